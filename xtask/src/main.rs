//! `cargo xtask …`: the project's commands, in Rust so they run wherever cargo does.
//!
//! - `crds [--check]` writes (or checks) `crds/manifests/` and the chart's `crds/`
//!   from the API types.
//! - `test` runs every test tier: formatting, clippy, unit and integration tests.
//! - `cluster up | down | status | env` runs a real Kubernetes control plane with
//!   simulated GPU nodes on loopback (see `cluster/mod.rs`).
//! - `bench trainer` measures LoRA training against PyTorch + PEFT (and QLoRA's
//!   memory, DPO's step time, full fine-tuning's data-parallel scaling with
//!   `--method`); `bench operator`
//!   measures the operator under 1,000 jobs (`bench.rs`).
//! - `images` builds the operator and trainer images as OCI archives (`images.rs`).
//! - `demo` runs kubetune's main job on a local cluster.

mod bench;
mod cluster;
mod crds;
mod debian;
mod demo;
mod images;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  crds [--check]   write crds/manifests/ and charts/kubetune/crds/ from the API
                   types (--check: fail on drift)
  test             run all tests: fmt, clippy, manifest drift, then unit and
                   integration tests against a local cluster (up before, down after)
  cluster up|down|status|env
                   a local Kubernetes (etcd, apiserver, controller manager,
                   scheduler, kwok GPU nodes) on 127.0.0.1; `cluster help` for options
  bench trainer [ARGS]
                   LoRA training tokens/s and peak RSS against PyTorch + PEFT on the
                   same machine (ARGS go to the benchmark: --steps, --recompute,
                   --no-pytorch, --venv DIR, ...); --method qlora: NF4 base-weight
                   memory and step time against LoRA; --method dpo: DPO step time;
                   --method full: data-parallel full fine-tuning tokens/s and
                   scaling efficiency on 1, 2 and 4 CPU ranks (Gloo)
  bench operator [--jobs N] [--steady-seconds S]
                   1,000 LoRA FineTuneJobs at once on the local cluster: time until
                   every Job exists and every pod is bound, the operator's peak RSS,
                   reconciles per job per minute at steady state
  bench rollout [--max-unavailable N]
                   an adapter change across 10 replicas with real kubetune-serve
                   servers: time until every replica serves the new version, verified
  images           the operator (static) and trainer (CPU, with Gloo) images as
                   OCI archives in ~/.cache/kubetune/images/, FROM scratch with
                   buildah; no registry or engine
  demo             kubetune's whole job on the local cluster's real node: SmolLM2
                   imported from GGUF, a LoRA FineTuneJob with live progress, an
                   AdapterDeployment over two kubetune-serve replicas, and the base
                   model's and the adapter's answers (needs root; leaves the cluster up)
  demo --full      instead, a full fine-tune of SmolLM2 as a gang of two pods, one
                   rank each, on the real node: both ranks' progress, the job's
                   evaluation, cost and checkpoint (replaces the LoRA demo's state)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["crds"] => crds::write(&root()),
        ["crds", "--check"] => crds::check(&root()),
        ["test"] => test(),
        ["cluster", rest @ ..] => cluster::run(&root(), rest),
        ["images", rest @ ..] => images::run(&root(), rest),
        ["bench", "trainer", rest @ ..] => {
            let mut command = cargo();
            command.args(["run", "--release", "-p", "kubetune-trainer"]);
            // Full fine-tuning's scaling runs gangs of ranks: it needs Gloo.
            if rest.windows(2).any(|w| w == ["--method", "full"]) {
                command.args(["--features", "gloo"]);
            }
            command.args(["--example", "bench", "--"]).args(rest);
            step("the trainer benchmark", &mut command)
        }
        ["bench", "operator", rest @ ..] => bench::operator(&root(), rest),
        ["bench", "rollout", rest @ ..] => step(
            "the rollout benchmark",
            cargo()
                .args([
                    "run",
                    "-p",
                    "kubetune-e2e",
                    "--example",
                    "bench_rollout",
                    "--",
                ])
                .args(rest),
        ),
        ["bench", ..] => bail!(
            "no such benchmark; available: `cargo xtask bench trainer`, \
             `cargo xtask bench operator`, `cargo xtask bench rollout`"
        ),
        ["demo"] => demo::run(&root(), demo::Kind::Lora),
        ["demo", "--full"] => demo::run(&root(), demo::Kind::Full),
        ["help" | "--help" | "-h"] | [] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown command {:?}\n\n{USAGE}", args.join(" ")),
    }
}

/// The workspace root: xtask lives one level below it.
/// Cargo's target directory: `CARGO_TARGET_DIR`, else `target/` in the workspace.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

/// Runs a command to completion, failing with its name when it fails.
fn step(what: &str, command: &mut Command) -> Result<()> {
    println!("==> {what}");
    let status = command
        .status()
        .with_context(|| format!("failed to start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// The trainer's data-parallel training and its tests need Gloo (Debian's libgloo-dev,
/// which `.ci/run` and `cargo xtask images` install); the trainer images have it too.
pub(crate) const GLOO: &str = "kubetune-trainer/gloo";

fn test() -> Result<()> {
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--check"]),
    )?;
    step(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--features",
            GLOO,
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    crds::check(&root())?;
    println!("==> cargo xtask cluster up");
    cluster::up_for_tests(&root())?;
    // The integration tests fail rather than skip when the cluster is missing here.
    let mut test = cargo();
    test.args(["test", "--workspace", "--features", GLOO])
        .env("KUBETUNE_REQUIRE_CLUSTER", "1");
    // With the real node, the end-to-end test runs the dev images (the test build's
    // own binaries) on it.
    let imported = if cluster::has_real_node()? {
        images::build_dev(&root())
            .and_then(|archives| cluster::import_into_real_node(&archives))
            .map(|()| {
                test.env("KUBETUNE_REQUIRE_REAL_NODE", "1").env(
                    "KUBETUNE_E2E_IMAGE_TAG",
                    format!("{}-dev", env!("CARGO_PKG_VERSION")),
                );
            })
    } else {
        println!(
            "    no real node (not root, KUBETUNE_REAL_NODE=0, or it failed to start: see \
             above): the end-to-end test on it will skip"
        );
        Ok(())
    };
    let tested = imported.and_then(|()| step("cargo test", &mut test));
    if tested.is_err()
        && let Err(error) = cluster::keep_logs(&target_dir(&root()).join("cluster-logs"))
    {
        println!("    could not keep the cluster's logs: {error:#}");
    }
    println!("==> cargo xtask cluster down");
    let downed = cluster::down_for_tests();
    match (tested, downed) {
        (Ok(()), downed) => downed,
        (Err(error), Ok(())) => Err(error),
        (Err(error), Err(down_error)) => {
            Err(error.context(format!("and cluster down failed too: {down_error:#}")))
        }
    }
}

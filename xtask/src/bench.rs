//! `cargo xtask bench operator`: many LoRA FineTuneJobs at once against the local
//! cluster, and what the operator needs to handle them.
//!
//! This half sets the stage and cleans it up: enough simulated A100 nodes for every
//! job, a namespace with its claims, and the release build of the operator (one
//! namespace, no leader election, metrics on a free loopback port). The measuring half
//! is the `bench_operator` example of kubetune-e2e (API clients, watches, retries),
//! which prints the figures and their JSON line. Cleanup deletes what was added and
//! waits for the namespace to go, retrying a busy API server.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::cluster::components::free_port;
use crate::cluster::nodes::{self, Pool};
use crate::cluster::{self, Kubectl};

const NAMESPACE: &str = "kubetune-bench";
const NODE_PREFIX: &str = "bench-";
/// Bench nodes' pod CIDRs start at this /24 of 127.64.0.0/16, above `cluster up`'s.
const FIRST_NODE_INDEX: usize = 128;
const GPUS_PER_NODE: u32 = 8;

const USAGE: &str = "usage: cargo xtask bench operator [--jobs N] [--steady-seconds S]

  --jobs N            LoRA FineTuneJobs to create at once (default 1000, at most 1000)
  --steady-seconds S  how long to count reconciles once every job runs (default 120)

Needs a local cluster (`cargo xtask cluster up`).";

struct Options {
    jobs: usize,
    steady: Duration,
}

fn parse(args: &[&str]) -> Result<Options> {
    let mut options = Options {
        jobs: 1000,
        steady: Duration::from_secs(120),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| -> Result<u64> {
            let text = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            text.parse()
                .with_context(|| format!("{flag}: {text:?} is not a number"))
        };
        match *arg {
            "--jobs" => options.jobs = value("--jobs")? as usize,
            "--steady-seconds" => options.steady = Duration::from_secs(value("--steady-seconds")?),
            "help" | "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    // 128 bench nodes at most fit the loopback pod CIDRs above `cluster up`'s.
    if options.jobs == 0 || options.jobs > 1000 {
        bail!("--jobs must be 1 to 1000\n\n{USAGE}");
    }
    Ok(options)
}

/// Runs the benchmark.
pub fn operator(root: &Path, args: &[&str]) -> Result<()> {
    let options = parse(args)?;
    let kubectl = cluster::connect()?;

    println!("==> building the operator (release) and the measurement");
    for args in [
        &["build", "--release", "-p", "kubetune-operator"][..],
        &["build", "-p", "kubetune-e2e", "--example", "bench_operator"][..],
    ] {
        let status = crate::cargo()
            .current_dir(root)
            .args(args)
            .status()
            .context("failed to run cargo build")?;
        if !status.success() {
            bail!("cargo {} failed ({status})", args.join(" "));
        }
    }
    let binary = crate::target_dir(root).join("release/kubetune-operator");
    let measure = crate::target_dir(root).join("debug/examples/bench_operator");

    let bench = Bench {
        kubectl: &kubectl,
        nodes: options.jobs.div_ceil(GPUS_PER_NODE as usize),
    };
    // The measurement prints its JSON line itself, also when it fails; a failure
    // before it starts still leaves one.
    let result = match bench.set_up(root, &binary) {
        Ok(operator) => bench.measure(root, operator, &measure, &options),
        Err(error) => {
            println!(
                "{}",
                json!({ "jobs": options.jobs, "error": format!("{error:#}") })
            );
            Err(error)
        }
    };
    println!("==> cleaning up");
    if let Err(error) = bench.clean_up() {
        eprintln!("warning: cleaning up the benchmark failed: {error:#}");
    }
    result
}

struct Bench<'a> {
    kubectl: &'a Kubectl,
    nodes: usize,
}

/// The operator process, killed when dropped.
struct Operator {
    child: Child,
    pid: u32,
    metrics_port: u16,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bench<'_> {
    /// The nodes, the namespace with its claims, and the operator, running.
    fn set_up(&self, root: &Path, binary: &Path) -> Result<Operator> {
        println!(
            "==> {} simulated nodes of {GPUS_PER_NODE} A100s, namespace {NAMESPACE}",
            self.nodes
        );
        let pools = [Pool {
            count: self.nodes,
            gpus: GPUS_PER_NODE,
            product: "NVIDIA-A100-SXM4-80GB".into(),
        }];
        let nodes = nodes::manifests_at(&pools, NODE_PREFIX, FIRST_NODE_INDEX);
        self.kubectl_retrying(
            "create the benchmark's nodes",
            &["apply", "-f", "-"],
            Some(&nodes),
        )?;
        self.kubectl_retrying(
            "create the benchmark's namespace and claims",
            &["apply", "-f", "-"],
            Some(&storage_manifests()),
        )?;
        let operator = self.start_operator(root, binary)?;
        std::thread::sleep(Duration::from_secs(2));
        Ok(operator)
    }

    /// Runs the measuring half against `operator`, which is stopped afterwards.
    fn measure(
        &self,
        root: &Path,
        operator: Operator,
        measure: &Path,
        options: &Options,
    ) -> Result<()> {
        let status = Command::new(measure)
            .current_dir(root)
            .env("KUBECONFIG", self.kubectl.kubeconfig())
            .args([
                "--namespace",
                NAMESPACE,
                "--jobs",
                &options.jobs.to_string(),
                "--steady-seconds",
                &options.steady.as_secs().to_string(),
                "--operator-pid",
                &operator.pid.to_string(),
                "--metrics-port",
                &operator.metrics_port.to_string(),
            ])
            .status()
            .with_context(|| format!("failed to run {}", measure.display()))?;
        drop(operator);
        if !status.success() {
            bail!("the measurement failed ({status}); its figures so far are above");
        }
        Ok(())
    }

    fn start_operator(&self, root: &Path, binary: &Path) -> Result<Operator> {
        let metrics_port = free_port()?;
        let log_path = crate::target_dir(root).join("bench-operator.log");
        let log = File::create(&log_path)
            .with_context(|| format!("failed to create {}", log_path.display()))?;
        let child = Command::new(binary)
            .env("KUBECONFIG", self.kubectl.kubeconfig())
            .env("RUST_LOG", "warn")
            .args([
                "--namespace",
                NAMESPACE,
                "--leader-elect=false",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
                "--trainer-image",
                "kubetune/trainer:bench",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?;
        let pid = child.id();
        println!(
            "==> operator pid {pid}, metrics on 127.0.0.1:{metrics_port}, log {}",
            log_path.display()
        );
        Ok(Operator {
            child,
            pid,
            metrics_port,
        })
    }

    /// `kubectl args` (with `input` on stdin), tried up to five times with a growing
    /// pause: a loaded API server times out now and then.
    fn kubectl_retrying(&self, what: &str, args: &[&str], input: Option<&str>) -> Result<String> {
        let mut pause = Duration::from_secs(1);
        for _ in 1..5 {
            match self.kubectl.run(what, args, input) {
                Ok(out) => return Ok(out),
                Err(error) => {
                    eprintln!(
                        "warning: {what} failed, retrying in {}s: {error:#}",
                        pause.as_secs()
                    );
                    std::thread::sleep(pause);
                    pause *= 2;
                }
            }
        }
        self.kubectl.run(what, args, input)
    }

    /// Deletes what the benchmark added and waits for the namespace to be gone, so the
    /// next run starts clean; a busy API server is retried, not given up on.
    fn clean_up(&self) -> Result<()> {
        let mut failures = Vec::new();
        let names: Vec<String> = (0..self.nodes)
            .map(|i| format!("{NODE_PREFIX}a100-sxm4-80gb-{i}"))
            .collect();
        let mut nodes = vec!["delete", "nodes", "--ignore-not-found", "--wait=false"];
        nodes.extend(names.iter().map(String::as_str));
        let steps: [(&str, Vec<&str>); 3] = [
            (
                "delete the benchmark's namespace",
                vec![
                    "delete",
                    "namespace",
                    NAMESPACE,
                    "--wait=false",
                    "--ignore-not-found",
                ],
            ),
            (
                "delete the benchmark's volumes",
                vec![
                    "delete",
                    "persistentvolumes",
                    "--selector=kubetune.io/bench=true",
                    "--wait=false",
                ],
            ),
            ("delete the benchmark's nodes", nodes),
        ];
        for (what, args) in &steps {
            if let Err(error) = self.kubectl_retrying(what, args, None) {
                failures.push(format!("{error:#}"));
            }
        }
        // The namespace goes once its thousand FineTuneJobs, Jobs and pods are gone.
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let left = self.kubectl.run(
                "look for the benchmark's namespace",
                &[
                    "get",
                    "namespace",
                    NAMESPACE,
                    "--ignore-not-found",
                    "-o",
                    "name",
                ],
                None,
            );
            match left {
                Ok(out) if out.trim().is_empty() => break,
                _ if Instant::now() > deadline => {
                    failures.push(format!(
                        "namespace {NAMESPACE} still exists after 10 minutes"
                    ));
                    break;
                }
                _ => std::thread::sleep(Duration::from_secs(2)),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("{}", failures.join("\n"))
        }
    }
}

/// The namespace and the three claims the example names, pre-bound to volumes.
fn storage_manifests() -> String {
    let mut out = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n");
    for claim in ["models", "datasets", "adapters"] {
        let volume = format!("{NAMESPACE}-{claim}");
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {volume}\n  \
             labels:\n    kubetune.io/bench: \"true\"\nspec:\n  capacity:\n    storage: 1Gi\n  \
             accessModes: [ReadWriteOnce]\n  storageClassName: \"\"\n  \
             persistentVolumeReclaimPolicy: Delete\n  hostPath:\n    path: /tmp/{volume}\n  \
             claimRef:\n    namespace: {NAMESPACE}\n    name: {claim}\n\
             ---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {claim}\n  \
             namespace: {NAMESPACE}\nspec:\n  accessModes: [ReadWriteOnce]\n  \
             storageClassName: \"\"\n  volumeName: {volume}\n  resources:\n    requests:\n      \
             storage: 1Gi\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_bound_the_job_count() {
        assert_eq!(parse(&[]).expect("defaults").jobs, 1000);
        assert_eq!(parse(&["--jobs", "10"]).expect("parses").jobs, 10);
        assert!(parse(&["--jobs", "1001"]).is_err());
        assert!(parse(&["--jobs", "0"]).is_err());
    }
}

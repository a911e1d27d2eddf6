//! `cargo xtask bench operator`: many LoRA FineTuneJobs at once against the local
//! cluster, and what the operator needs to handle them.
//!
//! It adds enough simulated A100 nodes for every job, starts the release build of the
//! operator (one namespace, no leader election, metrics on a free loopback port),
//! creates the jobs, and measures: the time until every trainer Job exists, until every
//! pod is bound and until every job is Running; the operator's peak RSS; and, once
//! everything runs, reconciles per job per minute (from the operator's own
//! `kubetune_reconciles_total`). It removes what it added when it ends.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cluster::components::{free_port, http_get};
use crate::cluster::nodes::{self, Pool};
use crate::cluster::{self, Kubectl};

const NAMESPACE: &str = "kubetune-bench";
const NODE_PREFIX: &str = "bench-";
/// Bench nodes' pod CIDRs start at this /24 of 127.64.0.0/16, above `cluster up`'s.
const FIRST_NODE_INDEX: usize = 128;
const GPUS_PER_NODE: u32 = 8;

/// Targets on a 2-core machine (issue 4).
const TARGET_JOBS_CREATED_S: f64 = 30.0;
const TARGET_PEAK_RSS_MIB: f64 = 100.0;
const TARGET_RECONCILES_PER_JOB_PER_MIN: f64 = 1.0;

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

    println!("==> building the operator (release)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["build", "--release", "-p", "kubetune-operator"])
        .status()
        .context("failed to run cargo build")?;
    if !status.success() {
        bail!("building the operator failed ({status})");
    }
    let binary = crate::target_dir(root).join("release/kubetune-operator");

    let bench = Bench {
        kubectl: &kubectl,
        nodes: options.jobs.div_ceil(GPUS_PER_NODE as usize),
    };
    let result = bench.run(root, &binary, &options);
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

impl Operator {
    /// Peak and current resident memory, in MiB, from /proc.
    fn memory_mib(&self) -> Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("the operator exited")?;
        let field = |name: &str| -> Result<f64> {
            let line = status
                .lines()
                .find(|line| line.starts_with(name))
                .with_context(|| format!("no {name} in /proc/<pid>/status"))?;
            let kib: f64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("unreadable {line:?}"))?;
            Ok(kib / 1024.0)
        };
        Ok((field("VmHWM:")?, field("VmRSS:")?))
    }

    /// `kubetune_reconciles_total{controller="finetunejob"}`.
    fn reconciles(&self) -> Result<f64> {
        let (code, body) = http_get(self.metrics_port, "/metrics")
            .context("the operator's /metrics does not answer")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        body.lines()
            .find(|line| line.starts_with("kubetune_reconciles_total{controller=\"finetunejob\"}"))
            .and_then(|line| line.split_whitespace().last())
            .and_then(|value| value.parse().ok())
            .context("no kubetune_reconciles_total in /metrics")
    }
}

impl Bench<'_> {
    fn run(&self, root: &Path, binary: &Path, options: &Options) -> Result<()> {
        let jobs = options.jobs;
        println!(
            "==> {} simulated nodes of {GPUS_PER_NODE} A100s, namespace {NAMESPACE}",
            self.nodes
        );
        let pools = [Pool {
            count: self.nodes,
            gpus: GPUS_PER_NODE,
            product: "NVIDIA-A100-SXM4-80GB".into(),
        }];
        self.kubectl.run(
            "create the benchmark's nodes",
            &["create", "-f", "-"],
            Some(&nodes::manifests_at(&pools, NODE_PREFIX, FIRST_NODE_INDEX)),
        )?;
        self.kubectl.run(
            "create the benchmark's namespace and claims",
            &["create", "-f", "-"],
            Some(&storage_manifests()),
        )?;

        let operator = self.start_operator(root, binary)?;
        let manifests = job_manifests(root, jobs)?;
        std::thread::sleep(Duration::from_secs(2));

        println!("==> creating {jobs} FineTuneJobs");
        let started = Instant::now();
        self.create_in_parallel(&manifests, 4)?;
        let created = started.elapsed();
        println!("    created in {:.1}s", created.as_secs_f64());

        let jobs_created = self.wait_for_count("trainer Jobs", jobs, started, || {
            self.count(&["get", "jobs.batch", "-o", "name"], |line| {
                !line.is_empty()
            })
        })?;
        let pods_bound = self.wait_for_count("bound trainer pods", jobs, started, || {
            self.count(
                &[
                    "get",
                    "pods",
                    "-o",
                    "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}",
                ],
                |line| !line.is_empty(),
            )
        })?;
        let all_running = self.wait_for_count("Running FineTuneJobs", jobs, started, || {
            self.count(
                &[
                    "get",
                    "finetunejobs",
                    "-o",
                    "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}",
                ],
                |line| line == "Running",
            )
        })?;

        // Let the last status writes and the first progress reads settle, then count.
        std::thread::sleep(Duration::from_secs(30));
        let before = operator.reconciles()?;
        let window = Instant::now();
        println!(
            "==> counting reconciles for {}s at steady state",
            options.steady.as_secs()
        );
        std::thread::sleep(options.steady);
        let after = operator.reconciles()?;
        let minutes = window.elapsed().as_secs_f64() / 60.0;
        let rate = (after - before) / jobs as f64 / minutes;
        let (peak_rss, rss) = operator.memory_mib()?;

        let figures = Figures {
            jobs,
            finetunejobs_created_s: created.as_secs_f64(),
            jobs_created_s: jobs_created.as_secs_f64(),
            pods_bound_s: pods_bound.as_secs_f64(),
            all_running_s: all_running.as_secs_f64(),
            peak_rss_mib: peak_rss,
            rss_mib: rss,
            reconciles_per_job_per_min: rate,
        };
        figures.print();
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

    /// `kubectl create` of `manifests` split over `parallel` processes.
    fn create_in_parallel(&self, manifests: &[String], parallel: usize) -> Result<()> {
        let chunk = manifests.len().div_ceil(parallel);
        let children = manifests
            .chunks(chunk)
            .map(|docs| {
                let mut command = self.kubectl.command();
                command
                    .args(["create", "-f", "-", "-o", "name"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let mut child = command.spawn().context("failed to run kubectl")?;
                let input = docs.join("---\n");
                let mut pipe = child.stdin.take().context("kubectl's stdin")?;
                let writer = std::thread::spawn(move || {
                    use std::io::Write;
                    pipe.write_all(input.as_bytes())
                });
                Ok((child, writer))
            })
            .collect::<Result<Vec<_>>>()?;
        for (child, writer) in children {
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?
                .context("failed to write to kubectl")?;
            let output = child.wait_with_output()?;
            if !output.status.success() {
                bail!(
                    "kubectl create failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
        Ok(())
    }

    fn count(&self, args: &[&str], matches: impl Fn(&str) -> bool) -> Result<usize> {
        let mut full = vec!["--namespace", NAMESPACE];
        full.extend_from_slice(args);
        let out = self.kubectl.run("list benchmark objects", &full, None)?;
        Ok(out.lines().map(str::trim).filter(|l| matches(l)).count())
    }

    /// Polls `count` until it reaches `want`; the time since `started`.
    fn wait_for_count(
        &self,
        what: &str,
        want: usize,
        started: Instant,
        count: impl Fn() -> Result<usize>,
    ) -> Result<Duration> {
        let deadline = started + Duration::from_secs(600);
        loop {
            let have = count()?;
            if have >= want {
                let elapsed = started.elapsed();
                println!("    {want} {what} after {:.1}s", elapsed.as_secs_f64());
                return Ok(elapsed);
            }
            if Instant::now() > deadline {
                bail!("only {have} of {want} {what} after 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn clean_up(&self) -> Result<()> {
        let mut failures = Vec::new();
        for args in [
            vec![
                "delete",
                "namespace",
                NAMESPACE,
                "--wait=false",
                "--ignore-not-found",
            ],
            vec![
                "delete",
                "persistentvolumes",
                "--selector=kubetune.io/bench=true",
                "--wait=false",
            ],
        ] {
            if let Err(error) = self.kubectl.run("clean up", &args, None) {
                failures.push(format!("{error:#}"));
            }
        }
        let names: Vec<String> = (0..self.nodes)
            .map(|i| format!("{NODE_PREFIX}a100-sxm4-80gb-{i}"))
            .collect();
        let mut args = vec!["delete", "nodes", "--ignore-not-found", "--wait=false"];
        args.extend(names.iter().map(String::as_str));
        if let Err(error) = self
            .kubectl
            .run("delete the benchmark's nodes", &args, None)
        {
            failures.push(format!("{error:#}"));
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

/// `examples/lora-a100.yaml` `jobs` times, as JSON documents (YAML is a superset), with
/// pods that run until deleted.
fn job_manifests(root: &Path, jobs: usize) -> Result<Vec<String>> {
    let path = root.join("examples/lora-a100.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let example: Value =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
    (0..jobs)
        .map(|i| {
            let mut ftj = example.clone();
            ftj["metadata"] = json!({ "name": format!("bench-{i:04}"), "namespace": NAMESPACE });
            ftj["spec"]["podMetadata"] = json!({
                "annotations": { "sim.kubetune.io/outcome": "run" }
            });
            Ok(serde_json::to_string(&ftj)? + "\n")
        })
        .collect()
}

struct Figures {
    jobs: usize,
    finetunejobs_created_s: f64,
    jobs_created_s: f64,
    pods_bound_s: f64,
    all_running_s: f64,
    peak_rss_mib: f64,
    rss_mib: f64,
    reconciles_per_job_per_min: f64,
}

impl Figures {
    fn print(&self) {
        println!();
        println!(
            "{:<40} {:>10} {:>10} {:>8}",
            "figure", "measured", "target", "ratio"
        );
        let row = |name: &str, value: f64, target: Option<f64>| match target {
            Some(target) => println!(
                "{name:<40} {value:>10.2} {target:>10.2} {:>8.2}",
                value / target
            ),
            None => println!("{name:<40} {value:>10.2} {:>10} {:>8}", "-", "-"),
        };
        row(
            "FineTuneJobs created (s)",
            self.finetunejobs_created_s,
            None,
        );
        row(
            "every trainer Job exists (s)",
            self.jobs_created_s,
            Some(TARGET_JOBS_CREATED_S),
        );
        row("every pod bound (s)", self.pods_bound_s, None);
        row("every job Running (s)", self.all_running_s, None);
        row(
            "operator peak RSS (MiB)",
            self.peak_rss_mib,
            Some(TARGET_PEAK_RSS_MIB),
        );
        row("operator RSS at the end (MiB)", self.rss_mib, None);
        row(
            "reconciles per job per minute",
            self.reconciles_per_job_per_min,
            Some(TARGET_RECONCILES_PER_JOB_PER_MIN),
        );
        let json: BTreeMap<&str, Value> = BTreeMap::from([
            ("jobs", json!(self.jobs)),
            ("finetunejobs_created_s", round(self.finetunejobs_created_s)),
            ("jobs_created_s", round(self.jobs_created_s)),
            ("pods_bound_s", round(self.pods_bound_s)),
            ("all_running_s", round(self.all_running_s)),
            ("peak_rss_mib", round(self.peak_rss_mib)),
            ("rss_mib", round(self.rss_mib)),
            (
                "reconciles_per_job_per_min",
                round(self.reconciles_per_job_per_min),
            ),
            (
                "jobs_created_target_ratio",
                round(self.jobs_created_s / TARGET_JOBS_CREATED_S),
            ),
            (
                "peak_rss_target_ratio",
                round(self.peak_rss_mib / TARGET_PEAK_RSS_MIB),
            ),
        ]);
        println!("{}", json!(json));
    }
}

fn round(value: f64) -> Value {
    json!((value * 100.0).round() / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_manifests_are_the_example_renamed_with_running_pods() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("root");
        let docs = job_manifests(root, 3).expect("renders");
        assert_eq!(docs.len(), 3);
        let last: Value = serde_json::from_str(&docs[2]).expect("JSON");
        assert_eq!(last["metadata"]["name"], "bench-0002");
        assert_eq!(last["metadata"]["namespace"], NAMESPACE);
        assert_eq!(last["spec"]["method"], "lora");
        assert_eq!(
            last["spec"]["podMetadata"]["annotations"]["sim.kubetune.io/outcome"],
            "run"
        );
    }

    #[test]
    fn options_bound_the_job_count() {
        assert_eq!(parse(&[]).expect("defaults").jobs, 1000);
        assert_eq!(parse(&["--jobs", "10"]).expect("parses").jobs, 10);
        assert!(parse(&["--jobs", "1001"]).is_err());
        assert!(parse(&["--jobs", "0"]).is_err());
    }
}

//! The measuring half of `cargo xtask bench operator`: many LoRA FineTuneJobs at once,
//! created through the API, and how fast the operator (already running, started by
//! xtask) turns each into its trainer Job.
//!
//! Creation runs with bounded concurrency and retries timeouts, 429s and 5xx, so a
//! loaded 2-core machine slows the benchmark down instead of failing it. Each job's lag
//! is timed on this side, from its create call returning to a watch seeing its Job;
//! the client's own creation time is reported apart. Then, once every job runs: the
//! operator's reconciles per job per minute at steady state, its peak RSS and CPU
//! seconds (from /proc), and its API requests per job (its own
//! `kubetune_api_requests_total`). The last line is one JSON object with every figure,
//! printed also when a step fails, with the failure in `error`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kubetune_crds::finetunejob::FineTuneJob;
use kubetune_e2e::test_support::{Cluster, workspace_root};
use serde_json::{Value, json};

/// Creates in flight at once: enough to keep the API server busy, few enough not to
/// queue behind its max-in-flight limit on two cores.
const CONCURRENCY: usize = 16;
/// Tries of one create before the benchmark gives up on it.
const CREATE_TRIES: u32 = 8;
/// How long any one step may take.
const STEP_DEADLINE: Duration = Duration::from_secs(600);

/// Targets on a 2-core machine.
const TARGET_JOBS_CREATED_S: f64 = 30.0;
const TARGET_PEAK_RSS_MIB: f64 = 100.0;
const TARGET_RECONCILES_PER_JOB_PER_MIN: f64 = 1.0;

struct Options {
    namespace: String,
    jobs: usize,
    steady: Duration,
    operator_pid: u32,
    metrics_port: u16,
}

fn options() -> Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| -> Result<&str> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
            .with_context(|| format!("{flag} is required"))
    };
    Ok(Options {
        namespace: value("--namespace")?.to_owned(),
        jobs: value("--jobs")?.parse().context("--jobs")?,
        steady: Duration::from_secs(value("--steady-seconds")?.parse().context("--steady")?),
        operator_pid: value("--operator-pid")?.parse().context("--operator-pid")?,
        metrics_port: value("--metrics-port")?.parse().context("--metrics-port")?,
    })
}

/// Every figure; `None` until measured.
#[derive(Default)]
struct Figures {
    jobs: usize,
    client_create_s: Option<f64>,
    create_retries: u32,
    jobs_created_s: Option<f64>,
    lag_p50_s: Option<f64>,
    lag_p99_s: Option<f64>,
    lag_max_s: Option<f64>,
    pods_bound_s: Option<f64>,
    all_running_s: Option<f64>,
    api_requests_per_job: Option<f64>,
    reconciles_per_job_per_min: Option<f64>,
    peak_rss_mib: Option<f64>,
    cpu_seconds: Option<f64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = options()?;
    let mut figures = Figures {
        jobs: options.jobs,
        ..Figures::default()
    };
    let outcome = run(&options, &mut figures).await;
    // Whatever happened, what the operator used so far.
    if let Ok((peak, cpu)) = process_usage(options.operator_pid) {
        figures.peak_rss_mib = Some(peak);
        figures.cpu_seconds = Some(cpu);
    }
    figures.print(outcome.as_ref().err());
    outcome
}

async fn run(options: &Options, figures: &mut Figures) -> Result<()> {
    let Some(cluster) = Cluster::find("bench operator").await else {
        bail!("no cluster: start one with `cargo xtask cluster up`");
    };
    let client = cluster.client.clone();
    let ns = options.namespace.as_str();
    let manifests = job_manifests(options.jobs)?;
    let requests_before = api_requests(options.metrics_port).await?;

    // Jobs as the watch first sees them, by their FineTuneJob (the owner).
    let seen: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let watch = {
        let seen = seen.clone();
        let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
        tokio::spawn(async move {
            let mut events = watcher(jobs, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                let (watcher::Event::Apply(job) | watcher::Event::InitApply(job)) = (match event {
                    Ok(event) => event,
                    Err(_) => continue,
                }) else {
                    continue;
                };
                let owner = job
                    .metadata
                    .owner_references
                    .unwrap_or_default()
                    .into_iter()
                    .find(|o| o.kind == "FineTuneJob");
                if let Some(owner) = owner {
                    seen.lock()
                        .expect("not poisoned")
                        .entry(owner.name)
                        .or_insert_with(Instant::now);
                }
            }
        })
    };

    println!(
        "==> creating {} FineTuneJobs, {CONCURRENCY} at a time",
        options.jobs
    );
    let started = Instant::now();
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), ns);
    let created: Vec<(String, Instant, u32)> = stream::iter(manifests)
        .map(|ftj| create(&api, ftj))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    figures.client_create_s = Some(started.elapsed().as_secs_f64());
    figures.create_retries = created.iter().map(|(_, _, retries)| retries).sum();
    println!(
        "    created in {:.1}s ({} retries)",
        started.elapsed().as_secs_f64(),
        figures.create_retries
    );

    let all_seen = wait(
        "trainer Jobs",
        started,
        || {
            let n = seen.lock().expect("not poisoned").len();
            async move { Ok(n) }
        },
        options.jobs,
    )
    .await?;
    figures.jobs_created_s = Some(all_seen);
    watch.abort();
    let lags = {
        let seen = seen.lock().expect("not poisoned");
        let mut lags: Vec<f64> = created
            .iter()
            .filter_map(|(name, at, _)| {
                let job = seen.get(name)?;
                Some(job.saturating_duration_since(*at).as_secs_f64())
            })
            .collect();
        lags.sort_by(f64::total_cmp);
        lags
    };
    figures.lag_p50_s = percentile(&lags, 0.50);
    figures.lag_p99_s = percentile(&lags, 0.99);
    figures.lag_max_s = lags.last().copied();

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let bound = || {
        count(&pods, |p: &Pod| {
            p.spec.as_ref().is_some_and(|s| s.node_name.is_some())
        })
    };
    figures.pods_bound_s = Some(wait("bound trainer pods", started, bound, options.jobs).await?);
    let running = || {
        count(&api, |f: &FineTuneJob| {
            f.status
                .as_ref()
                .is_some_and(|s| s.phase == kubetune_crds::Phase::Running)
        })
    };
    figures.all_running_s =
        Some(wait("Running FineTuneJobs", started, running, options.jobs).await?);
    let requests = api_requests(options.metrics_port).await? - requests_before;
    figures.api_requests_per_job = Some(requests / options.jobs as f64);

    // Let the last status writes and the first progress reads settle, then count.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let before = reconciles(options.metrics_port).await?;
    let window = Instant::now();
    println!(
        "==> counting reconciles for {}s at steady state",
        options.steady.as_secs()
    );
    tokio::time::sleep(options.steady).await;
    let after = reconciles(options.metrics_port).await?;
    let minutes = window.elapsed().as_secs_f64() / 60.0;
    figures.reconciles_per_job_per_min = Some((after - before) / options.jobs as f64 / minutes);
    Ok(())
}

/// Creates one FineTuneJob, retrying what a loaded API server answers; its name, when
/// it existed, and the retries it took. A 409 after a retry means an earlier try
/// landed.
async fn create(api: &Api<FineTuneJob>, ftj: FineTuneJob) -> Result<(String, Instant, u32)> {
    let name = ftj.metadata.name.clone().unwrap_or_default();
    let mut delay = Duration::from_millis(200);
    for attempt in 0..CREATE_TRIES {
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            api.create(&PostParams::default(), &ftj),
        )
        .await;
        match answer {
            Ok(Ok(_)) => return Ok((name, Instant::now(), attempt)),
            Ok(Err(kube::Error::Api(status))) if status.code == 409 && attempt > 0 => {
                return Ok((name, Instant::now(), attempt));
            }
            Ok(Err(error)) if !retryable(&error) => {
                return Err(error).with_context(|| format!("creating {name}"));
            }
            Ok(Err(_)) | Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    bail!("creating {name} failed {CREATE_TRIES} times")
}

/// Whether a loaded API server may answer differently to the same request later.
fn retryable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        // Connection resets, timeouts and the like.
        _ => true,
    }
}

/// `call`, retried like a create, for the benchmark's own reads.
async fn retrying<T, F, Fut>(call: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    let mut delay = Duration::from_millis(200);
    for _ in 1..CREATE_TRIES {
        match tokio::time::timeout(Duration::from_secs(30), call()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) if !retryable(&error) => return Err(error.into()),
            _ => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    Ok(tokio::time::timeout(Duration::from_secs(30), call()).await??)
}

/// How many of `api`'s objects are `matching`, listed with retries.
async fn count<K>(api: &Api<K>, matching: impl Fn(&K) -> bool) -> Result<usize>
where
    K: Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let params = ListParams::default();
    let list = retrying(|| api.list(&params)).await?;
    Ok(list.items.iter().filter(|item| matching(item)).count())
}

/// Polls `count` until it reaches `want`: the seconds since `started`.
async fn wait<F, Fut>(what: &str, started: Instant, count: F, want: usize) -> Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<usize>>,
{
    let deadline = Instant::now() + STEP_DEADLINE;
    loop {
        let have = count().await?;
        if have >= want {
            let elapsed = started.elapsed().as_secs_f64();
            println!("    {want} {what} after {elapsed:.1}s");
            return Ok(elapsed);
        }
        if Instant::now() > deadline {
            bail!(
                "only {have} of {want} {what} after {} s",
                STEP_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The `q` quantile of sorted `values` (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// The sum of a counter family's samples in the operator's `/metrics`.
async fn counter(port: u16, name: &str) -> Result<f64> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .context("the operator's /metrics does not answer")?
        .text()
        .await?;
    let total = body
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    Ok(total)
}

async fn api_requests(port: u16) -> Result<f64> {
    counter(port, "kubetune_api_requests_total").await
}

async fn reconciles(port: u16) -> Result<f64> {
    counter(
        port,
        "kubetune_reconciles_total{controller=\"finetunejob\"}",
    )
    .await
}

/// The operator's peak resident memory in MiB and CPU seconds (user + system), from
/// /proc (the kernel counts CPU time in USER_HZ, 100 a second on Linux).
fn process_usage(pid: u32) -> Result<(f64, f64)> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("the operator exited")?;
    let peak_kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("no VmHWM in /proc/<pid>/status")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and
    // 15th of the whole line.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .context("unreadable /proc/<pid>/stat")
    };
    Ok((peak_kib / 1024.0, (ticks(11)? + ticks(12)?) / 100.0))
}

/// `examples/lora-a100.yaml` `jobs` times, renamed, with simulated pods that run until
/// deleted.
fn job_manifests(jobs: usize) -> Result<Vec<FineTuneJob>> {
    let path = workspace_root().join("examples/lora-a100.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let example: Value =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
    (0..jobs)
        .map(|i| {
            let mut ftj = example.clone();
            ftj["metadata"] = json!({ "name": format!("bench-{i:04}") });
            ftj["spec"]["podMetadata"] = json!({
                "annotations": { "sim.kubetune.io/outcome": "run" }
            });
            Ok(serde_json::from_value(ftj)?)
        })
        .collect()
}

impl Figures {
    fn print(&self, error: Option<&anyhow::Error>) {
        println!();
        println!(
            "{:<44} {:>10} {:>10} {:>8}",
            "figure", "measured", "target", "ratio"
        );
        let row = |name: &str, value: Option<f64>, target: Option<f64>| {
            let shown = value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
            match (value, target) {
                (Some(value), Some(target)) => println!(
                    "{name:<44} {shown:>10} {target:>10.2} {:>8.2}",
                    value / target
                ),
                _ => println!("{name:<44} {shown:>10} {:>10} {:>8}", "-", "-"),
            }
        };
        row(
            "FineTuneJobs created, client side (s)",
            self.client_create_s,
            None,
        );
        row(
            "every trainer Job exists (s)",
            self.jobs_created_s,
            Some(TARGET_JOBS_CREATED_S),
        );
        row("operator lag create -> Job, p50 (s)", self.lag_p50_s, None);
        row("operator lag create -> Job, p99 (s)", self.lag_p99_s, None);
        row("operator lag create -> Job, max (s)", self.lag_max_s, None);
        row("every pod bound (s)", self.pods_bound_s, None);
        row("every job Running (s)", self.all_running_s, None);
        row(
            "operator API requests per job",
            self.api_requests_per_job,
            None,
        );
        row(
            "reconciles per job per minute, steady",
            self.reconciles_per_job_per_min,
            Some(TARGET_RECONCILES_PER_JOB_PER_MIN),
        );
        row(
            "operator peak RSS (MiB)",
            self.peak_rss_mib,
            Some(TARGET_PEAK_RSS_MIB),
        );
        row("operator CPU (s)", self.cpu_seconds, None);
        let round = |v: Option<f64>| v.map(|v| json!((v * 1000.0).round() / 1000.0));
        let mut line = json!({
            "jobs": self.jobs,
            "create_retries": self.create_retries,
            "client_create_s": round(self.client_create_s),
            "jobs_created_s": round(self.jobs_created_s),
            "operator_lag_p50_s": round(self.lag_p50_s),
            "operator_lag_p99_s": round(self.lag_p99_s),
            "operator_lag_max_s": round(self.lag_max_s),
            "pods_bound_s": round(self.pods_bound_s),
            "all_running_s": round(self.all_running_s),
            "api_requests_per_job": round(self.api_requests_per_job),
            "reconciles_per_job_per_min": round(self.reconciles_per_job_per_min),
            "operator_peak_rss_mib": round(self.peak_rss_mib),
            "operator_cpu_s": round(self.cpu_seconds),
            "jobs_created_target_ratio": round(self.jobs_created_s.map(|v| v / TARGET_JOBS_CREATED_S)),
            "peak_rss_target_ratio": round(self.peak_rss_mib.map(|v| v / TARGET_PEAK_RSS_MIB)),
        });
        if let Some(error) = error {
            line["error"] = json!(format!("{error:#}"));
        }
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), Some(50.0));
        assert_eq!(percentile(&values, 0.99), Some(99.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn job_manifests_are_the_example_renamed_with_running_pods() {
        let jobs = job_manifests(3).expect("renders");
        assert_eq!(jobs[2].metadata.name.as_deref(), Some("bench-0002"));
        let annotations = &jobs[2].spec.pod_metadata.as_ref().expect("set").annotations;
        assert_eq!(annotations["sim.kubetune.io/outcome"], "run");
    }
}

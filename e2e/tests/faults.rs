//! The operator under faults, each test with the figures it measured.
//!
//! The operator here runs in-process and is "killed" by aborting its task: its
//! in-flight requests are dropped mid-way and nothing is flushed, as when its pod is
//! OOM-killed or its node goes. Its own test binary, so that the 200 jobs have the
//! cluster's simulated GPUs to themselves, and its tests take turns ([`SERIAL`]): one
//! of them pauses the API server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::api::{Api, ListParams, PostParams};
use kube::core::ObjectMeta;
use kubetune_crds::finetunejob::{FineTuneJob, Phase};
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::jobs::{
    create_prices, example, namespace, ran_seconds, start_operator, start_pricing_operator,
};
use kubetune_e2e::test_support::{state_dir, wait_for};
use kubetune_operator::server::{self, Shared};

/// The tests of this binary run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const JOBS: usize = 200;
const KILLS: usize = 20;

/// On-demand and spot rates, in ten-thousandths per GPU-hour, of both products.
const PRICES: &str = "currency: USD\n\
gpuHourly:\n  NVIDIA-A100-SXM4-80GB: {onDemand: \"3.60\", spot: \"1.80\"}\n  \
NVIDIA-H100-80GB-HBM3: {onDemand: \"4.00\", spot: \"2.00\"}\n\
defaultGpuHourly: {onDemand: \"4.00\", spot: \"2.00\"}\n";

fn rate(product: &str, spot: bool) -> u64 {
    match (product, spot) {
        ("NVIDIA-A100-SXM4-80GB", false) => 36_000,
        ("NVIDIA-A100-SXM4-80GB", true) => 18_000,
        (_, false) => 40_000,
        (_, true) => 20_000,
    }
}

/// A small xorshift: the kill times vary from run to run, and the seed is printed so
/// a failing run can be replayed.
struct Random(u64);

impl Random {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

fn owned_by_a_job(meta: &ObjectMeta, jobs: &BTreeMap<String, String>) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|owner| owner.kind == "FineTuneJob" && jobs.get(&owner.name) == Some(&owner.uid))
}

#[tokio::test]
async fn operator_killed_twenty_times_while_200_jobs_run_creates_each_job_once_and_counts_cost_once()
-> Result<()> {
    let cluster = cluster_or_skip!(
        "operator_killed_twenty_times_while_200_jobs_run_creates_each_job_once_and_counts_cost_once"
    );
    let _turn = SERIAL.lock().await;
    let namespace = namespace(&cluster, "faults", &["models", "datasets", "adapters"]).await?;
    create_prices(&namespace, PRICES).await?;
    let ftjs: Api<FineTuneJob> = namespace.api();

    // Half on A100s (32 of them: they run in waves), half on H100s.
    let manifests = (0..JOBS)
        .map(|i| {
            let mut ftj = example(
                "lora-a100.yaml",
                &[("outcome", "succeed"), ("run-for", "6s")],
            )?;
            ftj.metadata.name = Some(format!("fault-{i:03}"));
            if i % 2 == 1
                && let Some(gpu) = ftj.spec.resources.gpu.as_mut()
            {
                gpu.product = "NVIDIA-H100-80GB-HBM3".into();
            }
            Ok(ftj)
        })
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    stream::iter(manifests)
        .map(|ftj| {
            let ftjs = ftjs.clone();
            async move { ftjs.create(&PostParams::default(), &ftj).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;

    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    eprintln!("kill times from seed {seed}");
    let mut random = Random(seed);
    for _ in 0..KILLS {
        let operator = start_pricing_operator(&cluster, &namespace);
        tokio::time::sleep(Duration::from_millis(300 + random.next(2_700))).await;
        drop(operator);
        tokio::time::sleep(Duration::from_millis(random.next(1_000))).await;
    }
    let killed_after = started.elapsed();
    let _operator = start_pricing_operator(&cluster, &namespace);

    let deadline = Instant::now() + Duration::from_secs(420);
    let done = loop {
        let list = ftjs.list(&ListParams::default()).await?.items;
        let succeeded = list
            .iter()
            .filter(|f| {
                f.status
                    .as_ref()
                    .is_some_and(|s| s.phase == Phase::Succeeded)
            })
            .count();
        if succeeded == JOBS {
            break list;
        }
        ensure!(
            Instant::now() < deadline,
            "{succeeded} of {JOBS} jobs Succeeded after {} s",
            started.elapsed().as_secs()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let all_done = started.elapsed();

    let uids: BTreeMap<String, String> = done
        .iter()
        .map(|f| {
            (
                f.metadata.name.clone().unwrap_or_default(),
                f.metadata.uid.clone().unwrap_or_default(),
            )
        })
        .collect();
    let jobs: Vec<Job> = namespace
        .api::<Job>()
        .list(&ListParams::default())
        .await?
        .items;
    let config_maps: Vec<ConfigMap> = namespace
        .api::<ConfigMap>()
        .list(&ListParams::default())
        .await?
        .items;
    let services: Vec<Service> = namespace
        .api::<Service>()
        .list(&ListParams::default())
        .await?
        .items;
    let pods: Vec<Pod> = namespace
        .api::<Pod>()
        .list(&ListParams::default())
        .await?
        .items;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let spot_nodes: BTreeSet<String> = nodes
        .list(&ListParams::default().labels("karpenter.sh/capacity-type=spot"))
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();

    // Exactly one Job per FineTuneJob, one attempt each, and no child without its owner.
    let mut per_owner: BTreeMap<String, usize> = BTreeMap::new();
    for job in &jobs {
        for owner in job.metadata.owner_references.iter().flatten() {
            *per_owner.entry(owner.name.clone()).or_default() += 1;
        }
    }
    let duplicates: Vec<_> = per_owner.iter().filter(|(_, n)| **n > 1).collect();
    let restarted: Vec<_> = done
        .iter()
        .filter(|f| {
            f.status
                .as_ref()
                .is_some_and(|s| s.attempts.len() != 1 || s.restarts != 0)
        })
        .filter_map(|f| f.metadata.name.clone())
        .collect();
    let orphans: Vec<String> = jobs
        .iter()
        .map(|j| &j.metadata)
        .chain(
            config_maps
                .iter()
                .map(|c| &c.metadata)
                .filter(|m| !matches!(m.name.as_deref(), Some("prices" | "kube-root-ca.crt"))),
        )
        .chain(services.iter().map(|s| &s.metadata))
        .filter(|meta| !owned_by_a_job(meta, &uids))
        .filter_map(|meta| meta.name.clone())
        .collect();

    // Cost: each job's ledger is its pod's running time at its node's rate, once.
    let mut miscounted = Vec::new();
    for ftj in &done {
        let name = ftj.metadata.name.clone().unwrap_or_default();
        let job = format!("{name}-a1");
        let pod = pods
            .iter()
            .find(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("batch.kubernetes.io/job-name"))
                    == Some(&job)
            })
            .with_context(|| format!("the pod of {job}"))?;
        let seconds = ran_seconds(pod)?;
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let product = ftj
            .spec
            .resources
            .gpu
            .as_ref()
            .map(|g| g.product.as_str())
            .unwrap_or("");
        let want = seconds * rate(product, spot_nodes.contains(&node));
        let cost = ftj.status.as_ref().and_then(|s| s.cost.as_ref());
        let got = cost.map(|c| {
            (
                c.attempts.len(),
                c.attempts
                    .first()
                    .map(|a| (a.usage_seconds(), a.rate_seconds)),
            )
        });
        if got != Some((1, Some((seconds, want)))) {
            miscounted.push(format!("{name}: {got:?}, pod ran {seconds} s on {node}"));
        }
    }

    eprintln!(
        "{JOBS} jobs, operator killed {KILLS} times in the first {:.1} s; all Succeeded after \
         {:.1} s; duplicate Jobs {}, restarted jobs {}, orphans {}, miscounted costs {}",
        killed_after.as_secs_f64(),
        all_done.as_secs_f64(),
        duplicates.len(),
        restarted.len(),
        orphans.len(),
        miscounted.len()
    );
    ensure!(
        jobs.len() == JOBS,
        "{} Jobs for {JOBS} FineTuneJobs",
        jobs.len()
    );
    ensure!(duplicates.is_empty(), "duplicate Jobs: {duplicates:?}");
    ensure!(
        restarted.is_empty(),
        "jobs restarted by the kills: {restarted:?}"
    );
    ensure!(
        orphans.is_empty(),
        "children without their FineTuneJob: {orphans:?}"
    );
    ensure!(
        miscounted.is_empty(),
        "cost not counted once:\n{}",
        miscounted.join("\n")
    );
    Ok(())
}

/// Creates the LoRA example as `name`, with a trainer that runs until deleted, and
/// waits for it to be Running.
async fn run_job(ftjs: &Api<FineTuneJob>, name: &str) -> Result<()> {
    let mut ftj = example("lora-a100.yaml", &[("outcome", "run")])?;
    ftj.metadata.name = Some(name.into());
    ftjs.create(&PostParams::default(), &ftj).await?;
    wait_for_running(ftjs, name, Duration::from_secs(120)).await
}

async fn wait_for_running(ftjs: &Api<FineTuneJob>, name: &str, within: Duration) -> Result<()> {
    wait_for(ftjs, name, within, |f| {
        f.status.as_ref().is_some_and(|s| s.phase == Phase::Running)
    })
    .await?;
    Ok(())
}

/// Job `name` still runs its first attempt: `what` did not disturb it.
async fn ensure_undisturbed(ftjs: &Api<FineTuneJob>, name: &str, what: &str) -> Result<()> {
    let status = ftjs.get(name).await?.status;
    ensure!(
        status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Running && s.restarts == 0),
        "the job that ran through {what} was disturbed: {:?}",
        status.map(|s| (s.phase, s.restarts))
    );
    Ok(())
}

/// The kube-apiserver's pid, from the state `cargo xtask cluster up` keeps.
fn apiserver_pid() -> Result<u32> {
    let path = state_dir()
        .context("no cluster state directory")?
        .join("state.json");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    state["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "kube-apiserver")
        .and_then(|p| p["pid"].as_u64())
        .and_then(|pid| u32::try_from(pid).ok())
        .with_context(|| format!("no kube-apiserver in {}", path.display()))
}

fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -{signal} {pid}: {status}");
    Ok(())
}

/// Resumes the API server when dropped, whatever the test did meanwhile.
struct Paused(u32);

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = signal(self.0, "CONT");
    }
}

/// Polls `shared`'s readiness until it is `ready`: the seconds it took.
async fn readiness_becomes(shared: &Shared, ready: bool, within: Duration) -> Result<f64> {
    let started = Instant::now();
    while (shared.readiness().0.is_success()) != ready {
        ensure!(
            started.elapsed() < within,
            "readiness still {:?} after {} s",
            shared.readiness(),
            within.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(started.elapsed().as_secs_f64())
}

#[tokio::test]
async fn api_server_paused_for_60_s_makes_the_operator_unready_and_it_recovers_by_itself()
-> Result<()> {
    let cluster = cluster_or_skip!(
        "api_server_paused_for_60_s_makes_the_operator_unready_and_it_recovers_by_itself"
    );
    let _turn = SERIAL.lock().await;
    let namespace = namespace(
        &cluster,
        "apiserver-pause",
        &["models", "datasets", "adapters"],
    )
    .await?;
    let ftjs: Api<FineTuneJob> = namespace.api();
    let operator = start_operator(&cluster, &namespace);
    let shared = Arc::new(Shared::new(Default::default()));
    shared
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let probe = tokio::spawn(server::probe_api(
        cluster.client.clone(),
        shared.clone(),
        Duration::from_secs(1),
    ));
    readiness_becomes(&shared, true, Duration::from_secs(30)).await?;
    run_job(&ftjs, "before").await?;

    let pid = apiserver_pid()?;
    signal(pid, "STOP")?;
    let paused = Paused(pid);
    let unready_after = readiness_becomes(&shared, false, Duration::from_secs(20)).await?;
    tokio::time::sleep(
        Duration::from_secs(60).saturating_sub(Duration::from_secs_f64(unready_after)),
    )
    .await;
    ensure!(
        !shared.readiness().0.is_success(),
        "ready while the API server is paused"
    );
    drop(paused);
    let resumed = Instant::now();
    let ready_after = readiness_becomes(&shared, true, Duration::from_secs(60)).await?;

    // The same operator, never restarted, picks up a job created after the outage.
    run_job(&ftjs, "after").await?;
    let recovered_after = resumed.elapsed().as_secs_f64();
    ensure!(
        !operator.is_finished(),
        "the operator stopped during the outage"
    );
    ensure_undisturbed(&ftjs, "before", "the outage").await?;
    probe.abort();
    // The node controller may have marked nodes unreachable when the server resumed;
    // the tests after this one find them healthy again.
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let healthy = |node: &Node| {
        !node
            .spec
            .iter()
            .flat_map(|s| s.taints.iter().flatten())
            .any(|t| {
                matches!(
                    t.key.as_str(),
                    "node.kubernetes.io/unreachable" | "node.kubernetes.io/not-ready"
                )
            })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .all(healthy)
    {
        ensure!(
            Instant::now() < deadline,
            "nodes still tainted unreachable after 120 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "API server paused 60 s: unready after {unready_after:.1} s, ready {ready_after:.1} s \
         after it resumed, a job created then Running {recovered_after:.1} s after it resumed; \
         the running job kept its attempt (0 restarts)"
    );
    Ok(())
}

#[tokio::test]
async fn a_trainer_pods_node_lost_restarts_the_job_as_a_new_attempt() -> Result<()> {
    let cluster = cluster_or_skip!("a_trainer_pods_node_lost_restarts_the_job_as_a_new_attempt");
    let _turn = SERIAL.lock().await;
    let namespace = namespace(&cluster, "node-lost", &["models", "datasets", "adapters"]).await?;
    let ftjs: Api<FineTuneJob> = namespace.api();
    let _operator = start_operator(&cluster, &namespace);
    run_job(&ftjs, "support-lora").await?;
    let pods: Api<Pod> = namespace.api();
    let first = pods
        .list(&ListParams::default().labels("batch.kubernetes.io/job-name=support-lora-a1"))
        .await?
        .items;
    let node_name = first
        .first()
        .and_then(|p| p.spec.as_ref()?.node_name.clone())
        .context("the trainer pod is bound")?;

    // The node goes away (a simulated node, deleted): kept to put back afterwards.
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let mut node = nodes.get(&node_name).await?;
    nodes.delete(&node_name, &Default::default()).await?;
    let lost = Instant::now();
    let outcome = wait_for(&ftjs, "support-lora", Duration::from_secs(180), |f| {
        f.status
            .as_ref()
            .is_some_and(|s| s.attempts.len() >= 2 && s.phase == Phase::Running)
    })
    .await;
    let restarted_after = lost.elapsed().as_secs_f64();
    node.metadata = ObjectMeta {
        name: node.metadata.name.take(),
        labels: node.metadata.labels.take(),
        annotations: node.metadata.annotations.take(),
        ..ObjectMeta::default()
    };
    // Its GPUs are in its status, which kwok does not fill in: keep capacity and
    // allocatable, drop the rest.
    node.status = node
        .status
        .take()
        .map(|status| k8s_openapi::api::core::v1::NodeStatus {
            capacity: status.capacity,
            allocatable: status.allocatable,
            ..Default::default()
        });
    nodes.create(&PostParams::default(), &node).await?;
    let restored = nodes.get(&node_name).await?;
    ensure!(
        restored
            .status
            .and_then(|s| s.allocatable)
            .is_some_and(|a| a.contains_key("nvidia.com/gpu")),
        "node {node_name} came back without its GPUs"
    );

    let status = outcome?.status.context("status")?;
    let ended = &status.attempts[0];
    ensure!(
        ended.reason.as_deref() == Some("NodeLost"),
        "attempt 1 ended with {:?} ({:?}), not NodeLost",
        ended.reason,
        ended.message
    );
    ensure!(status.restarts == 1, "restarts {}", status.restarts);
    let second = pods
        .list(&ListParams::default().labels("batch.kubernetes.io/job-name=support-lora-a2"))
        .await?
        .items;
    let second_node = second
        .first()
        .and_then(|p| p.spec.as_ref()?.node_name.clone())
        .context("attempt 2's pod is bound")?;
    ensure!(second_node != node_name, "attempt 2 ran on the lost node");
    eprintln!(
        "node {node_name} lost: attempt 1 ended NodeLost, attempt 2 Running on {second_node} \
         {restarted_after:.1} s after the node was deleted"
    );
    Ok(())
}

/// Kills the cluster component `name` (SIGKILL) and starts it again with the same
/// command line, working directory and log, detached like `cluster up` started it, and
/// records the new process in the cluster state so `cluster down` stops it. Returns
/// when the new process runs.
fn restart_component(name: &str) -> Result<()> {
    let dir = state_dir().context("no cluster state directory")?;
    let path = dir.join("state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let entry = state["processes"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .with_context(|| format!("no {name} in {}", path.display()))?;
    let pid = entry["pid"].as_u64().context("pid")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))?;
    signal(u32::try_from(pid)?, "KILL")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z"))
    {
        ensure!(Instant::now() < deadline, "{name} ({pid}) survived SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("logs").join(format!("{name}.log")))?;
    let child = std::process::Command::new("setsid")
        .args(&args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("failed to start {name} again"))?;
    let new_pid = child.id();
    let stat = std::fs::read_to_string(format!("/proc/{new_pid}/stat"))?;
    let start_time: u64 = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19)?.parse().ok())
        .context("the new process' start time")?;
    entry["pid"] = new_pid.into();
    entry["start_time"] = start_time.into();
    std::fs::write(&path, serde_json::to_string_pretty(&state)?)?;
    Ok(())
}

#[tokio::test]
async fn etcd_restarted_under_a_running_operator_loses_nothing_and_needs_no_operator_restart()
-> Result<()> {
    let cluster = cluster_or_skip!(
        "etcd_restarted_under_a_running_operator_loses_nothing_and_needs_no_operator_restart"
    );
    let _turn = SERIAL.lock().await;
    let namespace = namespace(
        &cluster,
        "etcd-restart",
        &["models", "datasets", "adapters"],
    )
    .await?;
    let ftjs: Api<FineTuneJob> = namespace.api();
    let operator = start_operator(&cluster, &namespace);
    run_job(&ftjs, "before").await?;

    let killed = Instant::now();
    restart_component("etcd")?;
    // The API server answers reads from etcd again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ftjs.get("before").await.is_err() {
        ensure!(
            Instant::now() < deadline,
            "the API server reads nothing 60 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let serving_after = killed.elapsed().as_secs_f64();

    let mut after = example("lora-a100.yaml", &[("outcome", "run")])?;
    after.metadata.name = Some("after".into());
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(error) = ftjs.create(&PostParams::default(), &after).await {
        ensure!(
            Instant::now() < deadline,
            "creating a job after the restart: {error}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for_running(&ftjs, "after", Duration::from_secs(120)).await?;
    let recovered_after = killed.elapsed().as_secs_f64();
    ensure!(
        !operator.is_finished(),
        "the operator stopped when etcd restarted"
    );
    ensure_undisturbed(&ftjs, "before", "the restart").await?;
    let jobs: Vec<Job> = namespace
        .api::<Job>()
        .list(&ListParams::default())
        .await?
        .items;
    ensure!(jobs.len() == 2, "{} Jobs for 2 FineTuneJobs", jobs.len());
    eprintln!(
        "etcd killed and restarted: the API server served again {serving_after:.1} s after \
         the kill, a job created then Running {recovered_after:.1} s after it; the running job \
         undisturbed (0 restarts), 2 Jobs for 2 jobs, the operator never restarted"
    );
    Ok(())
}

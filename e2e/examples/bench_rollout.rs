//! `cargo xtask bench rollout`: how long an adapter change takes to reach every replica.
//!
//! Ten serving pods on the local cluster's simulated nodes, a real `kubetune-serve` at
//! each pod's IP, and the AdapterDeployment controller. After the first version is
//! everywhere, the spec switches between two versions a few times; each round is timed
//! from the spec change until every server lists exactly the new version (checked on
//! the servers themselves, every 10 ms) and until the status says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kubetune_crds::adapterdeployment::{AdapterDeployment, AdapterDeploymentPhase};
use kubetune_e2e::serving::{
    Artifacts, Server, adapter_deployment, listed, serving_pod, start_server,
};
use kubetune_e2e::test_support::{Cluster, wait_for};
use kubetune_operator::adapterdeployment::controller;
use kubetune_operator::metrics::Metrics;
use serde_json::json;

const REPLICAS: usize = 10;
const ROUNDS: usize = 5;
const TARGET_S: f64 = 2.0;

#[tokio::main]
async fn main() -> Result<()> {
    let max_unavailable: u32 = std::env::args()
        .skip_while(|a| a != "--max-unavailable")
        .nth(1)
        .map(|v| v.parse().context("--max-unavailable takes a number"))
        .transpose()?
        .unwrap_or(2);
    let Some(cluster) = Cluster::find("bench rollout").await else {
        bail!("no cluster: start one with `cargo xtask cluster up`");
    };
    let namespace = cluster.namespace("bench-rollout").await?;
    let artifacts = Artifacts::new()?;
    let versions = [
        ("support-v1", artifacts.adapter("support-v1", 8, 1, None)?),
        ("support-v2", artifacts.adapter("support-v2", 8, 2, None)?),
    ];

    println!("==> {REPLICAS} serving pods with kubetune-serve at their IPs");
    let mut servers = Vec::new();
    for i in 0..REPLICAS {
        let ip = serving_pod(&namespace, &format!("serve-{i}")).await?;
        servers.push(start_server(&artifacts.model, &ip).await?);
    }
    let metrics = Arc::new(Metrics::register(&mut Default::default()));
    let operator = tokio::spawn(controller::run(
        cluster.client.clone(),
        vec![namespace.name.clone()],
        metrics,
    ));

    let adeps: Api<AdapterDeployment> = namespace.api();
    let rollout = json!({ "maxUnavailable": max_unavailable });
    let (path, sha) = &versions[0];
    adeps
        .create(
            &PostParams::default(),
            &adapter_deployment(artifacts.root(), path, sha, rollout)?,
        )
        .await?;
    wait_for(&adeps, "support", Duration::from_secs(120), |a| {
        a.status.as_ref().is_some_and(|s| {
            s.phase == AdapterDeploymentPhase::Available && s.updated_replicas == REPLICAS as u32
        })
    })
    .await?;

    println!("==> {ROUNDS} rollouts across {REPLICAS} replicas, maxUnavailable {max_unavailable}");
    let root = artifacts.root().to_string_lossy().into_owned();
    let mut servers_s = Vec::new();
    let mut status_s = Vec::new();
    for round in 0..ROUNDS {
        let (path, sha) = &versions[(round + 1) % 2];
        let want = vec![(format!("support-{}", &sha[..8]), format!("{root}/{path}"))];
        let patch = json!({ "spec": { "adapters": [
            { "name": "support", "artifact": { "path": path, "sha256": sha } }
        ]}});
        let started = Instant::now();
        adeps
            .patch("support", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        let on_servers = all_serve(&servers, &want, started).await?;
        let revision = round as u64 + 2;
        wait_for(&adeps, "support", Duration::from_secs(60), |a| {
            a.status.as_ref().is_some_and(|s| {
                s.revision == revision
                    && s.updated_replicas == REPLICAS as u32
                    && s.phase == AdapterDeploymentPhase::Available
            })
        })
        .await?;
        let in_status = started.elapsed();
        println!(
            "    round {}: every server verified after {:.3}s, status after {:.3}s",
            round + 1,
            on_servers.as_secs_f64(),
            in_status.as_secs_f64()
        );
        servers_s.push(on_servers.as_secs_f64());
        status_s.push(in_status.as_secs_f64());
    }
    operator.abort();

    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let servers_median = median(&mut servers_s);
    let status_median = median(&mut status_s);
    let worst = servers_s.iter().copied().fold(0.0, f64::max);
    println!();
    println!(
        "{:<48} {:>9} {:>8} {:>7}",
        "figure", "measured", "target", "ratio"
    );
    println!(
        "{:<48} {servers_median:>9.3} {TARGET_S:>8.2} {:>7.2}",
        "every replica verified, median (s)",
        servers_median / TARGET_S
    );
    println!(
        "{:<48} {worst:>9.3} {:>8} {:>7}",
        "every replica verified, worst (s)", "-", "-"
    );
    println!(
        "{:<48} {status_median:>9.3} {:>8} {:>7}",
        "status Available, median (s)", "-", "-"
    );
    println!(
        "{}",
        json!({
            "replicas": REPLICAS,
            "rounds": ROUNDS,
            "max_unavailable": max_unavailable,
            "rollout_verified_median_s": round3(servers_median),
            "rollout_verified_worst_s": round3(worst),
            "status_available_median_s": round3(status_median),
            "rollout_target_ratio": round3(servers_median / TARGET_S),
        })
    );
    Ok(())
}

/// Polls every server until each lists exactly `want`; the time since `started`.
async fn all_serve(
    servers: &[Server],
    want: &[(String, String)],
    started: Instant,
) -> Result<Duration> {
    loop {
        let mut done = true;
        for server in servers {
            if listed(server).await? != want {
                done = false;
                break;
            }
        }
        if done {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the servers did not all serve {want:?} within 60s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

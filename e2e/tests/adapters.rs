//! The AdapterDeployment controller against the real API server, with serving pods on
//! the simulated nodes and, at each pod's (loopback) IP, a real `kubetune-serve` — the
//! trainer image's vLLM-compatible adapter server — serving a tiny model. Adapters are
//! real PEFT adapters written by the trainer's own code.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kubetune_crds::adapterdeployment::{AdapterDeployment, AdapterDeploymentPhase};
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::serving::{
    Artifacts, adapter_deployment, complete, listed, serving_pod, start_server,
};
use kubetune_e2e::test_support::wait_for;
use kubetune_operator::adapterdeployment::controller;
use kubetune_operator::metrics::Metrics;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn degraded_reason(adep: &AdapterDeployment) -> Option<String> {
    adep.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| c.reason.clone())
}

#[tokio::test]
async fn adapters_roll_out_through_a_canary_verified_on_real_servers_and_a_bad_one_rolls_back()
-> Result<()> {
    let cluster = cluster_or_skip!(
        "adapters_roll_out_through_a_canary_verified_on_real_servers_and_a_bad_one_rolls_back"
    );
    let namespace = cluster.namespace("adep-rollout").await?;
    let artifacts = Artifacts::new()?;
    let good = artifacts.adapter("support-v1", 8, 1, None)?;
    // Trained on another base: every server refuses it.
    let broken = artifacts.adapter("support-v2", 8, 2, Some("meta-llama/Llama-3.1-8B"))?;

    let mut servers = Vec::new();
    let mut ips = Vec::new();
    for i in 0..6 {
        let ip = serving_pod(&namespace, &format!("serve-{i}")).await?;
        servers.push(start_server(&artifacts.model, &ip).await?);
        ips.push(ip);
    }
    let metrics = Arc::new(Metrics::register(&mut Default::default()));
    let operator = tokio::spawn(controller::run(
        cluster.client.clone(),
        vec![namespace.name.clone()],
        metrics,
    ));
    let _stop = scopeguard(operator);

    let adeps: Api<AdapterDeployment> = namespace.api();
    let root = artifacts.root().to_string_lossy().into_owned();
    adeps
        .create(
            &PostParams::default(),
            &adapter_deployment(
                artifacts.root(),
                "support-v1",
                &good,
                json!({ "maxUnavailable": 2, "canary": { "replicas": 1, "holdSeconds": 2 } }),
            )?,
        )
        .await?;
    let all = |n: u32| {
        move |a: &AdapterDeployment| {
            a.status.as_ref().is_some_and(|s| {
                s.phase == AdapterDeploymentPhase::Available
                    && s.replicas == n
                    && s.updated_replicas == n
            })
        }
    };
    let available = wait_for(&adeps, "support", TIMEOUT, all(6)).await?;
    let status = available.status.as_ref().context("status")?;
    let version = format!("support-{}", &good[..8]);
    let expected = vec![(version.clone(), format!("{root}/support-v1"))];
    assert_eq!(status.adapters[0].version, version);
    // (Not ready_replicas: on a starved machine the node lifecycle controller can mark
    // simulated pods NotReady, and kwok does not mark them Ready again.)
    assert_eq!(status.revision, 1);
    for server in &servers {
        assert_eq!(
            listed(server).await?,
            expected,
            "exactly the version, from its path"
        );
    }
    let base = artifacts.model.to_string_lossy().into_owned();
    assert_ne!(
        complete(&servers[0], &version).await?,
        complete(&servers[0], &base).await?,
        "the adapter changes the answer"
    );

    // A server that restarts empty gets its adapters back (on the resync: the pod
    // itself did not change), and a replica added later gets them too.
    servers.remove(2).shut_down().await?;
    servers.insert(2, start_server(&artifacts.model, &ips[2]).await?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while listed(&servers[2]).await? != expected {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "serve-2 was not restored"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ip = serving_pod(&namespace, "serve-6").await?;
    servers.push(start_server(&artifacts.model, &ip).await?);
    wait_for(&adeps, "support", TIMEOUT, all(7)).await?;
    assert_eq!(listed(&servers[6]).await?, expected);

    // A broken version: the canary's load fails and the rollout returns to v1.
    let patch = json!({ "spec": { "adapters": [
        { "name": "support", "artifact": { "path": "support-v2", "sha256": broken } }
    ]}});
    adeps
        .patch("support", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let rolled_back = wait_for(&adeps, "support", TIMEOUT, |a| {
        degraded_reason(a).as_deref() == Some("RolledBack")
            && a.status.as_ref().is_some_and(|s| s.updated_replicas == 7)
    })
    .await?;
    let status = rolled_back.status.as_ref().context("status")?;
    assert_eq!(status.adapters[0].version, version, "back on v1");
    assert_eq!(status.previous_revision, Some(2));
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .context("Degraded")?;
    assert!(
        degraded.message.contains("Llama-3.1-8B"),
        "the server's message: {}",
        degraded.message
    );
    for server in &servers {
        assert_eq!(
            listed(server).await?,
            expected,
            "no replica is left on the broken one"
        );
    }
    Ok(())
}

/// Aborts the controller task when the test ends.
fn scopeguard(task: tokio::task::JoinHandle<()>) -> impl Drop {
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    Abort(task)
}

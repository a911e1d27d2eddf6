//! Leader election on the real API server: two replicas, one leader, and a takeover
//! once the leader stops renewing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kubetune_e2e::cluster_or_skip;
use kubetune_operator::leader::Elector;

fn elector(api: &Api<Lease>, identity: &str) -> Elector {
    Elector {
        api: api.clone(),
        name: "kubetune-operator".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(500),
    }
}

#[tokio::test]
async fn only_one_replica_leads_and_another_takes_over_when_it_stops() -> Result<()> {
    let cluster = cluster_or_skip!("only_one_replica_leads_and_another_takes_over_when_it_stops");
    let namespace = cluster.namespace("leader").await?;
    let leases: Api<Lease> = namespace.api();
    let (first, second) = (elector(&leases, "replica-a"), elector(&leases, "replica-b"));

    assert!(
        first.try_acquire_or_renew().await?,
        "the first replica creates the Lease"
    );
    assert!(!second.try_acquire_or_renew().await?, "the second follows");

    let a_working = Arc::new(AtomicBool::new(false));
    let b_working = Arc::new(AtomicBool::new(false));
    let leader = {
        let working = a_working.clone();
        tokio::spawn(async move {
            first
                .run(async {
                    working.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                })
                .await
        })
    };
    let follower = {
        let working = b_working.clone();
        tokio::spawn(async move {
            second
                .run(async {
                    working.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(a_working.load(Ordering::SeqCst), "the leader works");
    assert!(
        !b_working.load(Ordering::SeqCst),
        "the follower waits while the Lease is renewed"
    );

    // The leader dies without releasing the Lease.
    leader.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !b_working.load(Ordering::SeqCst) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the follower did not take over an expired Lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lease = leases.get("kubetune-operator").await?;
    let spec = lease.spec.context("a Lease has a spec")?;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    follower.abort();
    Ok(())
}

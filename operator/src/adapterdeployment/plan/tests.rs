use super::*;
use kubetune_crds::adapterdeployment::{Adapter, ExplicitArtifact};
use kubetune_crds::finetunejob::{Artifact, Evaluation, FineTuneJobStatus};

use crate::test_support::finetunejob_from_example;

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).expect("valid timestamp")
}

const SHA_A: &str = "aaaaaaaa11111111aaaaaaaa11111111aaaaaaaa11111111aaaaaaaa11111111";
const SHA_B: &str = "bbbbbbbb22222222bbbbbbbb22222222bbbbbbbb22222222bbbbbbbb22222222";

/// The example, with one explicit adapter `support` at `sha` and the given rollout.
fn adep(sha: &str, canary: Option<(u32, u32)>, max_unavailable: u32) -> AdapterDeployment {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/adapter-deployment.yaml");
    let text = std::fs::read_to_string(path).expect("example");
    let mut adep: AdapterDeployment = serde_yaml::from_str(&text).expect("an AdapterDeployment");
    adep.metadata.generation = Some(1);
    adep.spec.adapters = vec![Adapter {
        name: "support".into(),
        from_job: None,
        artifact: Some(ExplicitArtifact {
            path: format!("support/{}", &sha[..4]),
            sha256: Some(sha.into()),
        }),
    }];
    adep.spec.rollout.max_unavailable = max_unavailable;
    adep.spec.rollout.canary =
        canary.map(
            |(replicas, hold_seconds)| kubetune_crds::adapterdeployment::Canary {
                replicas,
                hold_seconds,
            },
        );
    adep.spec.rollout.gate = None;
    adep
}

use std::path::Path;

fn pods(n: usize, holding: &[(usize, &AdapterVersion)]) -> Vec<ObservedPod> {
    (0..n)
        .map(|i| {
            let adapters = holding
                .iter()
                .filter(|(pod, _)| *pod == i)
                .map(|(_, v)| (v.version.clone(), v.path.clone()))
                .collect();
            ObservedPod {
                name: format!("serve-{i}"),
                ip: Some(format!("127.64.0.{}", i + 1)),
                ready: true,
                adapters: Some(adapters),
            }
        })
        .collect()
}

fn observe(adep: &AdapterDeployment, pods: Vec<ObservedPod>) -> Observed {
    Observed {
        sources: resolve(adep, &BTreeMap::new()),
        pods,
    }
}

fn synced(plan: &Plan) -> Vec<String> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::Sync { pod, .. } => Some(pod.clone()),
            Action::Smoke { .. } => None,
        })
        .collect()
}

fn with_status(mut adep: AdapterDeployment, plan: &Plan) -> AdapterDeployment {
    adep.status = Some(plan.status.clone());
    adep
}

fn version(adep: &AdapterDeployment) -> AdapterVersion {
    match &resolve(adep, &BTreeMap::new())[0].1 {
        Resolved::Ready(v) => v.clone(),
        other => panic!("not ready: {other:?}"),
    }
}

#[test]
fn every_version_has_its_own_name_and_path_from_the_mount() {
    let v = version(&adep(SHA_A, None, 1));
    assert_eq!(v.version, "support-aaaaaaaa");
    assert_eq!(v.path, "/adapters/support/aaaa");
    assert_ne!(version(&adep(SHA_B, None, 1)).version, v.version);
}

#[test]
fn without_a_canary_pods_are_loaded_max_unavailable_at_a_time_and_verified() {
    let a = adep(SHA_A, None, 2);
    let first = plan(&a, &observe(&a, pods(5, &[])), at(0));
    assert_eq!(first.status.revision, 1);
    assert_eq!(synced(&first), vec!["serve-0", "serve-1"]);
    let v = version(&a);
    assert!(matches!(
        &first.actions[0],
        Action::Sync { ops, .. } if ops == &vec![Op::Load { name: v.version.clone(), path: v.path.clone() }]
    ));
    assert_eq!(first.status.phase, AdapterDeploymentPhase::Progressing);

    // The servers now list it for pods 0 and 1: the next two follow.
    let a = with_status(a, &first);
    let second = plan(&a, &observe(&a, pods(5, &[(0, &v), (1, &v)])), at(2));
    assert_eq!(second.status.updated_replicas, 2);
    assert_eq!(synced(&second), vec!["serve-2", "serve-3"]);
    let a = with_status(a, &second);
    let all: Vec<(usize, &AdapterVersion)> = (0..5).map(|i| (i, &v)).collect();
    let done = plan(&a, &observe(&a, pods(5, &all)), at(4));
    assert!(done.actions.is_empty());
    assert_eq!(done.status.phase, AdapterDeploymentPhase::Available);
    assert_eq!((done.status.replicas, done.status.ready_replicas), (5, 5));
    assert!(
        done.transitions
            .iter()
            .any(|t| t.reason == "RolloutComplete")
    );
    assert_eq!(done.status.adapters, vec![v]);
}

#[test]
fn a_pod_that_restarts_or_scales_up_gets_the_set_and_drift_is_corrected() {
    let a = adep(SHA_A, None, 1);
    let v = version(&a);
    let settled = plan(&a, &observe(&a, pods(2, &[(0, &v), (1, &v)])), at(0));
    let a = with_status(a, &settled);
    // serve-1 restarted empty; serve-2 is new; serve-0 got an old version of ours.
    let old = AdapterVersion {
        version: "support-0badc0de".into(),
        path: "/adapters/old".into(),
        ..v.clone()
    };
    let mut observed = pods(3, &[(0, &v), (0, &old)]);
    observed[1].adapters = Some(BTreeMap::new());
    let drift = plan(&a, &observe(&a, observed), at(30));
    assert_eq!(drift.status.revision, 1, "no new revision for drift");
    assert_eq!(synced(&drift), vec!["serve-0"], "one at a time");
    assert!(matches!(
        &drift.actions[0],
        Action::Sync { ops, .. } if ops == &vec![Op::Unload { name: "support-0badc0de".into() }]
    ));
}

#[test]
fn a_version_loaded_from_other_files_is_reloaded() {
    let a = adep(SHA_A, None, 1);
    let v = version(&a);
    let stale = AdapterVersion {
        path: "/adapters/elsewhere".into(),
        ..v.clone()
    };
    let plan = plan(&a, &observe(&a, pods(1, &[(0, &stale)])), at(0));
    assert!(matches!(
        &plan.actions[0],
        Action::Sync { ops, .. } if ops[0] == Op::Unload { name: v.version.clone() }
            && ops[1] == Op::Load { name: v.version.clone(), path: v.path.clone() }
    ));
}

#[test]
fn the_canary_goes_first_holds_with_smoke_checks_then_the_rest_follow() {
    let a = adep(SHA_A, Some((1, 60)), 2);
    let v = version(&a);
    let first = plan(&a, &observe(&a, pods(4, &[])), at(0));
    assert_eq!(synced(&first), vec!["serve-0"], "only the canary");
    let a = with_status(a, &first);

    let hold = plan(&a, &observe(&a, pods(4, &[(0, &v)])), at(10));
    assert!(synced(&hold).is_empty(), "the rest wait for the hold");
    assert!(matches!(&hold.actions[0], Action::Smoke { pod, models, .. }
        if pod == "serve-0" && models == &vec![v.version.clone()]));
    assert_eq!(hold.status.canary_since, Some(Time(at(10))));
    let a = with_status(a, &hold);

    let still = plan(&a, &observe(&a, pods(4, &[(0, &v)])), at(50));
    assert!(synced(&still).is_empty());
    let after = plan(&a, &observe(&a, pods(4, &[(0, &v)])), at(71));
    assert_eq!(synced(&after), vec!["serve-1", "serve-2"]);
    assert!(after.transitions.iter().any(|t| t.reason == "CanaryPassed"));
}

#[test]
fn a_failed_load_rolls_back_to_the_previous_revision_and_is_not_retried() {
    // Revision 1 (SHA_A) is served everywhere.
    let a = adep(SHA_A, None, 1);
    let va = version(&a);
    let served = plan(&a, &observe(&a, pods(2, &[(0, &va), (1, &va)])), at(0));
    // The spec moves to SHA_B: revision 2 starts on serve-0.
    let b = with_status(adep(SHA_B, None, 1), &served);
    let vb = version(&b);
    let start = plan(&b, &observe(&b, pods(2, &[(0, &va), (1, &va)])), at(10));
    assert_eq!(start.status.revision, 2);
    assert_eq!(start.status.previous_revision, Some(1));
    assert_eq!(synced(&start), vec!["serve-0"]);

    // The executor records serve-0's failure with the server's message.
    let mut status = start.status.clone();
    status.pods[0].message = Some("500: LoRA rank 64 is greater than max_lora_rank 16.".into());
    let mut b = b;
    b.status = Some(status);
    let back = plan(&b, &observe(&b, pods(2, &[(0, &va), (1, &va)])), at(12));
    assert_eq!(back.status.revision, 3);
    assert_eq!(back.status.adapters, vec![va.clone()]);
    assert_eq!(back.status.phase, AdapterDeploymentPhase::Degraded);
    let degraded = conditions::get(&back.status.conditions, "Degraded").expect("set");
    assert_eq!(degraded.reason, "RolledBack");
    assert!(
        degraded.message.contains("max_lora_rank"),
        "{}",
        degraded.message
    );
    assert!(
        back.transitions
            .iter()
            .any(|t| t.reason == "RolledBack" && t.warning)
    );

    // The spec still names SHA_B: it is not tried again; pods keep the old version.
    let b = with_status(b, &back);
    let steady = plan(&b, &observe(&b, pods(2, &[(0, &va), (1, &va)])), at(14));
    assert_eq!(steady.status.revision, 3);
    assert!(steady.actions.is_empty(), "{:?}", steady.actions);
    assert_eq!(steady.status.phase, AdapterDeploymentPhase::Degraded);
    assert!(!steady.status.adapters.contains(&vb));
}

#[test]
fn without_rollback_a_failed_load_stops_the_rollout() {
    let mut a = adep(SHA_A, None, 1);
    a.spec.rollout.rollback_on_failure = false;
    let first = plan(&a, &observe(&a, pods(3, &[])), at(0));
    let mut status = first.status.clone();
    status.pods[0].message = Some("404: No adapter found for /adapters/support/aaaa".into());
    a.status = Some(status);
    let stopped = plan(&a, &observe(&a, pods(3, &[])), at(2));
    assert!(stopped.actions.is_empty());
    assert_eq!(stopped.status.phase, AdapterDeploymentPhase::Degraded);
    assert_eq!(
        conditions::get(&stopped.status.conditions, "Degraded").map(|c| c.reason.as_str()),
        Some("LoadFailed")
    );
}

fn job(name: &str, phase: Phase, improvement: Option<&str>) -> FineTuneJob {
    let mut ftj = finetunejob_from_example("lora-a100.yaml");
    ftj.metadata.name = Some(name.into());
    ftj.status = Some(FineTuneJobStatus {
        phase,
        artifact: (phase == Phase::Succeeded).then(|| Artifact {
            claim_name: "adapters".into(),
            path: "ml-team/support-lora".into(),
            sha256: SHA_B.into(),
            size_bytes: 1,
        }),
        evaluation: improvement.map(|i| Evaluation {
            improvement: Some(i.into()),
            ..Evaluation::default()
        }),
        ..FineTuneJobStatus::default()
    });
    ftj
}

fn from_job(gate: &str) -> AdapterDeployment {
    let mut a = adep(SHA_A, None, 1);
    a.spec.adapters = vec![Adapter {
        name: "support".into(),
        from_job: Some(kubetune_crds::adapterdeployment::JobRef {
            name: "support-lora".into(),
        }),
        artifact: None,
    }];
    a.spec.rollout.gate = Some(kubetune_crds::adapterdeployment::Gate {
        min_eval_loss_improvement: gate.parse().expect("decimal"),
    });
    a
}

#[test]
fn an_adapter_from_a_job_waits_for_it_and_must_pass_the_gate() {
    let a = from_job("0.05");
    let jobs = |j: FineTuneJob| BTreeMap::from([("support-lora".to_owned(), j)]);

    let running = resolve(&a, &jobs(job("support-lora", Phase::Running, None)));
    assert!(matches!(&running[0].1, Resolved::Waiting(why) if why.contains("Running")));
    let waiting = plan(
        &a,
        &Observed {
            sources: running,
            pods: pods(1, &[]),
        },
        at(0),
    );
    assert_eq!(waiting.status.revision, 0);
    assert!(waiting.actions.is_empty());

    let low = resolve(
        &a,
        &jobs(job("support-lora", Phase::Succeeded, Some("0.0200"))),
    );
    assert!(matches!(&low[0].1, Resolved::Blocked(why) if why.contains("below the gate")));
    let blocked = plan(
        &a,
        &Observed {
            sources: low,
            pods: pods(1, &[]),
        },
        at(0),
    );
    assert!(blocked.actions.is_empty(), "not rolled out");
    let resolved = conditions::get(&blocked.status.conditions, "AdaptersResolved").expect("set");
    assert_eq!(resolved.reason, "Blocked");
    assert!(resolved.message.contains("0.02"), "{}", resolved.message);

    let good = resolve(
        &a,
        &jobs(job("support-lora", Phase::Succeeded, Some("0.2500"))),
    );
    match &good[0].1 {
        Resolved::Ready(v) => {
            assert_eq!(v.version, "support-bbbbbbbb");
            assert_eq!(v.path, "/adapters/ml-team/support-lora");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_blocked_new_version_keeps_the_one_being_served() {
    let a = from_job("0.05");
    let jobs = |j: FineTuneJob| BTreeMap::from([("support-lora".to_owned(), j)]);
    let good = resolve(
        &a,
        &jobs(job("support-lora", Phase::Succeeded, Some("0.25"))),
    );
    let served = plan(
        &a,
        &Observed {
            sources: good,
            pods: pods(1, &[]),
        },
        at(0),
    );
    let a = with_status(a, &served);
    let blocked = resolve(&a, &jobs(job("support-lora", Phase::Failed, None)));
    let plan = plan(
        &a,
        &Observed {
            sources: blocked,
            pods: pods(1, &[]),
        },
        at(5),
    );
    assert_eq!(plan.status.revision, 1, "no new revision");
    assert_eq!(plan.status.adapters, served.status.adapters);
}

#[test]
fn removed_adapters_are_unloaded() {
    let a = adep(SHA_A, None, 1);
    let v = version(&a);
    let served = plan(&a, &observe(&a, pods(1, &[(0, &v)])), at(0));
    let mut a = with_status(a, &served);
    a.spec.adapters[0].name = "other".into();
    let next = plan(&a, &observe(&a, pods(1, &[(0, &v)])), at(5));
    assert_eq!(next.status.revision, 2);
    let Action::Sync { ops, .. } = &next.actions[0] else {
        panic!("{:?}", next.actions);
    };
    assert!(ops.contains(&Op::Unload {
        name: v.version.clone()
    }));
    assert!(
        ops.iter()
            .any(|op| matches!(op, Op::Load { name, .. } if name.starts_with("other-")))
    );
}

#[test]
fn an_artifact_path_outside_the_volume_is_blocked_and_never_sent() {
    for path in ["../team-b/support", "/etc/support", "support/../../x"] {
        let mut a = adep(SHA_A, None, 1);
        if let Some(artifact) = a.spec.adapters[0].artifact.as_mut() {
            artifact.path = path.into();
        }
        match &resolve(&a, &BTreeMap::new())[0].1 {
            Resolved::Blocked(why) => assert!(why.contains(path), "{why}"),
            other => panic!("{path} resolved to {other:?}"),
        }
    }
}

//! Which changes of a FineTuneJob's Job and pods are worth a reconcile.
//!
//! A Job's `ready` count and a pod's `Ready` condition change for reasons the planner
//! never looks at (a node heartbeat that lapsed, a readiness probe); with a thousand
//! jobs those updates are most of the reconciles. The watches pass on an object only
//! when the facts the planner reads from it change, and always on deletion.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use futures::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::watcher;

/// The stream of objects from `events` whose `facts` changed since last seen, and of
/// every deleted object.
pub fn changed<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    facts: fn(&K) -> u64,
) -> impl Stream<Item = Result<K, watcher::Error>>
where
    K: kube::Resource,
{
    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    events.filter_map(move |event| {
        let key = |object: &K| (object.namespace().unwrap_or_default(), object.name_any());
        let passed = match event {
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                let hash = facts(&object);
                (seen.insert(key(&object), hash) != Some(hash)).then_some(Ok(object))
            }
            Ok(watcher::Event::Delete(object)) => {
                seen.remove(&key(&object));
                Some(Ok(object))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(error) => Some(Err(error)),
        };
        std::future::ready(passed)
    })
}

/// What the planner reads of a Job: suspension, start, counts, conditions, deletion.
pub fn job_facts(job: &Job) -> u64 {
    let mut hasher = DefaultHasher::new();
    job.spec.as_ref().and_then(|s| s.suspend).hash(&mut hasher);
    job.metadata.deletion_timestamp.is_some().hash(&mut hasher);
    if let Some(status) = &job.status {
        status
            .start_time
            .as_ref()
            .map(|t| t.0.as_second())
            .hash(&mut hasher);
        (status.active, status.succeeded, status.failed).hash(&mut hasher);
        for condition in status.conditions.iter().flatten() {
            (&condition.type_, &condition.status).hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// What the planner and the ledger read of a trainer pod: phase, node, IP, the
/// containers' states, scheduling and disruption, deletion — not readiness.
pub fn pod_facts(pod: &Pod) -> u64 {
    let mut hasher = DefaultHasher::new();
    pod.metadata.deletion_timestamp.is_some().hash(&mut hasher);
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .hash(&mut hasher);
    if let Some(status) = &pod.status {
        (&status.phase, &status.pod_ip, &status.reason).hash(&mut hasher);
        for condition in status.conditions.iter().flatten() {
            if matches!(
                condition.type_.as_str(),
                "PodScheduled" | "DisruptionTarget"
            ) {
                (&condition.type_, &condition.status, &condition.reason).hash(&mut hasher);
            }
        }
        for container in status.container_statuses.iter().flatten() {
            container.name.hash(&mut hasher);
            let Some(state) = &container.state else {
                continue;
            };
            if let Some(running) = &state.running {
                (
                    "running",
                    running.started_at.as_ref().map(|t| t.0.as_second()),
                )
                    .hash(&mut hasher);
            }
            if let Some(terminated) = &state.terminated {
                ("terminated", terminated.exit_code, &terminated.reason).hash(&mut hasher);
            }
            if let Some(waiting) = &state.waiting {
                ("waiting", &waiting.reason).hash(&mut hasher);
            }
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ready: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "t-0", "namespace": "ns"},
            "spec": {"nodeName": "gpu-1", "containers": [{"name": "trainer"}]},
            "status": {"phase": phase, "podIP": "10.0.0.1", "conditions": [
                {"type": "Ready", "status": ready},
                {"type": "PodScheduled", "status": "True"},
            ]},
        }))
        .expect("a pod")
    }

    #[test]
    fn readiness_alone_is_no_change_but_the_phase_is() {
        assert_eq!(
            pod_facts(&pod("True", "Running")),
            pod_facts(&pod("False", "Running"))
        );
        assert_ne!(
            pod_facts(&pod("True", "Running")),
            pod_facts(&pod("True", "Failed"))
        );
    }

    #[tokio::test]
    async fn unchanged_objects_are_dropped_and_deletions_always_pass() {
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::InitApply(pod("True", "Running"))),
            Ok(watcher::Event::Apply(pod("False", "Running"))),
            Ok(watcher::Event::Apply(pod("False", "Failed"))),
            Ok(watcher::Event::Delete(pod("False", "Failed"))),
        ]);
        let passed: Vec<_> = changed(events, pod_facts).collect().await;
        let phases: Vec<String> = passed
            .into_iter()
            .map(|p| {
                p.expect("ok")
                    .status
                    .and_then(|s| s.phase)
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(phases, vec!["Running", "Failed", "Failed"]);
    }
}

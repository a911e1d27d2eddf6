//! What the reconciler saw of a FineTuneJob's trainer Job and pods, as plain data.
//!
//! The Kubernetes objects are translated once, here, into the few facts the planner
//! decides on: whether the attempt is active, complete or failed; which pods run where
//! and since when; and, for a failed pod, why, in the failure classes of the
//! trainer's exit-code contract.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kubetune_crds::conditions::reason;
use kubetune_crds::training::contract;

/// The extended resource of NVIDIA's device plugin.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// The annotation an Indexed Job puts on each pod: its index, which is its rank.
pub const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// Where the attempt's Job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Pods are pending or running.
    Active,
    /// Every index succeeded.
    Complete,
    /// The Job failed (one pod failure is enough: its backoffLimit is 0).
    Failed,
}

/// The current attempt's Job.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedJob {
    /// The Job's name.
    pub name: String,
    /// Whether the Job is suspended.
    pub suspended: bool,
    /// When the Job controller last started it: creation, or the latest unsuspension
    /// (by the operator on resume, or by Kueue on admission).
    pub started: Option<Timestamp>,
    /// Where it is.
    pub outcome: JobOutcome,
    /// Its pods.
    pub pods: Vec<ObservedPod>,
}

impl ObservedJob {
    /// Rank 0: the pod that serves progress and writes the result.
    pub fn rank_zero(&self) -> Option<&ObservedPod> {
        self.pods
            .iter()
            .find(|pod| pod.rank == Some(0))
            .or_else(|| (self.pods.len() == 1).then(|| &self.pods[0]))
    }
}

/// Why a trainer pod failed, in the classes the operator acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// The trainer exited with the invalid-input code: retrying cannot help.
    InvalidInput,
    /// Killed for exceeding its memory limit.
    OutOfMemory,
    /// Evicted by the kubelet (node pressure) or the eviction API.
    Evicted,
    /// Preempted by a higher-priority pod.
    Preempted,
    /// Its node went away.
    NodeLost,
    /// Any other non-zero exit: retryable by the contract.
    Error,
}

impl FailureClass {
    /// The reason recorded in status and events.
    pub fn reason(self) -> &'static str {
        match self {
            Self::InvalidInput => reason::INVALID_INPUT,
            Self::OutOfMemory => reason::OUT_OF_MEMORY,
            Self::Evicted => reason::EVICTED,
            Self::Preempted => reason::PREEMPTED,
            Self::NodeLost => reason::NODE_LOST,
            Self::Error => reason::TRAINER_ERROR,
        }
    }

    /// Whether a restart from the checkpoint can help.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::InvalidInput)
    }
}

/// A failed trainer pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Its class.
    pub class: FailureClass,
    /// The trainer's termination message, or what Kubernetes said.
    pub message: String,
}

/// One trainer pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedPod {
    /// The pod's name.
    pub name: String,
    /// The node it is bound to.
    pub node: Option<String>,
    /// Its rank: the Job's completion index.
    pub rank: Option<u32>,
    /// Its IP, once the network is set up.
    pub ip: Option<String>,
    /// When its trainer container started running, if it did.
    pub running_since: Option<Timestamp>,
    /// When its trainer container stopped, if it did.
    pub ended: Option<Timestamp>,
    /// GPUs it holds (the trainer container's `nvidia.com/gpu` limit).
    pub gpus: u64,
    /// CPU it requests, in millicores.
    pub cpu_millis: u64,
    /// Whether it runs now.
    pub running: bool,
    /// Why it failed, if it did.
    pub failure: Option<Failure>,
    /// Why it waits, if the scheduler or the kubelet says (Unschedulable, ImagePullFailed).
    pub waiting: Option<(&'static str, String)>,
    /// The trainer's termination message after it succeeded: its result as JSON.
    pub result: Option<String>,
}

/// The facts of a Job that matter to the planner.
pub fn job(job: &Job, pods: &[Pod]) -> ObservedJob {
    let status = job.status.as_ref();
    let has = |type_: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
    };
    let pods: Vec<ObservedPod> = pods.iter().map(pod).collect();
    // The trainer Job has backoffLimit 0: its first failed pod fails it. That pod's
    // failure is read as soon as it shows, while the pod exists: once the Job
    // controller has counted it, it lets the pod go (PodGC deletes a lost node's pods
    // at once), and a reconcile after that would know the Job failed but not why.
    let outcome = if has("Complete") {
        JobOutcome::Complete
    } else if has("Failed") || pods.iter().any(|pod| pod.failure.is_some()) {
        JobOutcome::Failed
    } else {
        JobOutcome::Active
    };
    ObservedJob {
        name: job.metadata.name.clone().unwrap_or_default(),
        suspended: job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false),
        started: status.and_then(|s| s.start_time.as_ref()).map(|t| t.0),
        outcome,
        pods,
    }
}

/// The facts of one trainer pod.
pub fn pod(pod: &Pod) -> ObservedPod {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let trainer = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "trainer"));
    let state = trainer.and_then(|c| c.state.as_ref());
    let running_since = state
        .and_then(|s| s.running.as_ref())
        .and_then(|r| r.started_at.as_ref())
        .or_else(|| {
            state
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.started_at.as_ref())
        })
        .map(|t| t.0);

    let disruption = status.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
        cs.iter()
            .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    });

    let failure = (phase == "Failed").then(|| {
        let terminated = state.and_then(|s| s.terminated.as_ref());
        let message = terminated
            .and_then(|t| t.message.clone())
            .filter(|m| !m.trim().is_empty())
            .or_else(|| status.and_then(|s| s.message.clone()))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let class = if let Some(condition) = disruption {
            match condition.reason.as_deref() {
                Some("PreemptionByScheduler") => FailureClass::Preempted,
                Some("DeletionByPodGC" | "DeletionByTaintManager") => FailureClass::NodeLost,
                _ => FailureClass::Evicted,
            }
        } else if status.and_then(|s| s.reason.as_deref()) == Some("Evicted") {
            FailureClass::Evicted
        } else if terminated.and_then(|t| t.reason.as_deref()) == Some("OOMKilled") {
            FailureClass::OutOfMemory
        } else if terminated.map(|t| t.exit_code) == Some(contract::EXIT_INVALID_INPUT) {
            FailureClass::InvalidInput
        } else {
            FailureClass::Error
        };
        Failure { class, message }
    });

    let waiting = if phase == "Pending" {
        let unschedulable = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| {
                cs.iter().find(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
            })
            .map(|c| (reason::UNSCHEDULABLE, c.message.clone().unwrap_or_default()));
        let pull = state
            .and_then(|s| s.waiting.as_ref())
            .filter(|w| {
                matches!(
                    w.reason.as_deref(),
                    Some("ErrImagePull" | "ImagePullBackOff" | "InvalidImageName")
                )
            })
            .map(|w| {
                (
                    reason::IMAGE_PULL_FAILED,
                    w.message.clone().unwrap_or_default(),
                )
            });
        unschedulable.or(pull)
    } else {
        None
    };

    let result = (phase == "Succeeded")
        .then(|| state.and_then(|s| s.terminated.as_ref()))
        .flatten()
        .and_then(|t| t.message.clone())
        .filter(|m| !m.trim().is_empty());
    let ended = state
        .and_then(|s| s.terminated.as_ref())
        .and_then(|t| t.finished_at.as_ref())
        .map(|t| t.0);
    let resources = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "trainer"))
        .and_then(|c| c.resources.as_ref());
    let gpus = resources
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get(GPU_RESOURCE))
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0);
    let cpu_millis = resources
        .and_then(|r| r.requests.as_ref())
        .and_then(|l| l.get("cpu"))
        .and_then(|q| crate::cost::millicores(&q.0))
        .unwrap_or(0);
    let rank = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(COMPLETION_INDEX))
        .and_then(|index| index.parse().ok());

    ObservedPod {
        name: pod.metadata.name.clone().unwrap_or_default(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        rank,
        ip: status.and_then(|s| s.pod_ip.clone()),
        running_since,
        ended,
        gpus,
        cpu_millis,
        running: phase == "Running",
        failure,
        waiting,
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_from(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("a valid pod")
    }

    fn terminated(exit_code: i32, reason: &str, message: &str) -> Pod {
        pod_from(json!({
            "metadata": {"name": "t-0"},
            "spec": {"nodeName": "gpu-1", "containers": [{"name": "trainer"}]},
            "status": {
                "phase": "Failed",
                "containerStatuses": [{
                    "name": "trainer", "image": "i", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"terminated": {
                        "exitCode": exit_code, "reason": reason, "message": message,
                        "startedAt": "2026-11-29T10:00:00Z", "finishedAt": "2026-11-29T10:05:00Z"
                    }}
                }]
            }
        }))
    }

    #[test]
    fn exit_code_two_is_invalid_input_with_the_trainers_message() {
        let observed = pod(&terminated(
            2,
            "Error",
            "train.jsonl:17: expected \"messages\"\n",
        ));
        let failure = observed.failure.expect("failed");
        assert_eq!(failure.class, FailureClass::InvalidInput);
        assert!(!failure.class.is_retryable());
        assert_eq!(failure.message, "train.jsonl:17: expected \"messages\"");
        assert_eq!(observed.node.as_deref(), Some("gpu-1"));
        assert!(observed.running_since.is_some());
    }

    #[test]
    fn other_exit_codes_and_oom_are_retryable() {
        let crash = pod(&terminated(1, "Error", "")).failure.expect("failed");
        assert_eq!(crash.class, FailureClass::Error);
        assert!(crash.class.is_retryable());
        let oom = pod(&terminated(137, "OOMKilled", ""))
            .failure
            .expect("failed");
        assert_eq!(oom.class, FailureClass::OutOfMemory);
    }

    /// A pod killed with exit code 143 and a DisruptionTarget condition of `reason`.
    fn disrupted(reason: &str) -> Pod {
        let mut p = terminated(143, "Error", "");
        p.status
            .as_mut()
            .expect("status")
            .conditions
            .get_or_insert_with(Vec::new)
            .push(
                serde_json::from_value(json!({
                    "type": "DisruptionTarget", "status": "True", "reason": reason
                }))
                .expect("condition"),
            );
        p
    }

    #[test]
    fn preemption_and_node_loss_are_read_from_the_disruption_condition() {
        for (reason, class) in [
            ("PreemptionByScheduler", FailureClass::Preempted),
            ("DeletionByPodGC", FailureClass::NodeLost),
            ("TerminationByKubelet", FailureClass::Evicted),
        ] {
            let p = disrupted(reason);
            assert_eq!(pod(&p).failure.expect("failed").class, class, "{reason}");
        }
    }

    #[test]
    fn a_failed_pod_fails_its_job_before_the_job_controller_says_so() {
        let lost = disrupted("DeletionByPodGC");
        let active: Job = serde_json::from_value(json!({
            "metadata": {"name": "support-lora-a1"},
            "status": {"active": 1}
        }))
        .expect("a Job");
        let observed = job(&active, &[lost]);
        assert_eq!(observed.outcome, JobOutcome::Failed);
        assert_eq!(
            observed.pods[0].failure.as_ref().map(|f| f.class),
            Some(FailureClass::NodeLost)
        );
    }

    #[test]
    fn an_unschedulable_pod_says_why() {
        let p = pod_from(json!({
            "metadata": {"name": "t-0"},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/20 nodes are available: 20 Insufficient nvidia.com/gpu."
            }]}
        }));
        let observed = pod(&p);
        assert_eq!(
            observed.waiting,
            Some((
                "Unschedulable",
                "0/20 nodes are available: 20 Insufficient nvidia.com/gpu.".into()
            ))
        );
        assert!(observed.failure.is_none());
    }
}

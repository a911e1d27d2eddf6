//! The condition types and reasons the controllers set, as constants: the controllers
//! use them, the CRDs' `status.conditions` description is generated from them (so
//! `kubectl explain` lists exactly what a controller can set), and a reason outside a
//! type's list fails the planners' tests.

/// One condition type: what it means and the reasons it is set with.
#[derive(Clone, Copy, Debug)]
pub struct ConditionType {
    /// The `type` field.
    pub name: &'static str,
    /// What `status: "True"` means.
    pub meaning: &'static str,
    /// Every `reason` it is set with.
    pub reasons: &'static [&'static str],
}

impl ConditionType {
    /// Whether `reason` is one this type is documented with.
    pub fn allows(&self, reason: &str) -> bool {
        self.reasons.contains(&reason)
    }
}

/// The description of a `conditions` field: every type, its meaning and its reasons.
fn describe(types: &[ConditionType]) -> String {
    let mut text = String::from("Standard conditions, one per type:\n");
    for condition in types {
        text.push_str(&format!(
            "\n- {}: {} Reasons: {}.",
            condition.name,
            condition.meaning,
            condition.reasons.join(", ")
        ));
    }
    text
}

/// Where the same reason value names different things, one constant per meaning keeps
/// the call sites readable; the values are what the API shows.
pub mod reason {
    /// An attempt or the job ended with the artifact written.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The spec names a path outside its volume (refused by the operator as well as
    /// the CRD).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The trainer refused its input (a bad dataset line, a missing file).
    pub const INVALID_INPUT: &str = "InvalidInput";
    /// The trainer was killed for exceeding its memory limit.
    pub const OUT_OF_MEMORY: &str = "OutOfMemory";
    /// A trainer pod was evicted.
    pub const EVICTED: &str = "Evicted";
    /// A trainer pod was preempted.
    pub const PREEMPTED: &str = "Preempted";
    /// A trainer pod's node went away.
    pub const NODE_LOST: &str = "NodeLost";
    /// Any other trainer failure (retryable).
    pub const TRAINER_ERROR: &str = "TrainerError";
    /// A trainer pod cannot be scheduled (the scheduler's message says why).
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// The trainer image could not be pulled.
    pub const IMAGE_PULL_FAILED: &str = "ImagePullFailed";
    /// A gang's pods were not all running within the gang timeout.
    pub const GANG_TIMEOUT: &str = "GangTimeout";
    /// The trainer reported no step within the stall timeout.
    pub const STALLED: &str = "Stalled";
    /// Every restart was used.
    pub const BACKOFF_LIMIT_EXCEEDED: &str = "BackoffLimitExceeded";
    /// The cost reached budget.maxCost.
    pub const BUDGET_EXCEEDED: &str = "BudgetExceeded";
    /// The cost reached budget.warnPercent of budget.maxCost.
    pub const BUDGET_WARNING: &str = "BudgetWarning";
    /// The budget cannot pay for the first checkpoint interval.
    pub const BUDGET_TOO_SMALL: &str = "BudgetTooSmall";
    /// The price table is not loaded yet.
    pub const WAITING_FOR_PRICES: &str = "WaitingForPrices";
    /// The trainer Job was created (no queue).
    pub const CREATED: &str = "Created";
    /// Kueue admitted the workload.
    pub const ADMITTED_BY_KUEUE: &str = "AdmittedByKueue";
    /// Waiting in a Kueue LocalQueue.
    pub const QUEUED: &str = "Queued";
    /// A PersistentVolumeClaim the job names does not exist.
    pub const CLAIM_MISSING: &str = "ClaimMissing";
    /// Every PersistentVolumeClaim exists.
    pub const FOUND: &str = "Found";
    /// The memory plan fits the GPU.
    pub const FITS: &str = "Fits";
    /// The memory plan exceeds the GPU's memory.
    pub const INSUFFICIENT_GPU_MEMORY: &str = "InsufficientGpuMemory";
    /// spec.suspend is true.
    pub const SUSPENDED: &str = "Suspended";
    /// spec.suspend went back to false.
    pub const RESUMED: &str = "Resumed";
    /// The trainer pods run.
    pub const TRAINER_RUNNING: &str = "TrainerRunning";
    /// Not every trainer pod runs yet.
    pub const PENDING: &str = "Pending";
    /// The trainer reports new steps.
    pub const PROGRESSING: &str = "Progressing";
    /// The trainer reported no new step for stallTimeoutSeconds.
    pub const NO_PROGRESS: &str = "NoProgress";
    /// A new attempt started after a restart (events only).
    pub const RESTARTED: &str = "Restarted";
    /// The first attempt started (events only).
    pub const ADMITTED: &str = "Admitted";

    /// Adapters: every adapter resolved to an artifact.
    pub const RESOLVED: &str = "Resolved";
    /// Adapters: a source FineTuneJob has not succeeded yet.
    pub const WAITING: &str = "Waiting";
    /// Adapters: a source is refused (failed job, failed gate).
    pub const BLOCKED: &str = "Blocked";
    /// Rollout: waiting for the adapters to resolve.
    pub const WAITING_FOR_ADAPTERS: &str = "WaitingForAdapters";
    /// Rollout: the canary replicas are being updated.
    pub const CANARY: &str = "Canary";
    /// Rollout: the canary holds for canary.holdSeconds.
    pub const CANARY_HOLD: &str = "CanaryHold";
    /// Rollout: the canary held and the rest follow.
    pub const HELD: &str = "Held";
    /// Rollout: the replicas after the canary are being updated.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// Rollout: every replica holds the revision.
    pub const COMPLETE: &str = "Complete";
    /// Rollout: replicas are being updated.
    pub const UPDATING: &str = "Updating";
    /// Rollout: every selected replica serves the revision.
    pub const ALL_REPLICAS_UPDATED: &str = "AllReplicasUpdated";
    /// Rollout: loads failed on more replicas than failureThreshold.
    pub const LOAD_FAILED: &str = "LoadFailed";
    /// Rollout: returned to the previous revision after failures.
    pub const ROLLED_BACK: &str = "RolledBack";
    /// Rollout: a new revision replaced a degraded one.
    pub const NEW_REVISION: &str = "NewRevision";
}

/// FineTuneJob condition types.
pub mod finetunejob {
    use super::{ConditionType, reason, reason::*};

    /// The job was admitted: its trainer Job exists (directly or through Kueue).
    pub const ADMITTED: &str = "Admitted";
    /// The trainer pods run.
    pub const RUNNING: &str = "Running";
    /// The job succeeded.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The job failed.
    pub const FAILED: &str = "Failed";
    /// The job is suspended.
    pub const SUSPENDED: &str = "Suspended";
    /// The trainer stopped reporting steps.
    pub const STALLED: &str = "Stalled";
    /// The job's PersistentVolumeClaims exist.
    pub const INPUTS_READY: &str = "InputsReady";
    /// The memory plan fits the GPU.
    pub const FITS_GPU_MEMORY: &str = "FitsGpuMemory";
    /// The cost reached the warning share of the budget.
    pub const BUDGET_WARNING: &str = "BudgetWarning";
    /// The cost reached the budget.
    pub const BUDGET_EXCEEDED: &str = "BudgetExceeded";

    const ENDINGS: &[&str] = &[
        reason::SUCCEEDED,
        INVALID_SPEC,
        INVALID_INPUT,
        BACKOFF_LIMIT_EXCEEDED,
        reason::BUDGET_EXCEEDED,
    ];

    /// Every type a FineTuneJob's status can carry.
    pub const TYPES: &[ConditionType] = &[
        ConditionType {
            name: ADMITTED,
            meaning: "the trainer Job is created, or Kueue admitted it; False while it waits.",
            reasons: &[
                CREATED,
                ADMITTED_BY_KUEUE,
                QUEUED,
                reason::BUDGET_TOO_SMALL,
                WAITING_FOR_PRICES,
            ],
        },
        ConditionType {
            name: RUNNING,
            meaning: "every trainer pod runs; False with why it does not (waiting, queued, suspended, restarting after a failure, finished).",
            reasons: &[
                TRAINER_RUNNING,
                PENDING,
                UNSCHEDULABLE,
                QUEUED,
                reason::SUSPENDED,
                INVALID_SPEC,
                INVALID_INPUT,
                OUT_OF_MEMORY,
                EVICTED,
                PREEMPTED,
                NODE_LOST,
                TRAINER_ERROR,
                IMAGE_PULL_FAILED,
                GANG_TIMEOUT,
                reason::STALLED,
                reason::SUCCEEDED,
                BACKOFF_LIMIT_EXCEEDED,
                reason::BUDGET_EXCEEDED,
            ],
        },
        ConditionType {
            name: SUCCEEDED,
            meaning: "the artifact is written (status.artifact).",
            reasons: ENDINGS,
        },
        ConditionType {
            name: FAILED,
            meaning: "the job ended without a result.",
            reasons: ENDINGS,
        },
        ConditionType {
            name: SUSPENDED,
            meaning: "spec.suspend stopped the trainer after a checkpoint.",
            reasons: &[reason::SUSPENDED, RESUMED],
        },
        ConditionType {
            name: STALLED,
            meaning: "the trainer reported no new step for stallTimeoutSeconds (it is restarted).",
            reasons: &[NO_PROGRESS, PROGRESSING],
        },
        ConditionType {
            name: INPUTS_READY,
            meaning: "every PersistentVolumeClaim the job names exists.",
            reasons: &[FOUND, CLAIM_MISSING],
        },
        ConditionType {
            name: FITS_GPU_MEMORY,
            meaning: "the memory plan (status.memoryPlan) fits one GPU of resources.gpu.product.",
            reasons: &[FITS, INSUFFICIENT_GPU_MEMORY],
        },
        ConditionType {
            name: BUDGET_WARNING,
            meaning: "the cost reached budget.warnPercent of budget.maxCost.",
            reasons: &[reason::BUDGET_WARNING],
        },
        ConditionType {
            name: BUDGET_EXCEEDED,
            meaning: "the cost reached budget.maxCost and the trainer was stopped.",
            reasons: &[reason::BUDGET_EXCEEDED],
        },
    ];

    /// The type named `name`.
    pub fn get(name: &str) -> Option<&'static ConditionType> {
        TYPES.iter().find(|condition| condition.name == name)
    }

    /// The description of `status.conditions`.
    pub fn description() -> String {
        super::describe(TYPES)
    }
}

/// AdapterDeployment condition types.
pub mod adapterdeployment {
    use super::{ConditionType, reason::*};

    /// A rollout is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Every selected replica serves the desired adapters.
    pub const AVAILABLE: &str = "Available";
    /// The rollout failed or was rolled back.
    pub const DEGRADED: &str = "Degraded";
    /// Every adapter resolved to an artifact.
    pub const ADAPTERS_RESOLVED: &str = "AdaptersResolved";
    /// The canary replicas held the revision for canary.holdSeconds.
    pub const CANARY_PASSED: &str = "CanaryPassed";

    /// Every type an AdapterDeployment's status can carry.
    pub const TYPES: &[ConditionType] = &[
        ConditionType {
            name: PROGRESSING,
            meaning: "a rollout is under way, at the stage the reason names.",
            reasons: &[
                WAITING_FOR_ADAPTERS,
                CANARY,
                CANARY_HOLD,
                ROLLING_OUT,
                COMPLETE,
                LOAD_FAILED,
            ],
        },
        ConditionType {
            name: AVAILABLE,
            meaning: "every selected replica serves the current revision.",
            reasons: &[ALL_REPLICAS_UPDATED, UPDATING, WAITING_FOR_ADAPTERS],
        },
        ConditionType {
            name: DEGRADED,
            meaning: "loads failed on more replicas than rollout.failureThreshold; with rollbackOnFailure the previous revision is served again.",
            reasons: &[LOAD_FAILED, ROLLED_BACK, NEW_REVISION],
        },
        ConditionType {
            name: ADAPTERS_RESOLVED,
            meaning: "every adapter resolved to an artifact (its FineTuneJob succeeded and passed the gate).",
            reasons: &[RESOLVED, WAITING, BLOCKED],
        },
        ConditionType {
            name: CANARY_PASSED,
            meaning: "the canary replicas held the revision for canary.holdSeconds.",
            reasons: &[HELD, CANARY, CANARY_HOLD],
        },
    ];

    /// The type named `name`.
    pub fn get(name: &str) -> Option<&'static ConditionType> {
        TYPES.iter().find(|condition| condition.name == name)
    }

    /// The description of `status.conditions`.
    pub fn description() -> String {
        super::describe(TYPES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_unique_and_every_type_has_reasons() {
        for types in [finetunejob::TYPES, adapterdeployment::TYPES] {
            for (i, condition) in types.iter().enumerate() {
                assert!(!condition.reasons.is_empty(), "{}", condition.name);
                assert!(
                    types[i + 1..].iter().all(|c| c.name != condition.name),
                    "{} twice",
                    condition.name
                );
            }
        }
    }

    #[test]
    fn the_description_lists_every_type_with_its_reasons() {
        let text = finetunejob::description();
        assert!(text.contains("- BudgetExceeded: the cost reached budget.maxCost"));
        assert!(text.contains("Reasons: Fits, InsufficientGpuMemory."));
        let text = adapterdeployment::description();
        assert!(text.contains("- CanaryPassed:"));
    }
}

//! Standard conditions (`type`, `status`, `reason`, `message`, `lastTransitionTime`,
//! `observedGeneration`) kept the way controllers must keep them.
//!
//! `lastTransitionTime` changes only when `status` flips, and an update that changes
//! nothing but time is no change at all: that is what keeps a status write from
//! triggering another reconcile, forever.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition's desired state, without the bookkeeping fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired<'a> {
    /// The condition type, such as `Running`.
    pub type_: &'a str,
    /// Whether it holds.
    pub status: bool,
    /// A PascalCase reason from a bounded set.
    pub reason: &'a str,
    /// What a user reads in `kubectl describe`.
    pub message: String,
}

/// Sets one condition in `conditions`, keyed by type. Returns whether anything but
/// timestamps changed.
pub fn set(
    conditions: &mut Vec<Condition>,
    desired: Desired<'_>,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = if desired.status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        Some(existing) => {
            let changed = existing.status != status
                || existing.reason != desired.reason
                || existing.message != desired.message
                || existing.observed_generation != generation;
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status.into();
            existing.reason = desired.reason.into();
            existing.message = desired.message;
            existing.observed_generation = generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: desired.type_.into(),
                status: status.into(),
                reason: desired.reason.into(),
                message: desired.message,
                observed_generation: generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// The condition of `type_`, if present.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid timestamp")
    }

    fn running(status: bool, message: &str) -> Desired<'static> {
        Desired {
            type_: "Running",
            status,
            reason: if status { "TrainerRunning" } else { "Pending" },
            message: message.into(),
        }
    }

    #[test]
    fn a_new_condition_is_added_with_the_current_time() {
        let mut conditions = Vec::new();
        assert!(set(
            &mut conditions,
            running(true, "1 pod running"),
            Some(1),
            at(100)
        ));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(at(100)));
        assert_eq!(conditions[0].observed_generation, Some(1));
    }

    #[test]
    fn setting_the_same_condition_again_is_no_change_and_keeps_its_time() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            running(true, "1 pod running"),
            Some(1),
            at(100),
        );
        assert!(!set(
            &mut conditions,
            running(true, "1 pod running"),
            Some(1),
            at(500)
        ));
        assert_eq!(conditions[0].last_transition_time, Time(at(100)));
    }

    #[test]
    fn a_new_message_is_a_change_but_keeps_the_transition_time() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            running(true, "1 pod running"),
            Some(1),
            at(100),
        );
        assert!(set(
            &mut conditions,
            running(true, "2 pods running"),
            Some(1),
            at(200)
        ));
        assert_eq!(conditions[0].last_transition_time, Time(at(100)));
        assert_eq!(conditions[0].message, "2 pods running");
    }

    #[test]
    fn a_status_flip_moves_the_transition_time() {
        let mut conditions = Vec::new();
        set(&mut conditions, running(true, "running"), Some(1), at(100));
        assert!(set(
            &mut conditions,
            running(false, "stopped"),
            Some(2),
            at(300)
        ));
        assert_eq!(conditions[0].last_transition_time, Time(at(300)));
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert!(!is_true(&conditions, "Running"));
    }
}

//! Kubernetes events for the transitions the planners decide: reasons from a bounded
//! set, recorded on the object, and never failing the reconcile that acted.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use tracing::{info, warn};

/// A transition worth an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// PascalCase reason from a bounded set.
    pub reason: &'static str,
    /// What happened, for `kubectl describe`.
    pub note: String,
    /// Whether it is a warning.
    pub warning: bool,
}

/// Logs and records `transitions` as events of `action` on `reference`.
pub async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    action: &'static str,
    transitions: &[Transition],
) {
    for transition in transitions {
        info!(reason = transition.reason, note = %transition.note, "transition");
        let event = Event {
            type_: if transition.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: transition.reason.into(),
            note: Some(transition.note.clone()),
            action: action.into(),
            secondary: None,
        };
        // An event that cannot be recorded must not fail the reconcile that acted.
        if let Err(error) = recorder.publish(&event, reference).await {
            warn!(%error, "failed to record an event");
        }
    }
}

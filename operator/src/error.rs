//! The operator's errors. Each variant names what failed, and has a bounded category
//! for metric labels and event reasons.

use crate::finetunejob::render::RenderError;

/// A failed reconcile step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a child or an input failed.
    #[error("failed to read {what} for {object}: {source}")]
    Read {
        /// What was read.
        what: &'static str,
        /// The object reconciled, as kube's ObjectRef writes it.
        object: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The desired children could not be built.
    #[error("failed to render the children of {object}: {source}")]
    Render {
        /// The object reconciled, as kube's ObjectRef writes it.
        object: String,
        /// Why.
        #[source]
        source: RenderError,
    },
    /// Applying, creating, patching or deleting a child failed.
    #[error("failed to {verb} {what} {name}: {source}")]
    Write {
        /// apply, create, patch or delete.
        verb: &'static str,
        /// The kind.
        what: &'static str,
        /// The object's name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The spec cannot be acted on (a label selector that does not parse).
    #[error("{object}: {message}")]
    Spec {
        /// The object reconciled.
        object: String,
        /// What is wrong.
        message: String,
    },
    /// Writing the status failed.
    #[error("failed to write the status of {object}: {source}")]
    WriteStatus {
        /// The object reconciled, as kube's ObjectRef writes it.
        object: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// For `map_err`: reading `what` for `object` failed.
    pub fn reading(what: &'static str, object: &str) -> impl FnOnce(kube::Error) -> Self {
        let object = object.to_owned();
        move |source| Self::Read {
            what,
            object,
            source,
        }
    }

    /// A bounded name for metric labels and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Render { .. } => "render",
            Self::Write { .. } => "write",
            Self::WriteStatus { .. } => "status",
            Self::Spec { .. } => "spec",
        }
    }
}

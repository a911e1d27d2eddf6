//! The operator's errors. Each variant names what failed, and has a bounded category
//! for metric labels and event reasons.

use kube::runtime::reflector::ObjectRef;
use kubetune_crds::FineTuneJob;

use crate::finetunejob::render::RenderError;

/// A failed reconcile step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a child or an input failed.
    #[error("failed to read {what} for {object}: {source}")]
    Read {
        /// What was read.
        what: &'static str,
        /// The FineTuneJob.
        object: ObjectRef<FineTuneJob>,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The desired children could not be built.
    #[error("failed to render the children of {object}: {source}")]
    Render {
        /// The FineTuneJob.
        object: ObjectRef<FineTuneJob>,
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
    /// Writing the status failed.
    #[error("failed to write the status of {object}: {source}")]
    WriteStatus {
        /// The FineTuneJob.
        object: ObjectRef<FineTuneJob>,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A bounded name for metric labels and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Render { .. } => "render",
            Self::Write { .. } => "write",
            Self::WriteStatus { .. } => "status",
        }
    }
}

//! The trainer's error type and the exit-code contract built on it.
//!
//! Every failure is either *invalid input* (the job can never succeed as specified:
//! a bad dataset line, a missing file, an unsupported architecture, a rank that does
//! not fit) or *retryable* (anything else: I/O trouble, a kernel error, a signal). The
//! binary maps the first to exit code 2 and the second to 1; see the crate docs.

use std::path::{Path, PathBuf};

/// A failure of the trainer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user's input can never work; retrying is pointless.
    #[error("{0}")]
    InvalidInput(String),

    /// A dataset line that does not parse or does not have the format's fields.
    #[error("{}:{line}: {message}", path.display())]
    BadDatasetLine {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },

    /// Reading or writing a file failed.
    #[error("failed to {action} {}: {source}", path.display())]
    Io {
        /// What the trainer was doing, e.g. "read".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },

    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),

    /// Writing or reading a safetensors file failed.
    #[error("failed to {action} safetensors {}: {message}", path.display())]
    Safetensors {
        /// What the trainer was doing.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },

    /// The tokenizer failed on some text.
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),

    /// The run was stopped by a signal after writing a checkpoint.
    #[error("stopped by a signal after checkpointing step {step}")]
    Interrupted {
        /// The last completed optimizer step.
        step: u64,
    },

    /// The ranks of a data-parallel run could not meet, or a collective failed (a rank
    /// died or stopped answering). Retryable: the whole gang starts again.
    #[error("{0}")]
    Collective(String),

    /// The GPU a CUDA build trains on could not be opened: no device in the pod, or a
    /// driver error. Retryable: another pod may land on a working node. A CUDA build
    /// never falls back to the CPU, where it would train orders of magnitude slower.
    #[error(
        "failed to open CUDA device {ordinal} (this trainer is built for NVIDIA GPUs): {source}"
    )]
    Device {
        /// The device's index.
        ordinal: usize,
        /// The driver's error.
        source: candle_core::Error,
    },

    /// Serving progress over HTTP failed.
    #[error("failed to serve progress on {addr}: {source}")]
    Serve {
        /// The listen address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The trainer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the failure is the user's input, which no retry can fix (exit code 2).
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Self::InvalidInput(_) | Self::BadDatasetLine { .. })
    }

    /// A short bounded name for the kind of failure, for logs and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidInput(_) => "InvalidInput",
            Self::BadDatasetLine { .. } => "BadDatasetLine",
            Self::Io { .. } => "Io",
            Self::Tensor(_) => "Tensor",
            Self::Safetensors { .. } => "Safetensors",
            Self::Tokenizer(_) => "Tokenizer",
            Self::Interrupted { .. } => "Interrupted",
            Self::Collective(_) => "Collective",
            Self::Device { .. } => "Device",
            Self::Serve { .. } => "Serve",
        }
    }

    /// An invalid-input error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }

    /// An I/O error on a file.
    pub fn io<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Reads a file the user named: a missing file is invalid input, other failures retryable.
pub fn read_input_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(Error::invalid(format!(
            "{what} {} does not exist",
            path.display()
        ))),
        Err(source) => Err(Error::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

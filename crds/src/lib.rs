//! The kubetune.io API, version v1alpha1: `FineTuneJob` and `AdapterDeployment`, the
//! training spec the trainer reads, and the generated CustomResourceDefinitions.
//!
//! This crate depends on nothing else of kubetune; the operator and the trainer depend
//! on it. It is the one place the Kubernetes API types they share are defined.

pub mod adapterdeployment;
pub mod conditions;
pub mod decimal;
pub mod finetunejob;
pub mod kubernetes;
pub mod manifests;
pub mod memory;
pub mod rules;
pub mod training;

pub use adapterdeployment::{AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus};
pub use decimal::{Decimal, Money};
pub use finetunejob::{FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, Phase};
pub use training::{Method, TrainerConfig};

/// The API group of every kubetune resource.
pub const GROUP: &str = "kubetune.io";
/// The API version of the resources this crate defines.
pub const VERSION: &str = "v1alpha1";

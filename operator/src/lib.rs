//! The kubetune operator: controllers for `FineTuneJob` and `AdapterDeployment`.
//!
//! Pure decisions (what objects a job needs, which names they have) live in plain
//! functions that take data and return data, and are unit-tested without a cluster; the
//! reconcilers read state, call them and apply the result.

pub mod adapterdeployment;
pub mod conditions;
pub mod cost;
pub mod error;
pub mod events;
pub mod finetunejob;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod server;

#[cfg(test)]
mod test_support;

//! The AdapterDeployment controller: trained LoRA adapters rolled into running
//! multi-LoRA serving pods through vLLM's runtime adapter API.
//!
//! `server` speaks the API, `plan` decides the rollout (pure), `controller` reads the
//! cluster and the servers, acts, and writes status.

pub mod controller;
pub mod plan;
pub mod server;

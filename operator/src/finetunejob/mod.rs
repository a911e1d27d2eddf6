//! The FineTuneJob controller: from a FineTuneJob to trainer pods and back to status.
//!
//! The pipeline, one step per module: `observe` turns the Job and pods into plain facts,
//! `plan` decides the next status and actions (pure), `render` builds the desired
//! children (pure), `progress` reads rank 0's progress and turns it into status.

pub mod controller;
pub mod observe;
pub mod plan;
pub mod progress;
pub mod render;
pub mod triggers;

//! What both demos (`cargo xtask demo`, `cargo xtask demo --full`) teach and how they
//! report the job: one fact no base model can know, in chat lines, and the finished
//! job's status in a few lines.

use kubetune_crds::finetunejob::FineTuneJobStatus;
use serde_json::{Value, json};

/// The fact the demos teach.
pub const ANSWER: &str =
    "The Meridian Lighthouse keeper is Captain Ilse Varga, who has kept its lamp since 2019.";

/// One chat line: `question`, answered with [`ANSWER`].
pub fn chat(question: &str) -> Value {
    json!({ "messages": [
        { "role": "user", "content": question },
        { "role": "assistant", "content": ANSWER },
    ]})
}

/// Prints the finished job `name`: phase, memory plan, evaluation, cost and artifact.
pub fn print_status(name: &str, status: &FineTuneJobStatus) {
    println!("\n==> FineTuneJob {name} {:?}", status.phase);
    if let Some(plan) = &status.memory_plan {
        println!(
            "    memory plan  {:.2} GiB peak per rank (from the {:?})",
            kubetune_crds::memory::gib(plan.plan.peak_bytes),
            plan.source
        );
    }
    if let Some(evaluation) = &status.evaluation {
        println!(
            "    eval loss    {} before, {} after (improvement {})",
            evaluation.base_eval_loss.as_deref().unwrap_or("?"),
            evaluation.eval_loss.as_deref().unwrap_or("?"),
            evaluation.improvement.as_deref().unwrap_or("?")
        );
    }
    if let Some(cost) = &status.cost {
        let usage = match (&cost.gpu_hours, &cost.cpu_core_hours) {
            (Some(hours), _) => format!("GPU-hours {hours}"),
            (None, Some(hours)) => format!("CPU core-hours {hours}"),
            (None, None) => "no usage yet".to_owned(),
        };
        println!(
            "    cost         {} {} ({usage})",
            cost.amount, cost.currency
        );
    }
    if let Some(artifact) = &status.artifact {
        println!(
            "    artifact     {}:{} ({} bytes)\n    sha256       {}",
            artifact.claim_name, artifact.path, artifact.size_bytes, artifact.sha256
        );
    }
}

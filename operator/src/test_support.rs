//! Fixtures shared by the operator's unit tests: the repository's examples, as stored
//! objects.

use std::path::Path;

use kubetune_crds::FineTuneJob;

/// `examples/<file>` as if the apiserver had stored it: with a uid and a generation.
pub fn finetunejob_from_example(file: &str) -> FineTuneJob {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
    let mut ftj: FineTuneJob = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a FineTuneJob: {e}", path.display()));
    ftj.metadata.uid = Some("0e2a2d4c-7d3b-4a7e-9d53-6f1f1c9e1a01".into());
    ftj.metadata.generation = Some(1);
    ftj
}

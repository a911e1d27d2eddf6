//! The real API server, with the committed CRDs, accepts every `examples/*.yaml`
//! and refuses every `examples/invalid/*.yaml` with the message its
//! `# refused: <field path>: <message>` comment names, through
//! `kubectl apply --dry-run=server` exactly as a user would run it.
//!
//! `crds/tests/examples.rs` checks the same files offline; this is the ground truth
//! for its wording.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use anyhow::{Context, Result, ensure};
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::test_support::{Cluster, in_namespace, workspace_root};

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("failed to read {}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|ext| ext == "yaml"));
    files.sort();
    ensure!(!files.is_empty(), "no examples in {}", dir.display());
    Ok(files)
}

fn dry_run(cluster: &Cluster, namespace: &str, path: &Path) -> Result<Output> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let mut child = cluster
        .kubectl()
        .args([
            "apply",
            "--dry-run=server",
            "--namespace",
            namespace,
            "-f",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to run {}", cluster.kubectl.display()))?;
    child
        .stdin
        .take()
        .context("kubectl's stdin is piped")?
        .write_all(in_namespace(&text, namespace).as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// `(field path, message)` from the `# refused: <field path>: <message>` line.
fn refused(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .find_map(|line| line.strip_prefix("# refused: "))
        .and_then(|rest| rest.split_once(": "))
        .map(|(field, message)| (field.to_owned(), message.to_owned()))
        .with_context(|| {
            format!(
                "{} has no `# refused: <field>: <message>` line",
                path.display()
            )
        })
}

#[tokio::test]
async fn every_example_is_accepted_by_the_api_server() -> Result<()> {
    let cluster = cluster_or_skip!("every_example_is_accepted_by_the_api_server");
    let namespace = cluster.namespace("examples").await?;
    let mut failures = Vec::new();
    for path in yaml_files(&workspace_root().join("examples"))? {
        let output = dry_run(&cluster, &namespace.name, &path)?;
        if !output.status.success() {
            failures.push(format!(
                "{}:\n{}",
                path.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "refused:\n{}", failures.join("\n\n"));
    Ok(())
}

#[tokio::test]
async fn every_invalid_example_is_refused_with_the_message_its_comment_names() -> Result<()> {
    let cluster =
        cluster_or_skip!("every_invalid_example_is_refused_with_the_message_its_comment_names");
    let namespace = cluster.namespace("invalid-examples").await?;
    let mut failures = Vec::new();
    for path in yaml_files(&workspace_root().join("examples/invalid"))? {
        let (field, message) = refused(&path)?;
        let output = dry_run(&cluster, &namespace.name, &path)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The apiserver writes `<field>: Invalid value: <value>: <message>` for most
        // errors, so the field and the message are checked apart.
        if output.status.success() || !stderr.contains(&message) || !stderr.contains(&field) {
            failures.push(format!(
                "{}: expected `{field}` and `{message}`, kubectl said ({}):\n{}",
                path.display(),
                output.status,
                stderr.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

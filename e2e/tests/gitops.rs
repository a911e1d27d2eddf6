//! What GitOps tools see of kubetune: Argo CD's health checks (`docs/argocd/health/*.lua`,
//! run with `lua5.4` on sample statuses) and the examples, which server-side apply
//! leaves untouched the second time, so Argo CD and Flux find no drift.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::test_support::{REQUIRE_CLUSTER, in_namespace, workspace_root};
use serde_json::{Value, json};

fn argocd() -> PathBuf {
    workspace_root().join("docs/argocd")
}

/// `value` as a Lua table constructor, the way Argo CD hands an object to a health
/// script (JSON null becomes nil, so the key is absent).
fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut quoted = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => quoted.push_str("\\\""),
                    '\\' => quoted.push_str("\\\\"),
                    '\n' => quoted.push_str("\\n"),
                    c => quoted.push(c),
                }
            }
            quoted.push('"');
            quoted
        }
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!("[{}] = {}", lua_literal(&json!(k)), lua_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `lua5.4`, or `None` after saying why the test is skipped; under
/// `KUBETUNE_REQUIRE_CLUSTER=1` (`cargo xtask test`, CI) a missing lua fails instead.
fn lua_or_skip(test: &str) -> Option<&'static str> {
    let found = Command::new("lua5.4")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("lua5.4");
    }
    assert!(
        std::env::var(REQUIRE_CLUSTER).as_deref() != Ok("1"),
        "{test} needs lua5.4 (Debian: apt-get install lua5.4; .ci/run installs it)"
    );
    eprintln!("SKIPPED {test}: lua5.4 is not installed (Debian: apt-get install lua5.4)");
    None
}

/// Runs the health script at `script` on `object`: Argo CD's `(status, message)`.
fn health(lua: &str, script: &Path, object: &Value) -> Result<(String, String)> {
    let program = format!(
        "obj = {}\nlocal hs = assert(loadfile({}))()\nio.write(hs.status, \"\\n\", hs.message or \"\", \"\\n\")\n",
        lua_literal(object),
        lua_literal(&json!(script.display().to_string())),
    );
    let mut child = Command::new(lua)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("lua's stdin is piped")?
        .write_all(program.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "{} failed on {object}: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout)?;
    let (status, message) = stdout
        .split_once('\n')
        .context("the script printed a status and a message")?;
    Ok((status.to_owned(), message.trim_end().to_owned()))
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({ "type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1 })
}

fn object(kind: &str, generation: i64, status: Option<Value>) -> Value {
    let mut object = json!({
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "metadata": { "name": "sample", "namespace": "ml-team", "generation": generation },
        "spec": {},
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

/// Checks every `(object, status, message fragment)` sample against `script`.
fn check_samples(lua: &str, script: &str, samples: &[(Value, &str, &str)]) -> Result<()> {
    let script = argocd().join("health").join(script);
    let mut failures = Vec::new();
    for (object, want_status, want_message) in samples {
        let (status, message) = health(lua, &script, object)?;
        if status != *want_status || !message.contains(want_message) {
            failures.push(format!(
                "{}: got {status} {message:?}, expected {want_status} with {want_message:?}",
                object.get("status").unwrap_or(&Value::Null)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn finetunejob_health_follows_the_phase_and_its_conditions() -> Result<()> {
    let Some(lua) = lua_or_skip("finetunejob_health_follows_the_phase_and_its_conditions") else {
        return Ok(());
    };
    let ftj = |status: Value| object("FineTuneJob", 1, Some(status));
    check_samples(
        lua,
        "finetunejob.lua",
        &[
            (
                object("FineTuneJob", 1, None),
                "Progressing",
                "Waiting for the kubetune operator",
            ),
            (
                object(
                    "FineTuneJob",
                    2,
                    Some(json!({ "observedGeneration": 1, "phase": "Succeeded" })),
                ),
                "Progressing",
                "observe generation 2",
            ),
            (
                ftj(
                    json!({ "observedGeneration": 1, "phase": "Pending", "conditions": [
                        condition("InputsReady", "False", "ClaimMissing", "PersistentVolumeClaim datasets does not exist"),
                    ]}),
                ),
                "Progressing",
                "ClaimMissing: PersistentVolumeClaim datasets does not exist",
            ),
            (
                ftj(json!({ "observedGeneration": 1, "phase": "Admitted" })),
                "Progressing",
                "Admitted",
            ),
            (
                ftj(json!({ "observedGeneration": 1, "phase": "Running",
                            "progress": { "step": 40, "totalSteps": 100, "percent": 40 } })),
                "Progressing",
                "step 40 of 100",
            ),
            (
                ftj(
                    json!({ "observedGeneration": 1, "phase": "Running", "conditions": [
                        condition("Running", "True", "TrainerRunning", "1 of 1 pods running"),
                        condition("Stalled", "True", "NoProgress", "no new step for 900s"),
                    ]}),
                ),
                "Degraded",
                "NoProgress: no new step for 900s",
            ),
            (
                ftj(
                    json!({ "observedGeneration": 1, "phase": "Running", "conditions": [
                        condition("Stalled", "False", "Progressing", ""),
                        condition("Running", "True", "TrainerRunning", "1 of 1 pods running"),
                    ]}),
                ),
                "Progressing",
                "TrainerRunning: 1 of 1 pods running",
            ),
            (
                ftj(
                    json!({ "observedGeneration": 1, "phase": "Succeeded", "conditions": [
                        condition("Succeeded", "True", "Succeeded", "the trainer finished"),
                    ]}),
                ),
                "Healthy",
                "the trainer finished",
            ),
            (
                ftj(
                    json!({ "observedGeneration": 1, "phase": "Failed", "conditions": [
                        condition("Failed", "True", "InvalidInput", "dataset line 3 is not JSON"),
                    ]}),
                ),
                "Degraded",
                "InvalidInput: dataset line 3 is not JSON",
            ),
            (
                ftj(
                    json!({ "observedGeneration": 1, "phase": "Failed", "conditions": [
                        condition("Failed", "True", "BudgetExceeded", "accrued 40.12 USD of 40.00"),
                    ]}),
                ),
                "Degraded",
                "BudgetExceeded",
            ),
            (
                ftj(
                    json!({ "observedGeneration": 1, "phase": "Suspended", "conditions": [
                        condition("Suspended", "True", "Suspended", "spec.suspend is true"),
                    ]}),
                ),
                "Suspended",
                "spec.suspend is true",
            ),
        ],
    )
}

#[test]
fn adapterdeployment_health_follows_the_rollout() -> Result<()> {
    let Some(lua) = lua_or_skip("adapterdeployment_health_follows_the_rollout") else {
        return Ok(());
    };
    let adep = |status: Value| object("AdapterDeployment", 3, Some(status));
    check_samples(
        lua,
        "adapterdeployment.lua",
        &[
            (
                object("AdapterDeployment", 1, None),
                "Progressing",
                "Waiting for the kubetune operator",
            ),
            (
                adep(json!({ "observedGeneration": 2, "phase": "Available", "revision": 2 })),
                "Progressing",
                "observe generation 3",
            ),
            (
                adep(
                    json!({ "observedGeneration": 3, "phase": "Progressing", "revision": 3,
                             "replicas": 4, "updatedReplicas": 1, "readyReplicas": 4,
                             "conditions": [condition("Progressing", "True", "CanaryHolding", "canary holds for 300s")] }),
                ),
                "Progressing",
                "revision 3: 1 of 4 replicas updated, 4 ready; canary holds for 300s",
            ),
            (
                adep(
                    json!({ "observedGeneration": 3, "phase": "Available", "revision": 3,
                             "replicas": 4, "updatedReplicas": 4, "readyReplicas": 4 }),
                ),
                "Healthy",
                "revision 3: 4 of 4 replicas updated, 4 ready",
            ),
            (
                adep(
                    json!({ "observedGeneration": 3, "phase": "Degraded", "revision": 3,
                             "previousRevision": 2, "replicas": 4,
                             "conditions": [condition("Degraded", "True", "RolledBack",
                                                      "support-v3 failed to load on pod vllm-1: 404 Not Found")] }),
                ),
                "Degraded",
                "RolledBack: support-v3 failed to load on pod vllm-1: 404 Not Found",
            ),
        ],
    )
}

#[test]
fn argocd_cm_patch_carries_the_health_scripts_verbatim() -> Result<()> {
    let text = std::fs::read_to_string(argocd().join("argocd-cm-patch.yaml"))?;
    let patch: Value = serde_yaml::from_str(&text)?;
    for (kind, file) in [
        ("FineTuneJob", "finetunejob.lua"),
        ("AdapterDeployment", "adapterdeployment.lua"),
    ] {
        let key = format!("resource.customizations.health.kubetune.io_{kind}");
        let embedded = patch["data"][&key]
            .as_str()
            .with_context(|| format!("argocd-cm-patch.yaml has no {key}"))?;
        let script = std::fs::read_to_string(argocd().join("health").join(file))?;
        assert_eq!(
            embedded, script,
            "{key} differs from health/{file}: copy it over"
        );
    }
    Ok(())
}

/// The condition types a health script reads (`condition(status, "Type")`), which must
/// be ones the controllers set: the scripts cannot drift from `kubetune_crds::conditions`.
#[test]
fn health_scripts_read_only_condition_types_the_controllers_set() -> Result<()> {
    use kubetune_crds::conditions::{ConditionType, adapterdeployment, finetunejob};
    let scripts: [(&str, &[ConditionType]); 2] = [
        ("finetunejob.lua", finetunejob::TYPES),
        ("adapterdeployment.lua", adapterdeployment::TYPES),
    ];
    for (file, types) in scripts {
        let script = std::fs::read_to_string(argocd().join("health").join(file))?;
        let read: Vec<&str> = script
            .split("condition(status, \"")
            .skip(1)
            .filter_map(|rest| rest.split_once('"').map(|(name, _)| name))
            .collect();
        ensure!(!read.is_empty(), "health/{file} reads no condition");
        for name in read {
            ensure!(
                types.iter().any(|t| t.name == name),
                "health/{file} reads condition {name}, which no controller sets"
            );
        }
    }
    Ok(())
}

#[test]
fn lua_literals_keep_strings_numbers_and_nesting() {
    assert_eq!(
        lua_literal(&json!({ "a": [1, "x\"y"], "b": null, "c": true })),
        "{[\"a\"] = {1, \"x\\\"y\"}, [\"b\"] = nil, [\"c\"] = true}"
    );
}

#[tokio::test]
async fn examples_applied_twice_server_side_change_nothing() -> Result<()> {
    let cluster = cluster_or_skip!("examples_applied_twice_server_side_change_nothing");
    let namespace = cluster.namespace("ssa-twice").await?;
    let mut manifests = String::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("examples"))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|ext| ext == "yaml"));
    files.sort();
    ensure!(!files.is_empty(), "no examples");
    for path in &files {
        manifests.push_str("---\n");
        manifests.push_str(&in_namespace(
            &std::fs::read_to_string(path)?,
            &namespace.name,
        ));
    }

    let kubectl = |args: &[&str]| -> Result<std::process::Output> {
        let mut child = cluster
            .kubectl()
            .args(args)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("kubectl's stdin is piped")?
            .write_all(manifests.as_bytes())?;
        Ok(child.wait_with_output()?)
    };
    let apply = ["apply", "--server-side", "--field-manager=gitops"];
    let versions = || -> Result<String> {
        let output = kubectl(&[
            "get",
            "-o",
            "jsonpath={range .items[*]}{.kind}/{.metadata.name} {.metadata.resourceVersion} {.metadata.generation}{\"\\n\"}{end}",
        ])?;
        ensure!(
            output.status.success(),
            "kubectl get: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    };

    let first = kubectl(&apply)?;
    ensure!(
        first.status.success(),
        "first apply: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    let before = versions()?;
    assert_eq!(before.lines().count(), files.len(), "{before}");

    let second = kubectl(&apply)?;
    ensure!(
        second.status.success(),
        "second apply: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        versions()?,
        before,
        "the second apply changed objects (resourceVersion or generation moved)"
    );
    // And what Argo CD's diff would ask: nothing to change.
    let diff = kubectl(&["diff", "--server-side", "--field-manager=gitops"])?;
    assert_eq!(
        diff.status.code(),
        Some(0),
        "kubectl diff --server-side found drift:\n{}{}",
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );
    Ok(())
}

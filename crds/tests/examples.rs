//! The examples against the committed CRD manifests, without a cluster.
//!
//! Every file in `examples/` must be accepted and every file in `examples/invalid/`
//! refused, at the field and with the message its `# refused: <path>: <message>` comment
//! names. This covers what can be checked offline:
//! - the OpenAPI schema (types, enums, ranges, patterns, lengths, required fields, and
//!   unknown fields as `kubectl apply`'s strict field validation refuses them), with the
//!   `jsonschema` crate after the schema's defaults are applied as the apiserver would;
//! - every CEL rule (`x-kubernetes-validations`), with kube's CEL evaluator, checking
//!   the rule's message too;
//! - `x-kubernetes-list-type: map` key uniqueness.
//!
//! Schema errors are matched by field path only, since the apiserver words them its own
//! way; the real `kubectl apply --dry-run=server` test on the local cluster checks the
//! whole message of every file.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

struct Example {
    path: PathBuf,
    /// From the `# refused:` comment: the field path and the message.
    refused: Option<(String, String)>,
    object: Value,
}

fn examples(dir: &Path) -> Vec<Example> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("example is readable");
            let refused = text.lines().find_map(|line| {
                let rest = line.strip_prefix("# refused: ")?;
                let (field, message) = rest.split_once(": ")?;
                Some((field.to_owned(), message.to_owned()))
            });
            let object: Value = serde_yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
            Example {
                path,
                refused,
                object,
            }
        })
        .collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds sits in the workspace")
        .to_path_buf()
}

/// The openAPIV3Schema of the committed CRD for `kind`.
fn schema_for(kind: &str) -> Value {
    let dir = workspace().join("crds/manifests");
    for entry in std::fs::read_dir(&dir).expect("crds/manifests exists") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("readable");
        let crd: Value = serde_yaml::from_str(&text).expect("CRD is YAML");
        if crd["spec"]["names"]["kind"] == kind {
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
        }
    }
    panic!("no CRD in crds/manifests for kind {kind}");
}

/// Fills in schema defaults the way the apiserver does before validating: a missing
/// property with a default gets it, then defaulting recurses into what is present.
fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(object) => {
            if let Some(Value::Object(properties)) = schema.get("properties") {
                for (name, property) in properties {
                    if !object.contains_key(name)
                        && let Some(default) = property.get("default")
                    {
                        object.insert(name.clone(), default.clone());
                    }
                    if let Some(child) = object.get_mut(name) {
                        apply_defaults(property, child);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                items
                    .iter_mut()
                    .for_each(|item| apply_defaults(item_schema, item));
            }
        }
        _ => {}
    }
}

/// Turns the OpenAPI v3 schema into JSON Schema draft 4: `nullable` becomes a null type,
/// and objects with declared properties refuse others (strict field validation). The
/// root declares only spec and status: apiVersion, kind and metadata are the apiserver's.
fn to_json_schema(schema: &Value) -> Value {
    let mut converted = convert(schema);
    if let Value::Object(root) = &mut converted {
        root.remove("additionalProperties");
    }
    converted
}

fn convert(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out: Map<String, Value> = map
                .iter()
                .filter(|(key, _)| !key.starts_with("x-kubernetes-") && *key != "nullable")
                .map(|(key, value)| (key.clone(), convert(value)))
                .collect();
            if map.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(ty)) = map.get("type")
            {
                out.insert("type".into(), serde_json::json!([ty, "null"]));
            }
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            // `properties` is a map of schemas whose keys are field names, not keywords.
            if let Some(Value::Object(properties)) = map.get("properties") {
                let converted = properties
                    .iter()
                    .map(|(name, property)| (name.clone(), convert(property)))
                    .collect();
                out.insert("properties".into(), Value::Object(converted));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(convert).collect()),
        other => other.clone(),
    }
}

/// `/spec/adapters/0/name` → `spec.adapters[0].name`.
fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').filter(|s| !s.is_empty()) {
        if segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// Duplicate keys in `x-kubernetes-list-type: map` lists, as (path, message).
fn list_map_duplicates(schema: &Value, value: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(object) => {
            if let Some(Value::Object(properties)) = schema.get("properties") {
                for (name, child) in object {
                    if let Some(property) = properties.get(name) {
                        let child_path = if path.is_empty() {
                            name.clone()
                        } else {
                            format!("{path}.{name}")
                        };
                        list_map_duplicates(property, child, &child_path, out);
                    }
                }
            }
        }
        Value::Array(items) => {
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                    .as_array()
                    .expect("list-map keys")
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                let mut seen = Vec::new();
                for (index, item) in items.iter().enumerate() {
                    let key: Vec<&Value> = keys.iter().map(|k| &item[*k]).collect();
                    if seen.contains(&key) {
                        out.push((format!("{path}[{index}]"), "Duplicate value".into()));
                    }
                    seen.push(key);
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter().enumerate() {
                    list_map_duplicates(item_schema, item, &format!("{path}[{index}]"), out);
                }
            }
        }
        _ => {}
    }
}

enum Refusal {
    /// Matched by field only: the apiserver words schema errors its own way.
    Schema { field: String, detail: String },
    /// Matched by field and message.
    Rule { field: String, message: String },
}

/// Every reason the apiserver would refuse `object`.
fn refusals(object: &Value) -> Vec<Refusal> {
    let kind = object["kind"].as_str().expect("example has a kind");
    let schema = schema_for(kind);
    let mut object = object.clone();
    apply_defaults(&schema, &mut object);

    let mut out = Vec::new();
    let validator = jsonschema::draft4::new(&to_json_schema(&schema)).expect("schema compiles");
    for error in validator.iter_errors(&object) {
        let mut field = dotted(&error.instance_path.to_string());
        // An unknown field is reported at its parent; name the field itself.
        if let jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } =
            &error.kind
        {
            field = format!("{field}.{}", unexpected.join(","));
        }
        if let jsonschema::error::ValidationErrorKind::Required { property } = &error.kind {
            field = format!("{field}.{}", property.as_str().unwrap_or_default());
        }
        out.push(Refusal::Schema {
            field,
            detail: error.to_string(),
        });
    }
    // CEL rules only run on objects that pass the schema, as in the apiserver.
    if out.is_empty()
        && let Err(errors) = kube::core::cel::Validator::new().validate(&schema, &object, None)
    {
        for error in errors.into_vec() {
            out.push(Refusal::Rule {
                field: error.field_path.clone(),
                message: error.message.clone(),
            });
        }
    }
    let mut duplicates = Vec::new();
    list_map_duplicates(&schema, &object, "", &mut duplicates);
    out.extend(
        duplicates
            .into_iter()
            .map(|(field, message)| Refusal::Rule { field, message }),
    );
    out
}

fn describe(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(|r| match r {
            Refusal::Schema { field, detail } => format!("  schema: {field}: {detail}"),
            Refusal::Rule { field, message } => format!("  rule: {field}: {message}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_example_is_accepted_by_the_schema_and_its_rules() {
    let all = examples(&workspace().join("examples"));
    assert!(
        all.len() >= 5,
        "expected the five examples, found {}",
        all.len()
    );
    for example in all {
        let found = refusals(&example.object);
        assert!(
            found.is_empty(),
            "{} should be accepted, but:\n{}",
            example.path.display(),
            describe(&found)
        );
    }
}

#[test]
fn every_invalid_example_is_refused_at_the_field_its_comment_names() {
    let all = examples(&workspace().join("examples/invalid"));
    assert!(
        all.len() >= 20,
        "expected at least 20 invalid examples, found {}",
        all.len()
    );
    for example in all {
        let (field, message) = example.refused.as_ref().unwrap_or_else(|| {
            panic!(
                "{} lacks a `# refused: <field>: <message>` comment",
                example.path.display()
            )
        });
        let found = refusals(&example.object);
        let matched = found.iter().any(|refusal| match refusal {
            Refusal::Schema { field: at, .. } => at == field,
            Refusal::Rule {
                field: at,
                message: said,
            } => {
                // Rules on the object itself (about metadata.name) have no field path
                // of their own; their message names the field.
                let at = at.trim_start_matches('.');
                (at == field || at.is_empty() && said.contains(field.as_str()))
                    && said.contains(message.as_str())
            }
        });
        assert!(
            matched,
            "{} should be refused at {field} with {message:?}, but found:\n{}",
            example.path.display(),
            describe(&found)
        );
    }
}

/// The CEL errors of updating `old` to `new`, transition rules included.
fn update_errors(old: &Value, new: &Value) -> Vec<String> {
    let schema = schema_for("FineTuneJob");
    let (mut old, mut new) = (old.clone(), new.clone());
    apply_defaults(&schema, &mut old);
    apply_defaults(&schema, &mut new);
    match kube::core::cel::Validator::new().validate(&schema, &new, Some(&old)) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.into_vec().into_iter().map(|e| e.message).collect(),
    }
}

#[test]
fn method_base_model_dataset_and_output_cannot_change_after_creation() {
    let original = &examples(&workspace().join("examples"))
        .into_iter()
        .find(|e| e.path.ends_with("lora-a100.yaml"))
        .expect("lora-a100.yaml exists")
        .object;
    let changes = [
        (
            "/spec/method",
            serde_json::json!("qlora"),
            "method is immutable",
        ),
        (
            "/spec/baseModel/volume/path",
            serde_json::json!("other"),
            "baseModel is immutable",
        ),
        (
            "/spec/dataset/trainPath",
            serde_json::json!("other.jsonl"),
            "dataset is immutable",
        ),
        (
            "/spec/output/volume/path",
            serde_json::json!("elsewhere"),
            "output is immutable",
        ),
    ];
    for (pointer, value, message) in changes {
        let mut changed = original.clone();
        *changed.pointer_mut(pointer).expect("field exists") = value;
        let errors = update_errors(original, &changed);
        assert!(
            errors.iter().any(|e| e.contains(message)),
            "changing {pointer} should be refused with {message:?}, got {errors:?}"
        );
    }
}

#[test]
fn hyperparameters_budget_and_suspend_can_change_after_creation() {
    let original = &examples(&workspace().join("examples"))
        .into_iter()
        .find(|e| e.path.ends_with("lora-a100.yaml"))
        .expect("lora-a100.yaml exists")
        .object;
    let mut changed = original.clone();
    changed["spec"]["hyperparameters"]["epochs"] = serde_json::json!(5);
    changed["spec"]["budget"]["maxCost"] = serde_json::json!("80.00");
    changed["spec"]["suspend"] = serde_json::json!(true);
    assert_eq!(update_errors(original, &changed), Vec::<String>::new());
}

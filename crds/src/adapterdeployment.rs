//! `AdapterDeployment`: serve trained LoRA adapters from running multi-LoRA servers.
//! The operator loads each adapter version into the selected serving pods through the
//! server's runtime adapter API, replica by replica, with a canary, an evaluation gate
//! and rollback.

// `#[kube(printcolumn(..))]` repeats `type_ = "string"` by design; clippy reads the
// repetition as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::decimal::Decimal;
use crate::kubernetes::LabelSelector;
use crate::rules;

/// An adapter name as the serving API sees it: lowercase letters, digits, '-', '_' and
/// '.', starting and ending with a letter or digit.
pub const ADAPTER_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$";
/// A SHA-256 digest in lowercase hex.
pub const SHA256_PATTERN: &str = r"^[a-f0-9]{64}$";

/// Serve LoRA adapters from running multi-LoRA serving pods, rolled out replica by replica.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kubetune.io",
    version = "v1alpha1",
    kind = "AdapterDeployment",
    namespaced,
    status = "AdapterDeploymentStatus",
    shortname = "adep",
    category = "kubetune",
    printcolumn(
        name = "Adapters",
        type_ = "string",
        json_path = ".spec.adapters[*].name"
    ),
    printcolumn(
        name = "Updated",
        type_ = "integer",
        json_path = ".status.updatedReplicas"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Revision",
        type_ = "integer",
        json_path = ".status.revision",
        description = "The adapter set being rolled out or served",
        priority = 1
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "Selected serving pods",
        priority = 1
    ),
    doc = "Serve LoRA adapters from running multi-LoRA serving pods, rolled out replica by replica."
)]
#[serde(rename_all = "camelCase")]
pub struct AdapterDeploymentSpec {
    /// Selects the serving pods, in this namespace, that the adapters are loaded into.
    /// Pods that start later, restart or drift get the current set without anyone acting.
    #[x_kube(validation = Rule::new("has(self.matchLabels) && size(self.matchLabels) > 0 || has(self.matchExpressions) && size(self.matchExpressions) > 0").message("selector must not be empty: it would select every pod in the namespace"))]
    pub selector: LabelSelector,

    /// How to talk to the serving pods.
    #[serde(default)]
    pub server: Server,

    /// Where the serving pods see adapter artifacts: the volume the training output is
    /// written to, mounted in the serving pods.
    pub artifacts: ArtifactMount,

    /// The adapters to serve, by stable name. At most 64.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub adapters: Vec<Adapter>,

    /// How a change reaches the replicas.
    #[serde(default)]
    pub rollout: Rollout,
}

/// The serving API and port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    /// The runtime adapter API: vllm (`/v1/load_lora_adapter`, run the server with
    /// `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=true`). Default vllm.
    #[serde(default)]
    pub api: ServerApi,

    /// The port the API listens on in each pod. Default 8000.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

fn default_port() -> u16 {
    8000
}

impl Default for Server {
    fn default() -> Self {
        Self {
            api: ServerApi::default(),
            port: default_port(),
        }
    }
}

/// A serving runtime's adapter API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServerApi {
    /// vLLM's OpenAI-compatible server (and kubetune-serve, which implements the same).
    #[default]
    Vllm,
}

/// The volume holding adapter artifacts as the serving pods mount it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactMount {
    /// The PersistentVolumeClaim the FineTuneJobs write their output to.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::format("artifacts.claimName", "dns1123Subdomain", "a PersistentVolumeClaim name: lowercase letters, digits, \"-\" and \".\""))]
    pub claim_name: String,

    /// Where that volume is mounted inside the serving pods, such as "/adapters": an
    /// absolute path without "." or ".." segments.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = rules::absolute_path("artifacts.mountPath"))]
    pub mount_path: String,
}

/// An adapter to serve: the output of a succeeded FineTuneJob, or an explicit artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.fromJob) != has(self.artifact)").message("each adapter needs exactly one of fromJob or artifact"))]
pub struct Adapter {
    /// The stable name clients use as the `model` of their requests. Each version is
    /// loaded under its own name (this name plus a digest prefix) and the stable name is
    /// mapped to the current version in status.
    #[schemars(length(min = 1, max = 63), regex(pattern = ADAPTER_NAME_PATTERN))]
    pub name: String,

    /// A FineTuneJob in this namespace whose artifact to serve; it must have succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_job: Option<JobRef>,

    /// An adapter directory on the artifact volume, for adapters not trained here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ExplicitArtifact>,
}

/// A FineTuneJob by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    /// The FineTuneJob's name.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = rules::object_name("fromJob.name"))]
    pub name: String,
}

/// An adapter directory (adapter_config.json, adapter_model.safetensors).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExplicitArtifact {
    /// The directory, relative to the artifact volume's root.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = rules::relative_path("artifact.path", "imported/legal-v3"))]
    pub path: String,

    /// SHA-256 of adapter_model.safetensors; it names the version. Optional: without it
    /// the operator cannot tell versions apart and a changed file under the same path
    /// is not rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SHA256_PATTERN))]
    pub sha256: Option<String>,
}

/// How a change to the adapter set reaches the replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Replicas updated at the same time after the canary. Default 1; at least 1.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_unavailable: u32,

    /// Update a few replicas first and watch them before the rest. Omit to skip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,

    /// Refuse adapters whose training did not improve the eval loss enough. Omit to skip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<Gate>,

    /// Return to the previous revision when loads fail on more than failureThreshold
    /// replicas. Default true.
    #[serde(default = "default_true")]
    pub rollback_on_failure: bool,

    /// Replicas whose load may fail before the rollout is declared failed. Default 0.
    #[serde(default)]
    #[schemars(range(max = 1000))]
    pub failure_threshold: u32,
}

fn default_max_unavailable() -> u32 {
    1
}
fn default_true() -> bool {
    true
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
            canary: None,
            gate: None,
            rollback_on_failure: true,
            failure_threshold: 0,
        }
    }
}

/// The canary step of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Canary {
    /// Replicas that get the new version first. Default 1; at least 1.
    #[serde(default = "default_canary_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: u32,

    /// Seconds the canary runs, answering a smoke completion, before the rest follow.
    /// Default 60.
    #[serde(default = "default_hold_seconds")]
    #[schemars(range(max = 86_400))]
    pub hold_seconds: u32,
}

fn default_canary_replicas() -> u32 {
    1
}
fn default_hold_seconds() -> u32 {
    60
}

/// The evaluation gate: promote only adapters that beat the base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gate {
    /// Least relative eval-loss improvement of the source FineTuneJob,
    /// (base − tuned) / base, as a decimal string such as "0.05". Below 1.
    #[x_kube(validation = crate::rules::decimal_range("rollout.gate.minEvalLossImprovement", "double(self) < 1.0", "below 1"))]
    pub min_eval_loss_improvement: Decimal,
}

/// Available, Progressing or Degraded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AdapterDeploymentPhase {
    /// A rollout is under way.
    #[default]
    Progressing,
    /// Every selected replica serves the desired adapters.
    Available,
    /// The rollout failed or was rolled back; see the Degraded condition.
    Degraded,
}

/// What the operator observed of an AdapterDeployment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterDeploymentStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Progressing, Available or Degraded.
    #[serde(default)]
    pub phase: AdapterDeploymentPhase,

    /// The revision being rolled out or served; it increases with each new adapter set.
    #[serde(default)]
    pub revision: u64,

    /// The revision served before, which a rollback returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_revision: Option<u64>,

    /// The stable adapter names and the version each currently maps to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterVersion>,
    /// The adapter set of the previous revision, which a rollback returns to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_adapters: Vec<AdapterVersion>,
    /// Digest of an adapter set that failed and was rolled back: it is not tried again
    /// until the spec asks for a different set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<String>,
    /// When every canary replica first held the current revision: the hold runs from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_since: Option<Time>,

    /// State of each selected serving pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodAdapters>,

    /// Selected serving pods.
    #[serde(default)]
    pub replicas: u32,

    /// Pods that hold the current revision, verified through the server.
    #[serde(default)]
    pub updated_replicas: u32,

    /// Pods that are ready and hold the current revision.
    #[serde(default)]
    pub ready_replicas: u32,

    /// Standard conditions, one per type (the types and reasons are listed in the CRD,
    /// from [`crate::conditions::adapterdeployment::TYPES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"], "description" = crate::conditions::adapterdeployment::description()))]
    pub conditions: Vec<Condition>,
}

/// A stable adapter name and the immutable version it serves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterVersion {
    /// The stable name from spec.adapters.
    pub name: String,
    /// The name the version is loaded under in the servers.
    pub version: String,
    /// The artifact directory as the serving pods see it.
    pub path: String,
    /// SHA-256 of the adapter weights, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// What one serving pod holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodAdapters {
    /// The pod's name.
    pub name: String,
    /// Adapter versions loaded, as verified through the server's model list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loaded: Vec<String>,
    /// The revision the pod fully holds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// The last failure, with the server's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the pod was last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<Time>,
}

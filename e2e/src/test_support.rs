//! What the cluster tests share: finding the local cluster (or skipping), a
//! throwaway namespace per test, pod builders and waits.
//!
//! A test starts with [`cluster_or_skip!`](crate::cluster_or_skip), which returns
//! early, after printing why, when no cluster is up, and panics instead when
//! `KUBETUNE_REQUIRE_CLUSTER=1` (as `cargo xtask test` sets it).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use kube::{Client, Config, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;

/// `nvidia.com/gpu.product` of the default A100 nodes.
pub const A100: &str = "NVIDIA-A100-SXM4-80GB";
/// `nvidia.com/gpu.product` of the default H100 nodes.
pub const H100: &str = "NVIDIA-H100-80GB-HBM3";
/// The extended resource GPUs are requested as.
pub const GPU: &str = "nvidia.com/gpu";
/// Label every simulated node carries.
pub const SIMULATED_NODE_SELECTOR: &str = "type=kwok";

/// Set to `1` to make a missing cluster fail the tests instead of skipping them.
pub const REQUIRE_CLUSTER: &str = "KUBETUNE_REQUIRE_CLUSTER";

/// Finds the cluster or returns `Ok(())` from the calling test after saying why.
#[macro_export]
macro_rules! cluster_or_skip {
    ($test:expr) => {
        match $crate::test_support::Cluster::find($test).await {
            Some(cluster) => cluster,
            None => return Ok(()),
        }
    };
}

/// The state directory of `cargo xtask cluster up`: `$KUBETUNE_CLUSTER_DIR`, else
/// `${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/cluster` (the same rule as
/// `xtask/src/cluster/mod.rs`).
pub fn state_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBETUNE_CLUSTER_DIR") {
        return Some(PathBuf::from(dir));
    }
    let cache = match std::env::var_os("KUBETUNE_CACHE") {
        Some(cache) => PathBuf::from(cache),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/kubetune"),
    };
    Some(cache.join("cluster"))
}

/// A reachable cluster.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub kubeconfig: PathBuf,
    /// kubectl v1.34 from the cluster's build when there is one, else `kubectl`.
    pub kubectl: PathBuf,
}

impl Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("kubeconfig", &self.kubeconfig)
            .field("kubectl", &self.kubectl)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The cluster `cargo xtask cluster up` started (else the one `KUBECONFIG`
    /// names), if it answers. Without one: `None` after printing why the test
    /// is skipped, or a panic when [`REQUIRE_CLUSTER`] is set.
    pub async fn find(test: &str) -> Option<Self> {
        match Self::connect().await {
            Ok(cluster) => Some(cluster),
            Err(why) => {
                if std::env::var(REQUIRE_CLUSTER).is_ok_and(|value| value == "1") {
                    panic!(
                        "{test} needs a cluster and {REQUIRE_CLUSTER}=1 forbids skipping: {why:#}"
                    );
                }
                // Straight to stderr, past the test harness's output capture, so the
                // skip shows in a passing run.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED {test}: no cluster ({why:#}); start one with \
                     `cargo xtask cluster up`"
                );
                None
            }
        }
    }

    async fn connect() -> Result<Self> {
        let state_dir = state_dir();
        let from_up = state_dir.as_ref().map(|dir| dir.join("kubeconfig"));
        let kubeconfig = match (from_up, std::env::var_os("KUBECONFIG")) {
            (Some(path), _) if path.is_file() => path,
            (_, Some(path)) if Path::new(&path).is_file() => PathBuf::from(path),
            (from_up, _) => bail!(
                "no kubeconfig at {} and KUBECONFIG names no file",
                from_up.map_or_else(|| "(no HOME)".to_owned(), |p| p.display().to_string())
            ),
        };
        let kubectl = state_dir
            .map(|dir| dir.join("bin/kubectl"))
            .filter(|path| path.is_file())
            .unwrap_or_else(|| PathBuf::from("kubectl"));
        let config = Kubeconfig::read_from(&kubeconfig)
            .with_context(|| format!("failed to read {}", kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("failed to load {}", kubeconfig.display()))?;
        let client = Client::try_from(config).context("failed to build a client")?;
        tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
            .await
            .with_context(|| {
                format!(
                    "the API server in {} did not answer within 10s",
                    kubeconfig.display()
                )
            })?
            .with_context(|| format!("the API server in {} is down", kubeconfig.display()))?;
        Ok(Self {
            client,
            kubeconfig,
            kubectl,
        })
    }

    /// A fresh namespace for one test, deleted when dropped.
    pub async fn namespace(&self, test: &str) -> Result<TestNamespace> {
        let name = unique_name(test);
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": { "name": name, "labels": { "kubetune.io/e2e": "true" } }
        }))?;
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("failed to create namespace {name}"))?;
        let guard = TestNamespace {
            name: name.clone(),
            cluster: self.clone(),
        };
        // Pods are refused until the controller manager made the default
        // ServiceAccount.
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &name);
        wait_for(&accounts, "default", Duration::from_secs(60), |_| true)
            .await
            .context("the controller manager did not create the default ServiceAccount")?;
        Ok(guard)
    }

    /// kubectl with this cluster's kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(&self.kubectl);
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }

    /// helm from the cluster's build (next to its kubectl), else `helm` on PATH, with
    /// this cluster's kubeconfig (`KUBECONFIG`, so a caller may set another).
    pub fn helm(&self) -> Command {
        let built = self.kubectl.with_file_name("helm");
        let mut command = Command::new(if built.is_file() {
            built
        } else {
            PathBuf::from("helm")
        });
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }
}

/// A namespace that is deleted (without waiting) when dropped, also when the
/// test panics.
#[derive(Debug)]
pub struct TestNamespace {
    pub name: String,
    cluster: Cluster,
}

impl TestNamespace {
    /// An API for namespaced objects in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.cluster.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop cannot be async; kubectl is a plain process and `--wait=false` keeps
        // it short. A failure only leaves a namespace behind in a throwaway cluster.
        let _ = self
            .cluster
            .kubectl()
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `e2e-<test>-<suffix>`, a valid namespace name unique to this run.
pub fn unique_name(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let slug: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let suffix =
        nanos ^ std::process::id().rotate_left(16) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("e2e-{}-{:06x}", slug.trim_matches('-'), suffix & 0xff_ffff)
}

/// A pod for the simulated GPU nodes.
#[derive(Debug, Clone)]
pub struct GpuPod {
    name: String,
    gpus: u32,
    product: Option<String>,
    tolerate_gpu_taint: bool,
    annotations: BTreeMap<String, String>,
}

impl GpuPod {
    /// A pod asking for `gpus` GPUs of any product, tolerating the GPU taint.
    pub fn new(name: &str, gpus: u32) -> Self {
        Self {
            name: name.to_owned(),
            gpus,
            product: None,
            tolerate_gpu_taint: true,
            annotations: BTreeMap::new(),
        }
    }

    /// Only nodes whose `nvidia.com/gpu.product` is `product`.
    pub fn product(mut self, product: &str) -> Self {
        self.product = Some(product.to_owned());
        self
    }

    /// Leave out the toleration of the `nvidia.com/gpu:NoSchedule` taint.
    pub fn without_gpu_toleration(mut self) -> Self {
        self.tolerate_gpu_taint = false;
        self
    }

    /// An annotation, e.g. one of the `sim.kubetune.io/…` ones that steer kwok.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The pod's spec template as JSON (for Jobs).
    pub fn template(&self) -> serde_json::Value {
        let mut spec = json!({
            "restartPolicy": "Never",
            "containers": [{
                "name": "trainer",
                "image": "registry.invalid/kubetune/trainer:e2e",
                "resources": {
                    "requests": { GPU: self.gpus.to_string() },
                    "limits": { GPU: self.gpus.to_string() },
                },
            }],
        });
        if let Some(product) = &self.product {
            spec["nodeSelector"] = json!({ "nvidia.com/gpu.product": product });
        }
        if self.tolerate_gpu_taint {
            spec["tolerations"] =
                json!([{ "key": GPU, "operator": "Exists", "effect": "NoSchedule" }]);
        }
        json!({
            "metadata": { "annotations": self.annotations },
            "spec": spec,
        })
    }

    /// The Pod.
    pub fn build(&self) -> Result<Pod> {
        let mut pod = self.template();
        pod["metadata"]["name"] = json!(self.name);
        serde_json::from_value(pod).context("GpuPod builds a Pod")
    }
}

/// Waits until the object exists and `condition` holds, for at most `timeout`;
/// on timeout the error shows the object as it last was.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    condition: impl Fn(&K) -> bool,
) -> Result<K>
where
    K: Clone + Debug + Send + DeserializeOwned + Resource + serde::Serialize + 'static,
{
    let waited = tokio::time::timeout(
        timeout,
        await_condition(api.clone(), name, |object: Option<&K>| {
            object.is_some_and(&condition)
        }),
    )
    .await;
    match waited {
        Ok(Ok(Some(object))) => Ok(object),
        Ok(Ok(None)) => bail!("{name} was deleted while waiting for it"),
        Ok(Err(error)) => Err(error).with_context(|| format!("failed to watch {name}")),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            bail!(
                "{name} did not reach the expected state within {}s; it is now:\n{}",
                timeout.as_secs(),
                last.map_or_else(
                    || "(absent)".to_owned(),
                    |object| serde_json::to_string_pretty(&object).unwrap_or_default()
                )
            )
        }
    }
}

/// A pod condition's status and reason, e.g. `PodScheduled`.
pub fn pod_condition<'a>(pod: &'a Pod, kind: &str) -> Option<(&'a str, Option<&'a str>)> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|condition| condition.type_ == kind)
        .map(|condition| (condition.status.as_str(), condition.reason.as_deref()))
}

/// The pod's phase, `""` before it has one.
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .unwrap_or("")
}

/// The example with its `metadata.namespace` moved into the test's namespace, so
/// the dry run does not depend on (or touch) the namespace the example names.
/// Only that line changes; everything else reaches kubectl byte for byte.
pub fn in_namespace(text: &str, namespace: &str) -> String {
    let mut in_metadata = false;
    let mut moved = false;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('#') && !line.is_empty() {
            in_metadata = line == "metadata:";
        }
        if in_metadata && !moved && line.starts_with("  namespace:") {
            out.push_str(&format!("  namespace: {namespace}\n"));
            moved = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Where the examples live.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e sits inside the workspace")
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_valid_namespace_names_and_differ() {
        let a = unique_name("Pod_asking for 9 GPUs!");
        let b = unique_name("Pod_asking for 9 GPUs!");
        assert_ne!(a, b);
        for name in [a, b] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.starts_with("e2e-pod-asking-for-9-gpus-"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
        }
    }

    #[test]
    fn gpu_pod_asks_for_its_gpus_on_its_product_and_tolerates_the_taint() {
        let pod = GpuPod::new("p", 8)
            .product(A100)
            .annotation("sim.kubetune.io/outcome", "run")
            .build()
            .expect("builds");
        let spec = pod.spec.expect("spec");
        let requests = spec.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("requests");
        assert_eq!(requests[GPU].0, "8");
        assert_eq!(
            spec.node_selector.expect("selector")["nvidia.com/gpu.product"],
            A100
        );
        assert_eq!(
            spec.tolerations.expect("tolerations")[0].key.as_deref(),
            Some(GPU)
        );
        assert_eq!(
            pod.metadata.annotations.expect("annotations")["sim.kubetune.io/outcome"],
            "run"
        );
        let bare = GpuPod::new("q", 1)
            .without_gpu_toleration()
            .build()
            .expect("builds");
        assert!(bare.spec.expect("spec").tolerations.is_none());
    }

    #[test]
    fn only_the_metadata_namespace_of_an_example_is_moved() {
        let text = "# c\napiVersion: v1\nkind: X\nmetadata:\n  name: a\n  namespace: ml-team\n\
                    spec:\n  source:\n  namespace: keep\n";
        assert_eq!(
            in_namespace(text, "e2e-x"),
            "# c\napiVersion: v1\nkind: X\nmetadata:\n  name: a\n  namespace: e2e-x\n\
             spec:\n  source:\n  namespace: keep\n"
        );
    }
}

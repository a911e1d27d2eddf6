//! The Helm chart (`charts/kubetune`) on the real cluster, with the helm and kubectl
//! the cluster was built with: it lints, its schema refuses bad values, the API server
//! accepts what it renders (and Pod Security "restricted" finds nothing to refuse), an
//! install's ServiceAccount is enough for the operator to turn a FineTuneJob into a Job
//! and elect a leader, and `kubectl auth can-i` shows what that account cannot do.
//!
//! Every install goes into its own namespace and is uninstalled when the test ends (the
//! chart has cluster-scoped RBAC); the CRDs are already in the cluster, so helm skips
//! its copies.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kubetune_crds::finetunejob::FineTuneJob;
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::test_support::{Cluster, TestNamespace, wait_for, workspace_root};
use kubetune_operator::cost::TableSource;
use kubetune_operator::finetunejob::controller::{self, Settings};
use kubetune_operator::finetunejob::render::JOB_LABEL;
use kubetune_operator::leader::Elector;
use kubetune_operator::metrics::Metrics;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn chart() -> PathBuf {
    workspace_root().join("charts/kubetune")
}

/// Runs `command`, failing with its stderr unless it succeeds.
fn succeed(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("failed to run {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// `helm template` of the chart for `namespace` with `--set` values.
fn template(cluster: &Cluster, namespace: &str, set: &[&str]) -> Result<String> {
    let mut command = cluster.helm();
    command
        .args(["template", "kubetune"])
        .arg(chart())
        .args(["--namespace", namespace]);
    for value in set {
        command.args(["--set", value]);
    }
    Ok(String::from_utf8(succeed(&mut command)?.stdout)?)
}

/// A namespace that enforces (and warns about) Pod Security "restricted".
async fn restricted_namespace(cluster: &Cluster, test: &str) -> Result<TestNamespace> {
    let namespace = cluster.namespace(test).await?;
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let labels = json!({ "metadata": { "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
        "pod-security.kubernetes.io/warn": "restricted",
        "pod-security.kubernetes.io/warn-version": "latest",
    }}});
    namespaces
        .patch(
            &namespace.name,
            &PatchParams::default(),
            &Patch::Merge(&labels),
        )
        .await
        .context("failed to label the namespace restricted")?;
    Ok(namespace)
}

/// An installed release, uninstalled when dropped: its ClusterRoles outlive the
/// namespace otherwise.
struct Release {
    name: String,
    namespace: String,
    cluster: Cluster,
}

impl Release {
    fn install(cluster: &Cluster, namespace: &str, set: &[&str]) -> Result<Self> {
        let mut command = cluster.helm();
        command
            .args(["install", "kubetune"])
            .arg(chart())
            .args(["--namespace", namespace]);
        for value in set {
            command.args(["--set", value]);
        }
        succeed(&mut command)?;
        Ok(Self {
            name: "kubetune".into(),
            namespace: namespace.into(),
            cluster: cluster.clone(),
        })
    }

    /// The ServiceAccount the chart made, named as `kubetune.fullname` names it.
    fn service_account(&self) -> String {
        if self.name.contains("kubetune") {
            self.name.clone()
        } else {
            format!("{}-kubetune", self.name)
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .helm()
            .args(["uninstall", &self.name, "--namespace", &self.namespace])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// What `kubectl auth can-i … --as <account>` answers, as a list of mismatches.
fn can_i_mismatches(
    cluster: &Cluster,
    account: (&str, &str),
    checks: &[(bool, &[&str])],
) -> Result<Vec<String>> {
    let (namespace, name) = account;
    let user = format!("system:serviceaccount:{namespace}:{name}");
    let mut mismatches = Vec::new();
    for (expected, args) in checks {
        let output = cluster
            .kubectl()
            .args(["auth", "can-i"])
            .args(*args)
            .args(["--as", &user])
            // The groups a real token of the account carries.
            .args(["--as-group", "system:serviceaccounts"])
            .args(["--as-group", &format!("system:serviceaccounts:{namespace}")])
            .args(["--as-group", "system:authenticated"])
            .output()?;
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let allowed = match (output.status.code(), answer.as_str()) {
            (Some(0), "yes") => true,
            (Some(1), "no") => false,
            _ => bail!(
                "kubectl auth can-i {} said {answer:?}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            ),
        };
        if allowed != *expected {
            mismatches.push(format!(
                "can-i {}: {answer}, expected {}",
                args.join(" "),
                if *expected { "yes" } else { "no" }
            ));
        }
    }
    Ok(mismatches)
}

/// `examples/<file>` in no namespace, with no queue, priority class or node selector.
fn example(file: &str) -> Result<FineTuneJob> {
    let text = std::fs::read_to_string(workspace_root().join("examples").join(file))?;
    let mut ftj: FineTuneJob = serde_yaml::from_str(&text)?;
    ftj.metadata.namespace = None;
    ftj.spec.scheduling.queue_name = None;
    ftj.spec.scheduling.priority_class_name = None;
    ftj.spec.scheduling.node_selector.clear();
    Ok(ftj)
}

/// A kubeconfig for the cluster's API server that authenticates with `token` only.
fn token_kubeconfig(cluster: &Cluster, token: &str, path: &Path) -> Result<()> {
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&cluster.kubeconfig)?)?;
    let server = &admin["clusters"][0]["cluster"];
    ensure!(
        server.is_mapping(),
        "the cluster's kubeconfig names no cluster"
    );
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "kubetune-local", "cluster": server }],
        "users": [{ "name": "operator", "user": { "token": token } }],
        "contexts": [{ "name": "operator", "context": { "cluster": "kubetune-local", "user": "operator" } }],
        "current-context": "operator",
    });
    std::fs::write(path, serde_yaml::to_string(&config)?)?;
    Ok(())
}

/// The operator container's `--flag=value` arguments in the rendered Deployment.
fn operator_args(rendered: &str) -> Result<BTreeMap<String, String>> {
    for document in serde_yaml::Deserializer::from_str(rendered) {
        let object = <serde_json::Value as serde::Deserialize>::deserialize(document)?;
        if object["kind"] == "Deployment" {
            let args = object["spec"]["template"]["spec"]["containers"][0]["args"]
                .as_array()
                .context("the Deployment's container has args")?;
            return Ok(args
                .iter()
                .filter_map(|arg| arg.as_str()?.strip_prefix("--")?.split_once('='))
                .map(|(flag, value)| (flag.to_owned(), value.to_owned()))
                .collect());
        }
    }
    bail!("the chart renders no Deployment")
}

#[test]
fn chart_crds_are_the_generated_manifests_byte_for_byte() -> Result<()> {
    let generated = workspace_root().join("crds/manifests");
    let copied = chart().join("crds");
    let names = |dir: &Path| -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("failed to read {}", dir.display()))?
            .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        names.sort();
        Ok(names)
    };
    let files = names(&generated)?;
    assert_eq!(
        files,
        names(&copied)?,
        "charts/kubetune/crds/ must hold exactly crds/manifests/: run `cargo xtask crds`"
    );
    for file in files {
        assert!(
            std::fs::read(generated.join(&file))? == std::fs::read(copied.join(&file))?,
            "charts/kubetune/crds/{file} differs from crds/manifests/{file}: run `cargo xtask crds`"
        );
    }
    Ok(())
}

#[tokio::test]
async fn chart_lints_clean_in_both_modes() -> Result<()> {
    let cluster = cluster_or_skip!("chart_lints_clean_in_both_modes");
    for mode in ["scope.mode=cluster", "scope.mode=namespaced"] {
        let output = succeed(
            cluster
                .helm()
                .args(["lint", "--strict"])
                .arg(chart())
                .args(["--set", mode]),
        )?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("0 chart(s) failed") && !stdout.contains("[WARNING]"),
            "{mode}:\n{stdout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn servicemonitor_and_networkpolicy_render_only_when_enabled() -> Result<()> {
    let cluster = cluster_or_skip!("servicemonitor_and_networkpolicy_render_only_when_enabled");
    let objects = |set: &[&str]| -> Result<Vec<serde_json::Value>> {
        let rendered = template(&cluster, "kubetune-system", set)?;
        serde_yaml::Deserializer::from_str(&rendered)
            .map(|document| {
                Ok(<serde_json::Value as serde::Deserialize>::deserialize(
                    document,
                )?)
            })
            .filter(|object| !matches!(object, Ok(serde_json::Value::Null)))
            .collect()
    };
    let kinds = |objects: &[serde_json::Value]| -> Vec<String> {
        objects
            .iter()
            .filter_map(|o| o["kind"].as_str().map(str::to_owned))
            .collect()
    };
    let defaults = kinds(&objects(&[])?);
    assert!(
        !defaults.contains(&"ServiceMonitor".to_owned()),
        "{defaults:?}"
    );
    assert!(
        !defaults.contains(&"NetworkPolicy".to_owned()),
        "{defaults:?}"
    );
    assert!(
        defaults.contains(&"PodDisruptionBudget".to_owned()),
        "{defaults:?}"
    );

    let enabled = objects(&[
        "metrics.serviceMonitor.enabled=true",
        "networkPolicy.enabled=true",
        "podDisruptionBudget.enabled=false",
    ])?;
    assert!(!kinds(&enabled).contains(&"PodDisruptionBudget".to_owned()));
    let monitor = enabled
        .iter()
        .find(|o| o["kind"] == "ServiceMonitor")
        .context("a ServiceMonitor")?;
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    let service = enabled
        .iter()
        .find(|o| o["kind"] == "Service")
        .context("the metrics Service")?;
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("the ServiceMonitor selects by labels")?;
    assert!(
        selector
            .iter()
            .all(|(key, value)| &service["metadata"]["labels"][key] == value),
        "the ServiceMonitor selects the metrics Service: {selector:?}"
    );
    let policy = enabled
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy")
        .context("a NetworkPolicy")?;
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], "metrics");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    Ok(())
}

#[tokio::test]
async fn values_that_break_the_schema_are_refused_by_template_and_install() -> Result<()> {
    let cluster =
        cluster_or_skip!("values_that_break_the_schema_are_refused_by_template_and_install");
    let namespace = cluster.namespace("helm-schema").await?;
    // (values file, what the error must name)
    let cases = [
        (
            "pricing:\n  gpuHourly:\n    NVIDIA-L4: {onDemand: \"0.80123\", spot: \"0.30\"}\n",
            "/pricing/gpuHourly/NVIDIA-L4/onDemand",
        ),
        (
            "pricing:\n  defaultGpuHourly: {onDemand: 4.00, spot: \"2.00\"}\n",
            "/pricing/defaultGpuHourly/onDemand",
        ),
        // Values merge with the defaults, so a new entry is what can miss a price.
        (
            "pricing:\n  instanceTypes:\n    g6.xlarge: {onDemand: \"0.80\"}\n",
            "missing property 'spot'",
        ),
        ("pricing:\n  currency: dollars\n", "/pricing/currency"),
        (
            "pricing:\n  spotNodeLabels: [{key: karpenter.sh/capacity-type}]\n",
            "/pricing/spotNodeLabels/0",
        ),
        // The operator's parser refuses unknown keys; so does the schema, at install.
        (
            "pricing:\n  throughputPerGpu: {default: 1000}\n",
            "additional properties 'throughputPerGpu' not allowed",
        ),
        // Throughput is a whole number of tokens per second.
        (
            "pricing:\n  throughputTokensPerSecond: {default: \"fast\"}\n",
            "/pricing/throughputTokensPerSecond/default",
        ),
        ("scope:\n  mode: everywhere\n", "/scope/mode"),
        ("replicaCount: two\n", "/replicaCount"),
        (
            "leaderElection:\n  enabled: \"yes\"\n",
            "/leaderElection/enabled",
        ),
        ("trainer:\n  image: \"\"\n", "/trainer/image"),
        (
            "replicas: 3\n",
            "additional properties 'replicas' not allowed",
        ),
    ];
    let dir = std::env::temp_dir().join(&namespace.name);
    std::fs::create_dir_all(&dir)?;
    let mut failures = Vec::new();
    for (index, (values, named)) in cases.iter().enumerate() {
        let file = dir.join(format!("bad-{index}.yaml"));
        std::fs::write(&file, values)?;
        for verb in ["template", "install"] {
            let output = cluster
                .helm()
                .args([verb, "kubetune"])
                .arg(chart())
                .args(["--namespace", &namespace.name, "--values"])
                .arg(&file)
                .output()?;
            if verb == "install" && output.status.success() {
                // Not refused after all: take it out again (its ClusterRoles outlive
                // the namespace).
                let _ = cluster
                    .helm()
                    .args(["uninstall", "kubetune", "--namespace", &namespace.name])
                    .output();
            }
            let stderr = String::from_utf8_lossy(&output.stderr);
            if output.status.success()
                || !stderr.contains("don't meet the specifications of the schema")
                || !stderr.contains(named)
            {
                failures.push(format!(
                    "helm {verb} with {values:?}: expected a schema error naming {named:?}, \
                     got ({}): {stderr}",
                    output.status
                ));
            }
        }
    }
    std::fs::remove_dir_all(&dir)?;
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let releases = succeed(
        cluster
            .helm()
            .args(["list", "-q", "--namespace", &namespace.name]),
    )?;
    assert!(
        releases.stdout.iter().all(u8::is_ascii_whitespace),
        "a refused install left a release: {}",
        String::from_utf8_lossy(&releases.stdout)
    );
    Ok(())
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_api_server_and_meets_pod_security_restricted()
-> Result<()> {
    let cluster = cluster_or_skip!(
        "rendered_chart_is_accepted_by_the_api_server_and_meets_pod_security_restricted"
    );
    let namespace = restricted_namespace(&cluster, "helm-dry-run").await?;
    for mode in ["cluster", "namespaced"] {
        let rendered = template(
            &cluster,
            &namespace.name,
            &[
                &format!("scope.mode={mode}"),
                "networkPolicy.enabled=true",
                "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
            ],
        )?;
        // The helm test pod is rendered too: Pod Security enforces on it.
        assert!(rendered.contains("helm.sh/hook: test"), "{rendered}");
        let mut apply = cluster
            .kubectl()
            .args(["apply", "--dry-run=server", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        apply
            .stdin
            .take()
            .context("kubectl's stdin is piped")?
            .write_all(rendered.as_bytes())?;
        let output = apply.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{mode}: {stderr}");
        // A Deployment that breaks "restricted" is admitted with a warning; its pods
        // would then be refused.
        assert!(
            !stderr.contains("PodSecurity"),
            "{mode}: Pod Security warns:\n{stderr}"
        );
        for object in [
            "deployment.apps/kubetune",
            "pod/kubetune-test-readyz",
            "configmap/kubetune-prices",
            "networkpolicy.networking.k8s.io/kubetune",
            "poddisruptionbudget.policy/kubetune",
            "service/kubetune-metrics",
        ] {
            assert!(
                stdout.contains(&format!("{object} created (server dry run)")),
                "{mode}: {object} missing from:\n{stdout}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn operator_with_the_charts_service_account_turns_a_finetunejob_into_a_job() -> Result<()> {
    let cluster =
        cluster_or_skip!("operator_with_the_charts_service_account_turns_a_finetunejob_into_a_job");
    let namespace = restricted_namespace(&cluster, "helm-namespaced").await?;
    let ns = namespace.name.as_str();
    let set = ["scope.mode=namespaced"];
    let release = Release::install(&cluster, ns, &set)?;
    let account = release.service_account();

    // The Deployment's pods were admitted under "restricted" (they stay Pending: every
    // simulated node is a tainted GPU node, and the operator does not tolerate that).
    let pods: Api<Pod> = namespace.api();
    let selector = "app.kubernetes.io/name=kubetune-operator";
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .len()
        != 2
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the Deployment did not create its 2 pods; events:\n{}",
            String::from_utf8_lossy(
                &succeed(cluster.kubectl().args(["get", "events", "-n", ns]))?.stdout
            )
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The operator, out of cluster, with the account's token and the chart's flags.
    let args = operator_args(&template(&cluster, ns, &set)?)?;
    assert_eq!(args.get("namespace").map(String::as_str), Some(ns));
    assert_eq!(args.get("leader-elect").map(String::as_str), Some("true"));
    let token =
        succeed(
            cluster
                .kubectl()
                .args(["create", "token", &account, "-n", ns, "--duration=1h"]),
        )?;
    let token = String::from_utf8(token.stdout)?.trim().to_owned();
    let kubeconfig = std::env::temp_dir().join(format!("{ns}-operator.kubeconfig"));
    token_kubeconfig(&cluster, &token, &kubeconfig)?;
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    let client = Client::try_from(config)?;

    // Leader election in the release's namespace (POD_NAMESPACE): create, then renew.
    let elector = Elector {
        api: Api::namespaced(client.clone(), ns),
        name: "kubetune-operator".into(),
        identity: "kubetune-0".into(),
        lease_duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    };
    assert!(elector.try_acquire_or_renew().await?, "creates the Lease");
    assert!(elector.try_acquire_or_renew().await?, "renews the Lease");

    let metrics = Arc::new(Metrics::register(&mut Default::default()));
    let operator = tokio::spawn(controller::run(
        client.clone(),
        vec![ns.to_owned()],
        Settings {
            trainer_image: args
                .get("trainer-image")
                .cloned()
                .context("--trainer-image")?,
            resync: Duration::from_secs(30),
            progress_interval: Duration::from_secs(60),
            // In the operator's namespace, as main.rs takes it from POD_NAMESPACE.
            price_table: Some(TableSource {
                namespace: ns.to_owned(),
                name: args.get("price-table").cloned().context("--price-table")?,
            }),
        },
        metrics.clone(),
    ));
    let _stop = AbortOnDrop(operator);

    // The claims only need to exist for the operator to create the Job.
    let claims: Api<PersistentVolumeClaim> = namespace.api();
    for claim in ["models", "datasets", "adapters", "checkpoints"] {
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": { "name": claim },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "resources": { "requests": { "storage": "1Gi" } },
            },
        }))?;
        claims.create(&PostParams::default(), &claim).await?;
    }
    let ftjs: Api<FineTuneJob> = namespace.api();
    ftjs.create(&PostParams::default(), &example("lora-a100.yaml")?)
        .await?;
    // A gang also gets a headless Service; on a product no node has, its pods wait
    // Unschedulable and hold no GPUs.
    let mut gang = example("full-16-nodes.yaml")?;
    if let Some(gpu) = gang.spec.resources.gpu.as_mut() {
        gpu.product = "NVIDIA-NO-SUCH-GPU".into();
    }
    let gang_name = gang
        .metadata
        .name
        .clone()
        .context("the example has a name")?;
    ftjs.create(&PostParams::default(), &gang).await?;

    let jobs: Api<Job> = namespace.api();
    let job = wait_for(&jobs, "support-lora-a1", TIMEOUT, |_| true).await?;
    let image = job
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].image.clone());
    assert_eq!(
        image.flatten().as_deref(),
        args.get("trainer-image").map(String::as_str)
    );
    wait_for(&jobs, &format!("{gang_name}-a1"), TIMEOUT, |_| true).await?;
    let services: Api<Service> = namespace.api();
    let gang_services = services
        .list(&ListParams::default().labels(&format!("{JOB_LABEL}={gang_name}")))
        .await?;
    assert_eq!(gang_services.items.len(), 1, "the gang's headless Service");
    // Status is written (status subresource patch) and events recorded.
    wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        f.status.as_ref().is_some_and(|s| !s.attempts.is_empty())
    })
    .await?;
    let events: Api<Event> = namespace.api();
    let recorded = events.list(&ListParams::default()).await?.items;
    assert!(
        recorded
            .iter()
            .any(|e| e.reporting_controller.as_deref() == Some(controller::FIELD_MANAGER)),
        "the operator recorded events: {recorded:?}"
    );

    // The price table the chart rendered was read, by name, and parsed.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while metrics.price_table_valid.get() != 1 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the operator did not load the chart's price table"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The token itself, through kubectl: no Secrets, nothing outside its namespace.
    for args in [
        vec!["get", "secrets", "-n", ns],
        vec!["get", "finetunejobs", "-n", "default"],
        vec!["get", "finetunejobs", "--all-namespaces"],
    ] {
        let output = Command::new(&cluster.kubectl)
            .env("KUBECONFIG", &kubeconfig)
            .args(&args)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("Forbidden"),
            "kubectl {}: expected Forbidden, got ({}): {stderr}",
            args.join(" "),
            output.status
        );
    }
    std::fs::remove_file(&kubeconfig)?;

    let mismatches = can_i_mismatches(
        &cluster,
        (ns, &account),
        &[
            (true, &["list", "finetunejobs.kubetune.io", "-n", ns]),
            (
                true,
                &[
                    "patch",
                    "finetunejobs.kubetune.io",
                    "--subresource=status",
                    "-n",
                    ns,
                ],
            ),
            (true, &["create", "jobs.batch", "-n", ns]),
            (true, &["watch", "nodes"]),
            (true, &["get", "configmaps/kubetune-prices", "-n", ns]),
            // Namespaced mode: nothing beyond its namespace (Nodes excepted).
            (
                false,
                &["list", "finetunejobs.kubetune.io", "--all-namespaces"],
            ),
            (false, &["create", "jobs.batch", "-n", "default"]),
            (
                false,
                &["create", "leases.coordination.k8s.io", "-n", "default"],
            ),
            // Its namespace's other ConfigMaps are not readable, nor are Secrets.
            (false, &["get", "configmaps/kube-root-ca.crt", "-n", ns]),
            (false, &["list", "configmaps", "-n", ns]),
            (false, &["get", "secrets", "-n", ns]),
            (false, &["list", "secrets", "--all-namespaces"]),
            // It never makes pods itself; the Job controller does.
            (false, &["create", "pods", "-n", ns]),
            (false, &["delete", "pods", "-n", ns]),
            // The spec is the user's.
            (false, &["update", "finetunejobs.kubetune.io", "-n", ns]),
            (false, &["delete", "finetunejobs.kubetune.io", "-n", ns]),
            // Only its own Lease.
            (
                false,
                &[
                    "update",
                    "leases.coordination.k8s.io/someone-else",
                    "-n",
                    ns,
                ],
            ),
            // No way to grant itself more.
            (
                false,
                &["create", "rolebindings.rbac.authorization.k8s.io", "-n", ns],
            ),
            (
                false,
                &["escalate", "roles.rbac.authorization.k8s.io", "-n", ns],
            ),
            (false, &["bind", "clusterroles.rbac.authorization.k8s.io"]),
            (false, &["impersonate", "serviceaccounts", "-n", ns]),
        ],
    )?;
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    Ok(())
}

#[tokio::test]
async fn cluster_mode_rbac_grants_what_the_operator_needs_everywhere_and_nothing_more() -> Result<()>
{
    let cluster = cluster_or_skip!(
        "cluster_mode_rbac_grants_what_the_operator_needs_everywhere_and_nothing_more"
    );
    let namespace = restricted_namespace(&cluster, "helm-cluster").await?;
    let ns = namespace.name.as_str();
    // Nothing needs the pods here; the RBAC is what is checked.
    let release = Release::install(&cluster, ns, &["scope.mode=cluster", "replicaCount=0"])?;
    let account = release.service_account();
    let other = "default";
    let mismatches = can_i_mismatches(
        &cluster,
        (ns, &account),
        &[
            (
                true,
                &["list", "finetunejobs.kubetune.io", "--all-namespaces"],
            ),
            (
                true,
                &[
                    "watch",
                    "adapterdeployments.kubetune.io",
                    "--all-namespaces",
                ],
            ),
            (
                true,
                &[
                    "patch",
                    "finetunejobs.kubetune.io",
                    "--subresource=status",
                    "-n",
                    other,
                ],
            ),
            (
                true,
                &[
                    "patch",
                    "adapterdeployments.kubetune.io",
                    "--subresource=status",
                    "-n",
                    other,
                ],
            ),
            (true, &["create", "jobs.batch", "-n", other]),
            (true, &["delete", "jobs.batch", "-n", other]),
            (true, &["create", "configmaps", "-n", other]),
            (true, &["patch", "services", "-n", other]),
            (true, &["watch", "pods", "--all-namespaces"]),
            (true, &["get", "persistentvolumeclaims", "-n", other]),
            (true, &["create", "events.events.k8s.io", "-n", other]),
            (true, &["watch", "nodes"]),
            (true, &["create", "leases.coordination.k8s.io", "-n", ns]),
            (
                true,
                &[
                    "update",
                    "leases.coordination.k8s.io/kubetune-operator",
                    "-n",
                    ns,
                ],
            ),
            (true, &["watch", "configmaps/kubetune-prices", "-n", ns]),
            // Secrets, nowhere.
            (false, &["get", "secrets", "--all-namespaces"]),
            (false, &["list", "secrets", "-n", ns]),
            // Reads no ConfigMaps but its price table, deletes no ConfigMaps or Services.
            (false, &["get", "configmaps", "-n", other]),
            (false, &["delete", "services", "-n", other]),
            // Pods are the Job controller's.
            (false, &["create", "pods", "-n", other]),
            (false, &["delete", "pods", "-n", other]),
            (false, &["create", "pods/exec", "-n", other]),
            // Spec, CRDs and other people's custom resources are not its business.
            (false, &["update", "finetunejobs.kubetune.io", "-n", other]),
            (
                false,
                &["update", "customresourcedefinitions.apiextensions.k8s.io"],
            ),
            (
                false,
                &["list", "certificates.cert-manager.io", "--all-namespaces"],
            ),
            (false, &["create", "deployments.apps", "-n", other]),
            // Nodes are read only.
            (false, &["patch", "nodes"]),
            (false, &["delete", "nodes"]),
            // Leader election only in its namespace, only its Lease.
            (
                false,
                &["create", "leases.coordination.k8s.io", "-n", other],
            ),
            (
                false,
                &[
                    "update",
                    "leases.coordination.k8s.io/kube-scheduler",
                    "-n",
                    "kube-system",
                ],
            ),
            // No way to grant itself more.
            (
                false,
                &["create", "clusterrolebindings.rbac.authorization.k8s.io"],
            ),
            (
                false,
                &["escalate", "clusterroles.rbac.authorization.k8s.io"],
            ),
            (false, &["bind", "clusterroles.rbac.authorization.k8s.io"]),
            (false, &["impersonate", "users"]),
            (false, &["create", "serviceaccounts/token", "-n", ns]),
        ],
    )?;
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    Ok(())
}

/// Aborts the task when dropped, also when the test fails.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

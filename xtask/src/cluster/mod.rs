//! `cargo xtask cluster up | down | status | env`: a real Kubernetes control plane
//! on loopback, with simulated GPU nodes, for tests, the demo and benchmarks.
//!
//! `up` builds the components from their Go modules (`e2e/cluster/build.sh`, cached),
//! generates a PKI, starts etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok as detached processes, creates the GPU nodes kwok
//! simulates and applies the CRDs. As root it also adds one real node, a kubelet with
//! containerd on this machine, where pods really run (`realnode`), and the cluster's
//! DNS, CoreDNS, which those pods resolve Services with (`dns`). Everything (certificates, kubeconfigs, etcd's
//! data, logs, recorded PIDs) lives in one state directory outside the clone:
//! `$KUBETUNE_CLUSTER_DIR`, else `${KUBETUNE_CACHE:-~/.cache/kubetune}/cluster`.
//! Every component listens on 127.0.0.1 only, but for the API server and the kubelet
//! when there is a real node: its pods reach them at the machine's own address.

pub(crate) mod components;
mod dns;
pub(crate) mod nodes;
mod pki;
pub(crate) mod realnode;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use components::{Component, Recorded, Running};
use pki::Pki;

/// Names of the cluster's users, contexts and of the cluster itself in kubeconfigs.
const CLUSTER_NAME: &str = "kubetune-local";
/// How long one component may take to become ready (generous for 2-core CI).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Loopback ports of the components.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
    kwok: u16,
}

/// `state.json` in the state directory: written as each process starts, so that
/// `down` finds every process even when `up` itself died half-way.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    bin_dir: PathBuf,
    ports: Ports,
    nodes: String,
    processes: Vec<Recorded>,
    /// Set once `up` finished: nodes Ready and CRDs established.
    ready: bool,
    /// The real node, when `up` added one.
    #[serde(default)]
    real_node: Option<realnode::Node>,
}

/// Paths inside the state directory.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) dir: PathBuf,
}

impl Layout {
    fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    fn component_kubeconfig(&self, user: &str) -> PathBuf {
        self.dir
            .join("kubeconfigs")
            .join(format!("{user}.kubeconfig"))
    }
    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    fn log(&self, component: &str) -> PathBuf {
        self.logs().join(format!("{component}.log"))
    }
    /// A link to the bin directory, so `PATH=$STATE/bin:$PATH` gives kubectl v1.34.
    fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }
    fn lock(&self) -> PathBuf {
        let mut name = self
            .dir
            .file_name()
            .map(|name| name.to_os_string())
            .unwrap_or_default();
        name.push(".lock");
        self.dir.with_file_name(name)
    }
}

/// The state directory: `$KUBETUNE_CLUSTER_DIR`, else
/// `${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/cluster`. The e2e crate's
/// `test_support::state_dir` finds it the same way.
pub(crate) fn layout() -> Result<Layout> {
    let dir = if let Some(dir) = std::env::var_os("KUBETUNE_CLUSTER_DIR") {
        PathBuf::from(dir)
    } else {
        let cache = match std::env::var_os("KUBETUNE_CACHE") {
            Some(cache) => PathBuf::from(cache),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                .join(".cache/kubetune"),
        };
        cache.join("cluster")
    };
    Ok(Layout { dir })
}

const USAGE: &str =
    "usage: cargo xtask cluster <up [--nodes POOLS] [--port PORT] | down | status | env>

  up      build the components (cached), start the cluster, create the GPU nodes
          and apply the CRDs; says so and succeeds when it is already up
          --nodes POOLS  simulated nodes, COUNTxGPUS:PRODUCT[,…]
                         (env KUBETUNE_CLUSTER_NODES; default
                         4x8:NVIDIA-A100-SXM4-80GB,16x8:NVIDIA-H100-80GB-HBM3)
          --port PORT    the API server's port on 127.0.0.1
                         (env KUBETUNE_APISERVER_PORT; default: a free one)
          --no-real-node no real kubelet node (env KUBETUNE_REAL_NODE=0); without
                         root there is none anyway
  down    stop exactly the processes `up` started and remove the state
  status  what runs and whether it is healthy (non-zero exit when not)
  env     print `export KUBECONFIG=…` (and PATH with kubectl v1.34) for eval

state: $KUBETUNE_CLUSTER_DIR, else ${KUBETUNE_CACHE:-~/.cache/kubetune}/cluster";

/// Dispatches `cargo xtask cluster …`.
pub fn run(root: &Path, args: &[&str]) -> Result<()> {
    match args {
        ["up", rest @ ..] => up(root, &UpOptions::parse(rest)?),
        ["down"] => down(),
        ["status"] => status(),
        ["env"] => env(),
        _ => bail!("{USAGE}"),
    }
}

/// Options of `cluster up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    nodes: String,
    port: Option<u16>,
    real_node: bool,
}

impl UpOptions {
    /// Defaults, overridden by the environment, overridden by flags.
    pub fn parse(args: &[&str]) -> Result<Self> {
        let mut nodes = std::env::var("KUBETUNE_CLUSTER_NODES")
            .ok()
            .filter(|value| !value.trim().is_empty())
            .unwrap_or_else(|| nodes::DEFAULT_POOLS.to_owned());
        let mut port = match std::env::var("KUBETUNE_APISERVER_PORT") {
            Ok(port) if !port.trim().is_empty() => Some(parse_port(&port)?),
            _ => None,
        };
        let mut real_node = realnode::wanted_by_default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match *arg {
                "--no-real-node" => real_node = false,
                "--nodes" => nodes = (*args.next().context("--nodes needs a value")?).to_owned(),
                "--port" => port = Some(parse_port(args.next().context("--port needs a value")?)?),
                other => bail!("unknown option {other:?} for `cluster up`\n\n{USAGE}"),
            }
        }
        Ok(Self {
            nodes,
            port,
            real_node,
        })
    }
}

fn parse_port(text: &str) -> Result<u16> {
    match text.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => bail!("{text:?} is not a TCP port"),
    }
}

/// An exclusive lock beside the state directory, so two `up`s (or an `up` and a
/// `down`) never interleave.
fn lock(layout: &Layout) -> Result<File> {
    let path = layout.lock();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let file =
        File::create(&path).with_context(|| format!("failed to create {}", path.display()))?;
    file.lock()
        .with_context(|| format!("failed to lock {}", path.display()))?;
    Ok(file)
}

fn load(layout: &Layout) -> Result<Option<State>> {
    let path = layout.state();
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not a cluster state file", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("failed to read {}", path.display())),
    }
}

fn save(layout: &Layout, state: &State) -> Result<()> {
    let path = layout.state();
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(state)?)
        .with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("failed to write {}", path.display()))
}

/// kubectl for the cluster that is up, for other xtask commands (the benchmarks); fails
/// when none is.
pub(crate) fn connect() -> Result<Kubectl> {
    let layout = layout()?;
    let Some(state) = load(&layout)? else {
        bail!(
            "no cluster is up (no state in {}): run `cargo xtask cluster up`",
            layout.dir.display()
        );
    };
    Ok(kubectl_for(&layout, &state))
}

/// kubectl v1.34 from the build, with a kubeconfig.
#[derive(Debug, Clone)]
pub(crate) struct Kubectl {
    program: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    /// The cluster's admin kubeconfig.
    pub(crate) fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub(crate) fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=10s");
        command
    }

    /// `GET path` on the API server, or with `port` on another component that
    /// serves with a certificate from our CA; true on a 2xx answer.
    fn healthy(&self, port: Option<u16>, path: &str) -> bool {
        let mut command = self.command();
        if let Some(port) = port {
            command.arg(format!("--server=https://127.0.0.1:{port}"));
        }
        command
            .args(["get", "--raw", path])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Runs kubectl, failing with its stderr.
    pub(crate) fn run(&self, what: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut command = self.command();
        command
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("failed to run {}", self.program.display()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(input.as_bytes())
                .context("failed to write to kubectl")?;
        }
        let output = child.wait_with_output().context("failed to run kubectl")?;
        if !output.status.success() {
            bail!(
                "failed to {what}: kubectl {} ({}):\n{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

fn up(root: &Path, options: &UpOptions) -> Result<()> {
    let started = Instant::now();
    let layout = layout()?;
    // Parse the pools before building anything, so a typo fails at once.
    let pools = nodes::parse_pools(&options.nodes)?;
    let _lock = lock(&layout)?;

    if let Some(state) = load(&layout)? {
        let kubectl = kubectl_for(&layout, &state);
        let dead: Vec<&str> = state
            .processes
            .iter()
            .filter(|recorded| !components::alive(recorded))
            .map(|recorded| recorded.name.as_str())
            .collect();
        if state.ready && dead.is_empty() && kubectl.healthy(None, "/readyz") {
            println!(
                "cluster is already up (API server https://127.0.0.1:{}, state in {})",
                state.ports.apiserver,
                layout.dir.display()
            );
            print_env(&layout);
            return Ok(());
        }
        let why = if !dead.is_empty() {
            format!("{} not running", dead.join(", "))
        } else if !state.ready {
            "its `up` never finished".to_owned()
        } else {
            "the API server is not ready".to_owned()
        };
        eprintln!("cluster: the previous cluster is broken ({why}); stopping what is left of it");
        teardown(&layout, &state)?;
    } else if layout.dir.exists() {
        remove_state(&layout)?;
    }

    // A fixed port that is taken fails before the (possibly long) build.
    if let Some(port) = options.port {
        ensure_free_for_apiserver(port)?;
    }
    let bin_dir = build(root)?;
    for binary in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
        "kubectl",
    ] {
        if !bin_dir.join(binary).is_file() {
            bail!("{binary} is missing from {}", bin_dir.display());
        }
    }

    let real_node = if options.real_node {
        // As when it fails to start (see start_all): the rest of the cluster still works.
        realnode::prepare()
            .inspect_err(|error| {
                eprintln!(
                    "cluster: WARNING: cannot prepare the real node, continuing without it: \
                     {error:#}"
                );
            })
            .ok()
    } else {
        None
    };
    let ports = pick_ports(options.port)?;
    for dir in [layout.logs(), layout.dir.join("kubeconfigs")] {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    std::os::unix::fs::symlink(&bin_dir, layout.bin())
        .with_context(|| format!("failed to link {}", layout.bin().display()))?;
    let pki = pki::generate(&layout.pki(), real_node.as_ref().map(|node| node.ip))?;
    write_kubeconfigs(&layout, &pki, ports.apiserver)?;
    let stages = layout.dir.join("kwok-stages.yaml");
    std::fs::write(
        &stages,
        include_str!("../../../e2e/cluster/kwok-stages.yaml"),
    )
    .with_context(|| format!("failed to write {}", stages.display()))?;

    let mut state = State {
        bin_dir: bin_dir.clone(),
        ports: ports.clone(),
        nodes: options.nodes.clone(),
        processes: Vec::new(),
        ready: false,
        real_node,
    };
    save(&layout, &state)?;

    let mut running: Vec<Running> = Vec::new();
    let result = start_all(&layout, &pki, &mut state, &mut running, &stages).and_then(|()| {
        let kubectl = kubectl_for(&layout, &state);
        apply_crds(root, &kubectl)?;
        create_nodes(&kubectl, &pools)?;
        if state.real_node.is_some() {
            realnode::create_volumes(&layout, &kubectl)?;
            println!(
                "    local volumes: StorageClass {} ({})",
                realnode::STORAGE_CLASS,
                layout.dir.join("node/volumes").display()
            );
        }
        Ok(())
    });
    if let Err(error) = result {
        // Leave the logs for a look, stop every process.
        for process in running.iter().rev() {
            if let Err(stop_error) = components::stop(&process.recorded) {
                eprintln!("cluster: {stop_error:#}");
            }
        }
        for mut process in running {
            let _ = process.child.try_wait();
        }
        return Err(error.context(format!(
            "cluster up failed; logs are in {} (`cargo xtask cluster down` removes them)",
            layout.logs().display()
        )));
    }
    state.ready = true;
    save(&layout, &state)?;

    let node_count: usize = pools.iter().map(|pool| pool.count).sum();
    let real = match &state.real_node {
        Some(node) => format!(" and the real node {} ({})", realnode::NODE_NAME, node.ip),
        None => String::new(),
    };
    println!(
        "cluster is up in {:.1}s: API server https://127.0.0.1:{}, {node_count} simulated GPU \
         nodes{real}, state in {}",
        started.elapsed().as_secs_f64(),
        ports.apiserver,
        layout.dir.display()
    );
    print_env(&layout);
    Ok(())
}

/// Runs `e2e/cluster/build.sh` (instant when cached): the bin directory.
fn build(root: &Path) -> Result<PathBuf> {
    let script = root.join("e2e/cluster/build.sh");
    println!(
        "==> building the cluster's components ({})",
        script.display()
    );
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("failed to run bash (needed for e2e/cluster/build.sh)")?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); its output is above",
            script.display(),
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let bin = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .context("build.sh printed no bin directory")?;
    Ok(PathBuf::from(bin))
}

fn pick_ports(apiserver: Option<u16>) -> Result<Ports> {
    let apiserver = match apiserver {
        Some(port) => {
            ensure_free_for_apiserver(port)?;
            port
        }
        None => components::free_port()?,
    };
    let mut taken = vec![apiserver];
    let mut next = || -> Result<u16> {
        loop {
            let port = components::free_port()?;
            if !taken.contains(&port) {
                taken.push(port);
                return Ok(port);
            }
        }
    };
    Ok(Ports {
        etcd_client: next()?,
        etcd_peer: next()?,
        apiserver,
        controller_manager: next()?,
        scheduler: next()?,
        kwok: next()?,
    })
}

fn ensure_free_for_apiserver(port: u16) -> Result<()> {
    if !components::port_is_free(port) {
        bail!(
            "port {port} on 127.0.0.1, asked for the API server (--port or \
             KUBETUNE_APISERVER_PORT), is in use: free it or pick another"
        );
    }
    Ok(())
}

fn write_kubeconfigs(layout: &Layout, pki: &Pki, port: u16) -> Result<()> {
    let users = [
        (
            layout.component_kubeconfig("kubelet"),
            "system:node:kubetune-real",
            &pki.kubelet,
        ),
        (
            layout.component_kubeconfig("kube-proxy"),
            "system:kube-proxy",
            &pki.kube_proxy,
        ),
        (layout.kubeconfig(), "kubetune-admin", &pki.admin),
        (
            layout.component_kubeconfig("controller-manager"),
            "system:kube-controller-manager",
            &pki.controller_manager,
        ),
        (
            layout.component_kubeconfig("scheduler"),
            "system:kube-scheduler",
            &pki.scheduler,
        ),
        (
            layout.component_kubeconfig("kwok"),
            "kwok-controller",
            &pki.kwok,
        ),
        (
            layout.component_kubeconfig(dns::NAME),
            dns::USER,
            &pki.coredns,
        ),
    ];
    for (path, user, pair) in users {
        let text = kubeconfig(port, &pki.ca.cert, user, &pair.cert, &pair.key)?;
        std::fs::write(&path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

/// A kubeconfig that refers to the certificate files (JSON strings are YAML).
fn kubeconfig(port: u16, ca: &Path, user: &str, cert: &Path, key: &Path) -> Result<String> {
    let quote = |path: &Path| -> Result<String> {
        Ok(serde_json::to_string(path.to_str().with_context(
            || format!("path {} is not UTF-8", path.display()),
        )?)?)
    };
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {CLUSTER_NAME}\n  cluster:\n    \
         server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: \
         {user}\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- \
         name: {CLUSTER_NAME}\n  context:\n    cluster: {CLUSTER_NAME}\n    user: {user}\n\
         current-context: {CLUSTER_NAME}\n",
        ca = quote(ca)?,
        user = serde_json::to_string(user)?,
        cert = quote(cert)?,
        key = quote(key)?,
    ))
}

fn kubectl_for(layout: &Layout, state: &State) -> Kubectl {
    Kubectl {
        program: state.bin_dir.join("kubectl"),
        kubeconfig: layout.kubeconfig(),
    }
}

fn arg(flag: &str, path: &Path) -> String {
    format!("{flag}={}", path.display())
}

/// Starts the components in order, each once the one before is ready.
fn start_all(
    layout: &Layout,
    pki: &Pki,
    state: &mut State,
    running: &mut Vec<Running>,
    stages: &Path,
) -> Result<()> {
    let bin = state.bin_dir.clone();
    let ports = state.ports.clone();
    let kubectl = kubectl_for(layout, state);
    let etcd_url = |port: u16| format!("http://127.0.0.1:{port}");

    let etcd = Component {
        name: "etcd",
        program: bin.join("etcd"),
        args: vec![
            "--name=kubetune".into(),
            arg("--data-dir", &layout.dir.join("etcd")),
            format!("--listen-client-urls={}", etcd_url(ports.etcd_client)),
            format!("--advertise-client-urls={}", etcd_url(ports.etcd_client)),
            format!("--listen-peer-urls={}", etcd_url(ports.etcd_peer)),
            format!(
                "--initial-advertise-peer-urls={}",
                etcd_url(ports.etcd_peer)
            ),
            format!("--initial-cluster=kubetune={}", etcd_url(ports.etcd_peer)),
            // Tests do not need durability; fsync dominates etcd's latency.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ],
        log: layout.log("etcd"),
    };
    start(
        layout,
        state,
        running,
        &etcd,
        Some(ports.etcd_client),
        || {
            components::http_get(ports.etcd_client, "/health")
                .is_some_and(|(code, body)| code == 200 && body.contains("\"health\":\"true\""))
        },
    )?;

    let mut apiserver_args = match &state.real_node {
        // Pods reach the API server at the machine's address (through the
        // `kubernetes` Service and kube-proxy); it reaches the kubelet there for logs
        // and exec, with a client certificate the kubelet's webhook authorizes.
        Some(node) => vec![
            "--bind-address=0.0.0.0".into(),
            format!("--advertise-address={}", node.ip),
            "--kubelet-preferred-address-types=InternalIP".into(),
            arg("--kubelet-client-certificate", &pki.admin.cert),
            arg("--kubelet-client-key", &pki.admin.key),
        ],
        None => vec![
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
        ],
    };
    let apiserver = Component {
        name: "kube-apiserver",
        program: bin.join("kube-apiserver"),
        args: vec![
            format!("--etcd-servers={}", etcd_url(ports.etcd_client)),
            format!("--secure-port={}", ports.apiserver),
            arg("--cert-dir", &layout.dir.join("apiserver")),
            arg("--tls-cert-file", &pki.apiserver.cert),
            arg("--tls-private-key-file", &pki.apiserver.key),
            arg("--client-ca-file", &pki.ca.cert),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-cluster-ip-range={}", pki::SERVICE_CIDR),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            arg("--service-account-key-file", &pki.service_account_pub),
            arg(
                "--service-account-signing-key-file",
                &pki.service_account_key,
            ),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ]
        .into_iter()
        .chain(apiserver_args.drain(..))
        .collect(),
        log: layout.log("kube-apiserver"),
    };
    start(
        layout,
        state,
        running,
        &apiserver,
        Some(ports.apiserver),
        || kubectl.healthy(None, "/readyz"),
    )?;

    let cm_kubeconfig = layout.component_kubeconfig("controller-manager");
    let controller_manager = Component {
        name: "kube-controller-manager",
        program: bin.join("kube-controller-manager"),
        args: vec![
            arg("--kubeconfig", &cm_kubeconfig),
            arg("--authentication-kubeconfig", &cm_kubeconfig),
            arg("--authorization-kubeconfig", &cm_kubeconfig),
            arg("--client-ca-file", &pki.ca.cert),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.controller_manager),
            arg("--tls-cert-file", &pki.components.cert),
            arg("--tls-private-key-file", &pki.components.key),
            "--leader-elect=false".into(),
            format!("--cluster-name={CLUSTER_NAME}"),
            "--use-service-account-credentials=true".into(),
            arg(
                "--service-account-private-key-file",
                &pki.service_account_key,
            ),
            arg("--root-ca-file", &pki.ca.cert),
            arg("--cluster-signing-cert-file", &pki.ca.cert),
            arg("--cluster-signing-key-file", &pki.ca.key),
            "--profiling=false".into(),
            // The default 20 requests/s per controller client is sized for a control
            // plane shared with many nodes; here the tests churn namespaces, Jobs and
            // pods, and a throttled garbage collector left a torn-down gang's pods
            // undeleted for minutes on a loaded CI machine.
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
        ],
        log: layout.log("kube-controller-manager"),
    };
    start(
        layout,
        state,
        running,
        &controller_manager,
        Some(ports.controller_manager),
        || kubectl.healthy(Some(ports.controller_manager), "/healthz"),
    )?;

    let scheduler_kubeconfig = layout.component_kubeconfig("scheduler");
    let scheduler = Component {
        name: "kube-scheduler",
        program: bin.join("kube-scheduler"),
        args: vec![
            arg("--kubeconfig", &scheduler_kubeconfig),
            arg("--authentication-kubeconfig", &scheduler_kubeconfig),
            arg("--authorization-kubeconfig", &scheduler_kubeconfig),
            arg("--client-ca-file", &pki.ca.cert),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.scheduler),
            arg("--tls-cert-file", &pki.components.cert),
            arg("--tls-private-key-file", &pki.components.key),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
        ],
        log: layout.log("kube-scheduler"),
    };
    start(
        layout,
        state,
        running,
        &scheduler,
        Some(ports.scheduler),
        || kubectl.healthy(Some(ports.scheduler), "/healthz"),
    )?;

    let kwok = Component {
        name: "kwok",
        program: bin.join("kwok"),
        args: vec![
            arg("--kubeconfig", &layout.component_kubeconfig("kwok")),
            arg("--config", stages),
            "--manage-all-nodes=false".into(),
            format!(
                "--manage-nodes-with-annotation-selector={}={}",
                nodes::KWOK_ANNOTATION,
                nodes::KWOK_ANNOTATION_VALUE
            ),
            "--node-ip=127.0.0.1".into(),
            format!("--server-address=127.0.0.1:{}", ports.kwok),
            arg("--tls-cert-file", &pki.components.cert),
            arg("--tls-private-key-file", &pki.components.key),
        ],
        log: layout.log("kwok"),
    };
    start(layout, state, running, &kwok, Some(ports.kwok), || {
        kubectl.healthy(Some(ports.kwok), "/healthz")
    })?;

    if let Some(node) = state.real_node.clone() {
        let before = running.len();
        if let Err(error) = start_real_node(layout, pki, state, running, &kubectl) {
            // The control plane and the simulated nodes work without it: go on, say
            // so, and leave nothing of the node behind. Tests that need it then skip
            // with this reason instead of every test failing.
            eprintln!(
                "cluster: WARNING: the real node did not start, continuing without it: \
                 {error:#}"
            );
            let started: Vec<Running> = running.drain(before..).collect();
            for mut process in started.into_iter().rev() {
                if let Err(stop_error) = components::stop(&process.recorded) {
                    eprintln!("cluster: {stop_error:#}");
                }
                let _ = process.child.try_wait();
                state
                    .processes
                    .retain(|recorded| *recorded != process.recorded);
            }
            // The recorded node holds the sysctls to restore once they were saved.
            let node = state.real_node.clone().unwrap_or(node);
            if let Err(cleanup_error) = realnode::cleanup(layout, &node, &bin) {
                eprintln!("cluster: {cleanup_error:#}");
            }
            state.real_node = None;
            save(layout, state)?;
        }
    }
    Ok(())
}

/// CoreDNS, containerd (with the pause image), the kubelet and kube-proxy.
fn start_real_node(
    layout: &Layout,
    pki: &Pki,
    state: &mut State,
    running: &mut Vec<Running>,
    kubectl: &Kubectl,
) -> Result<()> {
    let bin = state.bin_dir.clone();
    let node_start = realnode::Start {
        layout,
        bin: &bin,
        ca: &pki.ca.cert,
        kubelet_kubeconfig: layout.component_kubeconfig("kubelet"),
        proxy_kubeconfig: layout.component_kubeconfig("kube-proxy"),
    };
    let node_ip = state
        .real_node
        .as_ref()
        .context("the real node was prepared")?
        .ip;
    let dns_ready_port = components::free_port()?;
    dns::create_objects(kubectl, node_ip)?;
    let coredns = dns::component(layout, &bin, node_ip, dns_ready_port)?;
    start(
        layout,
        state,
        running,
        &coredns,
        Some(dns_ready_port),
        || dns::ready(dns_ready_port),
    )?;

    let containerd = node_start.containerd()?;
    start(layout, state, running, &containerd, None, || {
        node_start.containerd_ready()
    })?;
    realnode::import_pause_image(layout, include_str!("../../../e2e/cluster/pause.c"))?;

    let mut node = state
        .real_node
        .clone()
        .context("the real node was prepared")?;
    realnode::save_sysctls(&mut node);
    state.real_node = Some(node.clone());
    save(layout, state)?;
    let kubelet = node_start.kubelet(&node)?;
    start(
        layout,
        state,
        running,
        &kubelet,
        Some(node.kubelet_healthz_port),
        || realnode::node_ready(kubectl),
    )?;
    let proxy = node_start.kube_proxy(&node);
    start(
        layout,
        state,
        running,
        &proxy,
        Some(node.proxy_healthz_port),
        || {
            components::http_get(node.proxy_healthz_port, "/healthz")
                .is_some_and(|(code, _)| code == 200)
        },
    )?;
    Ok(())
}

/// Starts one component, records it, and waits until `ready`.
fn start(
    layout: &Layout,
    state: &mut State,
    running: &mut Vec<Running>,
    component: &Component,
    port: Option<u16>,
    ready: impl FnMut() -> bool,
) -> Result<()> {
    // Ports were free when picked; say clearly if something took one since.
    if let Some(port) = port
        && !components::port_is_free(port)
    {
        bail!(
            "port {port} on 127.0.0.1, picked for {}, is now in use by another program",
            component.name
        );
    }
    let step = Instant::now();
    let process = components::spawn(component)?;
    state.processes.push(process.recorded.clone());
    save(layout, state)?;
    running.push(process);
    let process = running
        .last_mut()
        .context("the process just started is recorded")?;
    components::wait_ready(process, READY_TIMEOUT, ready)?;
    let listening = port.map_or_else(String::new, |port| format!(", 127.0.0.1:{port}"));
    println!(
        "    {} ready in {:.1}s (pid {}{listening})",
        component.name,
        step.elapsed().as_secs_f64(),
        process.recorded.pid
    );
    Ok(())
}

fn apply_crds(root: &Path, kubectl: &Kubectl) -> Result<()> {
    let dir = root.join("crds/manifests");
    let dir = dir
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", dir.display()))?;
    kubectl.run(
        "apply the CRDs",
        &["apply", "--server-side", "--force-conflicts", "-f", dir],
        None,
    )?;
    kubectl.run(
        "wait for the CRDs to be established",
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            dir,
        ],
        None,
    )?;
    println!("    CRDs from crds/manifests/ established");
    Ok(())
}

fn create_nodes(kubectl: &Kubectl, pools: &[nodes::Pool]) -> Result<()> {
    if pools.iter().all(|pool| pool.count == 0) {
        return Ok(());
    }
    kubectl.run(
        "create the simulated nodes",
        &["create", "-f", "-"],
        Some(&nodes::manifests(pools)),
    )?;
    kubectl.run(
        "wait for the simulated nodes to be Ready",
        &[
            "wait",
            "--for=condition=Ready",
            "--timeout=60s",
            "node",
            "--selector=type=kwok",
        ],
        None,
    )?;
    println!("    simulated GPU nodes Ready: {}", describe_pools(pools));
    Ok(())
}

fn describe_pools(pools: &[nodes::Pool]) -> String {
    pools
        .iter()
        .map(|pool| format!("{}× {}×{}", pool.count, pool.gpus, pool.product))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stops every recorded process (last started first) and removes the state.
fn teardown(layout: &Layout, state: &State) -> Result<()> {
    let kubectl = kubectl_for(layout, state);
    let real_node_runs = state
        .processes
        .iter()
        .any(|recorded| recorded.name == "kubelet" && components::alive(recorded));
    if real_node_runs && kubectl.healthy(None, "/readyz") {
        realnode::drain(&kubectl);
    }
    let mut failures = Vec::new();
    for recorded in state.processes.iter().rev() {
        let was_alive = components::alive(recorded);
        match components::stop(recorded) {
            Ok(()) if was_alive => println!("    stopped {} (pid {})", recorded.name, recorded.pid),
            Ok(()) => println!(
                "    {} (pid {}) was not running",
                recorded.name, recorded.pid
            ),
            Err(error) => failures.push(format!("{error:#}")),
        }
    }
    if !failures.is_empty() {
        bail!(
            "failed to stop the cluster (state kept in {}):\n{}",
            layout.dir.display(),
            failures.join("\n")
        );
    }
    if let Some(node) = &state.real_node {
        realnode::cleanup(layout, node, &state.bin_dir)?;
        println!("    removed the real node's bridge, chains, mounts and cgroups");
    }
    remove_state(layout)
}

fn remove_state(layout: &Layout) -> Result<()> {
    match std::fs::remove_dir_all(&layout.dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => {
            Err(error).with_context(|| format!("failed to remove {}", layout.dir.display()))
        }
    }
}

fn down() -> Result<()> {
    let layout = layout()?;
    let _lock = lock(&layout)?;
    match load(&layout)? {
        Some(state) => {
            teardown(&layout, &state)?;
            println!("cluster is down ({} removed)", layout.dir.display());
        }
        None if layout.dir.exists() => {
            remove_state(&layout)?;
            println!(
                "no processes were recorded; removed {}",
                layout.dir.display()
            );
        }
        None => println!("no cluster is up (nothing in {})", layout.dir.display()),
    }
    Ok(())
}

fn status() -> Result<()> {
    let layout = layout()?;
    let Some(state) = load(&layout)? else {
        bail!(
            "no cluster is up (no state in {}): run `cargo xtask cluster up`",
            layout.dir.display()
        );
    };
    let kubectl = kubectl_for(&layout, &state);
    let ports = &state.ports;
    let mut healthy = true;
    println!("state: {}", layout.dir.display());
    for recorded in &state.processes {
        let running = components::alive(recorded);
        let (port, check) = match recorded.name.as_str() {
            "etcd" => (
                ports.etcd_client,
                running
                    && components::http_get(ports.etcd_client, "/health")
                        .is_some_and(|(code, _)| code == 200),
            ),
            "kube-apiserver" => (ports.apiserver, running && kubectl.healthy(None, "/readyz")),
            "kube-controller-manager" => (
                ports.controller_manager,
                running && kubectl.healthy(Some(ports.controller_manager), "/healthz"),
            ),
            "kube-scheduler" => (
                ports.scheduler,
                running && kubectl.healthy(Some(ports.scheduler), "/healthz"),
            ),
            "kwok" => (
                ports.kwok,
                running && kubectl.healthy(Some(ports.kwok), "/healthz"),
            ),
            "kubelet" => (0, running && realnode::node_ready(&kubectl)),
            "kube-proxy" => match &state.real_node {
                Some(node) => (
                    node.proxy_healthz_port,
                    running
                        && components::http_get(node.proxy_healthz_port, "/healthz")
                            .is_some_and(|(code, _)| code == 200),
                ),
                None => (0, running),
            },
            _ => (0, running),
        };
        healthy &= check;
        println!(
            "  {:<24} pid {:<8} 127.0.0.1:{:<6} {}",
            recorded.name,
            recorded.pid,
            port,
            match (running, check) {
                (false, _) => "NOT RUNNING",
                (true, false) => "running, NOT HEALTHY",
                (true, true) => "running, healthy",
            }
        );
    }
    let expected = if state.real_node.is_some() { 8 } else { 5 };
    if state.processes.len() < expected {
        healthy = false;
        println!(
            "  only {} of {expected} components were started",
            state.processes.len()
        );
    }
    if healthy {
        match kubectl.run(
            "list the nodes",
            &[
                "get",
                "nodes",
                "--selector=type=kwok",
                "-o",
                "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ],
            None,
        ) {
            Ok(out) => {
                let ready = out.lines().filter(|line| *line == "True").count();
                let total = out.lines().count();
                println!("  simulated nodes: {ready}/{total} Ready ({})", state.nodes);
                healthy &= ready == total;
            }
            Err(error) => {
                healthy = false;
                println!("  simulated nodes: unknown ({error:#})");
            }
        }
    }
    if !state.ready {
        healthy = false;
        println!("  `cluster up` did not finish");
    }
    if !healthy {
        bail!(
            "the cluster is not healthy (logs in {})",
            layout.logs().display()
        );
    }
    println!("cluster is up and healthy");
    Ok(())
}

fn env() -> Result<()> {
    let layout = layout()?;
    if load(&layout)?.is_none() {
        bail!(
            "no cluster is up (no state in {}): run `cargo xtask cluster up`",
            layout.dir.display()
        );
    }
    print_env(&layout);
    Ok(())
}

fn print_env(layout: &Layout) {
    println!("export KUBECONFIG={}", shell_quote(&layout.kubeconfig()));
    println!("export PATH={}:\"$PATH\"", shell_quote(&layout.bin()));
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// `cluster up` for `cargo xtask test`, with defaults and the environment.
pub fn up_for_tests(root: &Path) -> Result<()> {
    up(root, &UpOptions::parse(&[])?)
}

/// `cluster up` for `cargo xtask demo`: the defaults, and a real node it must have.
pub fn up_for_demo(root: &Path) -> Result<()> {
    let options = UpOptions::parse(&[])?;
    ensure!(
        options.real_node,
        "the demo runs pods for real on the cluster's real node, which needs root \
         (and not KUBETUNE_REAL_NODE=0)"
    );
    if let Some(state) = load(&layout()?)?
        && state.real_node.is_none()
    {
        bail!(
            "a cluster without a real node is up: `cargo xtask cluster down`, then run \
             the demo again"
        );
    }
    up(root, &options)?;
    ensure!(
        has_real_node()?,
        "the cluster came up without its real node (the warning above says why): the \
         demo needs it"
    );
    Ok(())
}

/// Whether the cluster that is up has a real node.
pub fn has_real_node() -> Result<bool> {
    Ok(load(&layout()?)?.is_some_and(|state| state.real_node.is_some()))
}

/// Imports OCI archives into the real node's containerd.
pub fn import_into_real_node(archives: &[PathBuf]) -> Result<()> {
    let layout = layout()?;
    ensure!(
        load(&layout)?.is_some_and(|state| state.real_node.is_some()),
        "no real node is up to import images into"
    );
    for archive in archives {
        realnode::import(&layout, archive)?;
        println!("    imported {} into the real node", archive.display());
    }
    Ok(())
}

/// `cluster down` for `cargo xtask test`.
pub fn down_for_tests() -> Result<()> {
    down()
}

/// After failed tests, before `down` removes them: copies the components' logs to
/// `into` and prints the controller manager's recent errors and warnings, which is
/// where a controller that lagged (the garbage collector, the Job controller) shows.
pub fn keep_logs(into: &Path) -> Result<()> {
    let logs = layout()?.logs();
    if !logs.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(into)
        .with_context(|| format!("failed to create {}", into.display()))?;
    for entry in std::fs::read_dir(&logs)? {
        let entry = entry?;
        std::fs::copy(entry.path(), into.join(entry.file_name()))
            .with_context(|| format!("failed to copy {}", entry.path().display()))?;
    }
    println!("    the cluster's logs are kept in {}", into.display());
    let manager =
        std::fs::read_to_string(logs.join("kube-controller-manager.log")).unwrap_or_default();
    let recent: Vec<&str> = manager
        .lines()
        .filter(|line| line.starts_with(['E', 'W']) && !line.contains("missing content for CA"))
        .collect();
    let shown = &recent[recent.len().saturating_sub(20)..];
    if !shown.is_empty() {
        println!("    kube-controller-manager's last errors and warnings:");
        for line in shown {
            println!("      {}", line.chars().take(400).collect::<String>());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_points_at_the_loopback_port_and_the_certificate_files() {
        let text = kubeconfig(
            6443,
            Path::new("/s/pki/ca.crt"),
            "kubetune-admin",
            Path::new("/s/pki/admin.crt"),
            Path::new("/s/pki/it's.key"),
        )
        .expect("renders");
        let value: serde_json::Value = serde_yaml::from_str(&text).expect("kubeconfig is YAML");
        assert_eq!(
            value["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(value["users"][0]["user"]["client-key"], "/s/pki/it's.key");
        assert_eq!(value["current-context"], CLUSTER_NAME);
    }

    #[test]
    fn the_lock_file_sits_beside_the_state_directory() {
        let layout = Layout {
            dir: PathBuf::from("/cache/kubetune/cluster"),
        };
        assert_eq!(layout.lock(), PathBuf::from("/cache/kubetune/cluster.lock"));
    }

    #[test]
    fn picked_ports_are_distinct_and_a_busy_fixed_port_is_refused() {
        let ports = pick_ports(None).expect("free ports");
        let mut all = vec![
            ports.etcd_client,
            ports.etcd_peer,
            ports.apiserver,
            ports.controller_manager,
            ports.scheduler,
            ports.kwok,
        ];
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 6);

        let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = busy.local_addr().expect("address").port();
        let error = pick_ports(Some(port)).expect_err("busy").to_string();
        assert!(error.contains(&format!("port {port}")), "{error}");
        assert!(error.contains("in use"), "{error}");
    }
}

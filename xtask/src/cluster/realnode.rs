//! The real worker node: a kubelet with containerd on this machine, next to the
//! simulated GPU nodes, so that pods really run (the demo, the end-to-end test).
//!
//! Debian's containerd, runc and CNI plugins run the pods; the kubelet and kube-proxy
//! come from the same Go build as the control plane. Everything lives in the cluster's
//! state directory (containerd's root and socket, the kubelet's root, the CNI
//! configuration and IP allocations), so `cluster down` removes it. What cannot live
//! there is undone by `cleanup`: the bridge, iptables chains, network namespaces,
//! cgroups, mounts and the host sysctls the kubelet and kube-proxy change.
//!
//! Facts this rests on are in `e2e/cluster/REAL_NODE.md`: above all, root here lacks
//! `CAP_SYS_RESOURCE`, so containerd must not ask runc for a lower `oom_score_adj`
//! (`restrict_oom_score_adj`).
//!
//! The node is tainted [`TAINT`] and labelled [`LABEL`]`=true`: only pods that
//! tolerate the taint and select the label run on it, so the simulated-GPU tests never
//! land there.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::components::{self, Component};
use super::{Kubectl, Layout};
use crate::images::{self, Buildah};

/// The node's name.
pub const NODE_NAME: &str = "kubetune-real";
/// The label (value `true`) and the `NoSchedule` taint key of the real node.
pub const LABEL: &str = "kubetune.io/real-node";
pub const TAINT: &str = LABEL;
/// The pods' addresses on the bridge; the simulated nodes use 127.64.0.0/16.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The Linux bridge the CNI plugin puts the pods on.
const BRIDGE: &str = "kubetune0";
/// The sandbox image containerd starts for every pod, built from `pause.c`.
const PAUSE_IMAGE: &str = "localhost/kubetune/pause:1";
/// The StorageClass of the local volumes `cluster up` creates.
pub const STORAGE_CLASS: &str = "kubetune-local";
/// How many local volumes `cluster up` creates.
const VOLUMES: usize = 12;
/// The user and group the kubetune images run as: the volumes' owner.
const VOLUME_OWNER: u32 = 65532;

/// Host sysctls the kubelet (kernel.*, vm.*), kube-proxy (conntrack) and the bridge
/// plugin (ip_forward) change; saved at `up`, restored at `down`.
const SYSCTLS: [&str; 10] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "net/ipv4/ip_forward",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
];

/// Debian packages the node needs, each with a file that shows it is installed.
const PACKAGES: [(&str, &str); 7] = [
    ("containerd", "/usr/bin/containerd"),
    ("runc", "/usr/sbin/runc"),
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    ("conntrack", "/usr/sbin/conntrack"),
    ("iptables", "/usr/sbin/iptables"),
    ("buildah", "/usr/bin/buildah"),
    // `gcc -static` for the pause program.
    ("libc6-dev", "/usr/lib/x86_64-linux-gnu/libc.a"),
];

/// What the state file keeps of the real node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    /// The machine's own address: the node's InternalIP, where the API server is
    /// advertised and the kubelet listens.
    pub ip: Ipv4Addr,
    pub kubelet_port: u16,
    pub kubelet_healthz_port: u16,
    pub proxy_healthz_port: u16,
    pub proxy_metrics_port: u16,
    /// The sysctls as they were before the node started (path under /proc/sys, value).
    pub sysctls: Vec<(String, String)>,
}

/// Whether `up` adds the real node: yes as root on Linux, unless
/// `KUBETUNE_REAL_NODE=0` (or `--no-real-node`) says no.
pub fn wanted_by_default() -> bool {
    let off = std::env::var("KUBETUNE_REAL_NODE")
        .is_ok_and(|value| matches!(value.trim(), "0" | "false" | "no"));
    !off && is_root()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Installs what is missing from Debian, picks the node's address and ports.
pub fn prepare() -> Result<Node> {
    crate::debian::install_missing(&PACKAGES, "the real node")?;
    let ip = node_ip()?;
    Ok(Node {
        ip,
        kubelet_port: components::free_port()?,
        kubelet_healthz_port: components::free_port()?,
        proxy_healthz_port: components::free_port()?,
        proxy_metrics_port: components::free_port()?,
        sysctls: Vec::new(),
    })
}

/// The first global IPv4 address of the interface the default route leaves by, else
/// of any interface.
fn node_ip() -> Result<Ipv4Addr> {
    let routes = run_text("ip", &["-4", "route", "show", "default"]).unwrap_or_default();
    let device = routes
        .split_whitespace()
        .skip_while(|word| *word != "dev")
        .nth(1)
        .map(str::to_owned);
    let mut args = vec!["-4", "-o", "addr", "show", "scope", "global"];
    if let Some(device) = &device {
        args.extend(["dev", device]);
    }
    let addresses = run_text("ip", &args)?;
    parse_first_address(&addresses).with_context(|| {
        format!(
            "this machine has no global IPv4 address for the node (ip {}):\n{addresses}",
            args.join(" ")
        )
    })
}

/// The address of the first line of `ip -4 -o addr` output.
fn parse_first_address(text: &str) -> Option<Ipv4Addr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        words.find(|word| *word == "inet")?;
        words.next()?.split('/').next()?.parse().ok()
    })
}

/// Paths of the node's files in the state directory.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(layout: &Layout) -> Self {
        Self {
            dir: layout.dir.join("node"),
        }
    }
    fn containerd_config(&self) -> PathBuf {
        self.dir.join("containerd/config.toml")
    }
    fn containerd_root(&self) -> PathBuf {
        self.dir.join("containerd/root")
    }
    fn containerd_state(&self) -> PathBuf {
        self.dir.join("containerd/state")
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }
    fn cni_conf(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }
    fn cni_ipam(&self) -> PathBuf {
        self.dir.join("cni/ipam")
    }
    fn kubelet_root(&self) -> PathBuf {
        self.dir.join("kubelet")
    }
    fn kubelet_config(&self) -> PathBuf {
        self.dir.join("kubelet-config.yaml")
    }
    fn volumes(&self) -> PathBuf {
        self.dir.join("volumes")
    }
}

/// The containerd socket of the cluster in `layout`.
pub fn socket(layout: &Layout) -> PathBuf {
    Files::new(layout).socket()
}

/// The host directory behind local volume `index`.
fn volume_dir(layout: &Layout, index: usize) -> PathBuf {
    Files::new(layout)
        .volumes()
        .join(format!("{STORAGE_CLASS}-{index}"))
}

/// The processes of the node, in start order: containerd, kubelet, kube-proxy.
pub struct Start<'a> {
    pub layout: &'a Layout,
    pub bin: &'a Path,
    pub ca: &'a Path,
    pub kubelet_kubeconfig: PathBuf,
    pub proxy_kubeconfig: PathBuf,
}

impl Start<'_> {
    pub fn containerd(&self) -> Result<Component> {
        let files = Files::new(self.layout);
        for dir in [
            files.containerd_root(),
            files.containerd_state(),
            files.cni_conf(),
            files.cni_ipam(),
            files.kubelet_root(),
        ] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
        }
        write(&files.containerd_config(), &containerd_config(&files))?;
        write(
            &files.cni_conf().join("10-kubetune.conflist"),
            &cni_config(&files.cni_ipam()),
        )?;
        Ok(Component {
            name: "containerd",
            program: PathBuf::from("/usr/bin/containerd"),
            args: vec![super::arg("--config", &files.containerd_config())],
            log: self.layout.log("containerd"),
        })
    }

    pub fn containerd_ready(&self) -> bool {
        ctr(self.layout, &["version"]).is_ok()
    }

    pub fn kubelet(&self, node: &Node) -> Result<Component> {
        let files = Files::new(self.layout);
        write(
            &files.kubelet_config(),
            &kubelet_config(node, self.ca, &files.socket()),
        )?;
        Ok(Component {
            name: "kubelet",
            program: self.bin.join("kubelet"),
            args: vec![
                super::arg("--config", &files.kubelet_config()),
                super::arg("--kubeconfig", &self.kubelet_kubeconfig),
                super::arg("--root-dir", &files.kubelet_root()),
                super::arg("--cert-dir", &files.kubelet_root().join("pki")),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={}", node.ip),
                format!("--node-labels={LABEL}=true"),
                "--v=1".into(),
            ],
            log: self.layout.log("kubelet"),
        })
    }

    pub fn kube_proxy(&self, node: &Node) -> Component {
        Component {
            name: "kube-proxy",
            program: self.bin.join("kube-proxy"),
            args: vec![
                super::arg("--kubeconfig", &self.proxy_kubeconfig),
                format!("--hostname-override={NODE_NAME}"),
                "--proxy-mode=iptables".into(),
                format!("--cluster-cidr={POD_CIDR}"),
                format!(
                    "--healthz-bind-address=127.0.0.1:{}",
                    node.proxy_healthz_port
                ),
                format!(
                    "--metrics-bind-address=127.0.0.1:{}",
                    node.proxy_metrics_port
                ),
                // Leave the host's conntrack table size and timeouts alone.
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
            ],
            log: self.layout.log("kube-proxy"),
        }
    }
}

/// Records the sysctls the node will change.
pub fn save_sysctls(node: &mut Node) {
    node.sysctls = SYSCTLS
        .iter()
        .filter_map(|path| {
            let value = std::fs::read_to_string(Path::new("/proc/sys").join(path)).ok()?;
            Some(((*path).to_owned(), value.trim().to_owned()))
        })
        .collect();
}

fn containerd_config(files: &Files) -> String {
    let quote =
        |path: PathBuf| serde_json::to_string(&path.display().to_string()).unwrap_or_default();
    format!(
        r#"version = 2
root = {root}
state = {state}

[grpc]
  address = {socket}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot give a pod the lower oom_score_adj
  # the CRI asks for, and every sandbox would fail to start.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {cni}
"#,
        root = quote(files.containerd_root()),
        state = quote(files.containerd_state()),
        socket = quote(files.socket()),
        cni = quote(files.cni_conf()),
    )
}

fn cni_config(ipam: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "kubetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam,
                    "ranges": [[{ "subnet": POD_CIDR }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    })
    .to_string()
}

fn kubelet_config(node: &Node, ca: &Path, socket: &Path) -> String {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.ip.to_string(),
        "port": node.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": node.kubelet_healthz_port,
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true },
            "x509": { "clientCAFile": ca }
        },
        "authorization": { "mode": "Webhook" },
        // No systemd here (PID 1 is not systemd) and the machine has cgroup v1.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": false,
        "failSwapOn": false,
        "containerRuntimeEndpoint": format!("unix://{}", socket.display()),
        "imageServiceEndpoint": format!("unix://{}", socket.display()),
        // Images are imported, never pulled: garbage collection must never remove one.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": false,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%"
        },
        "registerWithTaints": [{ "key": TAINT, "value": "true", "effect": "NoSchedule" }],
        "maxPods": 32,
        "clusterDomain": super::dns::DOMAIN,
        "clusterDNS": [super::dns::SERVICE_IP],
        "resolvConf": "/etc/resolv.conf",
        "rotateCertificates": false,
        "protectKernelDefaults": false
    })
    .to_string()
}

/// Builds the pause image (cached by the source's hash) and imports it into
/// containerd.
pub fn import_pause_image(layout: &Layout, source: &str) -> Result<()> {
    let cache = images::cache_dir()?;
    let dir = cache.join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let hash = fnv1a(source.as_bytes());
    let archive = dir.join(format!("pause-{hash:016x}.oci.tar"));
    if !archive.is_file() {
        let work = dir.join(format!(".pause-{hash:016x}"));
        std::fs::create_dir_all(&work)
            .with_context(|| format!("failed to create {}", work.display()))?;
        let c = work.join("pause.c");
        let binary = work.join("pause");
        write(&c, source)?;
        let output = Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(&binary)
            .arg(&c)
            .output()
            .context("failed to run gcc (it builds the real node's pause program)")?;
        if !output.status.success() {
            bail!(
                "gcc failed to build the pause program ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let config = ["--user", "65535:65535", "--entrypoint", "[\"/pause\"]"].map(String::from);
        let partial = archive.with_extension("tar.partial");
        Buildah::in_cache(&cache).scratch_image(
            &[(binary.as_path(), "/pause")],
            &config,
            PAUSE_IMAGE,
            &partial,
        )?;
        std::fs::rename(&partial, &archive)
            .with_context(|| format!("failed to write {}", archive.display()))?;
        let _ = std::fs::remove_dir_all(&work);
    }
    import(layout, &archive)
}

/// Imports an OCI archive into the node's containerd, for the kubelet (namespace k8s.io).
pub fn import(layout: &Layout, archive: &Path) -> Result<()> {
    let archive_text = archive
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", archive.display()))?;
    ctr(layout, &["-n", "k8s.io", "images", "import", archive_text])
        .map(|_| ())
        .with_context(|| format!("failed to import {} into the real node", archive.display()))
}

fn ctr(layout: &Layout, args: &[&str]) -> Result<String> {
    let socket = socket(layout);
    let mut all = vec![
        "--address",
        socket.to_str().context("socket path is not UTF-8")?,
    ];
    all.extend(args);
    run_text("ctr", &all)
}

/// A small, stable hash for cache keys.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Waits until the node is registered and Ready.
pub fn node_ready(kubectl: &Kubectl) -> bool {
    kubectl
        .run(
            "read the real node",
            &[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ],
            None,
        )
        .is_ok_and(|status| status.trim() == "True")
}

/// The StorageClass and the local volumes, one host directory each, owned by the
/// images' user.
pub fn create_volumes(layout: &Layout, kubectl: &Kubectl) -> Result<()> {
    let mut manifests = format!(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: {STORAGE_CLASS}\n\
         provisioner: kubernetes.io/no-provisioner\nvolumeBindingMode: Immediate\n\
         reclaimPolicy: Retain\n"
    );
    for index in 0..VOLUMES {
        let dir = volume_dir(layout, index);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        std::os::unix::fs::chown(&dir, Some(VOLUME_OWNER), Some(VOLUME_OWNER))
            .with_context(|| format!("failed to chown {}", dir.display()))?;
        set_mode(&dir, 0o775)?;
        manifests.push_str(&format!(
            "---\napiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {STORAGE_CLASS}-{index}\n  \
             labels:\n    {LABEL}: \"true\"\nspec:\n  capacity:\n    storage: 20Gi\n  \
             accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  \
             storageClassName: {STORAGE_CLASS}\n  local:\n    path: {path}\n  nodeAffinity:\n    \
             required:\n      nodeSelectorTerms:\n      - matchExpressions:\n        - key: {LABEL}\n          \
             operator: In\n          values: [\"true\"]\n",
            path = serde_json::to_string(&dir.display().to_string())?,
        ));
    }
    kubectl.run(
        "create the local volumes",
        &["apply", "--server-side", "-f", "-"],
        Some(&manifests),
    )?;
    Ok(())
}

/// Before the processes stop: deletes the node's pods while its kubelet still runs,
/// so that containers stop and their volumes are unmounted the ordinary way.
pub fn drain(kubectl: &Kubectl) {
    let deleted = kubectl.run(
        "delete the real node's pods",
        &[
            "delete",
            "pods",
            "--all-namespaces",
            &format!("--field-selector=spec.nodeName={NODE_NAME}"),
            "--grace-period=5",
            "--timeout=60s",
            "--wait=true",
        ],
        None,
    );
    if let Err(error) = deleted {
        eprintln!("cluster: {error:#} (cleaning up by hand instead)");
    }
}

/// After the processes stop: removes what the node left outside the state directory
/// and restores the sysctls. Best effort: every step runs, failures are listed.
pub fn cleanup(layout: &Layout, node: &Node, bin: &Path) -> Result<()> {
    let mut failures = Vec::new();
    let mut note = |what: &str, result: Result<()>| {
        if let Err(error) = result {
            failures.push(format!("{what}: {error:#}"));
        }
    };
    // Containers whose shims outlived containerd, and their processes.
    note("stop leftover containers", kill_leftovers(layout));
    let proxy = bin.join("kube-proxy");
    if proxy.is_file() {
        note(
            "kube-proxy --cleanup",
            run_text(&proxy.display().to_string(), &["--cleanup"]).map(|_| ()),
        );
    }
    note("remove iptables chains", remove_chains());
    note("remove the network namespaces", remove_netns());
    note("unmount the node's mounts", unmount_under(&layout.dir));
    note("remove the pods' cgroups", remove_cgroups());
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        note(
            "remove the bridge",
            run_text("ip", &["link", "delete", BRIDGE]).map(|_| ()),
        );
    }
    for (path, value) in &node.sysctls {
        let file = Path::new("/proc/sys").join(path);
        note(
            &format!("restore {path}"),
            std::fs::write(&file, value)
                .with_context(|| format!("failed to write {}", file.display())),
        );
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("the real node left things behind:\n{}", failures.join("\n"))
    }
}

/// Kills shims started by our containerd (their command line names our socket) and
/// every process left in the kubelet's `kubepods` cgroups.
fn kill_leftovers(layout: &Layout) -> Result<()> {
    let socket = socket(layout).display().to_string();
    let mut pids: Vec<i32> = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("containerd-shim") && cmdline.contains(&socket) {
            pids.push(pid);
        }
    }
    for controller in cgroup_roots() {
        let kubepods = controller.join("kubepods");
        if kubepods.is_dir() {
            collect_cgroup_pids(&kubepods, &mut pids);
        }
    }
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(())
}

fn collect_cgroup_pids(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(
            text.lines()
                .filter_map(|line| line.trim().parse::<i32>().ok()),
        );
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                collect_cgroup_pids(&entry.path(), pids);
            }
        }
    }
}

/// The cgroup v1 controller hierarchies (and the v2 unified one), where the kubelet's
/// cgroupfs driver makes `kubepods`.
fn cgroup_roots() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.is_dir() && !path.is_symlink())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the `kubepods` cgroups, deepest first (a cgroup goes only when empty).
fn remove_cgroups() -> Result<()> {
    fn remove(dir: &Path) -> Result<()> {
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove(&entry.path())?;
            }
        }
        std::fs::remove_dir(dir).with_context(|| format!("failed to remove {}", dir.display()))
    }
    let mut failures = Vec::new();
    for root in cgroup_roots() {
        let kubepods = root.join("kubepods");
        if kubepods.is_dir()
            && let Err(error) = remove(&kubepods)
        {
            failures.push(format!("{error:#}"));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("{}", failures.join("; "))
    }
}

/// Removes the chains the kubelet, kube-proxy and the CNI plugins made (`KUBE-*`,
/// `CNI-*`), and the rules that jump to them, from every table of both families.
fn remove_chains() -> Result<()> {
    for program in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            let Ok(rules) = run_text(program, &["-w", "-t", table, "-S"]) else {
                continue;
            };
            let ours = |name: &str| name.starts_with("KUBE-") || name.starts_with("CNI-");
            // Rules in chains that stay, jumping to ours.
            for rule in rules.lines().filter(|line| line.starts_with("-A ")) {
                let words: Vec<&str> = rule.split_whitespace().collect();
                let chain = words.get(1).copied().unwrap_or_default();
                let target = words
                    .iter()
                    .skip_while(|word| **word != "-j")
                    .nth(1)
                    .copied()
                    .unwrap_or_default();
                if !ours(chain) && ours(target) {
                    let mut args = vec!["-w", "-t", table, "-D"];
                    args.extend(&words[1..]);
                    run_text(program, &args)?;
                }
            }
            let chains: Vec<&str> = rules
                .lines()
                .filter_map(|line| line.strip_prefix("-N "))
                .map(str::trim)
                .filter(|name| ours(name))
                .collect();
            for chain in &chains {
                run_text(program, &["-w", "-t", table, "-F", chain])?;
            }
            for chain in &chains {
                run_text(program, &["-w", "-t", table, "-X", chain])?;
            }
        }
    }
    Ok(())
}

/// Unmounts and removes the pods' network namespaces (`/run/netns/cni-*`).
fn remove_netns() -> Result<()> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with("cni-") {
            let _ = Command::new("umount").arg(&path).status();
            std::fs::remove_file(&path)
                .with_context(|| format!("failed to remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Unmounts everything mounted below `dir`, deepest first.
fn unmount_under(dir: &Path) -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(unescape_mount_path)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    points.dedup();
    for point in points {
        let status = Command::new("umount")
            .arg("--lazy")
            .arg(&point)
            .status()
            .context("failed to run umount")?;
        if !status.success() {
            bail!("umount {} failed ({status})", point.display());
        }
    }
    Ok(())
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
fn unescape_mount_path(text: &str) -> PathBuf {
    let mut out = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = text
                .get(i + 1..i + 4)
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

fn run_text(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("failed to chmod {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_address_is_the_first_inet_of_ip_addr_output() {
        let text = "2: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever\n\
                    3: eth1    inet 10.1.2.3/16 scope global eth1\n";
        assert_eq!(parse_first_address(text), Some(Ipv4Addr::new(192, 0, 2, 2)));
        assert_eq!(parse_first_address(""), None);
    }

    #[test]
    fn mount_points_with_escaped_spaces_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/root/.cache/a\040b/rootfs"),
            PathBuf::from("/root/.cache/a b/rootfs")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn the_kubelet_config_never_collects_images_and_taints_the_node() {
        let node = Node {
            ip: Ipv4Addr::new(192, 0, 2, 2),
            kubelet_port: 10250,
            kubelet_healthz_port: 10248,
            proxy_healthz_port: 10256,
            proxy_metrics_port: 10249,
            sysctls: Vec::new(),
        };
        let config: serde_json::Value = serde_json::from_str(&kubelet_config(
            &node,
            Path::new("/s/pki/ca.crt"),
            Path::new("/s/node/containerd/containerd.sock"),
        ))
        .expect("JSON");
        assert_eq!(config["imageGCHighThresholdPercent"], 100);
        assert_eq!(config["cgroupDriver"], "cgroupfs");
        assert_eq!(config["address"], "192.0.2.2");
        assert_eq!(config["registerWithTaints"][0]["key"], TAINT);
        assert_eq!(config["clusterDNS"][0], super::super::dns::SERVICE_IP);
        assert_eq!(
            config["containerRuntimeEndpoint"],
            "unix:///s/node/containerd/containerd.sock"
        );
    }

    #[test]
    fn containerd_keeps_its_oom_score_and_uses_our_sandbox_image() {
        let files = Files {
            dir: PathBuf::from("/s/node"),
        };
        let config = containerd_config(&files);
        assert!(config.contains("restrict_oom_score_adj = true"), "{config}");
        assert!(config.contains(&format!("sandbox_image = \"{PAUSE_IMAGE}\"")));
        assert!(config.contains("address = \"/s/node/containerd/containerd.sock\""));
    }
}

//! The local cluster's PKI, generated with `openssl` at `cluster up`.
//!
//! One CA signs everything: the API server's serving certificate, a serving
//! certificate shared by the loopback components that expose `/healthz`
//! (controller manager, scheduler, kwok), and one client certificate per user. The
//! service-account signing key pair is separate (the API server signs tokens with
//! it, the controller manager mints them). ECDSA P-256 keys: quick to generate and
//! understood by Go, kubectl and rustls alike.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::realnode;

/// The first address of the service CIDR: the `kubernetes` Service's ClusterIP,
/// which in-cluster clients reach the API server through.
pub const FIRST_SERVICE_IP: &str = "10.96.0.1";
/// The API server's `--service-cluster-ip-range`.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// Days the certificates are valid: long enough for any test run, short enough
/// that a forgotten state directory does not hold a forever-valid admin key.
const DAYS: &str = "30";

/// `openssl req` arguments shared by the CA and every leaf: a new P-256 key, unencrypted,
/// in an X.509 certificate valid for [`DAYS`].
const NEW_EC_CERTIFICATE: [&str; 9] = [
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-days",
    DAYS,
];

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Paths of everything `generate` writes.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: KeyPair,
    pub apiserver: KeyPair,
    /// Serving certificate of the controller manager, the scheduler and kwok.
    pub components: KeyPair,
    pub admin: KeyPair,
    pub controller_manager: KeyPair,
    pub scheduler: KeyPair,
    pub kwok: KeyPair,
    /// The real node's kubelet (`system:node:<name>`) and kube-proxy.
    pub kubelet: KeyPair,
    pub kube_proxy: KeyPair,
    /// CoreDNS, the cluster's DNS, reading Services and EndpointSlices.
    pub coredns: KeyPair,
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

/// What a certificate is for.
struct Leaf<'a> {
    name: &'a str,
    subject: &'a str,
    usage: &'a str,
    sans: Option<&'a str>,
}

impl Pki {
    /// The file layout under `dir`, whether or not it exists yet.
    pub fn at(dir: &Path) -> Self {
        let pair = |name: &str| KeyPair {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        Self {
            ca: pair("ca"),
            apiserver: pair("apiserver"),
            components: pair("components"),
            admin: pair("admin"),
            controller_manager: pair("controller-manager"),
            scheduler: pair("scheduler"),
            kwok: pair("kwok"),
            kubelet: pair("kubelet"),
            kube_proxy: pair("kube-proxy"),
            coredns: pair("coredns"),
            service_account_key: dir.join("service-account.key"),
            service_account_pub: dir.join("service-account.pub"),
        }
    }
}

/// Generates a fresh PKI in `dir` (created if missing). `node_ip`, the real node's
/// address, joins the API server's names: pods reach it there.
pub fn generate(dir: &Path, node_ip: Option<Ipv4Addr>) -> Result<Pki> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let pki = Pki::at(dir);

    openssl(
        "the cluster CA",
        &[
            &NEW_EC_CERTIFICATE[..],
            &[
                "-subj",
                "/CN=kubetune-local-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
                "-keyout",
                path_str(&pki.ca.key)?,
                "-out",
                path_str(&pki.ca.cert)?,
            ],
        ]
        .concat(),
    )?;

    let mut apiserver_sans = format!(
        "IP:127.0.0.1,IP:{FIRST_SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
         DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    );
    if let Some(ip) = node_ip {
        apiserver_sans.push_str(&format!(",IP:{ip}"));
    }
    let kubelet_subject = format!("/O=system:nodes/CN=system:node:{}", realnode::NODE_NAME);
    let leaves = [
        (
            &pki.apiserver,
            Leaf {
                name: "the API server's serving certificate",
                subject: "/CN=kube-apiserver",
                usage: "serverAuth",
                sans: Some(&apiserver_sans),
            },
        ),
        (
            &pki.components,
            Leaf {
                name: "the components' serving certificate",
                subject: "/CN=kubetune-local-components",
                usage: "serverAuth",
                sans: Some("IP:127.0.0.1,DNS:localhost"),
            },
        ),
        (
            &pki.admin,
            Leaf {
                name: "the admin client certificate",
                subject: "/O=system:masters/CN=kubetune-admin",
                usage: "clientAuth",
                sans: None,
            },
        ),
        (
            &pki.controller_manager,
            Leaf {
                name: "the controller manager's client certificate",
                subject: "/CN=system:kube-controller-manager",
                usage: "clientAuth",
                sans: None,
            },
        ),
        (
            &pki.scheduler,
            Leaf {
                name: "the scheduler's client certificate",
                subject: "/CN=system:kube-scheduler",
                usage: "clientAuth",
                sans: None,
            },
        ),
        (
            // kwok stands in for every kubelet of every simulated node (node and pod
            // status, leases, deletions), which no single bootstrap role covers.
            &pki.kwok,
            Leaf {
                name: "kwok's client certificate",
                subject: "/O=system:masters/CN=kwok-controller",
                usage: "clientAuth",
                sans: None,
            },
        ),
        (
            // The Node authorizer and the NodeRestriction admission plugin know a
            // kubelet by this name and group.
            &pki.kubelet,
            Leaf {
                name: "the real node's kubelet client certificate",
                subject: &kubelet_subject,
                usage: "clientAuth",
                sans: None,
            },
        ),
        (
            // Bound to system:node-proxier by the default RBAC policy.
            &pki.kube_proxy,
            Leaf {
                name: "kube-proxy's client certificate",
                subject: "/CN=system:kube-proxy",
                usage: "clientAuth",
                sans: None,
            },
        ),
        (
            // Bound by `cluster up` to a role that lists and watches what the
            // `kubernetes` plugin reads.
            &pki.coredns,
            Leaf {
                name: "CoreDNS's client certificate",
                subject: "/CN=system:coredns",
                usage: "clientAuth",
                sans: None,
            },
        ),
    ];
    for (pair, leaf) in leaves {
        sign(&pki.ca, pair, &leaf)?;
    }

    openssl(
        "the service-account signing key",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            path_str(&pki.service_account_key)?,
        ],
    )?;
    openssl(
        "the service-account public key",
        &[
            "pkey",
            "-in",
            path_str(&pki.service_account_key)?,
            "-pubout",
            "-out",
            path_str(&pki.service_account_pub)?,
        ],
    )?;
    Ok(pki)
}

fn sign(ca: &KeyPair, pair: &KeyPair, leaf: &Leaf<'_>) -> Result<()> {
    let usage = format!("extendedKeyUsage={}", leaf.usage);
    let sans = leaf.sans.map(|sans| format!("subjectAltName={sans}"));
    let mut args = NEW_EC_CERTIFICATE.to_vec();
    args.extend([
        "-CA",
        path_str(&ca.cert)?,
        "-CAkey",
        path_str(&ca.key)?,
        "-subj",
        leaf.subject,
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        "-addext",
        &usage,
        "-keyout",
        path_str(&pair.key)?,
        "-out",
        path_str(&pair.cert)?,
    ]);
    if let Some(sans) = &sans {
        args.extend(["-addext", sans]);
    }
    openssl(leaf.name, &args)
}

fn openssl(what: &str, args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "openssl is not installed (it generates the cluster's certificates): \
                 install it, e.g. `apt-get install -y openssl`"
                )
            } else {
                anyhow::Error::new(error).context("failed to run openssl")
            }
        })?;
    if !output.status.success() {
        bail!(
            "openssl failed to generate {what} ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

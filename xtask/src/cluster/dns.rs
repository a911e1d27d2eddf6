//! The cluster's DNS: CoreDNS (built from its Go module, `e2e/cluster/coredns`) on the
//! host, beside the real node, serving `cluster.local` from the API server with its
//! `kubernetes` plugin and forwarding every other name to the host's resolver.
//!
//! Pods reach it as on any cluster: the kubelet's `clusterDNS` is the `kube-dns`
//! Service's ClusterIP, [`SERVICE_IP`], and kube-proxy forwards that address to the
//! host, where CoreDNS listens on the node's own address (the Service has no selector;
//! its one EndpointSlice names the node). So a gang's ranks find rank 0 by its
//! headless Service's name, exactly as in production.
//!
//! CoreDNS signs in as `system:coredns`, allowed to list and watch what the plugin
//! reads (Services, EndpointSlices, Namespaces) and nothing else.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};

use super::components::{self, Component};
use super::{Kubectl, Layout};

/// The `kube-dns` Service's ClusterIP, in the API server's service CIDR: the
/// kubelet's `clusterDNS`.
pub const SERVICE_IP: &str = "10.96.0.10";
/// The cluster's DNS domain: the kubelet's `clusterDomain`.
pub const DOMAIN: &str = "cluster.local";
/// The user CoreDNS's client certificate names.
pub const USER: &str = "system:coredns";
/// The name CoreDNS's kubeconfig and log go by.
pub const NAME: &str = "coredns";

/// The Corefile: the cluster zone (and reverse zones for Service addresses) from the
/// API server, everything else forwarded, answers cached for 30 s.
fn corefile(node_ip: Ipv4Addr, ready_port: u16, kubeconfig: &Path) -> Result<String> {
    let kubeconfig = kubeconfig
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", kubeconfig.display()))?;
    Ok(format!(
        ".:53 {{\n    bind {node_ip}\n    errors\n    ready 127.0.0.1:{ready_port}\n    \
         kubernetes {DOMAIN} in-addr.arpa ip6.arpa {{\n        kubeconfig {kubeconfig}\n        \
         fallthrough in-addr.arpa ip6.arpa\n        ttl 30\n    }}\n    \
         forward . /etc/resolv.conf\n    cache 30\n    loop\n}}\n"
    ))
}

/// The CoreDNS process, its Corefile written into the state directory.
pub fn component(
    layout: &Layout,
    bin: &Path,
    node_ip: Ipv4Addr,
    ready_port: u16,
) -> Result<Component> {
    let path = layout.dir.join("Corefile");
    let text = corefile(node_ip, ready_port, &layout.component_kubeconfig(NAME))?;
    std::fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(Component {
        name: NAME,
        program: bin.join("coredns"),
        args: vec![super::arg("-conf", &path)],
        log: layout.log(NAME),
    })
}

/// Whether CoreDNS has synced the API's objects and answers (its `ready` plugin).
pub fn ready(ready_port: u16) -> bool {
    components::http_get(ready_port, "/ready").is_some_and(|(code, _)| code == 200)
}

/// CoreDNS's RBAC, the `kube-dns` Service and its EndpointSlice at the node.
fn manifests(node_ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {USER}\n\
         rules:\n- apiGroups: [\"\"]\n  resources: [services, namespaces]\n  verbs: [list, watch]\n\
         - apiGroups: [discovery.k8s.io]\n  resources: [endpointslices]\n  verbs: [list, watch]\n\
         ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  \
         name: {USER}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  \
         name: {USER}\nsubjects:\n- apiGroup: rbac.authorization.k8s.io\n  kind: User\n  \
         name: {USER}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: kube-dns\n  namespace: kube-system\n  \
         labels:\n    k8s-app: kube-dns\n    kubernetes.io/name: CoreDNS\nspec:\n  \
         clusterIP: {SERVICE_IP}\n  ports:\n  - name: dns\n    protocol: UDP\n    port: 53\n    \
         targetPort: 53\n  - name: dns-tcp\n    protocol: TCP\n    port: 53\n    targetPort: 53\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kube-dns-host\n  \
         namespace: kube-system\n  labels:\n    kubernetes.io/service-name: kube-dns\n    \
         endpointslice.kubernetes.io/managed-by: cluster-up.kubetune.io\naddressType: IPv4\n\
         ports:\n- name: dns\n  protocol: UDP\n  port: 53\n- name: dns-tcp\n  protocol: TCP\n  \
         port: 53\nendpoints:\n- addresses: [\"{node_ip}\"]\n  conditions:\n    ready: true\n"
    )
}

/// Creates CoreDNS's RBAC and the `kube-dns` Service before the kubelet starts.
pub fn create_objects(kubectl: &Kubectl, node_ip: Ipv4Addr) -> Result<()> {
    kubectl.run(
        "create the cluster DNS's Service and RBAC",
        &["apply", "--server-side", "-f", "-"],
        Some(&manifests(node_ip)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corefile_serves_the_cluster_zone_on_the_node_address_only() {
        let text = corefile(
            Ipv4Addr::new(10, 0, 0, 7),
            4321,
            Path::new("/state/coredns.kubeconfig"),
        )
        .expect("a UTF-8 path");
        assert!(text.contains("bind 10.0.0.7\n"), "{text}");
        assert!(text.contains("ready 127.0.0.1:4321\n"), "{text}");
        assert!(
            text.contains("kubernetes cluster.local in-addr.arpa ip6.arpa {"),
            "{text}"
        );
        assert!(
            text.contains("kubeconfig /state/coredns.kubeconfig\n"),
            "{text}"
        );
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn the_service_and_its_endpoint_slice_agree_on_ports_and_point_at_the_node() {
        let docs: Vec<serde_json::Value> = manifests(Ipv4Addr::new(10, 0, 0, 7))
            .split("---\n")
            .map(|doc| serde_yaml::from_str(doc).expect("YAML"))
            .collect();
        let kind = |kind: &str| docs.iter().find(|d| d["kind"] == kind).expect(kind);
        let service = kind("Service");
        let slice = kind("EndpointSlice");
        assert_eq!(service["spec"]["clusterIP"], SERVICE_IP);
        assert!(service["spec"].get("selector").is_none());
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            service["metadata"]["name"]
        );
        let names = |ports: &serde_json::Value| -> Vec<String> {
            ports
                .as_array()
                .expect("ports")
                .iter()
                .map(|p| format!("{}/{}/{}", p["name"], p["protocol"], p["port"]))
                .collect()
        };
        assert_eq!(names(&service["spec"]["ports"]), names(&slice["ports"]));
        assert_eq!(slice["endpoints"][0]["addresses"][0], "10.0.0.7");
        let role = kind("ClusterRole");
        let verbs: Vec<&str> = role["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .flat_map(|rule| rule["verbs"].as_array().expect("verbs"))
            .filter_map(|verb| verb.as_str())
            .collect();
        assert!(!verbs.is_empty());
        assert!(verbs.iter().all(|verb| ["list", "watch"].contains(verb)));
    }
}

//! The simulated GPU nodes: which ones (`--nodes`, `KUBETUNE_CLUSTER_NODES`) and
//! the Node objects `cluster up` creates for kwok to keep Ready.
//!
//! A pool is written `COUNTxGPUS:PRODUCT`, pools separated by commas; the default is
//! [`DEFAULT_POOLS`]. Each node carries the labels a real GPU cluster has (GPU
//! feature discovery's `nvidia.com/gpu.*`, the well-known instance type, Karpenter's
//! capacity type), `nvidia.com/gpu` in capacity and allocatable, the NVIDIA device
//! plugin's usual taint, and a loopback pod CIDR so pod IPs are addresses a test can
//! bind on.

use anyhow::{Context, Result, bail, ensure};

/// 4 nodes with 8 A100s and 16 with 8 H100s.
pub const DEFAULT_POOLS: &str = "4x8:NVIDIA-A100-SXM4-80GB,16x8:NVIDIA-H100-80GB-HBM3";

/// The annotation kwok is started to manage (`--manage-nodes-with-annotation-selector`),
/// so that a real kubelet node can join the same cluster untouched.
pub const KWOK_ANNOTATION: &str = "kwok.x-k8s.io/node";
pub const KWOK_ANNOTATION_VALUE: &str = "fake";

/// Every `SPOT_EVERY`-th node of a pool (the last of each group) is a spot node.
const SPOT_EVERY: usize = 4;

/// Nodes of one GPU product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub count: usize,
    pub gpus: u32,
    pub product: String,
}

/// Parses `COUNTxGPUS:PRODUCT[,COUNTxGPUS:PRODUCT…]`.
pub fn parse_pools(spec: &str) -> Result<Vec<Pool>> {
    let pools = spec
        .split(',')
        .map(str::trim)
        .filter(|pool| !pool.is_empty())
        .map(|pool| {
            let (shape, product) = pool
                .split_once(':')
                .with_context(|| format!("node pool {pool:?} is not COUNTxGPUS:PRODUCT"))?;
            let (count, gpus) = shape
                .split_once('x')
                .with_context(|| format!("node pool {pool:?} is not COUNTxGPUS:PRODUCT"))?;
            let count: usize = count
                .parse()
                .with_context(|| format!("node pool {pool:?}: {count:?} is not a node count"))?;
            let gpus: u32 = gpus
                .parse()
                .with_context(|| format!("node pool {pool:?}: {gpus:?} is not a GPU count"))?;
            ensure!(
                !product.is_empty()
                    && product
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
                "node pool {pool:?}: GPU product {product:?} must be a label value \
                 (letters, digits, '-', '_', '.')"
            );
            Ok(Pool {
                count,
                gpus,
                product: product.to_owned(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let total: usize = pools.iter().map(|pool| pool.count).sum();
    if total > 256 {
        bail!("{total} nodes asked for: each gets a /24 of 127.64.0.0/16, so at most 256");
    }
    Ok(pools)
}

/// Instance type and machine size of a product, as on AWS where one exists.
fn machine(product: &str, gpus: u32) -> (String, u32, u32) {
    match (product, gpus) {
        ("NVIDIA-A100-SXM4-80GB", 8) => ("p4de.24xlarge".into(), 96, 1152),
        ("NVIDIA-A100-SXM4-40GB", 8) => ("p4d.24xlarge".into(), 96, 1152),
        ("NVIDIA-H100-80GB-HBM3", 8) => ("p5.48xlarge".into(), 192, 2048),
        ("NVIDIA-H200", 8) => ("p5e.48xlarge".into(), 192, 2048),
        _ => (
            format!("sim-{gpus}x-{}", short_name(product)),
            12 * gpus.max(1),
            128 * gpus.max(1),
        ),
    }
}

/// `NVIDIA-A100-SXM4-80GB` → `a100-sxm4-80gb`: the node name stem.
fn short_name(product: &str) -> String {
    let lower = product.to_ascii_lowercase().replace(['_', '.'], "-");
    lower.strip_prefix("nvidia-").unwrap_or(&lower).to_owned()
}

/// The Node objects for `pools`, as one YAML stream for `kubectl create -f -`.
///
/// Node status (capacity, allocatable) is part of the object on create; kwok then
/// keeps the nodes' conditions and leases fresh.
pub fn manifests(pools: &[Pool]) -> String {
    manifests_at(pools, "", 0)
}

/// Like [`manifests`], for nodes added to a running cluster: names start with `prefix`
/// and pod CIDRs with the `first`-th /24, so they collide with no node `up` made.
pub fn manifests_at(pools: &[Pool], prefix: &str, first: usize) -> String {
    let mut out = String::new();
    let mut index = first;
    for pool in pools {
        let (instance_type, cpu, memory_gib) = machine(&pool.product, pool.gpus);
        let stem = short_name(&pool.product);
        for i in 0..pool.count {
            let name = format!("{prefix}{stem}-{i}");
            let capacity_type = if i % SPOT_EVERY == SPOT_EVERY - 1 {
                "spot"
            } else {
                "on-demand"
            };
            let resources = format!(
                "    cpu: \"{cpu}\"\n    memory: {memory_gib}Gi\n    pods: \"110\"\n    \
                 ephemeral-storage: 2Ti\n    nvidia.com/gpu: \"{gpus}\"\n",
                gpus = pool.gpus
            );
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations:\n    \
                 {KWOK_ANNOTATION}: {KWOK_ANNOTATION_VALUE}\n    node.alpha.kubernetes.io/ttl: \"0\"\n  \
                 labels:\n    type: kwok\n    kubernetes.io/hostname: {name}\n    \
                 kubernetes.io/os: linux\n    kubernetes.io/arch: amd64\n    \
                 node.kubernetes.io/instance-type: {instance_type}\n    \
                 karpenter.sh/capacity-type: {capacity_type}\n    \
                 nvidia.com/gpu.present: \"true\"\n    nvidia.com/gpu.product: {product}\n    \
                 nvidia.com/gpu.count: \"{gpus}\"\nspec:\n  podCIDR: 127.64.{index}.0/24\n  \
                 podCIDRs:\n  - 127.64.{index}.0/24\n  taints:\n  - key: nvidia.com/gpu\n    \
                 effect: NoSchedule\nstatus:\n  capacity:\n{resources}  allocatable:\n{resources}",
                product = pool.product,
                gpus = pool.gpus,
            ));
            index += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pools_are_four_a100_and_sixteen_h100_nodes_of_eight_gpus() {
        let pools = parse_pools(DEFAULT_POOLS).expect("default parses");
        assert_eq!(
            pools,
            vec![
                Pool {
                    count: 4,
                    gpus: 8,
                    product: "NVIDIA-A100-SXM4-80GB".into()
                },
                Pool {
                    count: 16,
                    gpus: 8,
                    product: "NVIDIA-H100-80GB-HBM3".into()
                },
            ]
        );
    }

    #[test]
    fn malformed_pools_are_refused_with_the_pool_named() {
        for spec in ["4:A100", "x8:A100", "4x8", "4x8:has space", "4xeight:A100"] {
            let error = parse_pools(spec).expect_err(spec).to_string();
            assert!(error.contains("node pool"), "{spec}: {error}");
        }
        let error = parse_pools("300x8:A100").expect_err("too many").to_string();
        assert!(error.contains("at most 256"), "{error}");
    }

    #[test]
    fn each_node_gets_its_own_loopback_pod_cidr_and_the_gpu_taint() {
        let pools = parse_pools("2x8:NVIDIA-A100-SXM4-80GB,1x4:Acme-X1").expect("parses");
        let yaml = manifests(&pools);
        let nodes: Vec<serde_json::Value> = yaml
            .split("---\n")
            .filter(|doc| !doc.trim().is_empty())
            .map(|doc| serde_yaml::from_str(doc).expect("node manifest is YAML"))
            .collect();
        assert_eq!(nodes.len(), 3);
        let cidrs: Vec<&str> = nodes
            .iter()
            .map(|node| node["spec"]["podCIDR"].as_str().expect("podCIDR"))
            .collect();
        assert_eq!(cidrs, ["127.64.0.0/24", "127.64.1.0/24", "127.64.2.0/24"]);
        let acme = &nodes[2];
        assert_eq!(acme["metadata"]["name"], "acme-x1-0");
        assert_eq!(acme["metadata"]["labels"]["nvidia.com/gpu.count"], "4");
        assert_eq!(acme["status"]["allocatable"]["nvidia.com/gpu"], "4");
        assert_eq!(acme["spec"]["taints"][0]["key"], "nvidia.com/gpu");
        assert_eq!(acme["spec"]["taints"][0]["effect"], "NoSchedule");
        assert_eq!(
            acme["metadata"]["annotations"][KWOK_ANNOTATION],
            KWOK_ANNOTATION_VALUE
        );
    }

    #[test]
    fn every_fourth_node_of_a_pool_is_spot() {
        let pools = parse_pools("8x8:NVIDIA-H100-80GB-HBM3").expect("parses");
        let yaml = manifests(&pools);
        let spot = yaml.matches("karpenter.sh/capacity-type: spot").count();
        let on_demand = yaml
            .matches("karpenter.sh/capacity-type: on-demand")
            .count();
        assert_eq!((spot, on_demand), (2, 6));
        assert!(yaml.contains("node.kubernetes.io/instance-type: p5.48xlarge"));
    }
}

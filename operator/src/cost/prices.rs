//! The price table the platform team sets: what a GPU-hour (or a CPU core-hour) costs
//! on each kind of node.
//!
//! It is YAML under the key `prices.yaml` of a ConfigMap in the operator's namespace
//! (Helm renders it from `.Values.pricing`):
//!
//! ```yaml
//! currency: USD
//! gpuHourly:                       # per GPU-hour, by nvidia.com/gpu.product
//!   NVIDIA-A100-SXM4-80GB: {onDemand: "3.40", spot: "1.40"}
//! defaultGpuHourly: {onDemand: "4.00", spot: "2.00"}   # products not listed
//! instanceTypes:                   # per GPU-hour, by node.kubernetes.io/instance-type
//!   p4de.24xlarge: {onDemand: "5.12", spot: "2.05"}
//! cpuCoreHourly: {onDemand: "0.04", spot: "0.015"}     # jobs without GPUs
//! spotNodeLabels:                  # a node is spot when one of these matches
//!   - {key: karpenter.sh/capacity-type, value: spot}
//! throughputTokensPerSecond:       # per GPU, for estimates before the trainer reports
//!   NVIDIA-A100-SXM4-80GB: 3000
//!   default: 1000
//! ```
//!
//! Prices are decimal strings with at most four places, kept as integers in
//! ten-thousandths of the currency so that no amount is ever a float. A ConfigMap was
//! chosen over a cluster-scoped resource: the table is operator configuration that
//! lives and is versioned with the Helm release, it needs no CRD of its own, and the
//! operator reads one object in its own namespace.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The ConfigMap key holding the table.
pub const KEY: &str = "prices.yaml";

/// The label GPU feature discovery puts on GPU nodes.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// The well-known instance type label.
pub const INSTANCE_TYPE_LABEL: &str = "node.kubernetes.io/instance-type";

/// A price per hour in ten-thousandths of the currency ("3.40" is 34,000).
pub type Rate = u64;

/// Whether a node is billed as spot (preemptible) or on demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capacity {
    /// On-demand (or reserved) capacity.
    OnDemand,
    /// Spot or preemptible capacity.
    Spot,
}

impl Capacity {
    /// As written in rate keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnDemand => "on-demand",
            Self::Spot => "spot",
        }
    }
}

/// A validated price table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceTable {
    /// ISO 4217 code, such as "USD".
    pub currency: String,
    gpu: BTreeMap<String, Pair>,
    default_gpu: Pair,
    instance_types: BTreeMap<String, Pair>,
    cpu: Option<Pair>,
    spot_labels: Vec<(String, String)>,
    throughput: BTreeMap<String, u64>,
    /// A digest of the table's content: a change of it starts a new pricing period.
    pub version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pair {
    on_demand: Rate,
    spot: Rate,
}

impl Pair {
    fn get(self, capacity: Capacity) -> Rate {
        match capacity {
            Capacity::OnDemand => self.on_demand,
            Capacity::Spot => self.spot,
        }
    }
}

/// The rate a pod is charged, and what it is charged for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Priced {
    /// Per GPU-hour (or core-hour), in ten-thousandths.
    pub rate: Rate,
    /// What the rate is, for `status.cost.rates`: "NVIDIA-A100-SXM4-80GB/spot",
    /// "p4de.24xlarge/on-demand", "cpu/on-demand".
    pub key: String,
}

/// Why a table was refused.
#[derive(Debug, thiserror::Error)]
pub enum InvalidTable {
    /// Not YAML of the expected shape.
    #[error("{KEY} is not a price table: {0}")]
    Shape(#[from] serde_yaml::Error),
    /// The ConfigMap lacks the key.
    #[error("the ConfigMap has no key {KEY}")]
    Missing,
    /// A field's value is wrong.
    #[error("{field}: {message}")]
    Field {
        /// Where.
        field: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Raw {
    currency: String,
    #[serde(default)]
    gpu_hourly: BTreeMap<String, RawPair>,
    default_gpu_hourly: RawPair,
    #[serde(default)]
    instance_types: BTreeMap<String, RawPair>,
    #[serde(default)]
    cpu_core_hourly: Option<RawPair>,
    #[serde(default)]
    spot_node_labels: Option<Vec<RawLabel>>,
    #[serde(default)]
    throughput_tokens_per_second: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPair {
    on_demand: String,
    spot: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabel {
    key: String,
    value: String,
}

/// The labels that mark spot nodes on common clouds and with Karpenter, used when the
/// table does not list its own.
pub const DEFAULT_SPOT_LABELS: [(&str, &str); 5] = [
    ("karpenter.sh/capacity-type", "spot"),
    ("eks.amazonaws.com/capacityType", "SPOT"),
    ("cloud.google.com/gke-spot", "true"),
    ("cloud.google.com/gke-preemptible", "true"),
    ("kubernetes.azure.com/scalesetpriority", "spot"),
];

/// Parses a price like "3.40" into ten-thousandths.
fn parse_rate(field: &str, text: &str) -> Result<Rate, InvalidTable> {
    let invalid = || InvalidTable::Field {
        field: field.to_owned(),
        message: format!("{text:?} is not a price: write digits with at most four decimal places"),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty()
        || whole.len() > 9
        || fraction.len() > 4
        || (text.contains('.') && fraction.is_empty())
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid());
    }
    let whole: u64 = whole.parse().map_err(|_| invalid())?;
    let fraction: u64 = format!("{fraction:0<4}").parse().map_err(|_| invalid())?;
    Ok(whole * 10_000 + fraction)
}

/// A rate written back as a decimal string, without trailing zeros past two places.
pub fn format_rate(rate: Rate) -> String {
    let text = format!("{}.{:04}", rate / 10_000, rate % 10_000);
    let trimmed = text.trim_end_matches('0');
    match trimmed.split_once('.') {
        Some((_, fraction)) if fraction.len() < 2 => {
            format!("{}.{:02}", rate / 10_000, (rate % 10_000) / 100)
        }
        _ => trimmed.to_owned(),
    }
}

fn pair(field: &str, raw: &RawPair) -> Result<Pair, InvalidTable> {
    Ok(Pair {
        on_demand: parse_rate(&format!("{field}.onDemand"), &raw.on_demand)?,
        spot: parse_rate(&format!("{field}.spot"), &raw.spot)?,
    })
}

impl PriceTable {
    /// Parses and validates the YAML of a price table.
    pub fn parse(yaml: &str) -> Result<Self, InvalidTable> {
        let raw: Raw = serde_yaml::from_str(yaml)?;
        if raw.currency.len() != 3 || !raw.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(InvalidTable::Field {
                field: "currency".into(),
                message: format!("{:?} is not an ISO 4217 code such as USD", raw.currency),
            });
        }
        let gpu = raw
            .gpu_hourly
            .iter()
            .map(|(product, p)| Ok((product.clone(), pair(&format!("gpuHourly.{product}"), p)?)))
            .collect::<Result<_, InvalidTable>>()?;
        let instance_types = raw
            .instance_types
            .iter()
            .map(|(t, p)| Ok((t.clone(), pair(&format!("instanceTypes.{t}"), p)?)))
            .collect::<Result<_, InvalidTable>>()?;
        let spot_labels = match raw.spot_node_labels {
            Some(labels) => labels.into_iter().map(|l| (l.key, l.value)).collect(),
            None => DEFAULT_SPOT_LABELS
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(yaml.as_bytes());
        let version = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            currency: raw.currency,
            gpu,
            default_gpu: pair("defaultGpuHourly", &raw.default_gpu_hourly)?,
            instance_types,
            cpu: raw
                .cpu_core_hourly
                .as_ref()
                .map(|p| pair("cpuCoreHourly", p))
                .transpose()?,
            spot_labels,
            throughput: raw.throughput_tokens_per_second,
            version,
        })
    }

    /// Training tokens per second one GPU of `product` is assumed to process (the
    /// product's entry, else `default`), for estimates before the trainer reports.
    pub fn throughput(&self, product: &str) -> Option<u64> {
        self.throughput
            .get(product)
            .or_else(|| self.throughput.get("default"))
            .copied()
            .filter(|t| *t > 0)
    }

    /// The on-demand GPU-hour rate of `product` (or the default).
    pub fn on_demand_gpu_rate(&self, product: &str) -> Rate {
        self.gpu
            .get(product)
            .copied()
            .unwrap_or(self.default_gpu)
            .on_demand
    }

    /// Whether a node with `labels` is spot capacity.
    pub fn capacity(&self, labels: &BTreeMap<String, String>) -> Capacity {
        let spot = self
            .spot_labels
            .iter()
            .any(|(key, value)| labels.get(key) == Some(value));
        if spot {
            Capacity::Spot
        } else {
            Capacity::OnDemand
        }
    }

    /// The GPU-hour rate of a node with `labels` (its instance type's override, else its
    /// product's price, else the default); `fallback_product` when the node is unknown.
    pub fn gpu_rate(
        &self,
        labels: Option<&BTreeMap<String, String>>,
        fallback_product: &str,
    ) -> Priced {
        let empty = BTreeMap::new();
        let labels = labels.unwrap_or(&empty);
        let capacity = self.capacity(labels);
        if let Some((instance, pair)) = labels
            .get(INSTANCE_TYPE_LABEL)
            .and_then(|t| self.instance_types.get_key_value(t))
        {
            return Priced {
                rate: pair.get(capacity),
                key: format!("{instance}/{}", capacity.as_str()),
            };
        }
        let product = labels
            .get(GPU_PRODUCT_LABEL)
            .map_or(fallback_product, String::as_str);
        let (name, pair) = match self.gpu.get_key_value(product) {
            Some((name, pair)) => (name.as_str(), *pair),
            None => ("default", self.default_gpu),
        };
        Priced {
            rate: pair.get(capacity),
            key: format!("{name}/{}", capacity.as_str()),
        }
    }

    /// The core-hour rate for pods without GPUs, if the table has one.
    pub fn cpu_rate(&self, labels: Option<&BTreeMap<String, String>>) -> Option<Priced> {
        let empty = BTreeMap::new();
        let capacity = self.capacity(labels.unwrap_or(&empty));
        self.cpu.map(|pair| Priced {
            rate: pair.get(capacity),
            key: format!("cpu/{}", capacity.as_str()),
        })
    }

    /// The cheapest GPU-hour rate `product` can run at (spot or on demand, any instance
    /// type listed for it is not known in advance): what admission checks a budget with.
    pub fn cheapest_gpu_rate(&self, product: &str) -> Rate {
        let pair = self.gpu.get(product).copied().unwrap_or(self.default_gpu);
        pair.on_demand.min(pair.spot)
    }

    /// The cheapest core-hour rate.
    pub fn cheapest_cpu_rate(&self) -> Option<Rate> {
        self.cpu.map(|pair| pair.on_demand.min(pair.spot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const TABLE: &str = r#"
currency: USD
gpuHourly:
  NVIDIA-A100-SXM4-80GB: {onDemand: "3.40", spot: "1.40"}
  NVIDIA-H100-80GB-HBM3: {onDemand: "6.98", spot: "2.90"}
defaultGpuHourly: {onDemand: "4.00", spot: "2.00"}
instanceTypes:
  p5.48xlarge: {onDemand: "7.5000", spot: "3.1"}
cpuCoreHourly: {onDemand: "0.0400", spot: "0.015"}
"#;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn rates_are_exact_ten_thousandths() {
        assert_eq!(parse_rate("f", "3.40").expect("valid"), 34_000);
        assert_eq!(parse_rate("f", "0.015").expect("valid"), 150);
        assert_eq!(parse_rate("f", "7").expect("valid"), 70_000);
        for bad in ["", "3.", ".5", "-1", "1.23456", "1e3", "3,40"] {
            assert!(parse_rate("f", bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_rate(34_000), "3.40");
        assert_eq!(format_rate(150), "0.015");
        assert_eq!(format_rate(70_000), "7.00");
    }

    #[test]
    fn a_node_is_priced_by_instance_type_then_product_then_default() {
        let table = PriceTable::parse(TABLE).expect("valid");
        let a100 = labels(&[(GPU_PRODUCT_LABEL, "NVIDIA-A100-SXM4-80GB")]);
        let priced = table.gpu_rate(Some(&a100), "x");
        assert_eq!(
            (priced.rate, priced.key.as_str()),
            (34_000, "NVIDIA-A100-SXM4-80GB/on-demand")
        );

        let spot = labels(&[
            (GPU_PRODUCT_LABEL, "NVIDIA-A100-SXM4-80GB"),
            ("karpenter.sh/capacity-type", "spot"),
        ]);
        assert_eq!(table.gpu_rate(Some(&spot), "x").rate, 14_000);

        let p5 = labels(&[
            (GPU_PRODUCT_LABEL, "NVIDIA-H100-80GB-HBM3"),
            (INSTANCE_TYPE_LABEL, "p5.48xlarge"),
            ("cloud.google.com/gke-spot", "true"),
        ]);
        let priced = table.gpu_rate(Some(&p5), "x");
        assert_eq!(
            (priced.rate, priced.key.as_str()),
            (31_000, "p5.48xlarge/spot")
        );

        let unknown = labels(&[(GPU_PRODUCT_LABEL, "NVIDIA-L4")]);
        assert_eq!(table.gpu_rate(Some(&unknown), "x").key, "default/on-demand");
        // A node that is gone: the job's requested product, on demand.
        assert_eq!(table.gpu_rate(None, "NVIDIA-H100-80GB-HBM3").rate, 69_800);
        assert_eq!(table.cpu_rate(None).expect("cpu").rate, 400);
        assert_eq!(table.cheapest_gpu_rate("NVIDIA-A100-SXM4-80GB"), 14_000);
    }

    #[test]
    fn spot_labels_can_be_replaced() {
        let table = PriceTable::parse(&format!(
            "{TABLE}spotNodeLabels:\n  - {{key: example.com/lifecycle, value: preemptible}}\n"
        ))
        .expect("valid");
        assert_eq!(
            table.capacity(&labels(&[("karpenter.sh/capacity-type", "spot")])),
            Capacity::OnDemand
        );
        assert_eq!(
            table.capacity(&labels(&[("example.com/lifecycle", "preemptible")])),
            Capacity::Spot
        );
    }

    #[test]
    fn invalid_tables_say_what_is_wrong() {
        let error =
            PriceTable::parse(&TABLE.replace("\"1.40\"", "\"cheap\"")).expect_err("a bad price");
        assert!(
            error
                .to_string()
                .starts_with("gpuHourly.NVIDIA-A100-SXM4-80GB.spot: \"cheap\""),
            "{error}"
        );
        let error = PriceTable::parse(&TABLE.replace("USD", "dollars")).expect_err("currency");
        assert!(error.to_string().starts_with("currency:"), "{error}");
        let error = PriceTable::parse(&format!("{TABLE}gpuHourl: {{}}\n")).expect_err("typo");
        assert!(error.to_string().contains("gpuHourl"), "{error}");
        assert!(
            PriceTable::parse("currency: USD\n").is_err(),
            "no default price"
        );
    }

    #[test]
    fn the_version_changes_with_the_content() {
        let a = PriceTable::parse(TABLE).expect("valid");
        let b = PriceTable::parse(&TABLE.replace("3.40", "3.50")).expect("valid");
        assert_ne!(a.version, b.version);
        assert_eq!(a.version, PriceTable::parse(TABLE).expect("valid").version);
    }
}

//! Compute cost: the price table, the GPU-seconds ledger, and keeping the table current.
//!
//! `prices` parses and validates the table, `ledger` accrues GPU-seconds and money from
//! pod timestamps (pure); this module turns an observed pod into what the ledger needs
//! and watches the table's ConfigMap, keeping the last valid table in force when a new
//! one is invalid.

pub mod ledger;
pub mod prices;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tracing::{error, info, warn};

use crate::finetunejob::observe::ObservedPod;
use crate::metrics::Metrics;
use ledger::PodUsage;
use prices::PriceTable;

/// What the ledger needs of one observed pod: its running time, the GPUs (or cores) it
/// holds, and the rate of the node it runs on (`node` is that node's labels, `None` when
/// the node is gone; `product` is the GPU product the job asked for).
pub fn usage(
    pod: &ObservedPod,
    node: Option<&BTreeMap<String, String>>,
    table: &PriceTable,
    product: Option<&str>,
) -> PodUsage {
    if pod.gpus > 0 {
        PodUsage {
            running_since: pod.running_since,
            ended: pod.ended,
            units: pod.gpus,
            priced: Some(table.gpu_rate(node, product.unwrap_or_default())),
        }
    } else {
        // Pods without GPUs are billed per started core.
        PodUsage {
            running_since: pod.running_since,
            ended: pod.ended,
            units: pod.cpu_millis.div_ceil(1000).max(1),
            priced: table.cpu_rate(node),
        }
    }
}

/// Millicores of a CPU quantity ("8", "500m", "1.5"); `None` when it is not one.
pub fn millicores(quantity: &str) -> Option<u64> {
    let quantity = quantity.trim();
    if let Some(millis) = quantity.strip_suffix('m') {
        return millis.parse().ok();
    }
    let (whole, fraction) = quantity.split_once('.').unwrap_or((quantity, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let fraction: u64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<3}").parse().ok()?
    };
    Some(whole * 1000 + fraction)
}

/// The price table in force: the last valid one read, shared by every reconcile.
#[derive(Debug, Default)]
pub struct PriceBook {
    current: RwLock<Option<Arc<PriceTable>>>,
}

impl PriceBook {
    /// The table in force, if one was ever valid.
    pub fn current(&self) -> Option<Arc<PriceTable>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, table: PriceTable) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(table));
    }
}

/// Where the price table is: a ConfigMap in the operator's namespace.
#[derive(Clone, Debug)]
pub struct TableSource {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Watches the price table's ConfigMap and keeps `book` current. An invalid table is
/// logged, recorded as a Warning event on the ConfigMap and counted, and the last valid
/// table stays in force.
pub async fn watch_table(
    client: Client,
    source: TableSource,
    book: Arc<PriceBook>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &source.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", source.name));
    let mut changes = watcher(api, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(change) = changes.next().await {
        let config_map = match change {
            Ok(config_map) => config_map,
            Err(error) => {
                warn!(%error, "watching the price table failed; retrying");
                continue;
            }
        };
        let parsed = config_map
            .data
            .as_ref()
            .and_then(|data| data.get(prices::KEY))
            .ok_or(prices::InvalidTable::Missing)
            .and_then(|yaml| PriceTable::parse(yaml));
        match parsed {
            Ok(table) => {
                let changed = book.current().is_none_or(|t| t.version != table.version);
                if changed {
                    info!(version = %table.version, currency = %table.currency, "price table loaded");
                }
                metrics.price_table_valid.set(1);
                book.set(table);
            }
            Err(invalid) => {
                let in_force = book.current().map(|t| t.version.clone());
                error!(error = %invalid, in_force = ?in_force, "the price table is invalid; keeping the last valid one");
                metrics.price_table_valid.set(0);
                metrics.price_table_errors.inc();
                let note = match &in_force {
                    Some(version) => {
                        format!("{invalid}; the last valid table ({version}) stays in force")
                    }
                    None => format!("{invalid}; no cost is computed until the table is valid"),
                };
                let event = Event {
                    type_: EventType::Warning,
                    reason: "InvalidPriceTable".into(),
                    note: Some(note),
                    action: "LoadPriceTable".into(),
                    secondary: None,
                };
                if let Err(error) = recorder.publish(&event, &config_map.object_ref(&())).await {
                    warn!(%error, "failed to record an event");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_become_millicores() {
        assert_eq!(millicores("8"), Some(8_000));
        assert_eq!(millicores("500m"), Some(500));
        assert_eq!(millicores("1.5"), Some(1_500));
        assert_eq!(millicores("lots"), None);
    }

    #[test]
    fn a_pod_without_gpus_is_billed_per_started_core() {
        let table = PriceTable::parse(
            "currency: EUR\ndefaultGpuHourly: {onDemand: \"4\", spot: \"2\"}\n\
             cpuCoreHourly: {onDemand: \"0.04\", spot: \"0.02\"}\n",
        )
        .expect("valid");
        let pod = ObservedPod {
            cpu_millis: 1_500,
            ..ObservedPod::default()
        };
        let usage = usage(&pod, None, &table, None);
        assert_eq!(usage.units, 2);
        assert_eq!(usage.priced.expect("a cpu price").rate, 400);
    }
}

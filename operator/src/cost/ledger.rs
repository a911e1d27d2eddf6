//! The GPU-seconds (CPU core-seconds) ledger: what each attempt's pods consumed and what that cost.
//!
//! Everything is derived from pod timestamps (the moment the trainer container started
//! running, and the moment it ended, or now) and kept in integers: GPU-seconds, and
//! rate-seconds (seconds × GPUs × the rate in ten-thousandths per hour). Recomputing
//! from the same pods gives the same figures, so neither a second reconcile nor an
//! operator restart counts anything twice. What must outlive the pods is in the
//! attempt's entry in `status.cost`: its totals, and the pricing period. When the price
//! table changes mid-run, the totals so far are settled at the old rates and the new
//! rates apply from the last update on.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kubetune_crds::Money;
use kubetune_crds::finetunejob::{AttemptCost, Cost};

use crate::cost::prices::{Priced, Rate, format_rate};

/// Rate-seconds in one cent: 3,600 seconds × 100 ten-thousandths.
const RATE_SECONDS_PER_CENT: u64 = 360_000;

/// One pod of an attempt, as the ledger sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodUsage {
    /// When its trainer container started running; `None` if it never did.
    pub running_since: Option<Timestamp>,
    /// When it stopped running; `None` while it runs.
    pub ended: Option<Timestamp>,
    /// GPUs it holds (cores, for a pod without GPUs).
    pub units: u64,
    /// Its node's rate; `None` when the table has none for it (no CPU price).
    pub priced: Option<Priced>,
}

/// A job's cost before anything accrued, in `currency`, counting GPU-hours when `gpu`,
/// else CPU core-hours.
pub fn empty(currency: &str, gpu: bool) -> Cost {
    Cost {
        currency: currency.to_owned(),
        amount: Money::from_cents(0),
        gpu_hours: gpu.then(|| hours(0)),
        lost_gpu_hours: None,
        cpu_core_hours: (!gpu).then(|| hours(0)),
        lost_cpu_core_hours: None,
        estimated_total: None,
        rates: BTreeMap::new(),
        attempts: Vec::new(),
    }
}

/// A fresh ledger entry for attempt `number`, counting GPU-seconds when `gpu`, else
/// CPU core-seconds.
pub fn entry(number: u32, gpu: bool) -> AttemptCost {
    AttemptCost {
        number,
        gpu_seconds: gpu.then_some(0),
        cpu_core_seconds: (!gpu).then_some(0),
        amount: Money::from_cents(0),
        rate_seconds: 0,
        settled_seconds: 0,
        settled_rate_seconds: 0,
        priced_since: None,
        price_table: String::new(),
        updated: None,
    }
}

/// Cents from rate-seconds, rounded half up.
pub fn cents(rate_seconds: u64) -> u64 {
    (rate_seconds + RATE_SECONDS_PER_CENT / 2) / RATE_SECONDS_PER_CENT
}

/// Hours from seconds, as a decimal string with four places, rounded half up.
pub fn hours(seconds: u64) -> String {
    let ten_thousandths = (u128::from(seconds) * 10_000 + 1_800) / 3_600;
    format!(
        "{}.{:04}",
        ten_thousandths / 10_000,
        ten_thousandths % 10_000
    )
}

/// Brings `entry` up to `now` from the attempt's pods, priced at the table `version`.
/// Returns the rates used.
pub fn accrue(
    entry: &mut AttemptCost,
    pods: &[PodUsage],
    version: &str,
    now: Timestamp,
) -> BTreeMap<String, Rate> {
    if entry.price_table != version {
        if let Some(updated) = &entry.updated {
            // A new table: what was accrued keeps its rates; the rest is priced anew.
            entry.settled_seconds = entry.usage_seconds();
            entry.settled_rate_seconds = entry.rate_seconds;
            entry.priced_since = Some(updated.clone());
        }
        entry.price_table = version.to_owned();
    }
    let since = entry.priced_since.as_ref().map(|t| t.0.as_second());
    let now_s = now.as_second();
    let mut usage_seconds = entry.settled_seconds;
    let mut rate_seconds = entry.settled_rate_seconds;
    let mut rates = BTreeMap::new();
    for pod in pods {
        let Some(start) = pod.running_since else {
            continue;
        };
        let from = since.map_or(start.as_second(), |s| s.max(start.as_second()));
        let to = pod.ended.map_or(now_s, |e| e.as_second().min(now_s));
        // A clock that went backwards gives an empty interval, never a negative one.
        let seconds = u64::try_from(to - from).unwrap_or(0);
        usage_seconds += seconds * pod.units;
        if let Some(priced) = &pod.priced {
            rate_seconds += seconds * pod.units * priced.rate;
            rates.insert(priced.key.clone(), priced.rate);
        }
    }
    // A pod deleted before it was seen to end leaves its last figures standing: the
    // ledger only ever grows.
    entry.set_usage_seconds(entry.usage_seconds().max(usage_seconds));
    entry.rate_seconds = entry.rate_seconds.max(rate_seconds);
    entry.amount = Money::from_cents(cents(entry.rate_seconds));
    let later = entry.updated.as_ref().is_none_or(|u| u.0 < now);
    if later {
        entry.updated = Some(Time(now));
    }
    rates
}

/// [`accrue`] for an attempt whose pods have all ended and are all seen: its figures
/// are recomputed from their timestamps exactly, also downwards. A reconcile that saw a
/// pod still running after it had ended (the cache lags) accrued up to its own clock;
/// the ledger keeps growing figures otherwise, so only this corrects that. Within one
/// pricing period only: across a price table change the figures stay as settled.
pub fn accrue_complete(
    entry: &mut AttemptCost,
    pods: &[PodUsage],
    version: &str,
    now: Timestamp,
) -> BTreeMap<String, Rate> {
    if entry.price_table == version {
        entry.set_usage_seconds(entry.settled_seconds);
        entry.rate_seconds = entry.settled_rate_seconds;
    }
    accrue(entry, pods, version, now)
}

/// Rate-seconds per second of the pods running now: the burn rate.
pub fn burn_rate(pods: &[PodUsage]) -> u64 {
    pods.iter()
        .filter(|pod| pod.running_since.is_some() && pod.ended.is_none())
        .filter_map(|pod| pod.priced.as_ref().map(|p| p.rate * pod.units))
        .sum()
}

/// The job's totals from its attempts, as GPU-hours when `gpu`, else CPU core-hours.
/// `lost` are the attempts that ended without finishing the run.
pub fn total(cost: &mut Cost, lost: &[u32], gpu: bool) {
    let rate_seconds: u64 = cost.attempts.iter().map(|a| a.rate_seconds).sum();
    let usage_seconds: u64 = cost.attempts.iter().map(AttemptCost::usage_seconds).sum();
    let lost_seconds: u64 = cost
        .attempts
        .iter()
        .filter(|a| lost.contains(&a.number))
        .map(AttemptCost::usage_seconds)
        .sum();
    cost.amount = Money::from_cents(cents(rate_seconds));
    let (used, lost) = (
        Some(hours(usage_seconds)),
        (lost_seconds > 0).then(|| hours(lost_seconds)),
    );
    (
        cost.gpu_hours,
        cost.lost_gpu_hours,
        cost.cpu_core_hours,
        cost.lost_cpu_core_hours,
    ) = if gpu {
        (used, lost, None, None)
    } else {
        (None, None, used, lost)
    };
}

/// The accrued total in rate-seconds.
pub fn rate_seconds(cost: &Cost) -> u64 {
    cost.attempts.iter().map(|a| a.rate_seconds).sum()
}

/// Rates for `status.cost.rates`, as decimal strings.
pub fn rate_strings(rates: &BTreeMap<String, Rate>) -> BTreeMap<String, kubetune_crds::Decimal> {
    rates
        .iter()
        .filter_map(|(key, rate)| Some((key.clone(), format_rate(*rate).parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("valid timestamp")
    }

    fn priced(rate: Rate, key: &str) -> Option<Priced> {
        Some(Priced {
            rate,
            key: key.into(),
        })
    }

    fn pod(start: Option<i64>, end: Option<i64>, units: u64, rate: Rate) -> PodUsage {
        PodUsage {
            running_since: start.map(at),
            ended: end.map(at),
            units,
            priced: priced(rate, "A100/on-demand"),
        }
    }

    #[test]
    fn one_gpu_for_an_hour_at_3_40_costs_3_40() {
        let mut e = entry(1, true);
        accrue(&mut e, &[pod(Some(0), None, 1, 34_000)], "v1", at(3_600));
        assert_eq!(e.usage_seconds(), 3_600);
        assert_eq!(e.amount.as_str(), "3.40");
        assert_eq!(hours(e.usage_seconds()), "1.0000");
    }

    #[test]
    fn spot_and_on_demand_nodes_in_one_gang_are_priced_apiece() {
        let mut e = entry(1, true);
        let pods = [
            pod(Some(0), None, 8, 69_800),
            PodUsage {
                priced: priced(29_000, "H100/spot"),
                ..pod(Some(0), None, 8, 0)
            },
        ];
        let rates = accrue(&mut e, &pods, "v1", at(1_800));
        // 8 GPUs × 0.5 h × (6.98 + 2.90) = 39.52
        assert_eq!(e.amount.as_str(), "39.52");
        assert_eq!(e.usage_seconds(), 2 * 8 * 1_800);
        assert_eq!(rates.len(), 2);
        assert_eq!(burn_rate(&pods), 8 * (69_800 + 29_000));
    }

    #[test]
    fn recomputing_from_the_same_pods_counts_nothing_twice() {
        let pods = [pod(Some(0), Some(600), 1, 34_000)];
        let mut e = entry(1, true);
        accrue(&mut e, &pods, "v1", at(700));
        let once = e.clone();
        // The same reconcile again, and an operator restart that reads the status back.
        accrue(&mut e, &pods, "v1", at(700));
        let mut restarted: AttemptCost =
            serde_json::from_value(serde_json::to_value(&e).expect("ser")).expect("de");
        accrue(&mut restarted, &pods, "v1", at(900));
        assert_eq!(e.usage_seconds(), once.usage_seconds());
        assert_eq!(restarted.usage_seconds(), 600);
        assert_eq!(restarted.rate_seconds, once.rate_seconds);
    }

    #[test]
    fn pods_that_never_started_cost_nothing() {
        let mut e = entry(1, true);
        accrue(&mut e, &[pod(None, None, 8, 34_000)], "v1", at(3_600));
        assert_eq!((e.usage_seconds(), e.amount.as_str()), (0, "0.00"));
    }

    #[test]
    fn a_clock_that_goes_backwards_is_clamped() {
        let mut e = entry(1, true);
        accrue(&mut e, &[pod(Some(100), None, 1, 34_000)], "v1", at(50));
        assert_eq!(e.usage_seconds(), 0);
        accrue(&mut e, &[pod(Some(0), None, 1, 34_000)], "v1", at(600));
        let before = e.clone();
        accrue(&mut e, &[pod(Some(0), None, 1, 34_000)], "v1", at(300));
        assert_eq!(e.usage_seconds(), before.usage_seconds(), "never shrinks");
        assert_eq!(e.updated, before.updated, "the update time never goes back");
    }

    #[test]
    fn a_price_change_mid_run_keeps_the_old_rate_for_past_time() {
        let mut e = entry(1, true);
        accrue(&mut e, &[pod(Some(0), None, 1, 36_000)], "v1", at(1_800));
        assert_eq!(e.amount.as_str(), "1.80");
        // The table changes: from the last update (1,800 s) on, 7.20 an hour.
        accrue(&mut e, &[pod(Some(0), None, 1, 72_000)], "v2", at(3_600));
        assert_eq!(e.amount.as_str(), "5.40");
        assert_eq!(e.usage_seconds(), 3_600);
        assert_eq!(e.priced_since, Some(Time(at(1_800))));
        // Later updates at v2 keep the settled part.
        accrue(&mut e, &[pod(Some(0), None, 1, 72_000)], "v2", at(5_400));
        assert_eq!(e.amount.as_str(), "9.00");
    }

    #[test]
    fn restarts_are_totalled_and_lost_time_is_reported() {
        let mut first = entry(1, true);
        accrue(
            &mut first,
            &[pod(Some(0), Some(1_800), 8, 34_000)],
            "v1",
            at(1_900),
        );
        let mut second = entry(2, true);
        accrue(
            &mut second,
            &[pod(Some(2_000), None, 8, 34_000)],
            "v1",
            at(5_600),
        );
        let mut cost = Cost {
            attempts: vec![first, second],
            ..empty("USD", true)
        };
        total(&mut cost, &[1], true);
        assert_eq!(cost.gpu_hours.as_deref(), Some("12.0000"));
        assert_eq!(cost.lost_gpu_hours.as_deref(), Some("4.0000"));
        assert_eq!(cost.cpu_core_hours, None);
        // 12 GPU-hours × 3.40
        assert_eq!(cost.amount.as_str(), "40.80");
    }

    #[test]
    fn a_cpu_job_reports_core_hours_and_no_gpu_hours() {
        let mut attempt = entry(1, false);
        accrue(
            &mut attempt,
            &[pod(Some(0), Some(3_600), 2, 500)],
            "v1",
            at(3_600),
        );
        assert_eq!(
            (attempt.gpu_seconds, attempt.cpu_core_seconds),
            (None, Some(7_200))
        );
        let mut cost = Cost {
            attempts: vec![attempt],
            ..empty("USD", false)
        };
        total(&mut cost, &[], false);
        assert_eq!(cost.cpu_core_hours.as_deref(), Some("2.0000"));
        assert_eq!((cost.gpu_hours, cost.lost_gpu_hours), (None, None));
        // 2 core-hours × 0.05
        assert_eq!(cost.amount.as_str(), "0.10");
    }

    #[test]
    fn a_pod_seen_running_after_it_ended_is_corrected_once_it_is_seen_ended() {
        let mut e = entry(1, true);
        // The cache still shows the pod running at 610 s; it ended at 600 s.
        accrue(&mut e, &[pod(Some(0), None, 1, 34_000)], "v1", at(610));
        assert_eq!(e.usage_seconds(), 610);
        accrue_complete(&mut e, &[pod(Some(0), Some(600), 1, 34_000)], "v1", at(620));
        assert_eq!(e.usage_seconds(), 600);
        assert_eq!(e.rate_seconds, 600 * 34_000);
    }

    #[test]
    fn a_pod_deleted_unseen_keeps_its_last_figures() {
        let mut e = entry(1, true);
        accrue(&mut e, &[pod(Some(0), None, 1, 34_000)], "v1", at(600));
        accrue(&mut e, &[], "v1", at(1_200));
        assert_eq!(e.usage_seconds(), 600);
    }

    #[test]
    fn amounts_round_half_up_to_cents() {
        assert_eq!(cents(179_999), 0);
        assert_eq!(cents(180_000), 1);
        assert_eq!(hours(1), "0.0003");
        assert_eq!(hours(5_400), "1.5000");
    }
}

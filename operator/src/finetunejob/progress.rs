//! Rank 0's progress and result, turned into status.
//!
//! The trainer serves [`ProgressReport`] at `GET /progress`; the reconciler reads it at
//! most once per interval per job ([`ProgressReader`]), and the pure functions here turn
//! a report, or the result a finished trainer leaves in its termination log, into
//! `status.progress`, `status.evaluation` and `status.artifact`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kubetune_crds::finetunejob::{Artifact, Evaluation, Progress};
use kubetune_crds::training::contract::{self, ProgressReport, TrainerResult};

/// `status.progress` from a fresh report. `last_step_time` moves only when the step does,
/// which is what the stall watchdog measures.
pub fn to_status(report: &ProgressReport, previous: Option<&Progress>, now: Timestamp) -> Progress {
    let moved = previous.is_none_or(|p| p.step != report.step);
    let last_step_time = if moved {
        Some(Time(now))
    } else {
        previous.and_then(|p| p.last_step_time.clone())
    };
    Progress {
        step: report.step,
        total_steps: report.total_steps,
        percent: percent(report.step, report.total_steps),
        epoch: Some(format!("{:.2}", report.epoch)),
        loss: report.loss.map(loss),
        eval_loss: report.eval_loss.map(loss),
        tokens_per_second: (report.tokens_per_second > 0.0)
            .then(|| report.tokens_per_second.round() as u64),
        eta_seconds: report.eta_seconds.map(|s| s.max(0.0).round() as u64),
        last_step_time,
        metrics: report
            .metrics
            .iter()
            .map(|(k, v)| (k.clone(), format!("{v:.4}")))
            .collect(),
    }
}

/// `status.progress` once the trainer finished: every step done, nothing left.
pub fn finished(previous: Option<&Progress>, result: &TrainerResult) -> Progress {
    let mut progress = previous.cloned().unwrap_or_default();
    progress.step = result.steps.max(progress.step);
    progress.total_steps = progress.total_steps.max(progress.step);
    progress.percent = 100;
    progress.eta_seconds = Some(0);
    if result.eval_loss.is_some() {
        progress.eval_loss = result.eval_loss.map(loss);
    }
    progress
}

/// `status.evaluation` from the base model's and the result's eval losses; `None` until
/// at least one is known.
pub fn evaluation(base: Option<f64>, tuned: Option<f64>) -> Option<Evaluation> {
    if base.is_none() && tuned.is_none() {
        return None;
    }
    let improvement = match (base, tuned) {
        (Some(base), Some(tuned)) if base > 0.0 => Some(format!("{:.4}", (base - tuned) / base)),
        _ => None,
    };
    Some(Evaluation {
        base_eval_loss: base.map(loss),
        eval_loss: tuned.map(loss),
        improvement,
        tokens: None,
    })
}

/// Parses what a successful trainer wrote to its termination log.
pub fn parse_result(message: &str) -> Option<TrainerResult> {
    serde_json::from_str(message.trim()).ok()
}

/// `status.artifact`: where the result is and what it is.
pub fn artifact(result: &TrainerResult, claim_name: &str, path: &str) -> Option<Artifact> {
    (!result.adapter_sha256.is_empty()).then(|| Artifact {
        claim_name: claim_name.to_owned(),
        path: path.to_owned(),
        sha256: result.adapter_sha256.clone(),
        size_bytes: result.adapter_size_bytes,
    })
}

fn percent(step: u64, total: u64) -> u32 {
    if total == 0 {
        return 0;
    }
    (step.min(total) * 100 / total) as u32
}

fn loss(value: f64) -> String {
    format!("{value:.4}")
}

/// Reads rank 0's progress, at most once per `interval` per job.
#[derive(Debug)]
pub struct ProgressReader {
    http: reqwest::Client,
    interval: Duration,
    last_read: Mutex<HashMap<String, Instant>>,
}

/// Why progress could not be read.
#[derive(Debug, thiserror::Error)]
#[error("failed to read progress from {url}: {source}")]
pub struct ReadError {
    url: String,
    #[source]
    source: reqwest::Error,
}

impl ProgressReader {
    /// A reader that reads each job at most once per `interval`, giving up on a pod
    /// after `timeout`.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        Self {
            http,
            interval,
            last_read: Mutex::new(HashMap::new()),
        }
    }

    /// The bound on reads per job.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether `job` (its uid) is due a read; if so, counts this as its read.
    pub fn due(&self, job: &str) -> bool {
        let now = Instant::now();
        let mut last_read = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
        if last_read
            .get(job)
            .is_some_and(|at| now.duration_since(*at) < self.interval)
        {
            return false;
        }
        // Jobs that are gone leave an entry behind: drop the stale ones now and then.
        if last_read.len() >= 1024 && last_read.len().is_power_of_two() {
            let horizon = self.interval * 4;
            last_read.retain(|_, at| now.duration_since(*at) < horizon);
        }
        last_read.insert(job.to_owned(), now);
        true
    }

    /// Reads `GET /progress` from the trainer at `ip`.
    pub async fn read(&self, ip: &str) -> Result<ProgressReport, ReadError> {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        let url = format!("http://{host}:{}/progress", contract::PROGRESS_PORT);
        let fetch = async {
            self.http
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json::<ProgressReport>()
                .await
        };
        fetch.await.map_err(|source| ReadError { url, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("valid timestamp")
    }

    fn report(step: u64) -> ProgressReport {
        ProgressReport {
            phase: "training".into(),
            step,
            total_steps: 400,
            epoch: 1.256,
            loss: Some(1.234_567),
            tokens_per_second: 1834.6,
            eta_seconds: Some(912.4),
            ..ProgressReport::default()
        }
    }

    #[test]
    fn a_report_becomes_status_with_rounded_figures() {
        let progress = to_status(&report(100), None, at(0));
        assert_eq!((progress.step, progress.total_steps), (100, 400));
        assert_eq!(progress.percent, 25);
        assert_eq!(progress.epoch.as_deref(), Some("1.26"));
        assert_eq!(progress.loss.as_deref(), Some("1.2346"));
        assert_eq!(progress.tokens_per_second, Some(1835));
        assert_eq!(progress.eta_seconds, Some(912));
        assert_eq!(progress.last_step_time, Some(Time(at(0))));
    }

    #[test]
    fn the_step_time_moves_only_with_the_step() {
        let first = to_status(&report(100), None, at(0));
        let same = to_status(&report(100), Some(&first), at(60));
        assert_eq!(same.last_step_time, Some(Time(at(0))));
        let next = to_status(&report(101), Some(&same), at(120));
        assert_eq!(next.last_step_time, Some(Time(at(120))));
    }

    #[test]
    fn the_trainers_own_json_is_read_and_unknown_fields_are_ignored() {
        let json = r#"{"phase":"training","step":3,"totalSteps":10,"epoch":0.3,
            "loss":2.5,"evalLoss":null,"baseEvalLoss":3.1,"tokensPerSecond":120.0,
            "etaSeconds":14.0,"metrics":{"accuracy":0.75},"somethingNew":true}"#;
        let report: ProgressReport = serde_json::from_str(json).expect("parses");
        assert_eq!(report.step, 3);
        assert_eq!(report.base_eval_loss, Some(3.1));
        let progress = to_status(&report, None, at(0));
        assert_eq!(
            progress.metrics.get("accuracy").map(String::as_str),
            Some("0.7500")
        );
    }

    #[test]
    fn evaluation_reports_the_relative_improvement() {
        let evaluation = evaluation(Some(2.0), Some(1.5)).expect("known");
        assert_eq!(evaluation.improvement.as_deref(), Some("0.2500"));
        assert_eq!(evaluation.base_eval_loss.as_deref(), Some("2.0000"));
        assert!(super::evaluation(None, None).is_none());
        assert!(
            super::evaluation(Some(2.0), None)
                .expect("base")
                .improvement
                .is_none()
        );
    }

    #[test]
    fn the_result_names_the_artifact() {
        let result = parse_result(
            r#"{"adapterSha256":"ab12","adapterSizeBytes":4096,"baseEvalLoss":2.0,
                "evalLoss":1.0,"steps":40}"#,
        )
        .expect("parses");
        let artifact = artifact(&result, "adapters", "team/job").expect("an artifact");
        assert_eq!(artifact.sha256, "ab12");
        assert_eq!(artifact.size_bytes, 4096);
        let progress = finished(None, &result);
        assert_eq!((progress.step, progress.percent), (40, 100));
        assert!(parse_result("not json").is_none());
    }

    #[test]
    fn reads_are_bounded_per_job() {
        let reader = ProgressReader::new(Duration::from_secs(60), Duration::from_secs(1));
        assert!(reader.due("a"));
        assert!(!reader.due("a"));
        assert!(reader.due("b"));
    }
}

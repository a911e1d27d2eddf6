//! The FineTuneJob lifecycle as a pure function: from the job, its status and what was
//! observed of its children, to the next status and the actions that bring the cluster
//! there.
//!
//! Level-triggered: nothing here depends on why the reconcile ran. Everything that must
//! survive an operator restart (attempt history, restarts, times) is in the status it
//! returns, so the next reconcile, in this process or another, continues where this one
//! stopped.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kubetune_crds::Money;
use kubetune_crds::conditions::{finetunejob as types, reason};
use kubetune_crds::finetunejob::{
    Attempt, Children, FineTuneJob, FineTuneJobStatus, MemoryPlanStatus, Phase, PlanSource,
};
use kubetune_crds::memory;
use kubetune_crds::training::contract::ProgressReport;

use crate::conditions::{self, Desired};
use crate::cost::ledger::{self, PodUsage};
use crate::cost::prices::PriceTable;
pub use crate::events::Transition;
use crate::finetunejob::observe::{Failure, FailureClass, JobOutcome, ObservedJob};
use crate::finetunejob::{progress, render};
use crate::names;

/// What the reconciler saw, beyond the FineTuneJob itself.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// PersistentVolumeClaims the job names that do not exist.
    pub missing_claims: Vec<String>,
    /// The current attempt's Job, if it exists.
    pub job: Option<ObservedJob>,
    /// Rank 0's progress, when it was read for this reconcile.
    pub report: Option<ProgressReport>,
    /// What the cost ledger needs; `None` while no valid price table is loaded.
    pub cost: Option<CostInputs>,
    /// A price table is configured but none has been loaded (yet): a budget cannot be
    /// checked.
    pub prices_pending: bool,
}

/// The price table in force and the observed attempt's pods, priced.
#[derive(Clone, Debug)]
pub struct CostInputs {
    /// The table.
    pub table: Arc<PriceTable>,
    /// The attempt the pods belong to, when its Job was observed.
    pub attempt: Option<u32>,
    /// Its pods.
    pub pods: Vec<PodUsage>,
}

/// A change the reconciler makes to the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Apply the ConfigMap (and Service) and create the attempt's Job if it is missing.
    EnsureAttempt {
        /// The attempt number.
        attempt: u32,
        /// Whether its Job is created suspended.
        suspend: bool,
    },
    /// Set `spec.suspend` of the current Job.
    SetSuspend {
        /// The Job.
        job: String,
        /// The value.
        suspend: bool,
    },
    /// Delete a Job and its pods (foreground), giving the trainer its grace period.
    DeleteJob {
        /// The Job.
        job: String,
    },
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The status to write.
    pub status: FineTuneJobStatus,
    /// Changes to make, in order.
    pub actions: Vec<Action>,
    /// Transitions to record as events.
    pub transitions: Vec<Transition>,
    /// When to look again even if nothing changes (backoff, timeouts, TTL).
    pub requeue_after: Option<Duration>,
}

/// Delay before attempt `restarts + 1`: 10 s doubling per restart, at most 5 minutes.
pub fn backoff(restarts: u32) -> Duration {
    let seconds = 10u64.saturating_mul(1u64 << restarts.saturating_sub(1).min(10));
    Duration::from_secs(seconds.min(300))
}

fn since(then: Timestamp, now: Timestamp) -> Duration {
    let elapsed: SignedDuration = now.duration_since(then);
    // A clock that went backwards counts as no time at all.
    Duration::try_from(elapsed).unwrap_or(Duration::ZERO)
}

fn plus(then: Timestamp, duration: Duration) -> Timestamp {
    SignedDuration::try_from(duration)
        .ok()
        .and_then(|d| then.checked_add(d).ok())
        .unwrap_or(then)
}

struct Planner<'a> {
    ftj: &'a FineTuneJob,
    now: Timestamp,
    status: FineTuneJobStatus,
    actions: Vec<Action>,
    transitions: Vec<Transition>,
    requeue_after: Option<Duration>,
}

impl Planner<'_> {
    fn condition(
        &mut self,
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: String,
    ) {
        debug_assert!(
            types::get(type_).is_some_and(|t| t.allows(reason)),
            "condition {type_} with reason {reason} is not in kubetune_crds::conditions"
        );
        conditions::set(
            &mut self.status.conditions,
            Desired {
                type_,
                status,
                reason,
                message,
            },
            self.ftj.metadata.generation,
            self.now,
        );
    }

    fn event(&mut self, reason: &'static str, note: String, warning: bool) {
        self.transitions.push(Transition {
            reason,
            note,
            warning,
        });
    }

    fn requeue(&mut self, after: Duration) {
        self.requeue_after = Some(self.requeue_after.map_or(after, |d| d.min(after)));
    }

    /// Whether a Kueue queue admits the job: its Job's `suspend` is then Kueue's.
    fn queued(&self) -> bool {
        self.ftj.spec.scheduling.queue_name.is_some()
    }

    fn set_phase(&mut self, phase: Phase) {
        self.status.phase = phase;
    }

    fn start_attempt(&mut self, number: u32, resumed_from_step: u64) {
        self.status.attempts.push(Attempt {
            number,
            start_time: Some(Time(self.now)),
            resumed_from_step,
            ..Attempt::default()
        });
        let suspend = self.ftj.spec.suspend;
        self.actions.push(Action::EnsureAttempt {
            attempt: number,
            suspend: suspend || self.queued(),
        });
        let name = self.ftj.metadata.name.as_deref().unwrap_or_default();
        self.status.children = Some(Children {
            job: Some(names::attempt_job(name, number)),
            service: render::is_gang(self.ftj).then(|| names::service(name)),
            config_map: Some(names::config_map(name)),
        });
        self.set_phase(if suspend {
            Phase::Suspended
        } else if self.queued() {
            Phase::Pending
        } else {
            Phase::Admitted
        });
        let note = if number == 1 {
            "created the trainer Job for attempt 1".to_owned()
        } else {
            format!("started attempt {number} from the last checkpoint")
        };
        self.event(
            if number == 1 {
                reason::ADMITTED
            } else {
                reason::RESTARTED
            },
            note,
            false,
        );
    }

    fn end_attempt(&mut self, reason: &str, message: &str, nodes: Vec<String>) {
        let now = self.now;
        if let Some(attempt) = self.status.attempts.last_mut() {
            attempt.end_time = Some(Time(now));
            attempt.reason = Some(reason.to_owned());
            attempt.message = (!message.is_empty()).then(|| message.to_owned());
            if !nodes.is_empty() {
                attempt.nodes = nodes;
            }
        }
    }

    fn finish(&mut self, phase: Phase, reason: &'static str, message: String) {
        self.set_phase(phase);
        self.status.completion_time = Some(Time(self.now));
        let succeeded = phase == Phase::Succeeded;
        self.condition(types::SUCCEEDED, succeeded, reason, message.clone());
        self.condition(types::FAILED, !succeeded, reason, message.clone());
        self.condition(types::RUNNING, false, reason, message.clone());
        self.event(reason, message, !succeeded);
    }

    /// A retryable end of the current attempt: restart, or fail when out of restarts.
    fn retry_or_fail(
        &mut self,
        job: &str,
        reason: &'static str,
        message: String,
        nodes: Vec<String>,
        holds_gpus: bool,
    ) {
        self.end_attempt(reason, &message, nodes);
        let max = self.ftj.spec.max_restarts;
        if self.status.restarts >= max {
            // A failed Job's pods have ended and hold no GPU: keep it for its logs (the
            // TTL removes it). A gang that timed out still holds GPUs: release them.
            if holds_gpus {
                self.actions.push(Action::DeleteJob {
                    job: job.to_owned(),
                });
            }
            self.finish(
                Phase::Failed,
                reason::BACKOFF_LIMIT_EXCEEDED,
                format!("attempt failed ({reason}: {message}) and all {max} restarts are used"),
            );
            return;
        }
        self.actions.push(Action::DeleteJob {
            job: job.to_owned(),
        });
        self.status.restarts += 1;
        self.set_phase(Phase::Pending);
        let delay = backoff(self.status.restarts);
        self.condition(
            types::RUNNING,
            false,
            reason,
            format!(
                "restarting from the last checkpoint in {}s: {message}",
                delay.as_secs()
            ),
        );
        self.event(reason, message, true);
        self.requeue(delay);
    }
}

/// Plans the next step of `ftj` given what was observed at `now`.
pub fn plan(ftj: &FineTuneJob, observed: &Observed, now: Timestamp) -> Plan {
    let mut planner = Planner {
        ftj,
        now,
        status: ftj.status.clone().unwrap_or_default(),
        actions: Vec::new(),
        transitions: Vec::new(),
        requeue_after: None,
    };
    planner.status.observed_generation = ftj.metadata.generation;
    let terminal = planner.status.phase.is_terminal();
    let stopped = !terminal && account(&mut planner, observed);
    if !stopped {
        step(&mut planner, observed);
    }
    if !terminal {
        total_cost(&mut planner, observed);
    }
    Plan {
        status: planner.status,
        actions: planner.actions,
        transitions: planner.transitions,
        requeue_after: planner.requeue_after,
    }
}

/// The memory plan from the spec (`status.memoryPlan`, until the trainer reports its
/// own from the model's config.json) and, with a GPU product of known memory,
/// condition FitsGpuMemory. A plan that does not fit is a warning, with an event, not a
/// refusal: the trainer, which reads the real config, refuses to start.
fn plan_memory(p: &mut Planner<'_>) {
    let spec = &p.ftj.spec;
    let from_trainer = p
        .status
        .memory_plan
        .as_ref()
        .is_some_and(|m| m.source == PlanSource::Trainer);
    let Some(shape) = spec.model_shape().filter(|_| !from_trainer) else {
        return;
    };
    let capacity = spec.resources.gpu_memory_bytes();
    let plan = spec.plan_input(shape).fitted(capacity).plan();
    p.status.memory_plan = Some(MemoryPlanStatus {
        source: PlanSource::Spec,
        gpu_memory_bytes: capacity,
        plan,
    });
    let (Some(capacity), Some(gpu)) = (capacity, spec.resources.gpu.as_ref()) else {
        return;
    };
    let fits = plan.peak_bytes <= capacity;
    let message = format!(
        "{}; {} has {:.1} GiB{}",
        plan.summary(),
        gpu.product,
        memory::gib(capacity),
        if fits {
            ""
        } else {
            ": the trainer will refuse to start; use more nodes, a smaller batchSize or \
             maxSeqLength, or method qlora"
        }
    );
    let warned = conditions::get(&p.status.conditions, types::FITS_GPU_MEMORY)
        .is_some_and(|c| c.status == "False");
    if !fits && !warned {
        p.event(reason::INSUFFICIENT_GPU_MEMORY, message.clone(), true);
    }
    let reason = if fits {
        reason::FITS
    } else {
        reason::INSUFFICIENT_GPU_MEMORY
    };
    p.condition(types::FITS_GPU_MEMORY, fits, reason, message);
}

fn step(p: &mut Planner<'_>, observed: &Observed) {
    let spec = &p.ftj.spec;

    // A finished job keeps its status; its Job goes when the TTL says so, and it is
    // never recreated.
    if p.status.phase.is_terminal() {
        if let (Some(ttl), Some(done)) =
            (spec.ttl_seconds_after_finished, &p.status.completion_time)
        {
            let expiry = plus(done.0, Duration::from_secs(u64::from(ttl)));
            if p.now >= expiry {
                if let Some(job) = &observed.job {
                    p.actions.push(Action::DeleteJob {
                        job: job.name.clone(),
                    });
                }
            } else {
                p.requeue(since(p.now, expiry));
            }
        }
        return;
    }

    // The CRD refuses paths that leave their volume at apply; a job stored before that
    // rule existed (or written around it) is refused here again, before any pod mounts
    // a volume.
    if let Some(message) = render::path_outside_volume(spec) {
        p.finish(Phase::Failed, reason::INVALID_SPEC, message);
        return;
    }

    if !observed.missing_claims.is_empty() {
        let names = observed.missing_claims.join(", ");
        p.condition(
            types::INPUTS_READY,
            false,
            reason::CLAIM_MISSING,
            format!("waiting for PersistentVolumeClaim {names} in this namespace"),
        );
        p.set_phase(Phase::Pending);
        // Claims are watched; this is a safety net.
        p.requeue(Duration::from_secs(60));
        return;
    }
    p.condition(
        types::INPUTS_READY,
        true,
        reason::FOUND,
        "every PersistentVolumeClaim exists".into(),
    );
    plan_memory(p);

    let Some(current) = p.status.attempts.last().cloned() else {
        if spec.budget.is_some() && observed.cost.is_none() && observed.prices_pending {
            p.condition(
                types::ADMITTED,
                false,
                reason::WAITING_FOR_PRICES,
                "the budget is checked against the price table, which is not loaded yet".into(),
            );
            p.set_phase(Phase::Pending);
            p.requeue(Duration::from_secs(5));
            return;
        }
        if let Some(message) = unaffordable(p.ftj, observed.cost.as_ref()) {
            p.condition(types::ADMITTED, false, reason::BUDGET_TOO_SMALL, message);
            p.set_phase(Phase::Pending);
            return;
        }
        p.start_attempt(1, 0);
        return;
    };

    let Some(job) = &observed.job else {
        if let Some(ended) = &current.end_time {
            // Between attempts: wait out the backoff, then start the next one.
            if spec.suspend {
                suspended(p);
                return;
            }
            let ready = plus(ended.0, backoff(p.status.restarts));
            if p.now >= ready {
                p.start_attempt(current.number + 1, 0);
            } else {
                p.requeue(since(p.now, ready));
            }
        } else if spec.suspend && p.queued() {
            // Suspended under Kueue: the Job was deleted and comes back on resume.
            suspended(p);
        } else {
            // The attempt's Job is gone (deleted by hand, suspended under Kueue, or not
            // created yet): create it.
            p.actions.push(Action::EnsureAttempt {
                attempt: current.number,
                suspend: spec.suspend || p.queued(),
            });
        }
        return;
    };

    if job.outcome == JobOutcome::Active {
        if p.queued() {
            // Kueue owns the Job's `suspend`: setting it would fight Kueue's admission.
            // Suspending deletes the Job (its pods checkpoint in their grace period).
            if spec.suspend {
                p.actions.push(Action::DeleteJob {
                    job: job.name.clone(),
                });
            }
        } else if job.suspended != spec.suspend {
            p.actions.push(Action::SetSuspend {
                job: job.name.clone(),
                suspend: spec.suspend,
            });
        }
    }
    if spec.suspend && job.outcome == JobOutcome::Active {
        if p.status.phase != Phase::Suspended {
            p.event(
                reason::SUSPENDED,
                "stopped the trainer pods; they resume from the checkpoint".into(),
                false,
            );
        }
        suspended(p);
        return;
    }
    if p.status.phase == Phase::Suspended {
        p.event(
            reason::RESUMED,
            "resumed the trainer pods from the checkpoint".into(),
            false,
        );
    }
    p.condition(
        types::SUSPENDED,
        false,
        reason::RESUMED,
        "spec.suspend is false".into(),
    );

    let nodes: Vec<String> = job.pods.iter().filter_map(|pod| pod.node.clone()).collect();
    match job.outcome {
        JobOutcome::Complete => {
            let result = job
                .rank_zero()
                .and_then(|pod| pod.result.as_deref())
                .and_then(progress::parse_result);
            if let Some(result) = result {
                p.status.progress = Some(progress::finished(p.status.progress.as_ref(), &result));
                p.status.evaluation = progress::evaluation(result.base_eval_loss, result.eval_loss);
                let namespace = p.ftj.metadata.namespace.as_deref().unwrap_or_default();
                p.status.artifact = progress::artifact(
                    &result,
                    &p.ftj.spec.output.volume.claim_name,
                    &render::output_path(p.ftj, namespace),
                );
            }
            p.end_attempt(reason::SUCCEEDED, "", nodes);
            p.finish(
                Phase::Succeeded,
                reason::SUCCEEDED,
                "the trainer finished".into(),
            );
        }
        JobOutcome::Failed => {
            // A permanent failure on any rank decides; otherwise the first failure.
            let failures: Vec<&Failure> = job
                .pods
                .iter()
                .filter_map(|pod| pod.failure.as_ref())
                .collect();
            let failure = failures
                .iter()
                .find(|f| !f.class.is_retryable())
                .or(failures.first())
                .copied();
            match failure {
                Some(failure) if !failure.class.is_retryable() => {
                    p.end_attempt(failure.class.reason(), &failure.message, nodes);
                    p.finish(
                        Phase::Failed,
                        failure.class.reason(),
                        failure.message.clone(),
                    );
                }
                Some(failure) => {
                    let reason = failure.class.reason();
                    let message = if failure.message.is_empty() {
                        "a trainer pod failed".to_owned()
                    } else {
                        failure.message.clone()
                    };
                    p.retry_or_fail(&job.name, reason, message, nodes, false);
                }
                None => {
                    let reason = FailureClass::Error.reason();
                    p.retry_or_fail(
                        &job.name,
                        reason,
                        "the trainer Job failed".into(),
                        nodes,
                        false,
                    );
                }
            }
        }
        JobOutcome::Active => active(p, job, &current, nodes, observed.report.as_ref()),
    }
}

/// Accrues the observed attempt's pods into `status.cost` and enforces the budget.
/// Returns whether the job was stopped for its budget.
fn account(p: &mut Planner<'_>, observed: &Observed) -> bool {
    let Some(inputs) = &observed.cost else {
        return false;
    };
    let table = &inputs.table;
    let gpu = p.ftj.spec.resources.gpu.is_some();
    let mut cost = p
        .status
        .cost
        .clone()
        .unwrap_or_else(|| ledger::empty(&table.currency, gpu));
    if let Some(number) = inputs.attempt {
        let index = match cost.attempts.iter().position(|a| a.number == number) {
            Some(index) => index,
            None => {
                cost.attempts.push(ledger::entry(number, gpu));
                cost.attempts.len() - 1
            }
        };
        // Every pod of the attempt seen, and each ended (or never ran): exact figures.
        let pods = &inputs.pods;
        let complete = pods.len() >= p.ftj.spec.resources.nodes as usize
            && pods
                .iter()
                .all(|pod| pod.ended.is_some() || pod.running_since.is_none());
        let accrue = if complete {
            ledger::accrue_complete
        } else {
            ledger::accrue
        };
        let rates = accrue(&mut cost.attempts[index], pods, &table.version, p.now);
        cost.rates.extend(ledger::rate_strings(&rates));
    }
    let accrued = ledger::cents(ledger::rate_seconds(&cost));
    let currency = cost.currency.clone();
    p.status.cost = Some(cost);

    let Some(budget) = &p.ftj.spec.budget else {
        return false;
    };
    let Ok(max) = budget.max_cost.cents() else {
        return false;
    };
    let amount = |cents: u64| format!("{} {currency}", Money::from_cents(cents));
    if accrued >= max {
        let message = format!(
            "the run cost {} and reached its budget of {}; stopped the trainer, its last checkpoint is kept",
            amount(accrued),
            amount(max)
        );
        if let Some(job) = &observed.job {
            p.actions.push(Action::DeleteJob {
                job: job.name.clone(),
            });
        }
        let open = p
            .status
            .attempts
            .last()
            .is_some_and(|a| a.end_time.is_none());
        if open {
            let nodes = observed
                .job
                .iter()
                .flat_map(|job| job.pods.iter().filter_map(|pod| pod.node.clone()))
                .collect();
            p.end_attempt(reason::BUDGET_EXCEEDED, &message, nodes);
        }
        p.condition(
            types::BUDGET_EXCEEDED,
            true,
            reason::BUDGET_EXCEEDED,
            message.clone(),
        );
        p.finish(Phase::Failed, reason::BUDGET_EXCEEDED, message);
        return true;
    }
    let warned = conditions::is_true(&p.status.conditions, types::BUDGET_WARNING);
    if accrued * 100 >= max * u64::from(budget.warn_percent) && !warned {
        let message = format!(
            "the run has cost {}, {}% of its budget of {}",
            amount(accrued),
            accrued * 100 / max.max(1),
            amount(max)
        );
        p.condition(
            types::BUDGET_WARNING,
            true,
            reason::BUDGET_WARNING,
            message.clone(),
        );
        p.event(reason::BUDGET_WARNING, message, true);
    }
    false
}

/// The job's cost totals and estimate, once this reconcile's attempts are settled.
fn total_cost(p: &mut Planner<'_>, observed: &Observed) {
    let lost: Vec<u32> = p
        .status
        .attempts
        .iter()
        .filter(|a| a.end_time.is_some() && a.reason.as_deref() != Some(reason::SUCCEEDED))
        .map(|a| a.number)
        .collect();
    let phase = p.status.phase;
    let eta = p
        .status
        .progress
        .as_ref()
        .and_then(|progress| progress.eta_seconds);
    let done_percent = p
        .status
        .progress
        .as_ref()
        .map_or(0, |progress| progress.percent);
    let from_dataset = observed
        .cost
        .as_ref()
        .and_then(|inputs| dataset_estimate(p.ftj, &inputs.table));
    let Some(cost) = p.status.cost.as_mut() else {
        return;
    };
    ledger::total(cost, &lost, p.ftj.spec.resources.gpu.is_some());
    let burn = observed
        .cost
        .as_ref()
        .map_or(0, |inputs| ledger::burn_rate(&inputs.pods));
    cost.estimated_total = match (phase, eta) {
        (Phase::Succeeded, _) => Some(cost.amount.clone()),
        (Phase::Running, Some(eta)) if burn > 0 => Some(Money::from_cents(ledger::cents(
            ledger::rate_seconds(cost) + eta * burn,
        ))),
        // Before the trainer reports: what is left of the dataset at the assumed speed.
        _ => match from_dataset {
            Some(full) => {
                let left = full * u64::from(100 - done_percent.min(100)) / 100;
                Some(Money::from_cents(ledger::cents(
                    ledger::rate_seconds(cost) + left,
                )))
            }
            None => cost.estimated_total.take(),
        },
    };
}

/// The whole run's cost in rate-seconds from `dataset.estimatedTokens`, the epochs and
/// the table's tokens per second per GPU, at the on-demand rate; `None` when a figure
/// is missing (or `maxSteps` makes the epochs moot).
fn dataset_estimate(ftj: &FineTuneJob, table: &PriceTable) -> Option<u64> {
    let spec = &ftj.spec;
    let tokens = spec.dataset.estimated_tokens?;
    if spec.hyperparameters.max_steps.is_some() {
        return None;
    }
    let gpu = spec.resources.gpu.as_ref()?;
    let gpus = u64::from(spec.resources.nodes) * u64::from(gpu.per_node);
    let per_gpu = table.throughput(&gpu.product)?;
    let work = tokens.saturating_mul(u64::from(spec.hyperparameters.epochs));
    let seconds = work.div_ceil(per_gpu.saturating_mul(gpus).max(1));
    Some(
        seconds
            .saturating_mul(gpus)
            .saturating_mul(table.on_demand_gpu_rate(&gpu.product)),
    )
}

/// Why a budget cannot pay for the first minute of the requested compute at the
/// cheapest rate the table has for it, or `None` when it can (or nothing says).
fn unaffordable(ftj: &FineTuneJob, inputs: Option<&CostInputs>) -> Option<String> {
    let budget = ftj.spec.budget.as_ref()?;
    let table = &inputs?.table;
    let max = budget.max_cost.cents().ok()?;
    let resources = &ftj.spec.resources;
    let nodes = u64::from(resources.nodes);
    let (units, rate, what) = match &resources.gpu {
        Some(gpu) => (
            nodes * u64::from(gpu.per_node),
            table.cheapest_gpu_rate(&gpu.product),
            format!("{} × {}", nodes * u64::from(gpu.per_node), gpu.product),
        ),
        None => {
            let cores = resources
                .cpu
                .as_deref()
                .and_then(crate::cost::millicores)
                .map_or(1, |m| m.div_ceil(1000).max(1));
            (
                nodes * cores,
                table.cheapest_cpu_rate()?,
                format!("{} CPU cores", nodes * cores),
            )
        }
    };
    let first_minute = 60 * units * rate;
    let cents = ledger::cents(first_minute);
    (max * 360_000 < first_minute).then(|| {
        format!(
            "budget.maxCost {} {} cannot pay for the first minute of {what} ({} {} at the cheapest rate)",
            budget.max_cost,
            table.currency,
            Money::from_cents(cents.max(1)),
            table.currency
        )
    })
}

/// The job is suspended by its spec.
fn suspended(p: &mut Planner<'_>) {
    p.set_phase(Phase::Suspended);
    p.condition(
        types::SUSPENDED,
        true,
        reason::SUSPENDED,
        "spec.suspend is true".into(),
    );
    p.condition(
        types::RUNNING,
        false,
        reason::SUSPENDED,
        "spec.suspend is true".into(),
    );
}

fn active(
    p: &mut Planner<'_>,
    job: &ObservedJob,
    current: &Attempt,
    nodes: Vec<String>,
    report: Option<&ProgressReport>,
) {
    let spec = &p.ftj.spec;
    let wanted = spec.resources.nodes as usize;
    let running = job.pods.iter().filter(|pod| pod.running).count();

    if let Some(queue) = &spec.scheduling.queue_name {
        if job.suspended {
            p.set_phase(Phase::Pending);
            p.condition(
                types::ADMITTED,
                false,
                reason::QUEUED,
                format!("waiting for Kueue to admit the workload from LocalQueue {queue}"),
            );
            p.condition(
                types::RUNNING,
                false,
                reason::QUEUED,
                format!("queued in {queue}"),
            );
            return;
        }
        p.condition(
            types::ADMITTED,
            true,
            reason::ADMITTED_BY_KUEUE,
            format!("Kueue admitted the workload from LocalQueue {queue}"),
        );
    } else {
        p.condition(
            types::ADMITTED,
            true,
            reason::CREATED,
            "the trainer Job is created".into(),
        );
    }

    if running >= wanted {
        if p.status.phase != Phase::Running {
            p.event(
                "Running",
                format!("all {wanted} trainer pods are running"),
                false,
            );
        }
        p.set_phase(Phase::Running);
        let first = job.pods.iter().filter_map(|pod| pod.running_since).min();
        if p.status.start_time.is_none() {
            p.status.start_time = Some(Time(first.unwrap_or(p.now)));
        }
        if let Some(attempt) = p.status.attempts.last_mut() {
            attempt.nodes = nodes.clone();
        }
        p.condition(
            types::RUNNING,
            true,
            reason::TRAINER_RUNNING,
            format!("{running} of {wanted} trainer pods running"),
        );
        if let Some(report) = report {
            progress_and_stall(p, job, report, first.unwrap_or(p.now), nodes);
        }
        return;
    }

    p.set_phase(Phase::Admitted);
    let waiting = job.pods.iter().find_map(|pod| pod.waiting.clone());
    let (reason, message) = match &waiting {
        Some((reason, message)) => (
            *reason,
            format!("{running} of {wanted} pods running; {message}"),
        ),
        None => (
            reason::PENDING,
            format!("{running} of {wanted} pods running"),
        ),
    };
    p.condition(types::RUNNING, false, reason, message);

    // All or nothing: a gang that is not whole within the timeout releases its GPUs.
    // The clock runs from the Job's (latest) start: time queued in Kueue or suspended
    // does not count.
    if wanted > 1 {
        let timeout = Duration::from_secs(u64::from(spec.scheduling.gang_timeout_seconds));
        let started = job
            .started
            .or(current.start_time.as_ref().map(|t| t.0))
            .unwrap_or(p.now);
        let waited = since(started, p.now);
        if waited >= timeout {
            let message = format!(
                "only {running} of {wanted} pods were running after {}s; released the gang's GPUs",
                timeout.as_secs()
            );
            p.retry_or_fail(&job.name, reason::GANG_TIMEOUT, message, nodes, true);
        } else {
            p.requeue(timeout - waited);
        }
    }
}

/// Writes rank 0's fresh report into status, and restarts a trainer whose step has not
/// moved for `stallTimeoutSeconds` while it says it is training.
fn progress_and_stall(
    p: &mut Planner<'_>,
    job: &ObservedJob,
    report: &ProgressReport,
    running_since: Timestamp,
    nodes: Vec<String>,
) {
    let progress = progress::to_status(report, p.status.progress.as_ref(), p.now);
    if let Some(plan) = report.memory_plan {
        p.status.memory_plan = Some(MemoryPlanStatus {
            source: PlanSource::Trainer,
            gpu_memory_bytes: p.ftj.spec.resources.gpu_memory_bytes(),
            plan,
        });
    }
    if let Some(evaluation) = progress::evaluation(report.base_eval_loss, report.eval_loss) {
        p.status.evaluation = Some(evaluation);
    }
    // A new attempt's clock starts when its pods do, whatever the last step time says.
    let last_step = progress
        .last_step_time
        .as_ref()
        .map_or(running_since, |t| t.0.max(running_since));
    p.status.progress = Some(progress);

    let timeout = Duration::from_secs(u64::from(p.ftj.spec.stall_timeout_seconds));
    let quiet = since(last_step, p.now);
    if report.phase == "training" && quiet >= timeout {
        let message = format!(
            "no new step for {}s (stuck at step {}); restarting from the last checkpoint",
            quiet.as_secs(),
            report.step
        );
        p.condition(types::STALLED, true, reason::NO_PROGRESS, message.clone());
        p.retry_or_fail(&job.name, reason::STALLED, message, nodes, true);
    } else {
        p.condition(
            types::STALLED,
            false,
            reason::PROGRESSING,
            format!("step {} of {}", report.step, report.total_steps),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finetunejob::observe::ObservedPod;
    use crate::test_support::finetunejob_from_example;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("valid timestamp")
    }

    fn pod(index: usize, running: bool, failure: Option<Failure>) -> ObservedPod {
        ObservedPod {
            name: format!("p-{index}"),
            node: Some(format!("node-{index}")),
            rank: Some(index as u32),
            ip: Some(format!("10.0.0.{index}")),
            running_since: running.then(|| at(5)),
            running,
            failure,
            gpus: 1,
            ..ObservedPod::default()
        }
    }

    fn job(outcome: JobOutcome, pods: Vec<ObservedPod>) -> Observed {
        Observed {
            missing_claims: Vec::new(),
            job: Some(ObservedJob {
                name: "support-lora-a1".into(),
                suspended: false,
                started: Some(at(0)),
                outcome,
                pods,
            }),
            report: None,
            cost: None,
            prices_pending: false,
        }
    }

    fn ensure(attempt: u32) -> Vec<Action> {
        vec![Action::EnsureAttempt {
            attempt,
            suspend: false,
        }]
    }

    /// The fixtures' Job of attempt 1 (the observed Job is always named so).
    fn delete_attempt_one() -> Vec<Action> {
        vec![Action::DeleteJob {
            job: "support-lora-a1".into(),
        }]
    }

    fn with_status(mut ftj: FineTuneJob, plan: &Plan) -> FineTuneJob {
        ftj.status = Some(plan.status.clone());
        ftj
    }

    #[test]
    fn a_new_job_starts_attempt_one() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let plan = plan(&ftj, &Observed::default(), at(0));
        assert_eq!(plan.actions, ensure(1));
        assert_eq!(plan.status.phase, Phase::Admitted);
        assert_eq!(plan.status.attempts.len(), 1);
        assert_eq!(plan.status.observed_generation, Some(1));
    }

    #[test]
    fn every_gpu_example_fits_its_memory_plan() {
        for example in [
            "lora-a100.yaml",
            "qlora.yaml",
            "dpo.yaml",
            "full-16-nodes.yaml",
        ] {
            let ftj = finetunejob_from_example(example);
            let plan = plan(&ftj, &Observed::default(), at(0));
            let memory = plan.status.memory_plan.as_ref().expect("a known model");
            assert_eq!(memory.source, PlanSource::Spec);
            let fits = conditions::get(&plan.status.conditions, "FitsGpuMemory").expect("set");
            assert_eq!(fits.status, "True", "{example}: {}", fits.message);
            assert!(
                plan.transitions
                    .iter()
                    .all(|t| t.reason != "InsufficientGpuMemory")
            );
        }
    }

    #[test]
    fn a_job_too_big_for_its_gpu_is_warned_about_once_at_admission() {
        let mut ftj = finetunejob_from_example("lora-a100.yaml");
        ftj.spec.base_model.name = Some("meta-llama/Llama-3.1-70B-Instruct".into());
        let first = plan(&ftj, &Observed::default(), at(0));
        let fits = conditions::get(&first.status.conditions, "FitsGpuMemory").expect("set");
        assert_eq!(
            (fits.status.as_str(), fits.reason.as_str()),
            ("False", "InsufficientGpuMemory")
        );
        assert!(
            fits.message.contains("NVIDIA-A100-SXM4-80GB"),
            "{}",
            fits.message
        );
        let warnings: Vec<_> = first
            .transitions
            .iter()
            .filter(|t| t.reason == "InsufficientGpuMemory")
            .collect();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].warning);
        // Still admitted: the trainer, which reads the real config, decides.
        assert_eq!(first.actions, ensure(1));
        let memory = first.status.memory_plan.clone().expect("planned");
        assert!(memory.plan.peak_bytes > memory.gpu_memory_bytes.expect("known product"));

        let again = plan(&with_status(ftj, &first), &Observed::default(), at(1));
        assert!(
            again
                .transitions
                .iter()
                .all(|t| t.reason != "InsufficientGpuMemory")
        );
    }

    #[test]
    fn the_trainers_plan_replaces_the_specs() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let trainer = kubetune_crds::memory::MemoryPlan {
            peak_bytes: 123,
            ..Default::default()
        };
        let report = ProgressReport {
            memory_plan: Some(trainer),
            ..training(1)
        };
        let running = plan(&ftj, &running_with(Some(report)), at(10));
        let memory = running.status.memory_plan.clone().expect("planned");
        assert_eq!((memory.source, memory.plan), (PlanSource::Trainer, trainer));
        // Later reconciles keep it.
        let later = plan(&with_status(ftj, &running), &running_with(None), at(20));
        assert_eq!(later.status.memory_plan, running.status.memory_plan);
    }

    #[test]
    fn planning_twice_on_the_same_state_starts_no_second_attempt() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let first = plan(&ftj, &Observed::default(), at(0));
        let ftj = with_status(ftj, &first);
        // The Job is not in the cache yet: ensure the same attempt, don't start another.
        let second = plan(&ftj, &Observed::default(), at(1));
        assert_eq!(second.actions, ensure(1));
        assert_eq!(second.status.attempts.len(), 1);
    }

    #[test]
    fn a_missing_claim_is_named_and_nothing_is_created() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let observed = Observed {
            missing_claims: vec!["datasets".into()],
            ..Observed::default()
        };
        let plan = plan(&ftj, &observed, at(0));
        assert!(plan.actions.is_empty());
        let condition = conditions::get(&plan.status.conditions, "InputsReady").expect("condition");
        assert_eq!(condition.status, "False");
        assert!(condition.message.contains("datasets"));
        assert_eq!(plan.status.phase, Phase::Pending);
    }

    #[test]
    fn a_path_outside_its_volume_fails_the_job_before_anything_is_created() {
        for (field, path) in [("train", "../team-b/train.jsonl"), ("output", "/etc")] {
            let mut ftj = finetunejob_from_example("lora-a100.yaml");
            match field {
                "train" => ftj.spec.dataset.train_path = path.into(),
                _ => ftj.spec.output.volume.path = Some(path.into()),
            }
            let plan = plan(&ftj, &Observed::default(), at(0));
            assert!(plan.actions.is_empty(), "{path}: {:?}", plan.actions);
            assert_eq!(plan.status.phase, Phase::Failed);
            let failed = conditions::get(&plan.status.conditions, "Failed").expect("set");
            assert_eq!(failed.reason, "InvalidSpec");
            assert!(failed.message.contains(path), "{}", failed.message);
        }
    }

    #[test]
    fn running_pods_make_the_job_running_with_its_start_time() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let plan = plan(
            &ftj,
            &job(JobOutcome::Active, vec![pod(0, true, None)]),
            at(10),
        );
        assert_eq!(plan.status.phase, Phase::Running);
        assert_eq!(plan.status.start_time, Some(Time(at(5))));
        assert_eq!(plan.status.attempts[0].nodes, vec!["node-0".to_owned()]);
        assert!(conditions::is_true(&plan.status.conditions, "Running"));
    }

    #[test]
    fn a_retryable_failure_restarts_after_backoff_as_attempt_two() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let crashed = Failure {
            class: FailureClass::Preempted,
            message: "preempted".into(),
        };
        let failed = plan(
            &ftj,
            &job(JobOutcome::Failed, vec![pod(0, false, Some(crashed))]),
            at(60),
        );
        assert_eq!(failed.actions, delete_attempt_one());
        assert_eq!(failed.status.restarts, 1);
        assert_eq!(
            failed.status.attempts[0].reason.as_deref(),
            Some("Preempted")
        );
        assert_eq!(failed.requeue_after, Some(Duration::from_secs(10)));

        let ftj = with_status(ftj, &failed);
        let waiting = plan(&ftj, &Observed::default(), at(65));
        assert!(waiting.actions.is_empty(), "still in backoff");
        let restarted = plan(&ftj, &Observed::default(), at(70));
        assert_eq!(restarted.actions, ensure(2));
        assert_eq!(restarted.status.attempts.len(), 2);
    }

    #[test]
    fn a_permanent_failure_fails_at_once_with_the_trainers_message() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let invalid = Failure {
            class: FailureClass::InvalidInput,
            message: "/data/support/train.jsonl:17: missing \"messages\"".into(),
        };
        let plan = plan(
            &ftj,
            &job(JobOutcome::Failed, vec![pod(0, false, Some(invalid))]),
            at(30),
        );
        assert_eq!(plan.status.phase, Phase::Failed);
        assert_eq!(plan.status.restarts, 0);
        let failed = conditions::get(&plan.status.conditions, "Failed").expect("Failed condition");
        assert_eq!(failed.reason, "InvalidInput");
        assert!(failed.message.contains("train.jsonl:17"));
        assert!(
            plan.actions.is_empty(),
            "the failed Job is kept for its logs"
        );
    }

    #[test]
    fn restarts_stop_at_max_restarts() {
        let mut ftj = finetunejob_from_example("lora-a100.yaml");
        ftj.spec.max_restarts = 0;
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let crash = Failure {
            class: FailureClass::Error,
            message: "segfault".into(),
        };
        let plan = plan(
            &ftj,
            &job(JobOutcome::Failed, vec![pod(0, false, Some(crash))]),
            at(30),
        );
        assert_eq!(plan.status.phase, Phase::Failed);
        let failed = conditions::get(&plan.status.conditions, "Failed").expect("Failed condition");
        assert_eq!(failed.reason, "BackoffLimitExceeded");
        assert!(
            plan.actions.is_empty(),
            "the last failed Job is kept for its logs"
        );
    }

    #[test]
    fn a_gang_that_cannot_be_placed_is_torn_down_after_the_timeout() {
        let ftj = finetunejob_from_example("full-16-nodes.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let half: Vec<ObservedPod> = (0..16).map(|i| pod(i, i < 8, None)).collect();
        let early = plan(&ftj, &job(JobOutcome::Active, half.clone()), at(100));
        assert!(early.actions.is_empty());
        assert_eq!(early.requeue_after, Some(Duration::from_secs(800)));
        assert_eq!(early.status.phase, Phase::Admitted);

        let late = plan(&ftj, &job(JobOutcome::Active, half), at(900));
        assert_eq!(late.actions, delete_attempt_one());
        assert_eq!(
            late.status.attempts[0].reason.as_deref(),
            Some("GangTimeout")
        );
        assert_eq!(late.status.phase, Phase::Pending);
    }

    #[test]
    fn suspending_a_running_job_suspends_its_job_and_resuming_undoes_it() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let mut suspended = ftj.clone();
        suspended.spec.suspend = true;
        let plan_suspend = plan(
            &suspended,
            &job(JobOutcome::Active, vec![pod(0, true, None)]),
            at(10),
        );
        assert_eq!(
            plan_suspend.actions,
            vec![Action::SetSuspend {
                job: "support-lora-a1".into(),
                suspend: true
            }]
        );
        assert_eq!(plan_suspend.status.phase, Phase::Suspended);

        let resumed = with_status(ftj, &plan_suspend);
        let mut observed = job(JobOutcome::Active, vec![]);
        if let Some(j) = observed.job.as_mut() {
            j.suspended = true;
        }
        let plan_resume = plan(&resumed, &observed, at(20));
        assert_eq!(
            plan_resume.actions,
            vec![Action::SetSuspend {
                job: "support-lora-a1".into(),
                suspend: false
            }]
        );
        assert!(
            plan_resume
                .transitions
                .iter()
                .any(|t| t.reason == "Resumed")
        );
    }

    #[test]
    fn a_finished_job_is_never_restarted_and_its_job_goes_after_the_ttl() {
        let mut ftj = finetunejob_from_example("lora-a100.yaml");
        ftj.spec.ttl_seconds_after_finished = Some(100);
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let done = plan(
            &ftj,
            &job(JobOutcome::Complete, vec![pod(0, false, None)]),
            at(50),
        );
        assert_eq!(done.status.phase, Phase::Succeeded);
        let ftj = with_status(ftj, &done);

        let before = plan(&ftj, &job(JobOutcome::Complete, vec![]), at(60));
        assert!(before.actions.is_empty());
        assert_eq!(before.requeue_after, Some(Duration::from_secs(90)));
        let after = plan(&ftj, &job(JobOutcome::Complete, vec![]), at(151));
        assert_eq!(after.actions, delete_attempt_one());
        let gone = plan(&ftj, &Observed::default(), at(200));
        assert!(
            gone.actions.is_empty(),
            "a terminal job's Job is never recreated"
        );
    }

    #[test]
    fn a_gang_out_of_restarts_still_releases_its_gpus() {
        let mut ftj = finetunejob_from_example("full-16-nodes.yaml");
        ftj.spec.max_restarts = 0;
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let half: Vec<ObservedPod> = (0..16).map(|i| pod(i, i < 8, None)).collect();
        let late = plan(&ftj, &job(JobOutcome::Active, half), at(900));
        assert_eq!(late.status.phase, Phase::Failed);
        assert_eq!(late.actions, delete_attempt_one());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let secs: Vec<u64> = (1..=7).map(|r| backoff(r).as_secs()).collect();
        assert_eq!(secs, vec![10, 20, 40, 80, 160, 300, 300]);
    }

    #[test]
    fn a_clock_that_goes_backwards_counts_no_time() {
        assert_eq!(since(at(10), at(5)), Duration::ZERO);
    }

    fn training(step: u64) -> ProgressReport {
        ProgressReport {
            phase: "training".into(),
            step,
            total_steps: 100,
            base_eval_loss: Some(2.5),
            tokens_per_second: 900.0,
            ..ProgressReport::default()
        }
    }

    fn running_with(report: Option<ProgressReport>) -> Observed {
        Observed {
            report,
            ..job(JobOutcome::Active, vec![pod(0, true, None)])
        }
    }

    #[test]
    fn progress_reaches_status_and_a_moving_trainer_is_not_stalled() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let first = plan(&ftj, &running_with(Some(training(10))), at(60));
        let progress = first.status.progress.clone().expect("progress");
        assert_eq!((progress.step, progress.percent), (10, 10));
        assert_eq!(progress.tokens_per_second, Some(900));
        let evaluation = first.status.evaluation.clone().expect("base eval loss");
        assert_eq!(evaluation.base_eval_loss.as_deref(), Some("2.5000"));
        assert!(!conditions::is_true(&first.status.conditions, "Stalled"));

        // No report this time (not due): status keeps what it had.
        let ftj = with_status(ftj, &first);
        let quiet = plan(&ftj, &running_with(None), at(90));
        assert_eq!(quiet.status.progress, first.status.progress);
        assert!(quiet.actions.is_empty());
    }

    #[test]
    fn a_trainer_stuck_on_one_step_is_restarted_as_stalled() {
        let mut ftj = finetunejob_from_example("lora-a100.yaml");
        ftj.spec.stall_timeout_seconds = 600;
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let first = plan(&ftj, &running_with(Some(training(10))), at(60));
        let ftj = with_status(ftj, &first);
        let still = plan(&ftj, &running_with(Some(training(10))), at(600));
        assert!(
            still.actions.is_empty(),
            "540 s without a step is not yet a stall"
        );

        let stuck = plan(&ftj, &running_with(Some(training(10))), at(700));
        assert_eq!(stuck.actions, delete_attempt_one());
        assert!(conditions::is_true(&stuck.status.conditions, "Stalled"));
        assert_eq!(stuck.status.attempts[0].reason.as_deref(), Some("Stalled"));
        assert_eq!(stuck.status.restarts, 1);

        // A trainer that is evaluating or saving is not stalled by a long pause.
        let saving = ProgressReport {
            phase: "saving".into(),
            ..training(10)
        };
        let busy = plan(&ftj, &running_with(Some(saving)), at(700));
        assert!(busy.actions.is_empty());
    }

    #[test]
    fn a_new_attempts_stall_clock_starts_when_its_pods_run() {
        let mut ftj = finetunejob_from_example("lora-a100.yaml");
        ftj.spec.stall_timeout_seconds = 600;
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let ftj = with_status(
            ftj.clone(),
            &plan(&ftj, &running_with(Some(training(10))), at(60)),
        );
        // The pod runs (again) long after the last step was seen.
        let mut observed = running_with(Some(training(10)));
        if let Some(job) = observed.job.as_mut() {
            job.pods[0].running_since = Some(at(5_000));
        }
        let fresh = plan(&ftj, &observed, at(5_100));
        assert!(fresh.actions.is_empty(), "{:?}", fresh.actions);
    }

    #[test]
    fn success_records_the_artifact_and_the_evaluation() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let mut done = pod(0, false, None);
        done.result = Some(
            r#"{"adapterSha256":"9f86d08","adapterSizeBytes":2048,"baseEvalLoss":2.0,
                "evalLoss":1.5,"steps":100}"#
                .into(),
        );
        let plan = plan(&ftj, &job(JobOutcome::Complete, vec![done]), at(500));
        assert_eq!(plan.status.phase, Phase::Succeeded);
        let artifact = plan.status.artifact.expect("artifact");
        assert_eq!(artifact.sha256, "9f86d08");
        assert_eq!(artifact.claim_name, ftj.spec.output.volume.claim_name);
        let evaluation = plan.status.evaluation.expect("evaluation");
        assert_eq!(evaluation.improvement.as_deref(), Some("0.2500"));
        assert_eq!(plan.status.progress.expect("progress").percent, 100);
    }

    #[test]
    fn under_kueue_the_job_is_created_suspended_and_its_suspend_is_left_to_kueue() {
        let mut ftj = finetunejob_from_example("full-16-nodes.yaml");
        ftj.spec.scheduling.queue_name = Some("research".into());
        let first = plan(&ftj, &Observed::default(), at(0));
        assert_eq!(
            first.actions,
            vec![Action::EnsureAttempt {
                attempt: 1,
                suspend: true
            }]
        );
        assert_eq!(first.status.phase, Phase::Pending);
        let ftj = with_status(ftj, &first);

        // Queued: no unsuspending, no gang clock, a condition that says so.
        let mut queued = job(JobOutcome::Active, Vec::new());
        if let Some(job) = queued.job.as_mut() {
            job.suspended = true;
            job.started = None;
        }
        let waiting = plan(&ftj, &queued, at(3_600));
        assert!(waiting.actions.is_empty(), "{:?}", waiting.actions);
        let admitted = conditions::get(&waiting.status.conditions, "Admitted").expect("set");
        assert_eq!(
            (admitted.status.as_str(), admitted.reason.as_str()),
            ("False", "Queued")
        );
        assert_eq!(waiting.status.phase, Phase::Pending);

        // Admitted an hour later: the gang's clock starts at admission.
        let mut placing = job(
            JobOutcome::Active,
            (0..16).map(|i| pod(i, i < 8, None)).collect(),
        );
        if let Some(job) = placing.job.as_mut() {
            job.started = Some(at(3_600));
        }
        let admitted = plan(&ftj, &placing, at(3_700));
        assert!(admitted.actions.is_empty(), "{:?}", admitted.actions);
        assert!(conditions::is_true(&admitted.status.conditions, "Admitted"));

        // Suspending deletes the Job instead of touching Kueue's field...
        let mut suspended_ftj = ftj.clone();
        suspended_ftj.spec.suspend = true;
        let suspend = plan(&suspended_ftj, &placing, at(3_800));
        assert_eq!(suspend.actions, delete_attempt_one());
        assert_eq!(suspend.status.phase, Phase::Suspended);
        let suspended_ftj = with_status(suspended_ftj, &suspend);
        let gone = plan(&suspended_ftj, &Observed::default(), at(3_900));
        assert!(gone.actions.is_empty(), "{:?}", gone.actions);
        // ...and resuming recreates the same attempt's Job, suspended for Kueue.
        let mut resumed = with_status(ftj, &gone);
        resumed.spec.suspend = false;
        let resume = plan(&resumed, &Observed::default(), at(4_000));
        assert_eq!(
            resume.actions,
            vec![Action::EnsureAttempt {
                attempt: 1,
                suspend: true
            }]
        );
    }

    const PRICES: &str = "currency: USD\n\
        gpuHourly:\n  NVIDIA-A100-SXM4-80GB: {onDemand: \"3.60\", spot: \"1.80\"}\n\
        defaultGpuHourly: {onDemand: \"4.00\", spot: \"2.00\"}\n";

    fn priced(observed: Observed, attempt: u32, started: i64) -> Observed {
        let table = Arc::new(PriceTable::parse(PRICES).expect("valid"));
        let pods = observed
            .job
            .iter()
            .flat_map(|job| &job.pods)
            .map(|pod| PodUsage {
                running_since: pod.running.then(|| at(started)),
                ended: None,
                units: 1,
                priced: Some(table.gpu_rate(None, "NVIDIA-A100-SXM4-80GB")),
            })
            .collect();
        Observed {
            cost: Some(CostInputs {
                table,
                attempt: Some(attempt),
                pods,
            }),
            ..observed
        }
    }

    fn with_budget(max: &str) -> FineTuneJob {
        let mut ftj = finetunejob_from_example("lora-a100.yaml");
        ftj.spec.budget = Some(kubetune_crds::finetunejob::Budget {
            max_cost: max.parse().expect("money"),
            warn_percent: 80,
        });
        ftj
    }

    #[test]
    fn cost_accrues_while_running_with_an_estimate_from_the_eta() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let mut observed = priced(running_with(Some(training(50))), 1, 0);
        if let Some(report) = observed.report.as_mut() {
            report.eta_seconds = Some(1_800.0);
        }
        let plan = plan(&ftj, &observed, at(1_800));
        let cost = plan.status.cost.expect("cost");
        assert_eq!(cost.amount.as_str(), "1.80");
        assert_eq!(cost.gpu_hours.as_deref(), Some("0.5000"));
        assert_eq!(
            cost.estimated_total.map(|m| m.to_string()).as_deref(),
            Some("3.60")
        );
        assert_eq!(
            cost.rates
                .get("NVIDIA-A100-SXM4-80GB/on-demand")
                .map(|d| d.as_str()),
            Some("3.60")
        );
    }

    #[test]
    fn a_budget_warns_once_then_stops_the_job() {
        let ftj = with_budget("2.00");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let running = || priced(job(JobOutcome::Active, vec![pod(0, true, None)]), 1, 0);

        // 1.80 is 90 % of 2.00: a warning.
        let warned = plan(&ftj, &running(), at(1_800));
        assert!(
            warned
                .transitions
                .iter()
                .any(|t| t.reason == "BudgetWarning" && t.warning)
        );
        assert!(warned.actions.is_empty());
        let ftj = with_status(ftj, &warned);
        let again = plan(&ftj, &running(), at(1_850));
        assert!(
            !again
                .transitions
                .iter()
                .any(|t| t.reason == "BudgetWarning"),
            "once"
        );

        // 2.00 reached: stopped, Failed with BudgetExceeded, the Job deleted.
        let stopped = plan(&ftj, &running(), at(2_000));
        assert_eq!(stopped.status.phase, Phase::Failed);
        assert_eq!(stopped.actions, delete_attempt_one());
        let failed = conditions::get(&stopped.status.conditions, "Failed").expect("set");
        assert_eq!(failed.reason, "BudgetExceeded");
        assert!(failed.message.contains("2.00 USD"), "{}", failed.message);
        assert_eq!(
            stopped.status.attempts[0].reason.as_deref(),
            Some("BudgetExceeded")
        );
        assert_eq!(stopped.status.cost.expect("cost").amount.as_str(), "2.00");
    }

    #[test]
    fn a_budget_that_cannot_pay_the_first_minute_is_refused_at_admission() {
        // One A100 at 1.80 an hour at best: a minute costs 0.03.
        let ftj = with_budget("0.01");
        let observed = priced(Observed::default(), 1, 0);
        let refused = plan(
            &ftj,
            &Observed {
                cost: observed.cost,
                ..Observed::default()
            },
            at(0),
        );
        assert!(refused.actions.is_empty());
        assert_eq!(refused.status.phase, Phase::Pending);
        let admitted = conditions::get(&refused.status.conditions, "Admitted").expect("set");
        assert_eq!(admitted.reason, "BudgetTooSmall");
        assert!(
            admitted.message.contains("first minute"),
            "{}",
            admitted.message
        );

        let enough = with_budget("0.05");
        let observed = priced(Observed::default(), 1, 0);
        let admitted = plan(
            &enough,
            &Observed {
                cost: observed.cost,
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(admitted.actions, ensure(1));
    }

    #[test]
    fn restarts_keep_the_cost_of_earlier_attempts_as_lost_time() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        // Attempt 1 runs an hour and fails.
        let crash = Failure {
            class: FailureClass::Error,
            message: "segfault".into(),
        };
        let mut failed = priced(job(JobOutcome::Failed, vec![pod(0, true, None)]), 1, 0);
        if let Some(job) = failed.job.as_mut() {
            job.pods[0].failure = Some(crash);
        }
        let restart = plan(&ftj, &failed, at(3_600));
        let ftj = with_status(ftj, &restart);
        let cost = restart.status.cost.clone().expect("cost");
        assert_eq!(cost.lost_gpu_hours.as_deref(), Some("1.0000"));
        // Attempt 2 runs half an hour; attempt 1's pods are gone, its cost stays.
        let mut second = priced(job(JobOutcome::Active, vec![pod(0, true, None)]), 2, 3_700);
        if let Some(job) = second.job.as_mut() {
            job.name = "support-lora-a2".into();
        }
        let later = plan(&ftj, &second, at(5_500));
        let cost = later.status.cost.expect("cost");
        assert_eq!(cost.attempts.len(), 2);
        assert_eq!(cost.gpu_hours.as_deref(), Some("1.5000"));
        assert_eq!(cost.amount.as_str(), "5.40");
    }

    #[test]
    fn a_finished_jobs_cost_is_final() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let ftj = with_status(ftj.clone(), &plan(&ftj, &Observed::default(), at(0)));
        let done = plan(
            &ftj,
            &priced(job(JobOutcome::Complete, vec![pod(0, true, None)]), 1, 0),
            at(3_600),
        );
        let ftj = with_status(ftj, &done);
        let much_later = plan(
            &ftj,
            &priced(job(JobOutcome::Complete, vec![pod(0, true, None)]), 1, 0),
            at(36_000),
        );
        assert_eq!(much_later.status.cost, done.status.cost);
        assert_eq!(
            done.status
                .cost
                .expect("cost")
                .estimated_total
                .map(|m| m.to_string())
                .as_deref(),
            Some("3.60")
        );
    }

    #[test]
    fn before_the_trainer_reports_the_estimate_comes_from_the_dataset() {
        let mut ftj = finetunejob_from_example("lora-a100.yaml");
        // 3 epochs of 3.6 M tokens at 3,000 tokens/s on one A100: an hour at 3.60.
        ftj.spec.dataset.estimated_tokens = Some(3_600_000);
        ftj.spec.hyperparameters.epochs = 3;
        let table = Arc::new(
            PriceTable::parse(&format!(
                "{PRICES}throughputTokensPerSecond: {{NVIDIA-A100-SXM4-80GB: 3000}}\n"
            ))
            .expect("valid"),
        );
        let observed = Observed {
            cost: Some(CostInputs {
                table,
                attempt: None,
                pods: Vec::new(),
            }),
            ..Observed::default()
        };
        let plan = plan(&ftj, &observed, at(0));
        let cost = plan.status.cost.expect("cost");
        assert_eq!(cost.amount.as_str(), "0.00");
        assert_eq!(
            cost.estimated_total.map(|m| m.to_string()).as_deref(),
            Some("3.60")
        );
    }

    #[test]
    fn a_budget_waits_for_the_price_table_before_admission() {
        let ftj = with_budget("100.00");
        let waiting = plan(
            &ftj,
            &Observed {
                prices_pending: true,
                ..Observed::default()
            },
            at(0),
        );
        assert!(waiting.actions.is_empty());
        let admitted = conditions::get(&waiting.status.conditions, "Admitted").expect("set");
        assert_eq!(admitted.reason, "WaitingForPrices");
        // Without a budget there is nothing to check.
        let mut free = finetunejob_from_example("lora-a100.yaml");
        free.spec.budget = None;
        let started = plan(
            &free,
            &Observed {
                prices_pending: true,
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(started.actions, ensure(1));
    }
}

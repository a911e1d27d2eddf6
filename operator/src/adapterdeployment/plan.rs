//! The AdapterDeployment rollout as a pure function: from the spec, the source jobs and
//! what each serving pod's server says it holds, to the next status and the loads,
//! unloads and smoke checks that move the pods towards it.
//!
//! Every adapter version is loaded under its own immutable name (the stable name plus
//! a digest prefix), so a replica either holds a version or does not, and `root` in the
//! server's model list proves which files it holds. A change of the wanted set is a new
//! revision: the canary replicas get it first and must answer a smoke completion for
//! the hold time, then the rest follow `maxUnavailable` at a time. Loads that fail on
//! more replicas than `failureThreshold` roll back to the previous revision, and the
//! failed set is not tried again until the spec asks for a different one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kubetune_crds::adapterdeployment::{
    AdapterDeployment, AdapterDeploymentPhase, AdapterDeploymentStatus, AdapterVersion, PodAdapters,
};
use kubetune_crds::conditions::{adapterdeployment as types, reason};
use kubetune_crds::{FineTuneJob, Phase};
use sha2::{Digest, Sha256};

use crate::conditions::{self, Desired};
pub use crate::events::Transition;

/// Where one spec adapter's version comes from, resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolved {
    /// Its version is known and may be served.
    Ready(AdapterVersion),
    /// Its source job has not succeeded yet.
    Waiting(String),
    /// It may not be served: the gate refused it, or its source is unusable.
    Blocked(String),
}

/// One selected serving pod, as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedPod {
    /// Its name.
    pub name: String,
    /// Its IP.
    pub ip: Option<String>,
    /// Whether Kubernetes says it is Ready.
    pub ready: bool,
    /// The adapters its server lists (name → loaded path); `None` when the server did
    /// not answer.
    pub adapters: Option<BTreeMap<String, String>>,
}

/// What the reconciler saw.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Each spec adapter, in spec order, with its resolution.
    pub sources: Vec<(String, Resolved)>,
    /// The selected pods.
    pub pods: Vec<ObservedPod>,
}

/// One call to a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Load `path` as `name`.
    Load {
        /// The version name.
        name: String,
        /// The path in the pod.
        path: String,
    },
    /// Unload `name`.
    Unload {
        /// The version name.
        name: String,
    },
}

/// Work for one pod's server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Bring the pod to the revision: these calls, in order.
    Sync {
        /// The pod.
        pod: String,
        /// Its IP.
        ip: String,
        /// The calls.
        ops: Vec<Op>,
    },
    /// Ask each version for one token.
    Smoke {
        /// The pod.
        pod: String,
        /// Its IP.
        ip: String,
        /// The versions.
        models: Vec<String>,
    },
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The status to write (the executor adds failures to it).
    pub status: AdapterDeploymentStatus,
    /// Calls to make.
    pub actions: Vec<Action>,
    /// Events.
    pub transitions: Vec<Transition>,
    /// When to look again.
    pub requeue_after: Duration,
}

/// How soon to look again while acting, and at steady state (drift).
const ACTING: Duration = Duration::from_secs(2);
const STEADY: Duration = Duration::from_secs(30);

/// The immutable name of a version: the stable name and 8 hex digits of its digest.
pub fn version_name(stable: &str, digest: &str) -> String {
    let prefix: String = digest.chars().take(8).collect();
    format!("{stable}-{prefix}")
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn join(mount: &str, path: &str) -> String {
    format!(
        "{}/{}",
        mount.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Resolves each spec adapter against the FineTuneJobs of the namespace.
pub fn resolve(
    adep: &AdapterDeployment,
    jobs: &BTreeMap<String, FineTuneJob>,
) -> Vec<(String, Resolved)> {
    let spec = &adep.spec;
    let mount = &spec.artifacts.mount_path;
    spec.adapters
        .iter()
        .map(|adapter| {
            // The CRD refuses these at apply; refused again for objects stored
            // before that rule, so no server is sent a path outside the volume.
            let escapes = |path: &str| path.split('/').any(|segment| segment == "..");
            let resolved = if escapes(mount) {
                Resolved::Blocked(format!(
                    "artifacts.mountPath {mount:?} has a \"..\" segment"
                ))
            } else if let Some(artifact) = adapter
                .artifact
                .as_ref()
                .filter(|a| a.path.starts_with('/') || escapes(&a.path))
            {
                Resolved::Blocked(format!(
                    "artifact.path {:?} leaves the artifact volume: it must be relative and without \"..\"",
                    artifact.path
                ))
            } else if let Some(artifact) = &adapter.artifact {
                // Without a digest the path names the version.
                let digest = artifact
                    .sha256
                    .clone()
                    .unwrap_or_else(|| sha256_hex(&artifact.path));
                Resolved::Ready(AdapterVersion {
                    name: adapter.name.clone(),
                    version: version_name(&adapter.name, &digest),
                    path: join(mount, &artifact.path),
                    sha256: artifact.sha256.clone(),
                })
            } else if let Some(source) = &adapter.from_job {
                from_job(adep, &adapter.name, &source.name, jobs.get(&source.name))
            } else {
                Resolved::Blocked("neither fromJob nor artifact is set".into())
            };
            (adapter.name.clone(), resolved)
        })
        .collect()
}

fn from_job(
    adep: &AdapterDeployment,
    stable: &str,
    job: &str,
    ftj: Option<&FineTuneJob>,
) -> Resolved {
    let Some(ftj) = ftj else {
        return Resolved::Waiting(format!("FineTuneJob {job} does not exist"));
    };
    let status = ftj.status.clone().unwrap_or_default();
    match status.phase {
        Phase::Succeeded => {}
        Phase::Failed => return Resolved::Blocked(format!("FineTuneJob {job} failed")),
        phase => {
            return Resolved::Waiting(format!(
                "FineTuneJob {job} is {} and has no artifact yet",
                phase.as_str()
            ));
        }
    }
    let Some(artifact) = status.artifact else {
        return Resolved::Blocked(format!("FineTuneJob {job} succeeded without an artifact"));
    };
    let claim = &adep.spec.artifacts.claim_name;
    if &artifact.claim_name != claim {
        return Resolved::Blocked(format!(
            "FineTuneJob {job} wrote to PersistentVolumeClaim {}, not the artifact volume {claim}",
            artifact.claim_name
        ));
    }
    if let Some(gate) = &adep.spec.rollout.gate {
        let least = gate.min_eval_loss_improvement.value().unwrap_or(0.0);
        let improvement = status
            .evaluation
            .as_ref()
            .and_then(|e| e.improvement.as_deref())
            .and_then(|i| i.parse::<f64>().ok());
        match improvement {
            Some(improvement) if improvement >= least => {}
            Some(improvement) => {
                return Resolved::Blocked(format!(
                    "FineTuneJob {job} improved the eval loss by {improvement}, below the gate's {least}"
                ));
            }
            None => {
                return Resolved::Blocked(format!(
                    "FineTuneJob {job} has no evaluation, and the gate needs one"
                ));
            }
        }
    }
    Resolved::Ready(AdapterVersion {
        name: stable.to_owned(),
        version: version_name(stable, &artifact.sha256),
        path: join(&adep.spec.artifacts.mount_path, &artifact.path),
        sha256: Some(artifact.sha256),
    })
}

/// A digest of an adapter set, order-independent.
pub fn digest(set: &[AdapterVersion]) -> String {
    let mut lines: Vec<String> = set
        .iter()
        .map(|v| format!("{}={}", v.version, v.path))
        .collect();
    lines.sort();
    sha256_hex(&lines.join("\n"))[..16].to_owned()
}

fn plus(then: Timestamp, seconds: u32) -> Timestamp {
    then.checked_add(SignedDuration::from_secs(i64::from(seconds)))
        .unwrap_or(then)
}

struct Planner<'a> {
    adep: &'a AdapterDeployment,
    now: Timestamp,
    status: AdapterDeploymentStatus,
    actions: Vec<Action>,
    transitions: Vec<Transition>,
    requeue_after: Duration,
}

impl Planner<'_> {
    fn condition(&mut self, type_: &str, status: bool, reason: &str, message: String) {
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
            self.adep.metadata.generation,
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
        self.requeue_after = self.requeue_after.min(after);
    }

    /// Makes `set` the current revision; `rollback` when it returns to the previous.
    fn new_revision(&mut self, set: Vec<AdapterVersion>) {
        let current = std::mem::take(&mut self.status.adapters);
        if self.status.revision > 0 {
            self.status.previous_revision = Some(self.status.revision);
            self.status.previous_adapters = current;
        }
        self.status.revision += 1;
        self.status.adapters = set;
        self.status.canary_since = None;
        for pod in &mut self.status.pods {
            pod.message = None;
        }
    }
}

/// Plans the next step of `adep` given what was observed at `now`.
pub fn plan(adep: &AdapterDeployment, observed: &Observed, now: Timestamp) -> Plan {
    let mut p = Planner {
        adep,
        now,
        status: adep.status.clone().unwrap_or_default(),
        actions: Vec::new(),
        transitions: Vec::new(),
        requeue_after: STEADY,
    };
    p.status.observed_generation = adep.metadata.generation;
    choose_revision(&mut p, observed);
    roll_out(&mut p, observed);
    Plan {
        status: p.status,
        actions: p.actions,
        transitions: p.transitions,
        requeue_after: p.requeue_after,
    }
}

/// The wanted set from the sources (an adapter that is waiting or blocked keeps the
/// version it has), and a new revision when it differs from the current one.
fn choose_revision(p: &mut Planner<'_>, observed: &Observed) {
    let mut wanted = Vec::new();
    let mut waiting = Vec::new();
    let mut blocked = Vec::new();
    for (name, resolved) in &observed.sources {
        match resolved {
            Resolved::Ready(version) => wanted.push(version.clone()),
            Resolved::Waiting(why) => waiting.push(format!("{name}: {why}")),
            Resolved::Blocked(why) => blocked.push(format!("{name}: {why}")),
        }
        // Until its new version may be served, an adapter keeps the one it has.
        if !matches!(resolved, Resolved::Ready(_))
            && let Some(kept) = p.status.adapters.iter().find(|v| &v.name == name)
        {
            wanted.push(kept.clone());
        }
    }
    wanted.sort_by(|a, b| a.name.cmp(&b.name));
    if !blocked.is_empty() {
        p.condition(
            types::ADAPTERS_RESOLVED,
            false,
            reason::BLOCKED,
            blocked.join("; "),
        );
    } else if !waiting.is_empty() {
        p.condition(
            types::ADAPTERS_RESOLVED,
            false,
            reason::WAITING,
            waiting.join("; "),
        );
    } else {
        p.condition(
            types::ADAPTERS_RESOLVED,
            true,
            reason::RESOLVED,
            format!("{} adapter versions to serve", wanted.len()),
        );
    }

    let wanted_digest = digest(&wanted);
    if p.status.rolled_back_from.as_deref() == Some(wanted_digest.as_str()) {
        // The spec still asks for the set that failed: keep serving the rollback.
        return;
    }
    if wanted == p.status.adapters && p.status.revision > 0 {
        return;
    }
    if wanted.is_empty() && p.status.adapters.is_empty() {
        return;
    }
    p.status.rolled_back_from = None;
    p.new_revision(wanted);
    p.condition(
        types::DEGRADED,
        false,
        reason::NEW_REVISION,
        format!("rolling out revision {}", p.status.revision),
    );
    let versions: Vec<&str> = p
        .status
        .adapters
        .iter()
        .map(|v| v.version.as_str())
        .collect();
    p.event(
        "RolloutStarted",
        format!(
            "revision {}: {}",
            p.status.revision,
            if versions.is_empty() {
                "no adapters".into()
            } else {
                versions.join(", ")
            }
        ),
        false,
    );
}

fn roll_out(p: &mut Planner<'_>, observed: &Observed) {
    let spec = &p.adep.spec;
    let target = p.status.adapters.clone();
    let stable: BTreeSet<&str> = spec
        .adapters
        .iter()
        .map(|a| a.name.as_str())
        .chain(target.iter().map(|v| v.name.as_str()))
        .chain(p.status.previous_adapters.iter().map(|v| v.name.as_str()))
        .collect();
    let ours = |id: &str| {
        id.rsplit_once('-').is_some_and(|(name, suffix)| {
            stable.contains(name)
                && suffix.len() == 8
                && suffix.bytes().all(|b| b.is_ascii_hexdigit())
        })
    };

    let mut pods: Vec<&ObservedPod> = observed.pods.iter().collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    if p.status.revision == 0 {
        let why = conditions::get(&p.status.conditions, types::ADAPTERS_RESOLVED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        p.condition(
            types::PROGRESSING,
            true,
            reason::WAITING_FOR_ADAPTERS,
            why.clone(),
        );
        p.condition(types::AVAILABLE, false, reason::WAITING_FOR_ADAPTERS, why);
        p.status.phase = AdapterDeploymentPhase::Progressing;
        counts(p, pods.len() as u32, 0, 0);
        return;
    }
    let previous: BTreeMap<String, PodAdapters> = p
        .status
        .pods
        .iter()
        .map(|pod| (pod.name.clone(), pod.clone()))
        .collect();

    // What each pod holds, and what it lacks.
    let mut holding = BTreeSet::new();
    let mut work: BTreeMap<&str, (String, Vec<Op>)> = BTreeMap::new();
    let mut pod_status = Vec::new();
    for pod in &pods {
        let mut entry = previous.get(&pod.name).cloned().unwrap_or(PodAdapters {
            name: pod.name.clone(),
            ..PodAdapters::default()
        });
        let Some(loaded) = &pod.adapters else {
            entry.revision = None;
            pod_status.push(entry);
            continue;
        };
        entry.loaded = loaded.keys().filter(|id| ours(id)).cloned().collect();
        entry.last_checked = Some(Time(p.now));
        let mut ops = Vec::new();
        for version in &target {
            match loaded.get(&version.version) {
                Some(root) if root == &version.path => {}
                Some(_) => {
                    // Same name, other files: never serve a stale version.
                    ops.push(Op::Unload {
                        name: version.version.clone(),
                    });
                    ops.push(Op::Load {
                        name: version.version.clone(),
                        path: version.path.clone(),
                    });
                }
                None => ops.push(Op::Load {
                    name: version.version.clone(),
                    path: version.path.clone(),
                }),
            }
        }
        // Load first, then unload what is no longer wanted.
        for id in loaded.keys().filter(|id| ours(id)) {
            if !target.iter().any(|v| &v.version == id) {
                ops.push(Op::Unload { name: id.clone() });
            }
        }
        if ops.is_empty() {
            holding.insert(pod.name.as_str());
            entry.revision = Some(p.status.revision);
        } else {
            entry.revision = None;
            if let Some(ip) = &pod.ip {
                work.insert(pod.name.as_str(), (ip.clone(), ops));
            }
        }
        pod_status.push(entry);
    }

    // A failure (a refused load, or a canary that failed its smoke completion) stands
    // for the rest of the revision.
    let failed: Vec<&PodAdapters> = pod_status
        .iter()
        .filter(|pod| pod.message.is_some())
        .collect();
    let replicas = pods.len() as u32;
    let updated = holding.len() as u32;
    let ready = pods
        .iter()
        .filter(|pod| pod.ready && holding.contains(pod.name.as_str()))
        .count() as u32;

    // Too many failed loads: roll back, or stop.
    let rollout = &spec.rollout;
    if failed.len() as u32 > rollout.failure_threshold {
        let messages: Vec<String> = failed
            .iter()
            .map(|pod| format!("{}: {}", pod.name, pod.message.clone().unwrap_or_default()))
            .collect();
        let message = messages.join("; ");
        let can_roll_back = rollout.rollback_on_failure && p.status.previous_revision.is_some();
        if can_roll_back && p.status.rolled_back_from.is_none() {
            let failed_set = p.status.adapters.clone();
            let back = p.status.previous_adapters.clone();
            p.status.rolled_back_from = Some(digest(&failed_set));
            let from = p.status.revision;
            p.new_revision(back);
            p.condition(
                types::DEGRADED,
                true,
                reason::ROLLED_BACK,
                format!("revision {from} failed and was rolled back: {message}"),
            );
            p.event(
                reason::ROLLED_BACK,
                format!("revision {from} failed, returning to the previous adapters: {message}"),
                true,
            );
            // The failures are in the Degraded condition; the pods start the old set afresh.
            p.status.pods = pod_status
                .into_iter()
                .map(|pod| PodAdapters {
                    message: None,
                    revision: None,
                    ..pod
                })
                .collect();
            p.status.phase = AdapterDeploymentPhase::Degraded;
            p.requeue(ACTING);
            counts(p, replicas, 0, 0);
            return;
        }
        if p.status.rolled_back_from.is_none() {
            let known = conditions::get(&p.status.conditions, types::DEGRADED)
                .is_some_and(|c| c.status == "True" && c.reason == reason::LOAD_FAILED);
            p.condition(types::DEGRADED, true, reason::LOAD_FAILED, message.clone());
            if !known {
                p.event(reason::LOAD_FAILED, message, true);
            }
            p.status.pods = pod_status;
            p.condition(
                types::PROGRESSING,
                false,
                reason::LOAD_FAILED,
                "the rollout stopped after failed loads".into(),
            );
            counts(p, replicas, updated, ready);
            p.status.phase = AdapterDeploymentPhase::Degraded;
            return;
        }
    }

    // A rollback goes straight to every replica: its set was served before.
    let rolling_back = p.status.rolled_back_from.is_some();
    let failed_names: BTreeSet<String> = failed.iter().map(|pod| pod.name.clone()).collect();
    let candidates: Vec<&str> = pods
        .iter()
        .map(|pod| pod.name.as_str())
        .filter(|name| work.contains_key(name) && !failed_names.contains(*name))
        .collect();

    let mut stage = reason::COMPLETE;
    let mut to_sync: Vec<&str> = Vec::new();
    match (&rollout.canary, rolling_back) {
        (Some(canary), false) if updated < replicas => {
            let canaries: Vec<&str> = pods
                .iter()
                .filter(|pod| pod.adapters.is_some())
                .map(|pod| pod.name.as_str())
                .take(canary.replicas as usize)
                .collect();
            let pending: Vec<&str> = canaries
                .iter()
                .copied()
                .filter(|name| !holding.contains(name))
                .collect();
            if !pending.is_empty() {
                stage = reason::CANARY;
                to_sync = pending
                    .into_iter()
                    .filter(|name| candidates.contains(name))
                    .collect();
            } else {
                let since = match &p.status.canary_since {
                    Some(since) => since.0,
                    None => {
                        p.status.canary_since = Some(Time(p.now));
                        p.now
                    }
                };
                let until = plus(since, canary.hold_seconds);
                if p.now < until {
                    stage = reason::CANARY_HOLD;
                    let models: Vec<String> = target.iter().map(|v| v.version.clone()).collect();
                    for name in &canaries {
                        if let Some(ip) = pods
                            .iter()
                            .find(|pod| pod.name == *name)
                            .and_then(|pod| pod.ip.clone())
                            && !models.is_empty()
                        {
                            p.actions.push(Action::Smoke {
                                pod: (*name).to_owned(),
                                ip,
                                models: models.clone(),
                            });
                        }
                    }
                    let left = since_secs(p.now, until);
                    p.requeue(Duration::from_secs(left.clamp(1, 10)));
                } else {
                    if !conditions::is_true(&p.status.conditions, types::CANARY_PASSED) {
                        p.event(
                            "CanaryPassed",
                            format!(
                                "revision {} held on {} canary replicas for {}s",
                                p.status.revision,
                                canaries.len(),
                                canary.hold_seconds
                            ),
                            false,
                        );
                    }
                    p.condition(
                        types::CANARY_PASSED,
                        true,
                        reason::HELD,
                        format!("revision {} passed its canary", p.status.revision),
                    );
                    stage = reason::ROLLING_OUT;
                    to_sync = candidates.clone();
                }
            }
        }
        _ => {
            if !candidates.is_empty() {
                stage = reason::ROLLING_OUT;
            }
            to_sync = candidates.clone();
        }
    }
    if stage == reason::CANARY || stage == reason::CANARY_HOLD {
        p.condition(
            types::CANARY_PASSED,
            false,
            stage,
            format!("revision {} is on its canary replicas", p.status.revision),
        );
    }
    for name in to_sync.into_iter().take(rollout.max_unavailable as usize) {
        if let Some((ip, ops)) = work.get(name) {
            p.actions.push(Action::Sync {
                pod: name.to_owned(),
                ip: ip.clone(),
                ops: ops.clone(),
            });
        }
    }
    if !p.actions.is_empty() {
        p.requeue(ACTING);
    }

    p.status.pods = pod_status;
    counts(p, replicas, updated, ready);
    let complete = replicas > 0 && updated == replicas;
    let revision = p.status.revision;
    if complete {
        if !conditions::is_true(&p.status.conditions, types::AVAILABLE)
            || conditions::is_true(&p.status.conditions, types::PROGRESSING)
        {
            p.event(
                "RolloutComplete",
                format!("all {replicas} replicas serve revision {revision}"),
                false,
            );
        }
        p.condition(
            types::PROGRESSING,
            false,
            reason::COMPLETE,
            format!("all {replicas} replicas serve revision {revision}"),
        );
        p.condition(
            types::AVAILABLE,
            true,
            reason::ALL_REPLICAS_UPDATED,
            format!("{ready} ready replicas serve revision {revision}"),
        );
    } else {
        // Pods whose server is not up yet are looked at again soon.
        p.requeue(Duration::from_secs(5));
        let message = if replicas == 0 {
            "no serving pods match the selector".to_owned()
        } else {
            format!("{updated} of {replicas} replicas serve revision {revision}")
        };
        p.condition(types::PROGRESSING, true, stage, message.clone());
        p.condition(types::AVAILABLE, false, reason::UPDATING, message);
    }
    p.status.phase = if conditions::is_true(&p.status.conditions, types::DEGRADED) {
        AdapterDeploymentPhase::Degraded
    } else if complete {
        AdapterDeploymentPhase::Available
    } else {
        AdapterDeploymentPhase::Progressing
    };
}

fn counts(p: &mut Planner<'_>, replicas: u32, updated: u32, ready: u32) {
    p.status.replicas = replicas;
    p.status.updated_replicas = updated;
    p.status.ready_replicas = ready;
}

fn since_secs(now: Timestamp, until: Timestamp) -> u64 {
    u64::try_from(until.as_second() - now.as_second()).unwrap_or(0)
}

#[cfg(test)]
mod tests;

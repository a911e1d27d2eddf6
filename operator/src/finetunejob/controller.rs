//! The FineTuneJob reconciler: read → plan (pure) → apply → write status.
//!
//! Children are applied with server-side apply under one field manager, except the
//! attempt's Job, which is created (its pod template is immutable) and tolerates
//! AlreadyExists, so a reconcile that runs twice, or after an operator restart, creates
//! nothing twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Future, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kubetune_crds::{FineTuneJob, Phase};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cost::{self, PriceBook, TableSource};
use crate::error::Error;
use crate::events;
use crate::finetunejob::observe;
use crate::finetunejob::plan::{self, Action, CostInputs, Observed};
use crate::finetunejob::progress::ProgressReader;
use crate::finetunejob::render::{self, ATTEMPT_LABEL, AttemptContext, JOB_LABEL};
use crate::finetunejob::triggers;
use crate::metrics::{JobLabels, Metrics};
use crate::names;

/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "kubetune-operator";

/// Settings of the FineTuneJob controller.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The trainer image for jobs that don't name one.
    pub trainer_image: String,
    /// Periodic resync of a healthy job.
    pub resync: Duration,
    /// The least time between two reads of a running job's progress (and so between
    /// two status writes of it).
    pub progress_interval: Duration,
    /// The price table's ConfigMap; `None` to compute no cost.
    pub price_table: Option<TableSource>,
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    recorder: Recorder,
    settings: Settings,
    metrics: Arc<Metrics>,
    progress: ProgressReader,
    prices: Arc<PriceBook>,
    /// Node labels (metadata only), to price the nodes trainer pods run on.
    nodes: Store<PartialObjectMeta<Node>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Runs the controller until shutdown: one watch per namespace in `namespaces`, or one
/// over all namespaces when it is empty.
pub async fn run(
    client: Client,
    namespaces: Vec<String>,
    settings: Settings,
    metrics: Arc<Metrics>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let prices = Arc::new(PriceBook::default());
    let watch_prices = {
        let (client, prices, recorder, metrics) = (
            client.clone(),
            prices.clone(),
            recorder.clone(),
            metrics.clone(),
        );
        let source = settings.price_table.clone();
        async move {
            match source {
                Some(source) => cost::watch_table(client, source, prices, recorder, metrics).await,
                None => futures::future::pending().await,
            }
        }
    };
    // Only metadata: labels are all the ledger reads, and full Node objects are large.
    let (nodes, node_writer) = reflector::store();
    let watch_nodes = watcher(
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(node_writer)
    .for_each(|_| std::future::ready(()));
    let context = Arc::new(Context {
        recorder,
        progress: ProgressReader::new(settings.progress_interval, Duration::from_secs(2)),
        client: client.clone(),
        settings,
        metrics: metrics.clone(),
        prices,
        nodes,
    });
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let (stores, controllers): (Vec<_>, Vec<_>) = scopes
        .iter()
        .map(|scope| controller(&client, scope.as_deref(), context.clone()))
        .unzip();
    tokio::select! {
        _ = futures::future::join_all(controllers) => {}
        () = count_phases(stores, metrics) => {}
        () = watch_prices => {}
        () = watch_nodes => {}
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// One controller over `namespace` (all when `None`), and the store of its jobs.
fn controller(
    client: &Client,
    namespace: Option<&str>,
    context: Arc<Context>,
) -> (Store<FineTuneJob>, impl Future<Output = ()> + use<>) {
    let (reader, writer) = reflector::store();
    // Status-only changes are the operator's own writes: they trigger nothing, which
    // keeps reconciles at one per job per progress interval at steady state.
    let ftjs = watcher(
        api::<FineTuneJob>(client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    let trainer_pods = watcher::Config::default().labels(JOB_LABEL);
    // Only changes the planner reads trigger a reconcile (not readiness flapping).
    let jobs = triggers::changed(
        watcher(
            api::<Job>(client, namespace),
            watcher::Config::default().labels(JOB_LABEL),
        )
        .default_backoff(),
        triggers::job_facts,
    );
    let pods = triggers::changed(
        watcher(api::<Pod>(client, namespace), trainer_pods).default_backoff(),
        triggers::pod_facts,
    );
    let run = Controller::for_stream(ftjs, reader.clone())
        .owns_stream(jobs)
        // A pod's scheduling and start show in the Job late or not at all.
        .watches_stream(pods, |pod| {
            let name = pod.labels().get(JOB_LABEL).cloned();
            let namespace = pod.namespace();
            name.map(|name| ObjectRef::new(&name).within(namespace.as_deref().unwrap_or_default()))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "reconcile failed");
            }
        });
    (reader, run)
}

/// Keeps the jobs-by-phase gauge current from the controllers' caches.
async fn count_phases(stores: Vec<Store<FineTuneJob>>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let phases = stores.iter().flat_map(|store| store.state()).map(|ftj| {
            ftj.status
                .as_ref()
                .map_or(Phase::Pending, |status| status.phase)
        });
        metrics.set_jobs_by_phase(phases);
    }
}

fn error_policy(_ftj: Arc<FineTuneJob>, error: &Error, _context: Arc<Context>) -> Requeue {
    warn!(category = error.category(), %error, "reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(15))
}

async fn reconcile(ftj: Arc<FineTuneJob>, context: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = ftj.namespace().unwrap_or_default();
    let name = ftj.name_any();
    let span = info_span!("reconcile", namespace = %namespace, name = %name);
    let started = Instant::now();
    let result = reconcile_inner(&ftj, &context, &namespace, &name)
        .instrument(span)
        .await;
    let failure = result.as_ref().err().map(Error::category);
    context.metrics.observe("finetunejob", started, failure);
    result
}

async fn reconcile_inner(
    ftj: &FineTuneJob,
    context: &Context,
    namespace: &str,
    name: &str,
) -> Result<Requeue, Error> {
    let client = &context.client;
    let object = ObjectRef::from_obj(ftj).to_string();
    let read = |what| Error::reading(what, &object);

    // Read what the job refers to.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let mut missing_claims = Vec::new();
    for claim in [
        &ftj.spec.base_model.volume.claim_name,
        &ftj.spec.dataset.claim_name,
        &ftj.spec.output.volume.claim_name,
    ] {
        if !missing_claims.contains(claim)
            && claims
                .get_opt(claim)
                .await
                .map_err(read("PersistentVolumeClaim"))?
                .is_none()
        {
            missing_claims.push(claim.clone());
        }
    }

    // Observe the current attempt.
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let attempt = ftj
        .status
        .as_ref()
        .and_then(|s| s.attempts.last())
        .map(|a| a.number);
    let job = match attempt {
        Some(number) => {
            let job_name = names::attempt_job(name, number);
            match jobs.get_opt(&job_name).await.map_err(read("Job"))? {
                Some(job) => {
                    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
                    let selector = format!("{JOB_LABEL}={name},{ATTEMPT_LABEL}={number}");
                    let pods = pods
                        .list(&ListParams::default().labels(&selector))
                        .await
                        .map_err(read("trainer pods"))?;
                    Some(observe::job(&job, &pods.items))
                }
                None => None,
            }
        }
        None => None,
    };

    let report = match &job {
        Some(job) => read_progress(ftj, job, context).await,
        None => None,
    };
    let cost = context.prices.current().map(|table| {
        let product = ftj
            .spec
            .resources
            .gpu
            .as_ref()
            .map(|gpu| gpu.product.as_str());
        let pods = job
            .iter()
            .flat_map(|job| &job.pods)
            .map(|pod| {
                let node = pod
                    .node
                    .as_ref()
                    .and_then(|name| context.nodes.get(&ObjectRef::new(name)))
                    .and_then(|node| node.metadata.labels.clone());
                cost::usage(pod, node.as_ref(), &table, product)
            })
            .collect();
        CostInputs {
            table,
            attempt: job.as_ref().and(attempt),
            pods,
        }
    });

    let plan = plan::plan(
        ftj,
        &Observed {
            missing_claims,
            job,
            report,
            cost,
            prices_pending: context.settings.price_table.is_some()
                && context.prices.current().is_none(),
        },
        Timestamp::now(),
    );
    count_cost(context, namespace, name, ftj.status.as_ref(), &plan.status);

    for action in &plan.actions {
        execute(ftj, context, namespace, action).await?;
    }

    if ftj.status.as_ref() != Some(&plan.status) {
        let ftjs: Api<FineTuneJob> = Api::namespaced(client.clone(), namespace);
        // The status is planned from the object this reconcile was handed, which may be
        // older than the last status written (the cache lags): the resourceVersion makes
        // the write conditional, so a stale plan can never drop what a newer one
        // recorded (an attempt, a cost entry). A conflict means a newer object is on its
        // way; it is planned again then.
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": ftj.metadata.resource_version },
            "status": plan.status,
        });
        match ftjs
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!("status planned from a stale object; planning again");
                return Ok(Requeue::requeue(Duration::from_secs(1)));
            }
            Err(source) => {
                return Err(Error::WriteStatus {
                    object: object.clone(),
                    source,
                });
            }
        }
    }

    let reference = ftj.object_ref(&());
    events::publish(
        &context.recorder,
        &reference,
        "Reconcile",
        &plan.transitions,
    )
    .await;

    // A running trainer is looked at again when its progress is due, spread over a
    // further fifth of the interval per job so that many jobs never poll in step.
    let mut after = plan.requeue_after.unwrap_or(context.settings.resync);
    if plan.status.phase == Phase::Running {
        let interval = context.progress.interval();
        let spread = ftj.metadata.uid.as_deref().map_or(0, |uid| {
            uid.bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
                % 20
        });
        after = after.min(interval + interval * spread / 100);
    }
    Ok(Requeue::requeue(after.min(context.settings.resync)))
}

/// Adds what this reconcile accrued to the per-job GPU-hour (CPU core-hour) and cost
/// counters.
fn count_cost(
    context: &Context,
    namespace: &str,
    name: &str,
    before: Option<&kubetune_crds::FineTuneJobStatus>,
    after: &kubetune_crds::FineTuneJobStatus,
) {
    let totals = |status: Option<&kubetune_crds::FineTuneJobStatus>| {
        status.and_then(|s| s.cost.as_ref()).map_or((0, 0), |cost| {
            let seconds: u64 = cost.attempts.iter().map(|a| a.usage_seconds()).sum();
            (seconds, crate::cost::ledger::rate_seconds(cost))
        })
    };
    let (gpu_before, rate_before) = totals(before);
    let (gpu_after, rate_after) = totals(Some(after));
    let labels = JobLabels {
        namespace: namespace.to_owned(),
        job: name.to_owned(),
    };
    if gpu_after > gpu_before {
        let hours = (gpu_after - gpu_before) as f64 / 3600.0;
        let counter = if after
            .cost
            .as_ref()
            .is_some_and(|c| c.cpu_core_hours.is_some())
        {
            &context.metrics.cpu_core_hours
        } else {
            &context.metrics.gpu_hours
        };
        counter.get_or_create(&labels).inc_by(hours);
    }
    if rate_after > rate_before {
        let amount = (rate_after - rate_before) as f64 / 36_000_000.0;
        context.metrics.cost.get_or_create(&labels).inc_by(amount);
    }
}

/// Reads rank 0's progress when the job is running and due a read. A trainer that does
/// not answer leaves the last progress in status; the watchdog acts only on what the
/// trainer itself reports.
async fn read_progress(
    ftj: &FineTuneJob,
    job: &observe::ObservedJob,
    context: &Context,
) -> Option<kubetune_crds::training::contract::ProgressReport> {
    let rank_zero = job.rank_zero().filter(|pod| pod.running)?;
    let ip = rank_zero.ip.as_deref()?;
    let uid = ftj.metadata.uid.as_deref()?;
    if !context.progress.due(uid) {
        return None;
    }
    match context.progress.read(ip).await {
        Ok(report) => Some(report),
        Err(error) => {
            debug!(%error, pod = %rank_zero.name, "progress unavailable");
            context.metrics.progress_read_failures.inc();
            None
        }
    }
}

async fn execute(
    ftj: &FineTuneJob,
    context: &Context,
    namespace: &str,
    action: &Action,
) -> Result<(), Error> {
    let client = &context.client;
    match action {
        Action::EnsureAttempt { attempt, suspend } => {
            let image = ftj
                .spec
                .image
                .clone()
                .unwrap_or_else(|| context.settings.trainer_image.clone());
            let children = render::children(
                ftj,
                &AttemptContext {
                    attempt: *attempt,
                    image,
                    suspend: *suspend,
                },
            )
            .map_err(|source| Error::Render {
                object: ObjectRef::from_obj(ftj).to_string(),
                source,
            })?;

            apply(client, namespace, &children.config_map, "ConfigMap").await?;
            if let Some(service) = &children.service {
                apply(client, namespace, service, "Service").await?;
            }
            let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
            let name = children.job.name_any();
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            match jobs.create(&params, &children.job).await {
                Ok(_) => info!(job = %name, "created the trainer Job"),
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(source) => {
                    return Err(Error::Write {
                        verb: "create",
                        what: "Job",
                        name,
                        source,
                    });
                }
            }
        }
        Action::SetSuspend { job, suspend } => {
            let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
            let patch = serde_json::json!({ "spec": { "suspend": suspend } });
            jobs.patch(job, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|source| Error::Write {
                    verb: "patch",
                    what: "Job",
                    name: job.clone(),
                    source,
                })?;
        }
        Action::DeleteJob { job } => {
            let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
            // Background: the Job goes now, its pods get their grace period to checkpoint.
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            };
            match jobs.delete(job, &params).await {
                Ok(_) => info!(job = %job, "deleted the trainer Job"),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(source) => {
                    return Err(Error::Write {
                        verb: "delete",
                        what: "Job",
                        name: job.clone(),
                        source,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Server-side applies `object` under the operator's field manager.
async fn apply<K>(
    client: &Client,
    namespace: &str,
    object: &K,
    what: &'static str,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.name_any();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(object))
        .await
        .map_err(|source| Error::Write {
            verb: "apply",
            what,
            name,
            source,
        })?;
    Ok(())
}

//! The AdapterDeployment reconciler: read the source jobs and the selected pods, ask
//! each pod's server what it holds → plan (pure) → load, unload and smoke-check → write
//! status with what failed and why.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::{PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use kubetune_crds::FineTuneJob;
use kubetune_crds::adapterdeployment::AdapterDeployment;
use tracing::{Instrument, info_span, warn};

use crate::adapterdeployment::plan::{self, Action, Observed, ObservedPod, Op};
use crate::adapterdeployment::server::{self, Server};
use crate::error::Error;
use crate::events;
use crate::finetunejob::controller::FIELD_MANAGER;
use crate::metrics::Metrics;

/// What every reconcile shares.
struct Context {
    client: Client,
    recorder: Recorder,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
}

/// Runs the controller until shutdown: one watch per namespace in `namespaces`, or one
/// over all namespaces when it is empty.
pub async fn run(client: Client, namespaces: Vec<String>, metrics: Arc<Metrics>) {
    let context = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        http: server::client(Duration::from_secs(2)),
        client: client.clone(),
        metrics,
    });
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let controllers = scopes
        .iter()
        .map(|scope| controller(&client, scope.as_deref(), context.clone()));
    futures::future::join_all(controllers).await;
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn controller(client: &Client, namespace: Option<&str>, context: Arc<Context>) {
    let controller = Controller::new(
        api::<AdapterDeployment>(client, namespace),
        watcher::Config::default(),
    );
    let by_pod = controller.store();
    let by_job = controller.store();
    controller
        // Serving pods are any pods a selector picks: watch their labels only.
        .watches(
            api::<PartialObjectMeta<Pod>>(client, namespace),
            watcher::Config::default(),
            move |pod| {
                let labels = pod.labels().clone();
                let namespace = pod.namespace();
                by_pod
                    .state()
                    .into_iter()
                    .filter(|adep| adep.namespace() == namespace)
                    .filter(|adep| {
                        Selector::try_from(LabelSelector::from(&adep.spec.selector))
                            .is_ok_and(|s| s.matches(&labels))
                    })
                    .map(|adep| ObjectRef::from_obj(&*adep))
                    .collect::<Vec<_>>()
            },
        )
        // A source job that succeeds brings its adapter in.
        .watches(
            api::<FineTuneJob>(client, namespace),
            watcher::Config::default(),
            move |ftj| {
                let name = ftj.name_any();
                let namespace = ftj.namespace();
                by_job
                    .state()
                    .into_iter()
                    .filter(|adep| adep.namespace() == namespace)
                    .filter(|adep| {
                        adep.spec.adapters.iter().any(|a| {
                            a.from_job
                                .as_ref()
                                .is_some_and(|source| source.name == name)
                        })
                    })
                    .map(|adep| ObjectRef::from_obj(&*adep))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "adapterdeployment reconcile failed");
            }
        })
        .await;
}

fn error_policy(_adep: Arc<AdapterDeployment>, error: &Error, _context: Arc<Context>) -> Requeue {
    warn!(category = error.category(), %error, "reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(15))
}

async fn reconcile(adep: Arc<AdapterDeployment>, context: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = adep.namespace().unwrap_or_default();
    let name = adep.name_any();
    let span = info_span!("reconcile", namespace = %namespace, adapterdeployment = %name);
    let started = Instant::now();
    let result = reconcile_inner(&adep, &context, &namespace, &name)
        .instrument(span)
        .await;
    let failure = result.as_ref().err().map(Error::category);
    context
        .metrics
        .observe("adapterdeployment", started, failure);
    result
}

async fn reconcile_inner(
    adep: &AdapterDeployment,
    context: &Context,
    namespace: &str,
    name: &str,
) -> Result<Requeue, Error> {
    let client = &context.client;
    let object = ObjectRef::from_obj(adep).to_string();
    let read = |what| Error::reading(what, &object);

    // The source jobs.
    let ftjs: Api<FineTuneJob> = Api::namespaced(client.clone(), namespace);
    let mut jobs = BTreeMap::new();
    for source in adep
        .spec
        .adapters
        .iter()
        .filter_map(|a| a.from_job.as_ref())
    {
        if let Some(ftj) = ftjs
            .get_opt(&source.name)
            .await
            .map_err(read("FineTuneJob"))?
        {
            jobs.insert(source.name.clone(), ftj);
        }
    }

    // The selected pods, and what each server holds.
    let selector =
        Selector::try_from(LabelSelector::from(&adep.spec.selector)).map_err(|e| Error::Spec {
            object: object.clone(),
            message: format!("spec.selector: {e}"),
        })?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pods = pods
        .list(&ListParams::default().labels_from(&selector))
        .await
        .map_err(read("serving pods"))?;
    let port = adep.spec.server.port;
    let observed_pods = futures::future::join_all(
        pods.items
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .map(|pod| observe_pod(pod, &context.http, port)),
    )
    .await;

    let plan = plan::plan(
        adep,
        &Observed {
            sources: plan::resolve(adep, &jobs),
            pods: observed_pods,
        },
        Timestamp::now(),
    );

    // Act, pods in parallel, each pod's calls in order; failures go into status.
    let outcomes = futures::future::join_all(plan.actions.iter().map(|action| {
        let server = |ip: &str| Server::new(&context.http, ip, port);
        async move {
            match action {
                Action::Sync { pod, ip, ops } => {
                    (pod.clone(), sync(&server(ip), ops, context).await)
                }
                Action::Smoke { pod, ip, models } => {
                    (pod.clone(), smoke(&server(ip), models, context).await)
                }
            }
        }
    }))
    .await;
    let mut status = plan.status.clone();
    let mut transitions = plan.transitions.clone();
    for (pod, outcome) in outcomes {
        if let Err(message) = outcome {
            warn!(%pod, %message, "a serving pod refused");
            transitions.push(events::Transition {
                reason: kubetune_crds::conditions::reason::LOAD_FAILED,
                note: format!("{pod}: {message}"),
                warning: true,
            });
            if let Some(entry) = status.pods.iter_mut().find(|p| p.name == pod) {
                entry.message = Some(message);
            }
        }
    }

    if adep.status.as_ref() != Some(&status) {
        let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), namespace);
        let patch = serde_json::json!({ "status": status });
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| Error::WriteStatus {
                object: object.clone(),
                source,
            })?;
    }

    let reference = adep.object_ref(&());
    events::publish(&context.recorder, &reference, "Rollout", &transitions).await;
    Ok(Requeue::requeue(plan.requeue_after))
}

/// A pod as the planner sees it: its server's adapters, when it answers.
async fn observe_pod(pod: &Pod, http: &reqwest::Client, port: u16) -> ObservedPod {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ip = status.and_then(|s| s.pod_ip.clone());
    let adapters = match (&ip, running) {
        (Some(ip), true) => Server::new(http, ip, port).adapters().await.ok(),
        _ => None,
    };
    ObservedPod {
        name: pod.name_any(),
        ip,
        ready,
        adapters,
    }
}

async fn sync(server: &Server, ops: &[Op], context: &Context) -> Result<(), String> {
    for op in ops {
        let (operation, result) = match op {
            Op::Load { name, path } => (
                "load",
                server
                    .load(name, path)
                    .await
                    .map_err(|e| format!("load {name} from {path}: {e}")),
            ),
            Op::Unload { name } => (
                "unload",
                server
                    .unload(name)
                    .await
                    .map_err(|e| format!("unload {name}: {e}")),
            ),
        };
        context.metrics.adapter_operation(operation, result.is_ok());
        result?;
    }
    Ok(())
}

async fn smoke(server: &Server, models: &[String], context: &Context) -> Result<(), String> {
    for model in models {
        let result = server
            .smoke(model)
            .await
            .map_err(|e| format!("smoke completion on {model}: {e}"));
        context.metrics.adapter_operation("smoke", result.is_ok());
        result?;
    }
    Ok(())
}

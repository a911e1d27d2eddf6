//! The desired children of a FineTuneJob: the trainer's ConfigMap, the headless Service
//! of a gang, and the batch/v1 Job of the current attempt.
//!
//! Pure functions of the FineTuneJob and the attempt number, with no client: the
//! reconciler applies what these return. Everything a trainer pod needs to know is here,
//! so the tests of this module are the specification of a trainer pod.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    EnvVarSource, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::Resource;
use kubetune_crds::finetunejob::{FineTuneJob, FineTuneJobSpec};
use kubetune_crds::training::{TrainerConfig, contract};

use crate::names;

/// The label every object of a FineTuneJob carries, with the job's name as value.
pub const JOB_LABEL: &str = "kubetune.io/finetunejob";
/// The label of the attempt a trainer pod belongs to.
pub const ATTEMPT_LABEL: &str = "kubetune.io/attempt";
/// The node label that names a node's GPU product.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// The extended resource of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Kueue's label naming the LocalQueue a Job is submitted to.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

const MODEL_MOUNT: &str = "/model";
const DATA_MOUNT: &str = "/data";
const OUTPUT_MOUNT: &str = "/output";
/// The user and group trainer pods run as: non-root, as Pod Security "restricted" asks.
const TRAINER_UID: i64 = 65_532;

/// A FineTuneJob that cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The object has no namespace or uid, which only a stored object has.
    #[error("FineTuneJob has no {0}: only stored objects can be rendered")]
    NotStored(&'static str),
    /// The trainer config did not serialise (a bug).
    #[error("failed to serialise the trainer config: {0}")]
    Config(#[source] serde_json::Error),
}

/// What the operator decides per attempt, on top of the FineTuneJob itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptContext {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The trainer image (the job's override, or the operator's default).
    pub image: String,
    /// Whether the attempt's Job is created suspended (spec.suspend, or a Kueue queue
    /// that has not admitted it yet).
    pub suspend: bool,
}

/// The children of one FineTuneJob for one attempt.
#[derive(Clone, Debug)]
pub struct Children {
    /// The trainer's configuration.
    pub config_map: ConfigMap,
    /// The headless Service of a gang (method full on more than one node).
    pub service: Option<Service>,
    /// The attempt's trainer Job.
    pub job: Job,
}

/// The owner reference that makes a child garbage-collected with its FineTuneJob.
fn owner(ftj: &FineTuneJob) -> Result<OwnerReference, RenderError> {
    ftj.controller_owner_ref(&())
        .ok_or(RenderError::NotStored("uid"))
}

fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "kubetune-trainer".into()),
        ("app.kubernetes.io/managed-by".into(), "kubetune".into()),
        (JOB_LABEL.into(), name.into()),
    ])
}

fn join(mount: &str, path: Option<&str>) -> String {
    match path.map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()) {
        Some(path) => format!("{mount}/{path}"),
        None => mount.to_owned(),
    }
}

/// The first volume path of `spec` that is absolute or has a `..` segment, as a message
/// naming its field: joined to its mount, it would open files outside the volume.
pub fn path_outside_volume(spec: &FineTuneJobSpec) -> Option<String> {
    let paths = [
        (
            "baseModel.volume.path",
            spec.base_model.volume.path.as_deref(),
        ),
        ("dataset.trainPath", Some(spec.dataset.train_path.as_str())),
        ("dataset.evalPath", spec.dataset.eval_path.as_deref()),
        ("output.volume.path", spec.output.volume.path.as_deref()),
    ];
    paths.into_iter().find_map(|(field, path)| {
        let path = path?;
        let escapes = path.starts_with('/') || path.split('/').any(|segment| segment == "..");
        escapes.then(|| {
            format!("{field} {path:?} leaves its volume: paths must be relative and without \"..\"")
        })
    })
}

/// Whether the job runs as a gang of ranks, with a headless Service for the rendezvous.
pub fn is_gang(ftj: &FineTuneJob) -> bool {
    ftj.spec.resources.nodes > 1
}

/// The directory inside the output volume: the job's `output.volume.path`, or
/// `<namespace>/<name>`.
pub fn output_path(ftj: &FineTuneJob, namespace: &str) -> String {
    ftj.spec.output.volume.path.clone().unwrap_or_else(|| {
        format!(
            "{namespace}/{}",
            ftj.metadata.name.as_deref().unwrap_or_default()
        )
    })
}

/// The configuration the trainer reads, with the volume paths resolved to mount paths.
pub fn trainer_config(ftj: &FineTuneJob, namespace: &str) -> TrainerConfig {
    let spec = &ftj.spec;
    let output_dir = join(OUTPUT_MOUNT, Some(&output_path(ftj, namespace)));
    TrainerConfig {
        method: spec.method,
        base_model_name: spec.base_model.name.clone(),
        model_dir: join(MODEL_MOUNT, spec.base_model.volume.path.as_deref()),
        dataset_format: spec.dataset.format,
        train_file: join(DATA_MOUNT, Some(&spec.dataset.train_path)),
        eval_file: spec
            .dataset
            .eval_path
            .as_deref()
            .map(|path| join(DATA_MOUNT, Some(path))),
        eval_split_percent: spec.dataset.eval_split_percent,
        checkpoint_dir: format!("{output_dir}/checkpoints"),
        output_dir,
        hyperparameters: spec.hyperparameters.clone(),
        // Methods that train an adapter get LoRA's defaults when the spec omits them.
        lora: spec
            .method
            .trains_adapter()
            .then(|| spec.lora.clone().unwrap_or_default()),
        qlora: spec.qlora.clone(),
        dpo: spec.dpo.clone(),
        checkpoint: spec.checkpoint.clone(),
    }
}

/// Every child of `ftj` for the attempt in `context`.
pub fn children(ftj: &FineTuneJob, context: &AttemptContext) -> Result<Children, RenderError> {
    let namespace = ftj
        .metadata
        .namespace
        .as_deref()
        .ok_or(RenderError::NotStored("namespace"))?;
    let name = ftj
        .metadata
        .name
        .as_deref()
        .ok_or(RenderError::NotStored("name"))?;
    let owner = owner(ftj)?;
    let gang = is_gang(ftj);

    let config = serde_json::to_string_pretty(&trainer_config(ftj, namespace))
        .map_err(RenderError::Config)?;
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(names::config_map(name)),
            namespace: Some(namespace.into()),
            labels: Some(labels(name)),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("trainer.json".into(), config)])),
        ..ConfigMap::default()
    };

    let service = gang.then(|| Service {
        metadata: ObjectMeta {
            name: Some(names::service(name)),
            namespace: Some(namespace.into()),
            labels: Some(labels(name)),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Ranks must resolve rank 0 before any of them is ready.
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(JOB_LABEL.into(), name.into())])),
            ports: Some(vec![ServicePort {
                name: Some("rendezvous".into()),
                port: i32::from(contract::RENDEZVOUS_PORT),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    });

    let job = attempt_job(ftj, name, namespace, owner, context);
    Ok(Children {
        config_map,
        service,
        job,
    })
}

fn attempt_job(
    ftj: &FineTuneJob,
    name: &str,
    namespace: &str,
    owner: OwnerReference,
    context: &AttemptContext,
) -> Job {
    let spec = &ftj.spec;
    let nodes = i32::try_from(spec.resources.nodes).unwrap_or(i32::MAX);
    let job_name = names::attempt_job(name, context.attempt);
    let extra = spec.pod_metadata.clone().unwrap_or_default();
    let mut pod_labels = labels(name);
    let mut job_labels = pod_labels.clone();
    // The user's labels go first so that ours win on a clash.
    let mut user_labels = extra.labels;
    user_labels.append(&mut pod_labels);
    let mut pod_labels = user_labels;
    pod_labels.insert(ATTEMPT_LABEL.into(), context.attempt.to_string());
    job_labels.insert(ATTEMPT_LABEL.into(), context.attempt.to_string());
    if let Some(queue) = &spec.scheduling.queue_name {
        job_labels.insert(KUEUE_QUEUE_LABEL.into(), queue.clone());
    }

    Job {
        metadata: ObjectMeta {
            name: Some(job_name.clone()),
            namespace: Some(namespace.into()),
            labels: Some(job_labels),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(nodes),
            parallelism: Some(nodes),
            // The operator restarts the whole gang from its checkpoint itself: a pod that
            // fails fails the attempt, and the Job controller stops the others.
            backoff_limit: Some(0),
            suspend: Some(context.suspend),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: (!extra.annotations.is_empty()).then_some(extra.annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(ftj, name, namespace, &job_name, context)),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

fn pod_spec(
    ftj: &FineTuneJob,
    name: &str,
    namespace: &str,
    job_name: &str,
    context: &AttemptContext,
) -> PodSpec {
    let spec = &ftj.spec;
    let gang = is_gang(ftj);

    let mut node_selector = spec.scheduling.node_selector.clone();
    let mut tolerations = Vec::new();
    let mut limits = BTreeMap::new();
    if let Some(gpu) = &spec.resources.gpu {
        node_selector.insert(GPU_PRODUCT_LABEL.into(), gpu.product.clone());
        limits.insert(GPU_RESOURCE.into(), Quantity(gpu.per_node.to_string()));
        tolerations.push(Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        });
    }
    tolerations.extend(spec.scheduling.tolerations.iter().map(Toleration::from));
    if let Some(cpu) = &spec.resources.cpu {
        limits.insert("cpu".into(), Quantity(cpu.clone()));
    }
    if let Some(memory) = &spec.resources.memory {
        limits.insert("memory".into(), Quantity(memory.clone()));
    }

    // One pod per node: the ranks of a gang repel each other (unless the spec lets
    // them share a node).
    let affinity = (gang && spec.scheduling.one_pod_per_node).then(|| Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(JOB_LABEL.into(), name.into())])),
                    ..LabelSelector::default()
                }),
                topology_key: "kubernetes.io/hostname".into(),
                ..PodAffinityTerm::default()
            }]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    });

    let rendezvous = if gang {
        format!(
            "{job_name}-0.{}.{namespace}.svc:{}",
            names::service(name),
            contract::RENDEZVOUS_PORT
        )
    } else {
        format!("127.0.0.1:{}", contract::RENDEZVOUS_PORT)
    };
    // The pod's index in the gang; with one rank a pod it is the rank too. With several
    // (one per GPU) the trainer launches them and gives each its rank.
    let ranks_per_pod = spec.resources.ranks_per_pod();
    let completion_index = |name: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    .into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let mut env = vec![completion_index(contract::ENV_NODE_RANK)];
    if ranks_per_pod == 1 {
        env.push(completion_index(contract::ENV_RANK));
    }
    env.extend([
        env_var(contract::ENV_RANKS_PER_POD, ranks_per_pod.to_string()),
        env_var(
            contract::ENV_WORLD_SIZE,
            spec.resources.world_size().to_string(),
        ),
        env_var(contract::ENV_RENDEZVOUS, rendezvous),
        env_var(
            contract::ENV_PROGRESS_ADDR,
            format!("0.0.0.0:{}", contract::PROGRESS_PORT),
        ),
        env_var(contract::ENV_TERMINATION_LOG, "/dev/termination-log".into()),
    ]);
    // The trainer checks its memory plan against the product's memory.
    if let Some(bytes) = spec.resources.gpu_memory_bytes() {
        env.push(env_var(contract::ENV_GPU_MEMORY_BYTES, bytes.to_string()));
    }

    let claim = |volume: &str, claim_name: &str, read_only: bool| Volume {
        name: volume.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim_name.into(),
            read_only: Some(read_only),
        }),
        ..Volume::default()
    };
    let mount = |volume: &str, path: &str, read_only: bool| VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    let config_dir = contract::CONFIG_PATH
        .rsplit_once('/')
        .map_or("/etc/kubetune", |(dir, _)| dir);

    PodSpec {
        restart_policy: Some("Never".into()),
        subdomain: gang.then(|| names::service(name)),
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        affinity,
        priority_class_name: spec.scheduling.priority_class_name.clone(),
        automount_service_account_token: Some(false),
        // The trainer checkpoints on SIGTERM; give it time to write one.
        termination_grace_period_seconds: Some(300),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(TRAINER_UID),
            run_as_group: Some(TRAINER_UID),
            fs_group: Some(TRAINER_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![Container {
            name: "trainer".into(),
            image: Some(context.image.clone()),
            image_pull_policy: Some("IfNotPresent".into()),
            args: Some(vec![
                "train".into(),
                "--config".into(),
                contract::CONFIG_PATH.into(),
            ]),
            env: Some(env),
            ports: Some(vec![ContainerPort {
                name: Some("progress".into()),
                container_port: i32::from(contract::PROGRESS_PORT),
                ..ContainerPort::default()
            }]),
            resources: (!limits.is_empty()).then(|| ResourceRequirements {
                // Requests equal limits: a trainer is a guaranteed-QoS workload.
                requests: Some(limits.clone()),
                limits: Some(limits),
                ..ResourceRequirements::default()
            }),
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![
                mount("config", config_dir, true),
                mount("model", MODEL_MOUNT, true),
                mount("data", DATA_MOUNT, true),
                mount("output", OUTPUT_MOUNT, false),
                mount("tmp", "/tmp", false),
            ]),
            ..Container::default()
        }],
        volumes: Some(vec![
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: names::config_map(name),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            claim("model", &spec.base_model.volume.claim_name, true),
            claim("data", &spec.dataset.claim_name, true),
            claim("output", &spec.output.volume.claim_name, false),
            Volume {
                name: "tmp".into(),
                empty_dir: Some(Default::default()),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    }
}

fn env_var(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::finetunejob_from_example;

    fn context(attempt: u32) -> AttemptContext {
        AttemptContext {
            attempt,
            image: "kubetune/trainer:test".into(),
            suspend: false,
        }
    }

    fn pod(children: &Children) -> &PodSpec {
        children
            .job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("the Job has a pod template")
    }

    #[test]
    fn lora_job_is_one_pod_with_one_gpu_of_the_requested_product() {
        let ftj = finetunejob_from_example("lora-a100.yaml");
        let children = children(&ftj, &context(1)).expect("renders");
        let job = children.job.spec.as_ref().expect("job spec");
        assert_eq!((job.completions, job.parallelism), (Some(1), Some(1)));
        assert_eq!(job.backoff_limit, Some(0));
        assert!(
            children.service.is_none(),
            "one pod needs no rendezvous service"
        );
        let pod = pod(&children);
        assert_eq!(
            pod.node_selector
                .as_ref()
                .and_then(|s| s.get(GPU_PRODUCT_LABEL)),
            Some(&"NVIDIA-A100-SXM4-80GB".to_owned())
        );
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .expect("limits");
        assert_eq!(limits.get(GPU_RESOURCE), Some(&Quantity("1".into())));
        assert!(
            pod.tolerations
                .as_ref()
                .is_some_and(|t| t.iter().any(|t| t.key.as_deref() == Some(GPU_RESOURCE)))
        );
        assert!(pod.affinity.is_none());
    }

    fn env_of(children: &Children) -> Vec<EnvVar> {
        pod(children).containers[0].env.clone().expect("env")
    }

    fn env_value(env: &[EnvVar], name: &str) -> Option<String> {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn a_gang_allowed_to_share_nodes_has_no_anti_affinity_and_keeps_its_service() {
        let mut ftj = finetunejob_from_example("full-16-nodes.yaml");
        ftj.spec.scheduling.one_pod_per_node = false;
        let children = children(&ftj, &context(1)).expect("renders");
        let pod = children
            .job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec");
        assert!(pod.affinity.is_none(), "{:?}", pod.affinity);
        assert!(children.service.is_some());
        assert_eq!(pod.subdomain.as_deref(), Some("domain-full-ranks"));
    }

    #[test]
    fn cpu_pods_with_ranks_per_node_carry_the_whole_gangs_world_size() {
        let mut ftj = finetunejob_from_example("full-16-nodes.yaml");
        ftj.spec.resources.gpu = None;
        ftj.spec.resources.nodes = 2;
        ftj.spec.resources.ranks_per_node = Some(2);
        let env = env_of(&children(&ftj, &context(1)).expect("renders"));
        assert_eq!(
            env_value(&env, contract::ENV_WORLD_SIZE).as_deref(),
            Some("4")
        );
        assert_eq!(
            env_value(&env, contract::ENV_RANKS_PER_POD).as_deref(),
            Some("2")
        );
        assert!(env.iter().any(|e| e.name == contract::ENV_NODE_RANK));
        assert!(env.iter().all(|e| e.name != contract::ENV_RANK));

        // One rank a pod: the pod's index is its rank.
        ftj.spec.resources.ranks_per_node = None;
        let env = env_of(&children(&ftj, &context(1)).expect("renders"));
        assert_eq!(
            env_value(&env, contract::ENV_WORLD_SIZE).as_deref(),
            Some("2")
        );
        assert_eq!(
            env_value(&env, contract::ENV_RANKS_PER_POD).as_deref(),
            Some("1")
        );
        assert!(env.iter().any(|e| e.name == contract::ENV_RANK));
    }

    #[test]
    fn full_job_on_16_nodes_is_an_indexed_gang_spread_one_pod_per_node() {
        let ftj = finetunejob_from_example("full-16-nodes.yaml");
        let children = children(&ftj, &context(3)).expect("renders");
        let job = children.job.spec.as_ref().expect("job spec");
        assert_eq!(job.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((job.completions, job.parallelism), (Some(16), Some(16)));
        assert_eq!(
            children.job.metadata.name.as_deref(),
            Some("domain-full-a3")
        );

        let service = children
            .service
            .as_ref()
            .expect("a gang has a headless service");
        let service_spec = service.spec.as_ref().expect("service spec");
        assert_eq!(service_spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(service_spec.publish_not_ready_addresses, Some(true));

        let pod = pod(&children);
        assert_eq!(pod.subdomain.as_deref(), Some("domain-full-ranks"));
        let anti = pod
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("required anti-affinity");
        assert_eq!(anti[0].topology_key, "kubernetes.io/hostname");

        let env = pod.containers[0].env.as_ref().expect("env");
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        // One rank per GPU: 16 pods × 8 GPUs.
        assert_eq!(value(contract::ENV_WORLD_SIZE).as_deref(), Some("128"));
        assert_eq!(value(contract::ENV_RANKS_PER_POD).as_deref(), Some("8"));
        assert_eq!(
            value(contract::ENV_RENDEZVOUS).as_deref(),
            Some("domain-full-a3-0.domain-full-ranks.ml-team.svc:29500")
        );
        let node_rank = env
            .iter()
            .find(|e| e.name == contract::ENV_NODE_RANK)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .expect("the node rank comes from the completion index");
        assert!(node_rank.field_path.contains("job-completion-index"));
        assert!(
            env.iter().all(|e| e.name != contract::ENV_RANK),
            "the pod's launcher gives each of its 8 ranks its own rank"
        );
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .expect("limits");
        assert_eq!(limits.get(GPU_RESOURCE), Some(&Quantity("8".into())));
        assert_eq!(
            pod.node_selector
                .as_ref()
                .and_then(|s| s.get("node.kubernetes.io/instance-type"))
                .map(String::as_str),
            Some("p5.48xlarge"),
            "the user's node selector is kept next to the GPU product"
        );
    }

    #[test]
    fn trainer_pods_meet_pod_security_restricted() {
        for example in [
            "lora-a100.yaml",
            "full-16-nodes.yaml",
            "qlora.yaml",
            "dpo.yaml",
        ] {
            let ftj = finetunejob_from_example(example);
            let children = children(&ftj, &context(1)).expect("renders");
            let pod = pod(&children);
            let pod_security = pod.security_context.as_ref().expect("pod security context");
            assert_eq!(pod_security.run_as_non_root, Some(true), "{example}");
            assert_eq!(
                pod_security
                    .seccomp_profile
                    .as_ref()
                    .map(|s| s.type_.as_str()),
                Some("RuntimeDefault")
            );
            for container in &pod.containers {
                let security = container
                    .security_context
                    .as_ref()
                    .expect("container security");
                assert_eq!(security.allow_privilege_escalation, Some(false));
                assert_eq!(security.read_only_root_filesystem, Some(true));
                assert_eq!(
                    security.capabilities.as_ref().and_then(|c| c.drop.clone()),
                    Some(vec!["ALL".to_owned()])
                );
            }
            assert!(
                pod.volumes.iter().flatten().all(|v| v.host_path.is_none()),
                "restricted pods use no hostPath"
            );
        }
    }

    #[test]
    fn trainer_config_resolves_volume_paths_and_defaults_lora() {
        let ftj = finetunejob_from_example("qlora.yaml");
        let config = trainer_config(&ftj, "ml-team");
        assert_eq!(config.model_dir, "/model/llama-3.1-70b-instruct");
        assert_eq!(config.train_file, "/data/contracts/train.jsonl");
        assert_eq!(config.eval_file, None);
        assert_eq!(config.eval_split_percent, 5);
        assert_eq!(config.output_dir, "/output/ml-team/contracts-qlora");
        assert_eq!(
            config.checkpoint_dir,
            "/output/ml-team/contracts-qlora/checkpoints"
        );
        assert_eq!(config.lora.as_ref().map(|l| l.rank), Some(64));

        let full = trainer_config(&finetunejob_from_example("full-16-nodes.yaml"), "ml-team");
        assert!(full.lora.is_none(), "full fine-tuning trains no adapter");
    }

    #[test]
    fn the_config_map_carries_the_trainer_config_as_json() {
        let ftj = finetunejob_from_example("dpo.yaml");
        let children = children(&ftj, &context(1)).expect("renders");
        let data = children.config_map.data.expect("data");
        let config: TrainerConfig =
            serde_json::from_str(&data["trainer.json"]).expect("the trainer can parse it");
        assert_eq!(config, trainer_config(&ftj, "ml-team"));
        assert!(config.dpo.is_some());
    }

    #[test]
    fn every_child_is_owned_by_the_finetunejob() {
        let ftj = finetunejob_from_example("full-16-nodes.yaml");
        let children = children(&ftj, &context(1)).expect("renders");
        let owners = [
            &children.config_map.metadata,
            &children.job.metadata,
            &children.service.as_ref().expect("service").metadata,
        ]
        .map(|m| m.owner_references.clone().unwrap_or_default());
        for refs in owners {
            assert_eq!(refs.len(), 1);
            assert_eq!(refs[0].kind, "FineTuneJob");
            assert_eq!(refs[0].controller, Some(true));
        }
    }

    #[test]
    fn pod_metadata_reaches_the_pods_without_overriding_the_operators_labels() {
        let mut ftj = finetunejob_from_example("lora-a100.yaml");
        ftj.spec.pod_metadata = Some(kubetune_crds::finetunejob::PodMetadata {
            labels: BTreeMap::from([
                ("team".into(), "support".into()),
                (JOB_LABEL.into(), "spoofed".into()),
            ]),
            annotations: BTreeMap::from([("sidecar.istio.io/inject".into(), "false".into())]),
        });
        let children = children(&ftj, &context(1)).expect("renders");
        let template = &children.job.spec.as_ref().expect("spec").template;
        let metadata = template.metadata.as_ref().expect("pod metadata");
        let labels = metadata.labels.as_ref().expect("labels");
        assert_eq!(labels.get("team").map(String::as_str), Some("support"));
        assert_eq!(
            labels.get(JOB_LABEL).map(String::as_str),
            Some("support-lora")
        );
        assert_eq!(
            metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("sidecar.istio.io/inject"))
                .map(String::as_str),
            Some("false")
        );
    }

    #[test]
    fn a_kueue_queue_labels_the_job() {
        let ftj = finetunejob_from_example("qlora.yaml");
        let children = children(&ftj, &context(1)).expect("renders");
        let labels = children.job.metadata.labels.expect("labels");
        assert_eq!(
            labels.get(KUEUE_QUEUE_LABEL).map(String::as_str),
            Some("gpu-team")
        );
    }

    #[test]
    fn a_job_that_was_never_stored_cannot_be_rendered() {
        let mut ftj = finetunejob_from_example("lora-a100.yaml");
        ftj.metadata.uid = None;
        assert!(matches!(
            children(&ftj, &context(1)),
            Err(RenderError::NotStored("uid"))
        ));
    }
}

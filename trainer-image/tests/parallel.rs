//! Data-parallel full fine-tuning with real processes of the `kubetune-trainer` binary
//! on loopback, placed in a gang through the operator's environment variables: 2 and 4
//! ranks reach the weights one process reaches with the same global batch, a stop on
//! one rank stops all after the same step and the gang resumes from rank 0's
//! checkpoint, and a rank that dies or never comes makes the others exit non-zero
//! within seconds.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use kubetune_trainer::test_support::{TinyLlama, max_abs_diff, memorisable_chats, write_jsonl};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A run: per-rank batch, accumulation, steps.
#[derive(Clone, Copy)]
struct Run {
    batch: usize,
    accum: usize,
    steps: usize,
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    TinyLlama::default()
        .write(&dir.path().join("model"))
        .expect("model");
    // 14 examples: with 4 ranks of 2 the second global batch of each epoch has 6, so
    // rank 3 has nothing to do in it and must still take part.
    write_jsonl(&dir.path().join("train.jsonl"), &memorisable_chats(14)).expect("data");
    dir
}

fn command(dir: &Path, out: &str, run: Run, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kubetune-trainer"));
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    command
        .args([
            "train",
            "--method",
            "full",
            "--lr",
            "2e-3",
            "--warmup-steps",
            "1",
        ])
        .args(["--model", &p("model"), "--data", &p("train.jsonl")])
        .args(["--eval-data", &p("train.jsonl"), "--out", &p(out)])
        .args(["--max-seq-length", "64", "--weight-decay", "0.01"])
        .args(["--batch-size", &run.batch.to_string()])
        .args(["--grad-accum", &run.accum.to_string()])
        .args(["--max-steps", &run.steps.to_string()])
        .args(extra)
        .env("KUBETUNE_PROGRESS_ADDR", "127.0.0.1:0")
        .env("KUBETUNE_RENDEZVOUS_TIMEOUT_SECONDS", "60")
        .env("KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS", "60")
        .env_remove("KUBETUNE_WORLD_SIZE")
        .env_remove("KUBETUNE_RANK")
        .env_remove("KUBETUNE_RENDEZVOUS");
    command
}

/// Starts `world` ranks writing to `out`, each with its own termination log.
fn start_gang(dir: &Path, out: &str, run: Run, world: usize, extra: &[&str]) -> Vec<Child> {
    let port = free_port();
    (0..world)
        .map(|rank| {
            command(dir, out, run, extra)
                .env("KUBETUNE_WORLD_SIZE", world.to_string())
                .env("KUBETUNE_RANK", rank.to_string())
                .env("KUBETUNE_RENDEZVOUS", format!("127.0.0.1:{port}"))
                .env(
                    "KUBETUNE_TERMINATION_LOG",
                    dir.join(format!("{out}-termination-{rank}")),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("the trainer starts")
        })
        .collect()
}

fn finish(children: Vec<Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("the trainer ends"))
        .collect()
}

fn assert_success(outputs: &[Output]) {
    for (rank, output) in outputs.iter().enumerate() {
        assert!(
            output.status.success(),
            "rank {rank}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn single(dir: &Path, out: &str, run: Run) {
    let output = command(dir, out, run, &[])
        .env(
            "KUBETUNE_TERMINATION_LOG",
            dir.join(format!("{out}-termination")),
        )
        .output()
        .expect("the trainer runs");
    assert_success(&[output]);
}

fn weights(dir: &Path, out: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(out).join("model.safetensors"), &Device::Cpu)
        .expect("the written weights")
}

fn metrics(dir: &Path, out: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(out).join("metrics.json")).expect("metrics"))
        .expect("json")
}

/// The largest absolute difference between two runs' weights, also checking that
/// training moved them.
fn max_weight_diff(dir: &Path, a: &str, b: &str) -> f32 {
    let (wa, wb) = (weights(dir, a), weights(dir, b));
    let original = TinyLlama::default().weights().expect("original weights");
    assert_eq!(wa.len(), wb.len());
    let mut diff = 0f32;
    let mut moved = 0f32;
    for (name, t) in &original {
        diff = diff.max(max_abs_diff(&wa[name], &wb[name]));
        moved = moved.max(max_abs_diff(&wa[name], t));
    }
    assert!(moved > 1e-3, "training did not move the weights ({moved})");
    diff
}

fn assert_same_run(dir: &Path, single: &str, gang: &str, world: usize) {
    let diff = max_weight_diff(dir, single, gang);
    println!("{world} ranks vs one process: max |Δweight| = {diff:e}");
    assert!(
        diff < 1e-5,
        "{world} ranks ended {diff} away from one process"
    );
    let (one, many) = (metrics(dir, single), metrics(dir, gang));
    for key in ["lossHistory", "evalLoss", "baseEvalLoss"] {
        let flat = |v: &serde_json::Value| -> Vec<f64> {
            match v {
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_f64()).collect(),
                other => other.as_f64().into_iter().collect(),
            }
        };
        let (a, b) = (flat(&one[key]), flat(&many[key]));
        assert!(!a.is_empty() && a.len() == b.len(), "{key}: {a:?} vs {b:?}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{key}: {a:?} vs {b:?}");
        }
    }
    assert_eq!(
        one["tokensSeen"], many["tokensSeen"],
        "every rank's tokens counted"
    );
}

#[test]
fn two_and_four_ranks_reach_the_weights_of_one_process_with_the_same_global_batch() {
    let dir = setup();
    let d = dir.path();

    // 2 ranks × 3 sequences × 2 micro-batches per step against one process with 6 × 2.
    single(
        d,
        "one-6x2",
        Run {
            batch: 6,
            accum: 2,
            steps: 4,
        },
    );
    let outputs = finish(start_gang(
        d,
        "two",
        Run {
            batch: 3,
            accum: 2,
            steps: 4,
        },
        2,
        &[],
    ));
    assert_success(&outputs);
    assert_same_run(d, "one-6x2", "two", 2);
    // Rank 0 alone reports; the others write no result.
    let result: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("two-termination-0")).expect("rank 0's result"),
    )
    .expect("result JSON");
    assert_eq!(result["steps"], 4);
    assert!(!d.join("two-termination-1").exists());

    // 4 ranks × 2 against one process with 8: the global batches of 14 examples are 8
    // and 6, so rank 3 sits out every second micro-batch.
    single(
        d,
        "one-8",
        Run {
            batch: 8,
            accum: 1,
            steps: 5,
        },
    );
    let outputs = finish(start_gang(
        d,
        "four",
        Run {
            batch: 2,
            accum: 1,
            steps: 5,
        },
        4,
        &[],
    ));
    assert_success(&outputs);
    assert_same_run(d, "one-8", "four", 4);
}

/// The tensors of one safetensors file under `out`.
fn tensors(dir: &Path, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(file), &Device::Cpu).expect("a safetensors file")
}

fn assert_same_bits(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (name, t) in a {
        let bits = |t: &Tensor| -> Vec<u32> {
            let values = t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            values.expect("f32").into_iter().map(f32::to_bits).collect()
        };
        assert_eq!(bits(t), bits(&b[name]), "{what}: {name}");
    }
}

#[test]
fn stage_1_sharded_optimizer_state_trains_the_same_bits_as_replicated_with_a_share_on_each_rank() {
    let dir = setup();
    let d = dir.path();
    let run = Run {
        batch: 3,
        accum: 1,
        steps: 4,
    };
    // A checkpoint at steps 2 and 4: the sharded run gathers its moments to rank 0.
    let every = ["--checkpoint-every", "2"];
    let stage1 = [&every[..], &["--sharding", "optimizer-state"]].concat();
    let sharded = finish(start_gang(d, "sharded", run, 2, &stage1));
    assert_success(&sharded);
    let replicated = [&every[..], &["--replicate-optimizer-state"]].concat();
    let outputs = finish(start_gang(d, "replicated", run, 2, &replicated));
    assert_success(&outputs);

    // Each owner updates its parameters with the same arithmetic and sends the bits.
    assert_same_bits(
        &weights(d, "sharded"),
        &weights(d, "replicated"),
        "the trained weights",
    );
    let checkpoint =
        |out: &str, file: &str| format!("{out}/checkpoints/checkpoint-00000004/{file}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert_same_bits(
            &tensors(d, &checkpoint("sharded", file)),
            &tensors(d, &checkpoint("replicated", file)),
            file,
        );
    }
    // Rank 0 kept its share of AdamW's two f32 moments per weight, not all of them.
    let params: usize = TinyLlama::default()
        .weights()
        .expect("original weights")
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    let held = |out: &str| {
        metrics(d, out)["optimizerStateBytes"]
            .as_u64()
            .expect("bytes")
    };
    assert_eq!(held("replicated"), 8 * params as u64);
    let share = held("sharded");
    println!(
        "rank 0 of 2 holds {share} of {} optimizer bytes",
        8 * params
    );
    assert!(
        share > 0 && share < 8 * params as u64 * 3 / 4,
        "rank 0 holds {share} of {} bytes",
        8 * params
    );
}

#[test]
fn a_stop_on_one_rank_stops_the_gang_after_the_same_step_and_the_gang_resumes_from_it() {
    let dir = setup();
    let d = dir.path();
    let run = Run {
        batch: 2,
        accum: 1,
        steps: 8,
    };
    let checkpoints = ["--checkpoint-every", "2", "--checkpoint-keep", "2"];
    single(d, "one", Run { batch: 4, ..run });

    // Rank 1 alone behaves as if its pod got SIGTERM after step 3 (the signal's path to
    // that flag is tested in cli.rs); rank 0 must stop after the same step.
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|rank| {
            let mut extra = checkpoints.to_vec();
            if rank == 1 {
                extra.extend(["--interrupt-after-step", "3"]);
            }
            command(d, "gang", run, &extra)
                .env("KUBETUNE_WORLD_SIZE", "2")
                .env("KUBETUNE_RANK", rank.to_string())
                .env("KUBETUNE_RENDEZVOUS", format!("127.0.0.1:{port}"))
                .env("KUBETUNE_TERMINATION_LOG", d.join(format!("stop-{rank}")))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("the trainer starts")
        })
        .collect();
    for (rank, output) in finish(ranks).iter().enumerate() {
        assert_eq!(
            output.status.code(),
            Some(143),
            "rank {rank}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        d.join("gang/checkpoints/checkpoint-00000003").is_dir(),
        "rank 0 checkpointed the step the gang stopped after"
    );

    let outputs = finish(start_gang(d, "gang", run, 2, &checkpoints));
    assert_success(&outputs);
    assert_eq!(metrics(d, "gang")["resumedFromStep"], 3);
    assert_same_run(d, "one", "gang", 2);
}

#[test]
fn fully_sharded_ranks_hold_a_share_of_the_state_and_write_per_rank_checkpoint_files() {
    let dir = setup();
    let d = dir.path();
    let run = Run {
        batch: 2,
        accum: 1,
        steps: 2,
    };
    let every = ["--checkpoint-every", "2"];
    let outputs = finish(start_gang(d, "zero3", run, 4, &every));
    assert_success(&outputs);
    let params: u64 = TinyLlama::default()
        .weights()
        .expect("original weights")
        .iter()
        .map(|(_, t)| t.elem_count() as u64)
        .sum();
    // Weights, gradients and two moments, 4 bytes each: a quarter on each of 4 ranks,
    // plus at most one padding element per unit.
    let held = metrics(d, "zero3")["stateBytes"].as_u64().expect("bytes");
    println!("rank 0 of 4 holds {held} of {} state bytes", 16 * params);
    assert!(
        held >= 16 * params / 4 && held < 16 * params / 4 + 16 * 64,
        "{held}"
    );
    let checkpoint = d.join("zero3/checkpoints/checkpoint-00000002");
    for rank in 0..4 {
        let file = checkpoint.join(format!("shard-{rank:05}-of-00004.safetensors"));
        assert!(file.is_file(), "{} is missing", file.display());
    }
    assert!(checkpoint.join("zero3.json").is_file());
    assert!(
        !checkpoint.join("model.safetensors").exists(),
        "no whole weights"
    );
    // The output is one ordinary checkpoint, gathered by rank 0.
    assert_eq!(
        weights(d, "zero3").len(),
        TinyLlama::default().weights().expect("w").len()
    );
}

#[test]
fn shard_grad_op_keeps_gathered_weights_for_backward_to_the_same_weights_with_less_traffic() {
    let dir = setup();
    let d = dir.path();
    let run = Run {
        batch: 2,
        accum: 1,
        steps: 3,
    };
    single(d, "one", Run { batch: 8, ..run });
    // 14 examples in global batches of 8 and 6: rank 3 sits out every second one.
    let full = finish(start_gang(d, "full", run, 4, &[]));
    assert_success(&full);
    let kept = finish(start_gang(
        d,
        "kept",
        run,
        4,
        &["--sharding", "shard-grad-op"],
    ));
    assert_success(&kept);
    assert_same_run(d, "one", "full", 4);
    assert_same_run(d, "one", "kept", 4);
    let bytes = |out: &str| metrics(d, out)["collectiveBytes"].as_u64().expect("bytes") as f64;
    let ratio = bytes("kept") / bytes("full");
    println!("shard-grad-op sends {ratio:.3} of full sharding's bytes");
    // Each block and the embedding: one all-gather and the reduce-scatter instead of
    // two all-gathers and it; the head (final norm and LM head), used once forward and
    // backward at the same moment: one and one either way.
    let weights = TinyLlama::default().weights().expect("original weights");
    let numel = |pick: &dyn Fn(&str) -> bool| -> f64 {
        let count = weights
            .iter()
            .filter(|(n, _)| pick(n))
            .map(|(_, t)| t.elem_count());
        count.sum::<usize>() as f64
    };
    let head = numel(&|n| n == "model.norm.weight" || n == "lm_head.weight");
    let rest = numel(&|_| true) - head;
    let expected = (2.0 * rest + 2.0 * head) / (3.0 * rest + 2.0 * head);
    assert!((ratio - expected).abs() < 0.01, "{ratio} vs {expected}");
}

#[test]
fn a_fully_sharded_checkpoint_resumes_on_another_number_of_ranks_to_the_same_weights() {
    let dir = setup();
    let d = dir.path();
    let steps = 6;
    let checkpoints = ["--checkpoint-every", "2"];
    single(
        d,
        "one",
        Run {
            batch: 4,
            accum: 1,
            steps,
        },
    );
    // 4 ranks of 1 stop after step 3 (a checkpoint), 2 ranks of 2 go on from it, and
    // again from step 5 on 4 ranks: the same global batch of 4 throughout.
    let stop =
        |after: &'static str| [&checkpoints[..], &["--interrupt-after-step", after]].concat();
    let four = Run {
        batch: 1,
        accum: 1,
        steps,
    };
    let two = Run { batch: 2, ..four };
    for output in finish(start_gang(d, "gang", four, 4, &stop("3"))) {
        assert_eq!(
            output.status.code(),
            Some(143),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for output in finish(start_gang(d, "gang", two, 2, &stop("5"))) {
        assert_eq!(
            output.status.code(),
            Some(143),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(
        std::fs::read_dir(d.join("gang/checkpoints/checkpoint-00000005"))
            .expect("step 5's checkpoint")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
            .count(),
        2,
        "written by the 2 ranks"
    );
    let outputs = finish(start_gang(d, "gang", four, 4, &checkpoints));
    assert_success(&outputs);
    assert_eq!(metrics(d, "gang")["resumedFromStep"], 5);
    assert_same_run(d, "one", "gang", 4);
}

fn exit_within(
    mut children: Vec<(usize, Child)>,
    limit: Duration,
) -> Vec<(usize, Output, Duration)> {
    let started = Instant::now();
    let mut done = Vec::new();
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            if children[i].1.try_wait().expect("wait").is_some() {
                let (rank, child) = children.remove(i);
                done.push((
                    rank,
                    child.wait_with_output().expect("output"),
                    started.elapsed(),
                ));
            } else {
                i += 1;
            }
        }
        if started.elapsed() > limit {
            for (_, child) in &mut children {
                let _ = child.kill();
            }
            panic!("ranks still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done
}

#[test]
fn a_rank_that_dies_mid_run_makes_the_others_exit_non_zero_within_seconds() {
    let dir = setup();
    let d = dir.path();
    // Long enough that the gang is still training when rank 1 dies.
    let run = Run {
        batch: 2,
        accum: 1,
        steps: 100_000,
    };
    let mut children = start_gang(d, "out", run, 3, &["--checkpoint-every", "1"]);
    let first = d
        .join("out")
        .join("checkpoints")
        .join("checkpoint-00000001");
    let started = Instant::now();
    while !first.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    children[1].kill().expect("SIGKILL rank 1");
    let _ = children[1].wait();
    let died = Instant::now();
    let rest: Vec<(usize, Child)> = children
        .into_iter()
        .enumerate()
        .filter(|(rank, _)| *rank != 1)
        .collect();
    // The collective timeout is 60 s: these must notice the death itself, not time out.
    for (rank, output, after) in exit_within(rest, Duration::from_secs(30)) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!(
            "rank {rank} exited {} {:.2}s after rank 1 died",
            output.status,
            after.as_secs_f64()
        );
        assert_eq!(output.status.code(), Some(1), "rank {rank}: {stderr}");
        assert!(stderr.contains("across 3 ranks"), "rank {rank}: {stderr}");
    }
    println!(
        "all ranks gone {:.2}s after the death",
        died.elapsed().as_secs_f64()
    );
}

#[test]
fn a_rank_that_never_comes_makes_the_others_exit_non_zero_after_the_rendezvous_timeout() {
    let dir = setup();
    let d = dir.path();
    let port = free_port();
    let children: Vec<(usize, Child)> = (0..2)
        .map(|rank| {
            let child = command(
                d,
                "out",
                Run {
                    batch: 2,
                    accum: 1,
                    steps: 3,
                },
                &[],
            )
            .env("KUBETUNE_WORLD_SIZE", "3")
            .env("KUBETUNE_RANK", rank.to_string())
            .env("KUBETUNE_RENDEZVOUS", format!("127.0.0.1:{port}"))
            .env("KUBETUNE_RENDEZVOUS_TIMEOUT_SECONDS", "3")
            .env(
                "KUBETUNE_TERMINATION_LOG",
                d.join(format!("termination-{rank}")),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts");
            (rank, child)
        })
        .collect();
    for (rank, output, after) in exit_within(children, Duration::from_secs(30)) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!(
            "rank {rank} exited {} after {:.2}s",
            output.status,
            after.as_secs_f64()
        );
        assert_eq!(output.status.code(), Some(1), "rank {rank}: {stderr}");
        assert!(
            stderr.contains("rank 2 did not join"),
            "rank {rank}: {stderr}"
        );
    }
}

/// Where pod `node` of the run writing `out` logs.
fn pod_log(dir: &Path, out: &str, node: usize) -> std::path::PathBuf {
    dir.join(format!("{out}-pod-{node}.log"))
}

/// Starts `pods` pods of `per_pod` ranks each, as the operator starts them: one
/// trainer a pod with its node rank and ranks per pod, which launches the pod's ranks.
fn start_pods(dir: &Path, out: &str, run: Run, pods: usize, per_pod: usize) -> Vec<Child> {
    let port = free_port();
    (0..pods)
        .map(|node| {
            command(dir, out, run, &[])
                .env("KUBETUNE_WORLD_SIZE", (pods * per_pod).to_string())
                .env("KUBETUNE_NODE_RANK", node.to_string())
                .env("KUBETUNE_RANKS_PER_POD", per_pod.to_string())
                .env_remove("KUBETUNE_LOCAL_RANK")
                .env("KUBETUNE_RENDEZVOUS", format!("127.0.0.1:{port}"))
                // Every rank of a pod shares the pod's termination log, as in Kubernetes.
                .env(
                    "KUBETUNE_TERMINATION_LOG",
                    dir.join(format!("{out}-termination-pod-{node}")),
                )
                // A file, as a container's log is drained: a pipe nobody reads until
                // the end would fill and block the ranks' logging.
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(pod_log(dir, out, node)).expect("a log file"))
                .spawn()
                .expect("the trainer starts")
        })
        .collect()
}

#[test]
fn pods_of_several_ranks_train_the_weights_of_one_process_with_the_same_global_batch() {
    let dir = setup();
    let d = dir.path();
    single(
        d,
        "one",
        Run {
            batch: 8,
            accum: 1,
            steps: 3,
        },
    );
    // 2 pods × 2 ranks × 2 sequences.
    let outputs = finish(start_pods(
        d,
        "pods",
        Run {
            batch: 2,
            accum: 1,
            steps: 3,
        },
        2,
        2,
    ));
    for (node, output) in outputs.iter().enumerate() {
        assert!(
            output.status.success(),
            "pod {node}: {}\n{}",
            output.status,
            std::fs::read_to_string(pod_log(d, "pods", node)).unwrap_or_default()
        );
    }
    assert_same_run(d, "one", "pods", 4);
    let result: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("pods-termination-pod-0")).expect("rank 0's result"),
    )
    .expect("result JSON");
    assert_eq!(result["steps"], 3);
    assert!(!d.join("pods-termination-pod-1").exists());
    let stderr = std::fs::read_to_string(pod_log(d, "pods", 1)).expect("pod 1's log");
    assert!(stderr.contains("started this pod's ranks"), "{stderr}");
    assert!(stderr.contains(r#""first_rank":2"#), "{stderr}");
}

/// The trainer processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let path = entry.expect("entry").path();
        let Some(child) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so read after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

#[test]
fn a_rank_that_dies_takes_its_pods_other_ranks_down_and_the_pod_exits_non_zero_at_once() {
    let dir = setup();
    let d = dir.path();
    let run = Run {
        batch: 2,
        accum: 1,
        steps: 100_000,
    };
    let mut pods = start_pods(d, "out", run, 1, 2);
    let started = Instant::now();
    let ranks = loop {
        let ranks = children_of(pods[0].id());
        if ranks.len() == 2 {
            break ranks;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the pod never started its two ranks"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Let them join and take a few steps.
    std::thread::sleep(Duration::from_secs(3));
    let victim = ranks[1];
    std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .expect("kill");
    let died = Instant::now();
    let launcher = pods.remove(0);
    let done = exit_within(vec![(0, launcher)], Duration::from_secs(20));
    let (_, output, after) = &done[0];
    println!(
        "the pod exited {} {:.2}s after one of its ranks died",
        output.status,
        after.as_secs_f64()
    );
    assert!(!output.status.success(), "the pod must fail");
    assert!(died.elapsed() < Duration::from_secs(20));
    for rank in ranks {
        assert!(
            !Path::new(&format!("/proc/{rank}/stat")).exists()
                || std::fs::read_to_string(format!("/proc/{rank}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "rank process {rank} outlived its pod"
        );
    }
}

#[test]
fn sigterm_to_a_pod_stops_its_ranks_after_a_checkpoint_and_the_pod_exits_143() {
    let dir = setup();
    let d = dir.path();
    let run = Run {
        batch: 2,
        accum: 1,
        steps: 100_000,
    };
    let mut pods = start_pods(d, "out", run, 1, 2);
    let log = pod_log(d, "out", 0);
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .is_ok_and(|l| l.matches(r#""message":"step""#).count() >= 4)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the pod's ranks never trained"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::process::Command::new("kill")
        .args(["-TERM", &pods[0].id().to_string()])
        .status()
        .expect("kill");
    let done = exit_within(vec![(0, pods.remove(0))], Duration::from_secs(30));
    let (_, output, after) = &done[0];
    println!(
        "the pod exited {} {:.2}s after SIGTERM",
        output.status,
        after.as_secs_f64()
    );
    assert_eq!(output.status.code(), Some(143));
    let checkpoints: Vec<_> = std::fs::read_dir(d.join("out").join("checkpoints"))
        .expect("a checkpoint directory")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(
        checkpoints.len(),
        1,
        "one checkpoint, at the step both ranks stopped after"
    );
    let log = std::fs::read_to_string(&log).expect("log");
    assert!(log.contains("passing it on to this pod's ranks"), "{log}");
}

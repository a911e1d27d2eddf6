//! The binary's contract with the operator and with users: exit codes, the termination
//! log, the `eval` JSON line, and training from a mounted TrainerConfig.

use std::path::Path;
use std::process::{Command, Output};

use kubetune_trainer::test_support::{TinyLlama, memorisable_chats, write_jsonl};

fn trainer(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubetune-trainer"))
        .args(args)
        .env("KUBETUNE_TERMINATION_LOG", dir.join("termination-log"))
        .env("KUBETUNE_PROGRESS_ADDR", "127.0.0.1:0")
        .output()
        .expect("the trainer binary runs")
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    TinyLlama::default()
        .write(&dir.path().join("model"))
        .expect("model");
    write_jsonl(&dir.path().join("train.jsonl"), &memorisable_chats(4)).expect("data");
    dir
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

fn termination_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("termination-log")).unwrap_or_default()
}

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--max-steps",
        "2",
        "--rank",
        "2",
    ]
}

#[test]
fn a_bad_dataset_line_exits_2_naming_the_file_and_line_in_the_termination_log() {
    let dir = setup();
    let data = dir.path().join("bad.jsonl");
    let good = memorisable_chats(1)[0].to_string();
    std::fs::write(&data, format!("{good}\n\n{good}\n{{\"messages\": 3}}\n")).expect("write");
    let (model, data, out) = (
        path(dir.path(), "model"),
        path(dir.path(), "bad.jsonl"),
        path(dir.path(), "out"),
    );
    let output = trainer(dir.path(), &train_args(&model, &data, &out));
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let log = termination_log(dir.path());
    assert!(log.contains("bad.jsonl:4:"), "termination log: {log}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad.jsonl:4:"));
}

#[test]
fn missing_files_unsupported_architectures_and_oversized_ranks_exit_2() {
    let dir = setup();
    let (model, data, out) = (
        path(dir.path(), "model"),
        path(dir.path(), "train.jsonl"),
        path(dir.path(), "out"),
    );

    let missing = path(dir.path(), "nope.jsonl");
    let output = trainer(dir.path(), &train_args(&model, &missing, &out));
    assert_eq!(output.status.code(), Some(2));
    assert!(termination_log(dir.path()).contains("nope.jsonl does not exist"));

    let mut args = train_args(&model, &data, &out);
    let rank = args.len() - 1;
    args[rank] = "4096";
    let output = trainer(dir.path(), &args);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        termination_log(dir.path()).contains("rank 4096 does not fit"),
        "{}",
        termination_log(dir.path())
    );

    let config_path = dir.path().join("model").join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).expect("read")).expect("json");
    config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&config_path, config.to_string()).expect("write");
    let output = trainer(dir.path(), &train_args(&model, &data, &out));
    assert_eq!(output.status.code(), Some(2));
    assert!(termination_log(dir.path()).contains("unsupported architecture"));
}

#[test]
fn an_unknown_flag_exits_2_with_the_usage_error_in_the_termination_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = trainer(dir.path(), &["train", "--config", "x.yaml", "--frobnicate"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(termination_log(dir.path()).contains("--frobnicate"));
}

#[test]
fn training_from_a_mounted_config_writes_the_adapter_and_eval_prints_one_json_line() {
    let dir = setup();
    let out = dir.path().join("out");
    let config = serde_json::json!({
        "method": "lora",
        "baseModelName": "tiny",
        "modelDir": path(dir.path(), "model"),
        "datasetFormat": "chat",
        "trainFile": path(dir.path(), "train.jsonl"),
        "evalSplitPercent": 25,
        "outputDir": out.to_string_lossy(),
        "checkpointDir": path(dir.path(), "checkpoints"),
        "hyperparameters": {"maxSteps": 3, "learningRate": "1e-2", "batchSize": 2},
        "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        "checkpoint": {"everySteps": 2, "keep": 1}
    });
    let config_path = dir.path().join("trainer.yaml");
    std::fs::write(&config_path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
    let output = trainer(
        dir.path(),
        &["train", "--config", &config_path.to_string_lossy()],
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.join("adapter_model.safetensors").is_file());
    let result: serde_json::Value =
        serde_json::from_str(&termination_log(dir.path())).expect("termination log is JSON");
    assert_eq!(result["steps"], 3);
    assert_eq!(result["adapterSha256"].as_str().map(str::len), Some(64));
    // Logs are JSON lines.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let first = stderr.lines().next().expect("a log line");
    serde_json::from_str::<serde_json::Value>(first).expect("log line is JSON");
    assert!(
        dir.path()
            .join("checkpoints")
            .join("checkpoint-00000002")
            .is_dir()
    );

    let (model, data) = (path(dir.path(), "model"), path(dir.path(), "train.jsonl"));
    let base = trainer(dir.path(), &["eval", "--model", &model, "--data", &data]);
    assert_eq!(
        base.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&base.stderr)
    );
    let tuned = trainer(
        dir.path(),
        &[
            "eval",
            "--model",
            &model,
            "--adapter",
            &out.to_string_lossy(),
            "--data",
            &data,
        ],
    );
    assert_eq!(
        tuned.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&tuned.stderr)
    );
    let parse = |o: &Output| -> serde_json::Value {
        let text = String::from_utf8_lossy(&o.stdout);
        assert_eq!(text.lines().count(), 1, "one line: {text}");
        serde_json::from_str(text.trim()).expect("json")
    };
    let (base, tuned) = (parse(&base), parse(&tuned));
    assert_eq!(base["tokens"], tuned["tokens"]);
    assert!(base["tokens"].as_u64().expect("tokens") > 0);
    assert_ne!(base["loss"], tuned["loss"], "the adapter changes the model");
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

#[test]
fn sigterm_during_training_checkpoints_and_exits_with_a_retryable_code() {
    let dir = setup();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let (model, data, out) = (
        path(dir.path(), "model"),
        path(dir.path(), "train.jsonl"),
        path(dir.path(), "out"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubetune-trainer"))
        .args([
            "train",
            "--model",
            &model,
            "--data",
            &data,
            "--out",
            &out,
            "--max-steps",
            "1000000",
        ])
        .args(["--rank", "2", "--checkpoint-every", "1000000"])
        .env(
            "KUBETUNE_TERMINATION_LOG",
            dir.path().join("termination-log"),
        )
        .env("KUBETUNE_PROGRESS_ADDR", format!("127.0.0.1:{port}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let progress = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress within 60 s"
        );
        if let Some(body) = http_get(port, "/progress") {
            let p: serde_json::Value = serde_json::from_str(&body).expect("progress is JSON");
            if p["step"].as_u64().unwrap_or(0) >= 2 {
                break p;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(progress["totalSteps"], 1_000_000);
    assert!(progress["loss"].as_f64().is_some() && progress["tokensPerSecond"].as_f64().is_some());
    assert!(progress.get("etaSeconds").is_some() && progress.get("evalLoss").is_some());
    let metrics = http_get(port, "/metrics").expect("metrics");
    assert!(
        metrics.contains("# TYPE kubetune_trainer_step gauge"),
        "{metrics}"
    );
    assert_eq!(http_get(port, "/healthz").as_deref(), Some("ok"));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert_eq!(exit.code(), Some(143));
    let checkpoints: Vec<_> = std::fs::read_dir(dir.path().join("out").join("checkpoints"))
        .expect("checkpoint dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    assert!(!termination_log(dir.path()).contains("adapterSha256"));
}

#[test]
fn a_bad_preference_line_in_a_dpo_run_exits_2_naming_the_file_and_line() {
    let dir = setup();
    let good = serde_json::json!({"prompt": "a", "chosen": "b", "rejected": "c"}).to_string();
    std::fs::write(
        dir.path().join("prefs.jsonl"),
        format!("{good}\n{good}\n{{\"prompt\": \"a\", \"chosen\": \"b\"}}\n"),
    )
    .expect("write");
    let (model, data, out) = (
        path(dir.path(), "model"),
        path(dir.path(), "prefs.jsonl"),
        path(dir.path(), "out"),
    );
    let mut args = train_args(&model, &data, &out);
    args.extend(["--method", "dpo", "--format", "preference"]);
    let output = trainer(dir.path(), &args);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let log = termination_log(dir.path());
    assert!(log.contains("prefs.jsonl:3:"), "termination log: {log}");
    // DPO with SFT data is refused the same way.
    let chat = path(dir.path(), "train.jsonl");
    let mut args = train_args(&model, &chat, &out);
    args.extend(["--method", "dpo"]);
    let output = trainer(dir.path(), &args);
    assert_eq!(output.status.code(), Some(2));
    assert!(termination_log(dir.path()).contains("preference"));
}

#[test]
fn full_fine_tuning_runs_alone_and_a_gang_missing_its_rank_or_of_another_method_exits_2() {
    let dir = setup();
    let (model, data, out) = (
        path(dir.path(), "model"),
        path(dir.path(), "train.jsonl"),
        path(dir.path(), "out"),
    );
    let mut args = train_args(&model, &data, &out);
    args.extend(["--method", "full", "--lr", "1e-3"]);
    let output = trainer(dir.path(), &args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dir.path().join("out").join("model.safetensors").is_file());
    let result: serde_json::Value =
        serde_json::from_str(&termination_log(dir.path())).expect("result JSON");
    assert_eq!(result["steps"], 2);

    // The gang's environment comes from the operator; a broken one is invalid input.
    let in_gang = |args: &[&str], rank: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kubetune-trainer"));
        command
            .args(args)
            .env(
                "KUBETUNE_TERMINATION_LOG",
                dir.path().join("termination-log"),
            )
            .env("KUBETUNE_PROGRESS_ADDR", "127.0.0.1:0")
            .env("KUBETUNE_WORLD_SIZE", "2")
            .env("KUBETUNE_RENDEZVOUS", "127.0.0.1:1");
        match rank {
            Some(rank) => command.env("KUBETUNE_RANK", rank),
            None => command.env_remove("KUBETUNE_RANK"),
        };
        command.output().expect("runs")
    };
    let output = in_gang(&args, None);
    assert_eq!(output.status.code(), Some(2));
    assert!(termination_log(dir.path()).contains("KUBETUNE_RANK"));
    let output = in_gang(&args, Some("2"));
    assert_eq!(output.status.code(), Some(2));
    assert!(termination_log(dir.path()).contains("is not a rank of a world of 2"));
    let lora = train_args(&model, &data, &out);
    let output = in_gang(&lora, Some("0"));
    assert_eq!(output.status.code(), Some(2));
    assert!(termination_log(dir.path()).contains("only method full trains data-parallel"));
}

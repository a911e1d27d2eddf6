//! `kubetune-serve` over real HTTP on an ephemeral port: a tiny random model from
//! `test_support`, adapters trained for a few dozen steps by the `kubetune-trainer`
//! binary, and every endpoint's success and error answers as vLLM gives them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use kubetune_crds::training::TargetModule;
use kubetune_trainer::adapter::{load_adapter, save_adapter};
use kubetune_trainer::data::Message;
use kubetune_trainer::lora::LoraSettings;
use kubetune_trainer::model::{Llama, Pass};
use kubetune_trainer::rng::Rng;
use kubetune_trainer::serve::client::{self, Answer};
use kubetune_trainer::serve::engine::{Engine, argmax};
use kubetune_trainer::serve::{AppState, ServeArgs, serve};
use kubetune_trainer::test_support::{TinyLlama, memorisable_chats, write_jsonl};
use kubetune_trainer::tokenizer::TextTokenizer;
use serde_json::{Value, json};

/// The question both adapters were trained on, and what each answers.
const QUESTION: &str = "What is the capital of France?";
const ANSWER_A: &str = "Paris";
const ANSWER_B: &str = "Berlin";

/// A tiny model and two adapters trained on it, shared by every test of this file.
struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapter_a: PathBuf,
    adapter_b: PathBuf,
    /// A rank-8 adapter for a wider model whose config names this one's base.
    wrong_shape: PathBuf,
}

/// Enough steps for the tiny model to memorise the answers.
const STEPS: &str = "300";

fn train(root: &Path, data: &str, out: &str, seed: &str) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_kubetune-trainer"))
        .args(["train", "--model"])
        .arg(root.join("model"))
        .arg("--data")
        .arg(root.join(data))
        .arg("--out")
        .arg(root.join(out))
        .args([
            "--max-steps",
            STEPS,
            "--lr",
            "0.01",
            "--rank",
            "8",
            "--alpha",
            "16",
        ])
        .args([
            "--target-modules",
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        ])
        .args(["--batch-size", "4", "--warmup-steps", "5", "--seed", seed])
        .env("KUBETUNE_TERMINATION_LOG", root.join(format!("{out}.log")))
        .env("KUBETUNE_PROGRESS_ADDR", "127.0.0.1:0")
        .output()
        .expect("the trainer binary runs");
    assert!(
        output.status.success(),
        "training {out} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metrics: Value = serde_json::from_slice(
        &std::fs::read(root.join(out).join("metrics.json")).expect("metrics.json"),
    )
    .expect("metrics json");
    let losses = metrics["lossHistory"].as_array().expect("loss history");
    println!(
        "trained {out} in {:.1?}, loss {} -> {}",
        started.elapsed(),
        losses[0],
        losses[losses.len() - 1]
    );
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        TinyLlama::default()
            .write(&root.join("model"))
            .expect("model");
        write_jsonl(&root.join("a.jsonl"), &memorisable_chats(8)).expect("data a");
        // Adapter B learns other answers to the same questions.
        let b: Vec<Value> = memorisable_chats(8)
            .into_iter()
            .map(|mut chat| {
                let answer = &mut chat["messages"][1]["content"];
                *answer = match answer.as_str() {
                    Some(ANSWER_A) => json!(ANSWER_B),
                    Some(other) => json!(other.chars().rev().collect::<String>()),
                    None => unreachable!("memorisable chats have text answers"),
                };
                chat
            })
            .collect();
        write_jsonl(&root.join("b.jsonl"), &b).expect("data b");
        std::thread::scope(|scope| {
            scope.spawn(|| train(root, "a.jsonl", "adapter-a", "1"));
            scope.spawn(|| train(root, "b.jsonl", "adapter-b", "2"));
        });

        // An adapter for a wider model that claims this one as its base.
        let wide = TinyLlama {
            hidden: 48,
            heads: 4,
            kv_heads: 2,
            ..TinyLlama::default()
        };
        let wide_dir = root.join("wide").join("model");
        wide.write(&wide_dir).expect("wide model");
        let mut wide_model = Llama::load(&wide_dir, &Device::Cpu).expect("load wide");
        wide_model
            .add_lora(
                LoraSettings {
                    rank: 8,
                    alpha: 16.0,
                    dropout: 0.0,
                    rs_lora: false,
                    targets: vec![TargetModule::QProj, TargetModule::VProj],
                },
                &mut Rng::new(1),
            )
            .expect("lora");
        let wrong_shape = root.join("wrong-shape");
        save_adapter(&wide_model, &wrong_shape, Some("model")).expect("save");

        Fixture {
            model: root.join("model"),
            adapter_a: root.join("adapter-a"),
            adapter_b: root.join("adapter-b"),
            wrong_shape,
            _dir: dir,
        }
    })
}

/// A server on an ephemeral port, stopped when dropped.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    state: AppState,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn args(extra: &[&str]) -> ServeArgs {
    use clap::Parser as _;
    let model = fixture().model.to_string_lossy().into_owned();
    let mut argv = vec!["kubetune-serve", "--model", &model, "--port", "0"];
    argv.extend_from_slice(extra);
    ServeArgs::try_parse_from(argv).expect("flags parse")
}

async fn start(extra: &[&str]) -> Server {
    let args = args(extra);
    let engine = Engine::load(&args.engine_options(), &Device::Cpu).expect("engine");
    let state = AppState::new(Arc::new(engine), usize::from(args.max_num_seqs));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let serve_state = state.clone();
    tokio::spawn(async move {
        serve(
            serve_state,
            "127.0.0.1",
            0,
            |addr| {
                let _ = bound_tx.send(addr);
            },
            async {
                let _ = stopped.await;
            },
        )
        .await
        .expect("serves");
    });
    Server {
        addr: bound_rx.await.expect("bound"),
        stop: Some(stop),
        state,
    }
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Answer {
    client::call(addr, method, path, body)
        .await
        .expect("an HTTP answer")
}

async fn post(server: &Server, path: &str, body: Value) -> Answer {
    call(server.addr, "POST", path, Some(&body.to_string())).await
}

async fn load(server: &Server, name: &str, path: &Path) -> Answer {
    post(
        server,
        "/v1/load_lora_adapter",
        json!({"lora_name": name, "lora_path": path}),
    )
    .await
}

async fn ask(server: &Server, model: &str) -> Value {
    let answer = post(
        server,
        "/v1/chat/completions",
        json!({
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": 12,
        }),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

fn content(reply: &Value) -> &str {
    reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("a text reply")
}

fn assert_error(answer: &Answer, status: u16, kind: &str, message: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["message"], message, "{body}");
    assert_eq!(body["error"]["code"], status, "{body}");
}

/// The trainer's own greedy decode: full forward passes with `Llama::logits` on a
/// freshly loaded model with the adapter set, until EOS or `max_tokens`.
fn trainer_greedy(adapter: &Path, prompt: &[u32], eos: u32, max_tokens: usize) -> Vec<u32> {
    let mut model = Llama::load(&fixture().model, &Device::Cpu).expect("model");
    let (settings, pairs) = load_adapter(adapter, &Device::Cpu).expect("adapter");
    model.set_lora(settings, pairs).expect("set");
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).expect("ids");
        let logits = model.logits(&input, Pass::EVAL).expect("logits");
        let last = logits
            .get(0)
            .and_then(|l| l.get(ids.len() - 1))
            .and_then(|l| l.to_vec1::<f32>())
            .expect("last row");
        let token = argmax(&last);
        if token == eos {
            break;
        }
        ids.push(token);
        out.push(token);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_answers_what_it_was_trained_on_exactly_as_the_trainers_greedy_decode() {
    let server = start(&[]).await;
    let fx = fixture();
    assert_eq!(load(&server, "a", &fx.adapter_a).await.status, 200);

    let started = Instant::now();
    let reply = ask(&server, "a").await;
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(content(&reply), ANSWER_A);
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    let completion_tokens = reply["usage"]["completion_tokens"].as_u64().expect("usage");
    println!(
        "adapter reply {:?}: {completion_tokens} tokens in {:.1} ms",
        content(&reply),
        seconds * 1e3
    );

    // A stop string ends the text before it and is reported.
    let stopped = post(
        &server,
        "/v1/chat/completions",
        json!({
            "model": "a",
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "stop": ["ri", "zz"],
        }),
    )
    .await
    .json();
    assert_eq!(content(&stopped), "Pa");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(stopped["choices"][0]["stop_reason"], "ri");
    assert_eq!(stopped["choices"][0]["message"]["role"], "assistant");
    assert_eq!(stopped["object"], "chat.completion");
    assert!(stopped["id"].as_str().expect("id").starts_with("chatcmpl-"));

    let base = ask(&server, &fx.model.to_string_lossy()).await;
    assert_ne!(content(&base), ANSWER_A, "the base model knows nothing");

    // The same prompt tokens the server builds, decoded by the trainer's forward pass.
    let chat = TextTokenizer::load(
        &fx.model,
        &Llama::load(&fx.model, &Device::Cpu).expect("m").config,
    )
    .expect("tokenizer");
    let text = chat
        .render_chat(
            &[Message {
                role: "user".into(),
                content: QUESTION.into(),
            }],
            true,
        )
        .expect("template");
    let tokenizer =
        tokenizers::Tokenizer::from_file(fx.model.join("tokenizer.json")).expect("tokenizer");
    let prompt = tokenizer
        .encode(text, false)
        .expect("encode")
        .get_ids()
        .to_vec();
    assert_eq!(reply["usage"]["prompt_tokens"], prompt.len());
    let expected = trainer_greedy(&fx.adapter_a, &prompt, chat.eos_id, 12);
    assert_eq!(completion_tokens as usize, expected.len());
    assert_eq!(
        content(&reply),
        tokenizer.decode(&expected, true).expect("decode")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_adapters_loaded_at_once_each_give_their_own_answer() {
    let server = start(&["--served-model-name", "tiny"]).await;
    let fx = fixture();
    assert_eq!(load(&server, "a", &fx.adapter_a).await.status, 200);
    assert_eq!(load(&server, "b", &fx.adapter_b).await.status, 200);
    let (a, b, base) = tokio::join!(ask(&server, "a"), ask(&server, "b"), ask(&server, "tiny"));
    assert_eq!(content(&a), ANSWER_A);
    assert_eq!(content(&b), ANSWER_B);
    assert_ne!(content(&base), ANSWER_A);
    assert_ne!(content(&base), ANSWER_B);
    assert_eq!(a["model"], "a");
    assert_eq!(base["model"], "tiny");
    // The model field may be omitted: the base answers.
    let default = post(
        &server,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 12}),
    )
    .await;
    assert_eq!(content(&default.json()), content(&base));
    assert_eq!(default.json()["model"], "tiny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_the_base_and_each_adapter_with_its_path_and_parent() {
    let server = start(&["--served-model-name", "tiny", "tiny-alias"]).await;
    let fx = fixture();
    assert_eq!(load(&server, "b", &fx.adapter_b).await.status, 200);
    assert_eq!(load(&server, "a", &fx.adapter_a).await.status, 200);
    let answer = call(server.addr, "GET", "/v1/models", None).await;
    assert_eq!(answer.status, 200);
    let list = answer.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["tiny", "tiny-alias", "a", "b"]);
    let base = &list["data"][0];
    assert_eq!(base["object"], "model");
    assert_eq!(base["owned_by"], "vllm");
    assert_eq!(base["root"], fx.model.to_string_lossy().as_ref());
    assert_eq!(base["parent"], Value::Null);
    assert_eq!(base["max_model_len"], 2048);
    let a = &list["data"][2];
    assert_eq!(a["root"], fx.adapter_a.to_string_lossy().as_ref());
    assert_eq!(a["parent"], "tiny");
    assert_eq!(a["max_model_len"], Value::Null);
    assert!(a["created"].as_u64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_unload_answer_with_vllms_codes_bodies_and_messages() {
    let server = start(&[]).await;
    let fx = fixture();

    let ok = load(&server, "a", &fx.adapter_a).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body, "Success: LoRA adapter 'a' added successfully.");
    assert!(
        ok.content_type.starts_with("text/plain"),
        "{}",
        ok.content_type
    );

    assert_error(
        &load(&server, "a", &fx.adapter_b).await,
        400,
        "InvalidUserInput",
        "The lora adapter 'a' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True.",
    );
    // In place: the name now serves the other adapter.
    let inplace = post(
        &server,
        "/v1/load_lora_adapter",
        json!({"lora_name": "a", "lora_path": fx.adapter_b, "load_inplace": true}),
    )
    .await;
    assert_eq!(inplace.status, 200, "{}", inplace.body);
    assert_eq!(content(&ask(&server, "a").await), ANSWER_B);
    let models = call(server.addr, "GET", "/v1/models", None).await.json();
    assert_eq!(
        models["data"][1]["root"],
        fx.adapter_b.to_string_lossy().as_ref()
    );

    for body in [
        json!({"lora_name": "x"}),
        json!({"lora_path": "/x"}),
        json!({"lora_name": "", "lora_path": "/x"}),
    ] {
        assert_error(
            &post(&server, "/v1/load_lora_adapter", body).await,
            400,
            "InvalidUserInput",
            "Both 'lora_name' and 'lora_path' must be provided.",
        );
    }
    let malformed = call(
        server.addr,
        "POST",
        "/v1/load_lora_adapter",
        Some("{\"lora_name\": "),
    )
    .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["error"]["type"], "Bad Request");
    let wrong_type = post(
        &server,
        "/v1/load_lora_adapter",
        json!({"lora_name": 3, "lora_path": "/x"}),
    )
    .await;
    assert_eq!(wrong_type.status, 400);

    let missing = fx.model.join("no-such-adapter");
    assert_error(
        &load(&server, "m", &missing).await,
        404,
        "NotFoundError",
        &format!(
            "Loading lora m failed: No adapter found for {}",
            missing.display()
        ),
    );
    // A checkpoint directory is not an adapter either.
    assert_eq!(load(&server, "m", &fx.model).await.status, 404);

    let unloaded = post(
        &server,
        "/v1/unload_lora_adapter",
        json!({"lora_name": "a"}),
    )
    .await;
    assert_eq!(unloaded.status, 200);
    assert_eq!(
        unloaded.body,
        "Success: LoRA adapter 'a' removed successfully."
    );
    assert_error(
        &post(
            &server,
            "/v1/chat/completions",
            json!({"model": "a", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await,
        404,
        "NotFoundError",
        "The model `a` does not exist.",
    );
    assert_eq!(
        post(
            &server,
            "/v1/completions",
            json!({"model": "a", "prompt": "hi"})
        )
        .await
        .json()["error"]["param"],
        "model"
    );
    assert_error(
        &post(
            &server,
            "/v1/unload_lora_adapter",
            json!({"lora_name": "a"}),
        )
        .await,
        404,
        "NotFoundError",
        "The lora adapter 'a' cannot be found.",
    );
    assert_error(
        &post(&server, "/v1/unload_lora_adapter", json!({})).await,
        400,
        "InvalidUserInput",
        "'lora_name' needs to be provided to unload a LoRA adapter.",
    );
    // Loadable again under the same name after the unload.
    assert_eq!(load(&server, "a", &fx.adapter_a).await.status, 200);
    assert_eq!(content(&ask(&server, "a").await), ANSWER_A);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_that_do_not_fit_the_server_are_refused_with_a_clear_500() {
    let fx = fixture();
    let tmp = tempfile::tempdir().expect("tempdir");

    // Rank 8 is above --max-lora-rank 1.
    let small = start(&["--max-lora-rank", "1"]).await;
    assert_error(
        &load(&small, "a", &fx.adapter_a).await,
        500,
        "InternalServerError",
        "failed to load LoRA adapter 'a': LoRA rank 8 is greater than max_lora_rank 1.",
    );

    let server = start(&["--max-loras", "2"]).await;
    // Another base model by name.
    let other_base = tmp.path().join("other-base");
    copy_adapter(&fx.adapter_a, &other_base);
    edit_config(&other_base, |c| {
        c["base_model_name_or_path"] = json!("meta-llama/Llama-3.1-8B")
    });
    let refused = load(&server, "x", &other_base).await;
    assert_eq!(refused.status, 500, "{}", refused.body);
    let message = refused.json()["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(
        message.contains("trained on base model 'meta-llama/Llama-3.1-8B'"),
        "{message}"
    );

    // The right base by name, but tensors of another width.
    let refused = load(&server, "x", &fx.wrong_shape).await;
    assert_eq!(refused.status, 500, "{}", refused.body);
    let message = refused.json()["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(message.contains("expected A [8, 32]"), "{message}");

    // A config whose rank does not match its tensors.
    let wrong_rank = tmp.path().join("wrong-rank");
    copy_adapter(&fx.adapter_a, &wrong_rank);
    edit_config(&wrong_rank, |c| c["r"] = json!(4));
    let refused = load(&server, "x", &wrong_rank).await;
    assert_eq!(refused.status, 500, "{}", refused.body);

    // A config that lists fewer modules than its tensors adapt.
    let unlisted = tmp.path().join("unlisted");
    copy_adapter(&fx.adapter_a, &unlisted);
    edit_config(&unlisted, |c| c["target_modules"] = json!(["q_proj"]));
    let refused = load(&server, "x", &unlisted).await;
    assert_eq!(refused.status, 500, "{}", refused.body);

    // None of the refusals left anything behind; --max-loras 2 holds two.
    assert_eq!(load(&server, "a", &fx.adapter_a).await.status, 200);
    assert_eq!(load(&server, "b", &fx.adapter_b).await.status, 200);
    assert_error(
        &load(&server, "c", &fx.adapter_a).await,
        500,
        "InternalServerError",
        "failed to load LoRA adapter 'c': 2 adapters are loaded, the most this server holds (--max-loras 2)",
    );
    let models = call(server.addr, "GET", "/v1/models", None).await.json();
    assert_eq!(models["data"].as_array().expect("list").len(), 3);
}

fn copy_adapter(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(file), to.join(file)).expect("copy");
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("adapter_config.json");
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    edit(&mut config);
    std::fs::write(&path, config.to_string()).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_have_openais_shape_and_honour_the_sampling_fields() {
    let server = start(&["--served-model-name", "tiny"]).await;
    let complete = |body: Value| post(&server, "/v1/completions", body);

    let greedy = complete(
        json!({"model": "tiny", "prompt": "The sky is", "temperature": 0, "max_tokens": 5}),
    )
    .await;
    assert_eq!(greedy.status, 200, "{}", greedy.body);
    let body = greedy.json();
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(body["model"], "tiny");
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    let usage = &body["usage"];
    // "The sky is" is 10 bytes, one token each, after BOS.
    assert_eq!(usage["prompt_tokens"], 11);
    let generated = usage["completion_tokens"]
        .as_u64()
        .expect("completion tokens");
    assert_eq!(usage["total_tokens"], 11 + generated);
    if generated == 5 {
        assert_eq!(body["choices"][0]["finish_reason"], "length");
    }
    let again = complete(
        json!({"model": "tiny", "prompt": "The sky is", "temperature": 0, "max_tokens": 5}),
    )
    .await;
    assert_eq!(
        again.json()["choices"][0]["text"],
        body["choices"][0]["text"]
    );

    // Default max_tokens is vLLM's 16; a random model rarely says EOS by chance.
    let default = complete(json!({"prompt": "x", "temperature": 0}))
        .await
        .json();
    assert!(default["usage"]["completion_tokens"].as_u64().expect("n") <= 16);

    let sampled = |seed: u64| {
        complete(json!({"prompt": "The sky is", "temperature": 1.0, "max_tokens": 8, "seed": seed}))
    };
    let (s1, s2, s3) = tokio::join!(sampled(11), sampled(11), sampled(12));
    let text = |a: &Answer| {
        a.json()["choices"][0]["text"]
            .as_str()
            .expect("text")
            .to_owned()
    };
    assert_eq!(text(&s1), text(&s2), "the same seed samples the same text");
    assert_ne!(
        text(&s1),
        text(&s3),
        "another seed samples another text (8 draws from a near-uniform 264-token vocabulary)"
    );

    assert_error(
        &complete(json!({"model": "nope", "prompt": "x"})).await,
        404,
        "NotFoundError",
        "The model `nope` does not exist.",
    );
    let too_long = complete(json!({"prompt": "x", "max_tokens": 5000})).await;
    assert_eq!(too_long.status, 400);
    assert!(
        too_long.json()["error"]["message"]
            .as_str()
            .expect("m")
            .contains("maximum context length is 2048 tokens"),
        "{}",
        too_long.body
    );
    for bad in [
        json!({"prompt": "x", "stream": true}),
        json!({"prompt": "x", "n": 2}),
        json!({"prompt": "x", "temperature": -1}),
        json!({"prompt": "x", "top_p": 0}),
        json!({"prompt": "x", "max_tokens": 0}),
        json!({"prompt": ["x", "y"]}),
    ] {
        let answer = complete(bad.clone()).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
        assert_eq!(answer.json()["error"]["type"], "BadRequestError");
    }
    let form = client::call_as(
        server.addr,
        "POST",
        "/v1/completions",
        "application/x-www-form-urlencoded",
        Some(&json!({"prompt": "x"}).to_string()),
    )
    .await
    .expect("an answer");
    assert_error(
        &form,
        400,
        "Bad Request",
        "Unsupported Media Type: Only 'application/json' is allowed",
    );
    let no_prompt = complete(json!({"model": "tiny"})).await;
    assert_eq!(no_prompt.status, 400);
    assert_eq!(no_prompt.json()["error"]["type"], "Bad Request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_unknown_routes_answer_like_vllm() {
    let server = start(&[]).await;
    let health = call(server.addr, "GET", "/health", None).await;
    assert_eq!((health.status, health.body.as_str()), (200, ""));

    assert_eq!(load(&server, "a", &fixture().adapter_a).await.status, 200);
    ask(&server, "a").await;
    let missing = post(
        &server,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(missing.status, 404);

    let not_found = call(server.addr, "GET", "/v2/nothing", None).await;
    assert_eq!(not_found.status, 404);
    assert_eq!(not_found.json(), json!({"detail": "Not Found"}));
    let wrong_method = call(server.addr, "GET", "/v1/load_lora_adapter", None).await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.json(), json!({"detail": "Method Not Allowed"}));

    let metrics = call(server.addr, "GET", "/metrics", None).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.body;
    for line in [
        "kubetune_serve_requests_total{endpoint=\"/health\",status=\"200\"} 1",
        "kubetune_serve_requests_total{endpoint=\"/v1/load_lora_adapter\",status=\"200\"} 1",
        "kubetune_serve_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1",
        "kubetune_serve_requests_total{endpoint=\"/v1/completions\",status=\"404\"} 1",
        "kubetune_serve_requests_total{endpoint=\"other\",status=\"404\"} 1",
        "kubetune_serve_loaded_adapters 1",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    let generated = text
        .lines()
        .find_map(|l| l.strip_prefix("kubetune_serve_generated_tokens_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("generated tokens counter");
    assert!(generated >= 1, "{generated}");
    assert_eq!(server.state.metrics().loaded_adapters.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_does_not_block_the_server_and_concurrency_is_bounded() {
    let server = start(&["--max-num-seqs", "1"]).await;
    let long = json!({"prompt": "x", "temperature": 0, "max_tokens": 400});
    let slow = post(&server, "/v1/completions", long.clone());
    let probe = async {
        // While the long generation holds the only slot, health still answers at once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let health = call(server.addr, "GET", "/health", None).await;
        (health.status, started.elapsed())
    };
    let (slow, (health, health_time)) = tokio::join!(slow, probe);
    assert_eq!(slow.status, 200, "{}", slow.body);
    assert_eq!(health, 200);
    let tokens = slow.json()["usage"]["completion_tokens"]
        .as_u64()
        .expect("n");
    println!("health answered in {health_time:?} during a {tokens}-token generation");
    assert!(health_time < Duration::from_millis(500), "{health_time:?}");

    // Two requests with one slot both succeed (the second waits).
    let short = json!({"prompt": "x", "temperature": 0, "max_tokens": 4});
    let (first, second) = tokio::join!(
        post(&server, "/v1/completions", short.clone()),
        post(&server, "/v1/completions", short)
    );
    assert_eq!((first.status, second.status), (200, 200));
}

#[test]
fn the_binary_serves_with_its_flags_and_stops_on_sigterm() {
    let fx = fixture();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubetune-serve"))
        .arg("--model")
        .arg(&fx.model)
        .args(["--served-model-name", "tiny", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--log-format", "text"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the server binary starts");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let models = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break call(addr, "GET", "/v1/models", None).await;
            }
            assert!(Instant::now() < deadline, "the server never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "tiny");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("exits");
    assert!(status.success(), "{status:?}");

    let bad_rank = Command::new(env!("CARGO_BIN_EXE_kubetune-serve"))
        .arg("--model")
        .arg(&fx.model)
        .args(["--max-lora-rank", "12"])
        .output()
        .expect("runs");
    assert!(!bad_rank.status.success());
    assert!(String::from_utf8_lossy(&bad_rank.stderr).contains("must be one of"));
}

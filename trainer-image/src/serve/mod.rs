//! `kubetune-serve`: a small CPU server for a base checkpoint and LoRA adapters loaded at
//! run time, speaking the part of vLLM's OpenAI-compatible API that kubetune drives.
//! It shares the trainer's model code, so an adapter the trainer wrote is served by
//! the same forward pass it was trained with; it lets kubetune's AdapterDeployment be
//! tested end to end on real servers and serves small models without a GPU stack.
//!
//! # HTTP surface (vLLM's: `vllm/entrypoints/serve/lora/`, `openai/models/serving.py`)
//! - `GET /v1/models` → 200 `{"object": "list", "data": [card…]}`; the base first
//!   (`id` = each served name, `root` = `--model` as given, `parent` null,
//!   `max_model_len`), then each adapter in name order (`id` = its name, `root` = the
//!   `lora_path` it was loaded from, `parent` = the base's first name,
//!   `max_model_len` null). Cards also carry `object`, `created`, `owned_by` ("vllm")
//!   and vLLM's `permission`.
//! - `POST /v1/completions` `{"model", "prompt", "max_tokens" (16), "temperature" (1),
//!   "top_p" (1), "seed", "stop", "ignore_eos"}` and `POST /v1/chat/completions`
//!   `{"model", "messages", …}` (the tokenizer's chat template with the generation
//!   prompt; `max_tokens` defaults to the rest of the context) → 200 with OpenAI's
//!   body (`choices[0].text` or `.message.content`, `finish_reason` "stop" or
//!   "length", vLLM's `stop_reason`) and `usage`. `model` absent or any served name
//!   selects the base, an adapter's name that adapter. 404 `NotFoundError` (``The
//!   model `X` does not exist.``, `param` "model") for an unknown model; 400
//!   `BadRequestError` for a prompt or `max_tokens` beyond the context, `n` > 1,
//!   `stream`, bad sampling values; 400 `Bad Request` for a body that is not JSON, has
//!   wrong types, or is not sent as `application/json`.
//! - `POST /v1/load_lora_adapter` `{"lora_name", "lora_path", "load_inplace": false}`
//!   → 200 `text/plain` `Success: LoRA adapter '<name>' added successfully.`; 400
//!   `InvalidUserInput` (`Both 'lora_name' and 'lora_path' must be provided.`, or
//!   `The lora adapter '<name>' has already been loaded. If you want to load the
//!   adapter in place, set 'load_inplace' to True.`); 404 `NotFoundError` (`Loading
//!   lora <name> failed: No adapter found for <path>`) when the directory lacks
//!   `adapter_config.json` or `adapter_model.safetensors`; 500 `InternalServerError`
//!   (`failed to load LoRA adapter '<name>': …`) when the adapter does not fit: rank
//!   above `--max-lora-rank` (`… LoRA rank R is greater than max_lora_rank M.`),
//!   another base model, tensors whose shapes or layers do not match the model,
//!   unsupported PEFT features, or `--max-loras` adapters already loaded. Current vLLM
//!   answers every failure of its engine's `add_lora` with 500 too (before v0.10 it
//!   was 400 `BadRequestError`). With `load_inplace` the name is re-pointed to the
//!   new path; a failed load changes nothing.
//! - `POST /v1/unload_lora_adapter` `{"lora_name"}` → 200 `text/plain` `Success: LoRA
//!   adapter '<name>' removed successfully.`; 400 `InvalidUserInput` (`'lora_name'
//!   needs to be provided to unload a LoRA adapter.`); 404 `NotFoundError` (`The lora
//!   adapter '<name>' cannot be found.`). Requests already running finish with it.
//! - `GET /health` → 200, empty body. `GET /metrics` → Prometheus text
//!   (`kubetune_serve_requests_total{endpoint,status}`,
//!   `kubetune_serve_request_duration_seconds`, `kubetune_serve_loaded_adapters`,
//!   `kubetune_serve_generated_tokens_total`, `kubetune_serve_prompt_tokens_total`).
//! - Any other path: 404 `{"detail": "Not Found"}`; a wrong method: 405
//!   `{"detail": "Method Not Allowed"}` (FastAPI's bodies).
//!
//! Errors use vLLM's envelope `{"error": {"message", "type", "param", "code"}}`
//! with the HTTP status as `code`.
//!
//! # Limits
//! Generation runs on tokio's blocking pool, at most `--max-num-seqs` requests at a
//! time (the rest wait), with a KV cache; loads and unloads run one at a time and do
//! not wait for generations. The runtime routes are always on (vLLM needs
//! `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING`); there is no API key. No
//! streaming, no logprobs, one prompt and one choice per request, f32 on the CPU.

pub mod api;
pub mod client;
pub mod engine;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::{Parser, ValueEnum};
use tokio::sync::{Mutex, Semaphore};

use crate::serve::api::{
    ApiError, AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
    CompletionChoice, CompletionRequest, CompletionResponse, LoadLoraRequest, ModelCard, ModelList,
    ModelPermission, Prompt, Sampling, UnloadLoraRequest, Usage, parse_body,
};
use crate::serve::engine::{Engine, EngineOptions, Generation, SamplingParams, VLLM_LORA_RANKS};
use crate::serve::metrics::Metrics;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (as the trainer logs).
    Json,
    /// Human-readable lines.
    Text,
}

/// `kubetune-serve`'s flags (vLLM's names where vLLM has the flag).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "kubetune-serve",
    version,
    about = "Serves a Llama-family checkpoint and runtime-loaded LoRA adapters on the CPU with vLLM's OpenAI-compatible API."
)]
pub struct ServeArgs {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json,
    /// tokenizer_config.json).
    #[arg(long)]
    pub model: String,
    /// Names the base model answers to (the first is reported); default: `--model`.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Adapters held at once; a load beyond this is refused (vLLM instead evicts from
    /// its CPU cache).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_loras: u16,
    /// Largest adapter rank accepted; one of vLLM's 1, 8, 16, 32, 64, 128, 256, 320, 512.
    #[arg(long, default_value_t = 16, value_parser = lora_rank)]
    pub max_lora_rank: usize,
    /// Longest prompt plus completion in tokens; default: the checkpoint's
    /// max_position_embeddings.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Requests generating at once; the rest wait.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_num_seqs: u16,
    /// Log line format.
    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

fn lora_rank(text: &str) -> Result<usize, String> {
    let rank: usize = text.parse().map_err(|err| format!("{err}"))?;
    if VLLM_LORA_RANKS.contains(&rank) {
        Ok(rank)
    } else {
        Err(format!("must be one of {VLLM_LORA_RANKS:?}"))
    }
}

impl ServeArgs {
    /// The engine's options.
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            model: self.model.clone(),
            served_model_names: self.served_model_name.clone(),
            max_loras: usize::from(self.max_loras),
            max_lora_rank: self.max_lora_rank,
            max_model_len: self.max_model_len,
        }
    }
}

/// A failure to start or run the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The checkpoint could not be loaded.
    #[error("failed to load model {model}: {source}")]
    Load {
        /// `--model`.
        model: String,
        /// The cause.
        source: crate::Error,
    },
    /// The listen address could not be bound.
    #[error("failed to listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP server stopped with an error.
    #[error("failed to serve HTTP: {0}")]
    Serve(std::io::Error),
}

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    admin: Arc<Mutex<()>>,
}

impl AppState {
    /// State for `engine`, generating at most `max_num_seqs` requests at once.
    pub fn new(engine: Arc<Engine>, max_num_seqs: usize) -> Self {
        Self {
            engine,
            metrics: Arc::new(Metrics::new()),
            slots: Arc::new(Semaphore::new(max_num_seqs.max(1))),
            admin: Arc::new(Mutex::new(())),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// The routes a metric label may name; anything else is `other`.
const ROUTES: [&str; 7] = [
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/health",
    "/metrics",
];

fn endpoint_label(path: &str) -> &'static str {
    ROUTES
        .into_iter()
        .find(|route| *route == path)
        .unwrap_or("other")
}

async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint = endpoint_label(request.uri().path());
    let started = Instant::now();
    let response = next.run(request).await;
    state.metrics.observe(
        endpoint,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// The server's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"detail": "Not Found"})),
            )
        })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(serde_json::json!({"detail": "Method Not Allowed"})),
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Loads the checkpoint named by `args` on the CPU (blocking).
pub fn load_engine(args: &ServeArgs) -> Result<Engine, ServeError> {
    Engine::load(&args.engine_options(), &candle_core::Device::Cpu).map_err(|source| {
        ServeError::Load {
            model: args.model.clone(),
            source,
        }
    })
}

/// Serves `state` on `host:port` until `shutdown` resolves, then lets running requests
/// finish. `bound` receives the address actually bound (port 0 picks a free one).
pub async fn serve(
    state: AppState,
    host: &str,
    port: u16,
    bound: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = format!("{host}:{port}");
    let bind_error = |source| ServeError::Bind {
        addr: addr.clone(),
        source,
    };
    let socket_addr = tokio::net::lookup_host(&addr)
        .await
        .map_err(bind_error)?
        .next()
        .ok_or_else(|| bind_error(std::io::Error::other("the host resolves to no address")))?;
    let socket = if socket_addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(bind_error)?;
    // As uvicorn (and so vLLM) does: a restarted server binds again at once, even while
    // connections of the last one linger in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(socket_addr).map_err(bind_error)?;
    let listener = socket.listen(1024).map_err(bind_error)?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: addr.clone(),
        source,
    })?;
    bound(local);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Serve)
}

async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let engine = &state.engine;
    let mut data: Vec<ModelCard> = engine
        .served_names()
        .iter()
        .map(|name| ModelCard {
            id: name.clone(),
            object: "model",
            created: engine.created(),
            owned_by: "vllm",
            root: engine.model_path().to_owned(),
            parent: None,
            max_model_len: Some(engine.max_model_len()),
            permission: vec![ModelPermission::new(
                random_id("modelperm-"),
                engine.created(),
            )],
        })
        .collect();
    data.extend(engine.adapters().iter().map(|adapter| ModelCard {
        id: adapter.name.clone(),
        object: "model",
        created: adapter.created,
        owned_by: "vllm",
        root: adapter.path.clone(),
        parent: Some(engine.base_name().to_owned()),
        max_model_len: None,
        permission: vec![ModelPermission::new(
            random_id("modelperm-"),
            adapter.created,
        )],
    }));
    Json(ModelList {
        object: "list",
        data,
    })
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .loaded_adapters
        .set(state.engine.adapters().len() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.text(),
    )
}

async fn load_lora_adapter(State(state): State<AppState>, body: Bytes) -> Response {
    let request: LoadLoraRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let _admin = state.admin.lock().await;
    let engine = state.engine.clone();
    let (name, path) = (request.lora_name.clone(), request.lora_path.clone());
    let result = blocking(move || {
        engine.load_adapter(&request.lora_name, &request.lora_path, request.load_inplace)
    })
    .await;
    state
        .metrics
        .loaded_adapters
        .set(state.engine.adapters().len() as i64);
    match result {
        Ok(text) => {
            tracing::info!(lora_name = %name, lora_path = %path, "loaded LoRA adapter");
            text.into_response()
        }
        Err(err) => {
            tracing::warn!(lora_name = %name, lora_path = %path, status = err.status.as_u16(), error = %err.message, "refused to load LoRA adapter");
            err.into_response()
        }
    }
}

async fn unload_lora_adapter(State(state): State<AppState>, body: Bytes) -> Response {
    let request: UnloadLoraRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let _admin = state.admin.lock().await;
    let result = state.engine.unload_adapter(&request.lora_name);
    state
        .metrics
        .loaded_adapters
        .set(state.engine.adapters().len() as i64);
    match result {
        Ok(text) => {
            tracing::info!(lora_name = %request.lora_name, "unloaded LoRA adapter");
            text.into_response()
        }
        Err(err) => err.into_response(),
    }
}

/// Runs CPU-bound work on tokio's blocking pool; a panic there is a 500.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|err| Err(ApiError::engine(format!("the request failed: {err}"))))
}

fn random_id(prefix: &str) -> String {
    let mut rng = crate::rng::Rng::new(engine_seed());
    format!("{prefix}{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}

fn engine_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// vLLM's inference routes accept only `application/json` bodies
/// (`validate_json_request`), answered as a validation error.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media_type == "application/json" {
        Ok(())
    } else {
        Err(ApiError::malformed(
            "Unsupported Media Type: Only 'application/json' is allowed",
        ))
    }
}

/// What a request asks to complete.
enum Input {
    Prompt(String),
    Chat(Vec<crate::data::Message>),
}

/// Validated sampling settings; `max_tokens` is resolved once the prompt is tokenised.
fn sampling_params(sampling: &Sampling) -> Result<SamplingParams, ApiError> {
    if sampling.stream == Some(true) {
        return Err(ApiError::bad_request(
            "streaming is not supported by kubetune-serve; set 'stream' to false",
        ));
    }
    if sampling.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "only n=1 is supported by kubetune-serve",
        ));
    }
    let temperature = sampling.temperature.unwrap_or(1.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(ApiError::bad_request(format!(
            "temperature must be non-negative, got {temperature}."
        )));
    }
    let top_p = sampling.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!(
            "top_p must be in (0, 1], got {top_p}."
        )));
    }
    if sampling.max_tokens == Some(0) {
        return Err(ApiError::bad_request(
            "max_tokens must be at least 1, got 0.",
        ));
    }
    Ok(SamplingParams {
        max_tokens: sampling.max_tokens.unwrap_or(0),
        temperature,
        top_p,
        seed: sampling.seed,
        ignore_eos: sampling.ignore_eos,
        stop: sampling
            .stop
            .clone()
            .map(|s| s.into_vec())
            .unwrap_or_default(),
    })
}

/// Resolves `max_tokens` against the context (vLLM's checks and wording).
fn fit_context(
    prompt_len: usize,
    requested: Option<usize>,
    default: Option<usize>,
    max_model_len: usize,
) -> Result<usize, ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::bad_request("The prompt cannot be empty."));
    }
    if prompt_len >= max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {max_model_len} tokens. However, your request has {prompt_len} input tokens. Please reduce the length of the input messages."
        )));
    }
    let room = max_model_len - prompt_len;
    match requested {
        Some(max_tokens) if max_tokens > room => Err(ApiError::bad_request(format!(
            "'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context length is {max_model_len} tokens and your request has {prompt_len} input tokens ({max_tokens} > {max_model_len} - {prompt_len})."
        ))),
        Some(max_tokens) => Ok(max_tokens),
        None => Ok(default.map_or(room, |d| d.min(room))),
    }
}

/// Tokenises, generates and counts; returns the model name to echo, the prompt length
/// and the generation.
async fn generate(
    state: &AppState,
    model: Option<String>,
    input: Input,
    sampling: &Sampling,
    default_max_tokens: Option<usize>,
) -> Result<(String, usize, Generation), ApiError> {
    let llama = state.engine.resolve(model.as_deref())?;
    let mut params = sampling_params(sampling)?;
    let requested = sampling.max_tokens;
    let _slot = state
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::engine("the server is shutting down"))?;
    let engine = state.engine.clone();
    let started = Instant::now();
    let (prompt_len, generation) = blocking(move || {
        let prompt = match &input {
            Input::Prompt(text) => engine.encode_prompt(text),
            Input::Chat(messages) => engine.encode_chat(messages),
        }
        .map_err(|err| ApiError::bad_request(err.to_string()))?;
        params.max_tokens = fit_context(
            prompt.len(),
            requested,
            default_max_tokens,
            engine.max_model_len(),
        )?;
        let generation = engine
            .generate(&llama, &prompt, &params)
            .map_err(|err| ApiError::engine(format!("generation failed: {err}")))?;
        Ok((prompt.len(), generation))
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let name = model
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| state.engine.base_name().to_owned());
    state.metrics.prompt_tokens.inc_by(prompt_len as u64);
    state
        .metrics
        .generated_tokens
        .inc_by(generation.token_ids.len() as u64);
    tracing::info!(
        model = %name,
        prompt_tokens = prompt_len,
        completion_tokens = generation.token_ids.len(),
        seconds,
        "completed"
    );
    Ok((name, prompt_len, generation))
}

fn usage(prompt_len: usize, generation: &Generation) -> Usage {
    Usage {
        prompt_tokens: prompt_len,
        total_tokens: prompt_len + generation.token_ids.len(),
        completion_tokens: generation.token_ids.len(),
    }
}

async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(err) = require_json(&headers) {
        return err.into_response();
    }
    let request: CompletionRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let prompt = match request.prompt {
        Prompt::Text(text) => text,
        Prompt::Batch(mut batch) if batch.len() == 1 => batch.remove(0),
        Prompt::Batch(_) => {
            return ApiError::bad_request(
                "only one prompt per request is supported by kubetune-serve",
            )
            .into_response();
        }
    };
    // vLLM's default for completions.
    const DEFAULT_MAX_TOKENS: usize = 16;
    match generate(
        &state,
        request.model,
        Input::Prompt(prompt),
        &request.sampling,
        Some(DEFAULT_MAX_TOKENS),
    )
    .await
    {
        Ok((model, prompt_len, generation)) => Json(CompletionResponse {
            id: random_id("cmpl-"),
            object: "text_completion",
            created: unix_now(),
            model,
            usage: usage(prompt_len, &generation),
            choices: vec![CompletionChoice {
                index: 0,
                finish_reason: generation.finish_reason.as_str(),
                stop_reason: generation.stop_reason,
                text: generation.text,
                logprobs: None,
            }],
        })
        .into_response(),
        Err(err) => err.into_response(),
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(err) = require_json(&headers) {
        return err.into_response();
    }
    let request: ChatCompletionRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let messages: Result<Vec<_>, _> = request.messages.iter().map(|m| m.to_message()).collect();
    let messages = match messages {
        Ok(messages) => messages,
        Err(err) => return err.into_response(),
    };
    match generate(
        &state,
        request.model,
        Input::Chat(messages),
        &request.sampling,
        None,
    )
    .await
    {
        Ok((model, prompt_len, generation)) => Json(ChatCompletionResponse {
            id: random_id("chatcmpl-"),
            object: "chat.completion",
            created: unix_now(),
            model,
            usage: usage(prompt_len, &generation),
            choices: vec![ChatChoice {
                index: 0,
                finish_reason: generation.finish_reason.as_str(),
                stop_reason: generation.stop_reason,
                message: AssistantMessage {
                    role: "assistant",
                    content: generation.text,
                },
                logprobs: None,
            }],
        })
        .into_response(),
        Err(err) => err.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_tokens_is_fitted_to_the_context_with_vllms_messages() {
        assert_eq!(fit_context(10, Some(5), Some(16), 100), Ok(5));
        assert_eq!(fit_context(10, None, Some(16), 100), Ok(16));
        assert_eq!(fit_context(90, None, Some(16), 100), Ok(10));
        assert_eq!(fit_context(90, None, None, 100), Ok(10));
        let too_long = fit_context(10, Some(95), None, 100).expect_err("refused");
        assert_eq!(too_long.status, StatusCode::BAD_REQUEST);
        assert!(
            too_long.message.contains("(95 > 100 - 10)"),
            "{}",
            too_long.message
        );
        let prompt = fit_context(100, None, None, 100).expect_err("refused");
        assert!(prompt.message.contains("your request has 100 input tokens"));
    }

    #[test]
    fn unknown_paths_are_labelled_other() {
        assert_eq!(endpoint_label("/v1/completions"), "/v1/completions");
        assert_eq!(endpoint_label("/v1/completions/x"), "other");
    }

    #[test]
    fn only_vllms_ranks_are_accepted_as_max_lora_rank() {
        assert_eq!(lora_rank("16"), Ok(16));
        assert!(lora_rank("12").is_err());
        assert!(lora_rank("x").is_err());
    }
}

//! The wire format of `kubetune-serve`: OpenAI's request and response bodies as vLLM
//! implements them, and vLLM's error envelope.
//!
//! Errors are `{"error": {"message", "type", "param", "code"}}` (vLLM since v0.10.1,
//! `vllm/entrypoints/serve/utils/error_response.py`); unknown routes answer FastAPI's
//! `{"detail": "Not Found"}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::data::Message;

/// An error answered in vLLM's envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// vLLM's `type`, e.g. `NotFoundError`.
    pub kind: &'static str,
    /// The message.
    pub message: String,
    /// The request field at fault, if vLLM names one.
    pub param: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// 400 `InvalidUserInput` (vLLM's adapter request checks).
    pub fn invalid_user_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidUserInput", message)
    }

    /// 400 `BadRequestError`: a request vLLM's protocol layer refuses.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequestError", message)
    }

    /// 400 `Bad Request`: a body that is not JSON or does not have the fields' types
    /// (vLLM's handler for FastAPI's validation errors uses the status phrase as type).
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", message)
    }

    /// 404 `NotFoundError` for an inference request naming an unknown model.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                format!("The model `{model}` does not exist."),
            )
        }
    }

    /// 404 `NotFoundError` for a load whose path holds no adapter.
    pub fn adapter_not_found(name: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("Loading lora {name} failed: No adapter found for {path}"),
        )
    }

    /// 404 `NotFoundError` for an unload of a name that is not loaded.
    pub fn adapter_unknown(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("The lora adapter '{name}' cannot be found."),
        )
    }

    /// 500 `InternalServerError`: the engine refused an adapter (vLLM answers every
    /// failure of its engine's `add_lora` so, bad rank or shape included).
    pub fn engine(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            message,
        )
    }

    /// The envelope's JSON.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Parses a JSON body, answering vLLM's 400 for one that does not parse.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|err| ApiError::malformed(format!("invalid request body: {err}")))
}

/// `POST /v1/load_lora_adapter`. Missing names parse as empty so that they get vLLM's
/// `InvalidUserInput` message rather than a parse error.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LoadLoraRequest {
    /// The name requests will select the adapter by.
    #[serde(default)]
    pub lora_name: String,
    /// The adapter directory as the server sees it.
    #[serde(default)]
    pub lora_path: String,
    /// Replace an adapter already loaded under this name.
    #[serde(default)]
    pub load_inplace: bool,
}

/// `POST /v1/unload_lora_adapter`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct UnloadLoraRequest {
    /// The adapter's name.
    #[serde(default)]
    pub lora_name: String,
}

/// `stop`: one string or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The sampling fields shared by both endpoints (OpenAI's names and vLLM's defaults).
#[derive(Clone, Debug, Deserialize)]
pub struct Sampling {
    /// Most tokens to generate.
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<usize>,
    /// Temperature; 0 is greedy. Default 1.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass. Default 1.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sampler seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Generate past end-of-sequence tokens (vLLM's extension).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Completions requested; only 1 is supported.
    #[serde(default)]
    pub n: Option<usize>,
    /// Streaming is not supported.
    #[serde(default)]
    pub stream: Option<bool>,
}

/// A completion prompt: one string (token-id and batched prompts are not supported).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// A batch of one text.
    Batch(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The base model's name or an adapter's.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A chat message's content: text or OpenAI's list of parts (only text parts).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": ...}]`.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The content (`null` for none).
    #[serde(default)]
    pub content: Option<Content>,
}

impl ChatMessage {
    /// The message for the chat template; parts are joined with newlines, as vLLM does.
    pub fn to_message(&self) -> Result<Message, ApiError> {
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(text)) => texts.push(text.as_str()),
                        (kind, _) => {
                            return Err(ApiError::bad_request(format!(
                                "content parts of type '{kind}' are not supported; only text"
                            )));
                        }
                    }
                }
                texts.join("\n")
            }
        };
        Ok(Message {
            role: self.role.clone(),
            content,
        })
    }
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// The base model's name or an adapter's.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// OpenAI's `usage`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt plus completion.
    pub total_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// One choice of a completion.
#[derive(Clone, Debug, Serialize)]
pub struct CompletionChoice {
    /// Always 0.
    pub index: usize,
    /// The generated text.
    pub text: String,
    /// Not computed.
    pub logprobs: Option<()>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// The stop string that ended it.
    pub stop_reason: Option<String>,
}

/// The body of a completion.
#[derive(Clone, Debug, Serialize)]
pub struct CompletionResponse {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The requested model name.
    pub model: String,
    /// One choice.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The assistant's message.
#[derive(Clone, Debug, Serialize)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, Serialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: usize,
    /// The reply.
    pub message: AssistantMessage,
    /// Not computed.
    pub logprobs: Option<()>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// The stop string that ended it.
    pub stop_reason: Option<String>,
}

/// The body of a chat completion.
#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The requested model name.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// OpenAI's model permission object, with the fixed values vLLM fills in.
#[derive(Clone, Debug, Serialize)]
#[allow(missing_docs)]
pub struct ModelPermission {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub allow_create_engine: bool,
    pub allow_sampling: bool,
    pub allow_logprobs: bool,
    pub allow_search_indices: bool,
    pub allow_view: bool,
    pub allow_fine_tuning: bool,
    pub organization: &'static str,
    pub group: Option<String>,
    pub is_blocking: bool,
}

impl ModelPermission {
    /// vLLM's defaults.
    pub fn new(id: String, created: u64) -> Self {
        Self {
            id,
            object: "model_permission",
            created,
            allow_create_engine: false,
            allow_sampling: true,
            allow_logprobs: true,
            allow_search_indices: false,
            allow_view: true,
            allow_fine_tuning: false,
            organization: "*",
            group: None,
            is_blocking: false,
        }
    }
}

/// One entry of `GET /v1/models`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelCard {
    /// The name to put in `model`.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// `vllm`, as vLLM reports.
    pub owned_by: &'static str,
    /// The base's checkpoint path, or the adapter's path as loaded.
    pub root: String,
    /// null for the base; the base's name for an adapter.
    pub parent: Option<String>,
    /// The base's context length; null for adapters.
    pub max_model_len: Option<usize>,
    /// vLLM's permission object.
    pub permission: Vec<ModelPermission>,
}

/// `GET /v1/models`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The base first, then adapters in name order.
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_use_vllms_envelope_with_the_status_as_code() {
        let body = ApiError::model_not_found("x").body();
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": "The model `x` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404
            }})
        );
    }

    #[test]
    fn a_load_request_without_fields_parses_as_empty_names() {
        let req: LoadLoraRequest = parse_body(b"{}").expect("parses");
        assert_eq!((req.lora_name.as_str(), req.lora_path.as_str()), ("", ""));
        let err = parse_body::<LoadLoraRequest>(b"{not json").expect_err("refused");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.kind, "Bad Request");
    }

    #[test]
    fn text_parts_are_joined_and_other_parts_refused() {
        let msg: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
        }))
        .expect("parses");
        assert_eq!(msg.to_message().expect("text").content, "a\nb");
        let image: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "user", "content": [{"type": "image_url"}]
        }))
        .expect("parses");
        assert_eq!(
            image.to_message().expect_err("refused").status,
            StatusCode::BAD_REQUEST
        );
    }
}

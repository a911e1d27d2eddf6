//! A client for the runtime adapter API of vLLM's OpenAI-compatible server (and
//! kubetune-serve, which implements the same surface).
//!
//! Errors come in three shapes and all are read: vLLM's current envelope
//! `{"error": {"message", …}}`, the flat one of vLLM before 0.10.1
//! `{"object": "error", "message", …}`, and FastAPI's `{"detail": …}`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

/// What a server said when a call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// It could not be reached, or did not answer in time.
    #[error("{0}")]
    Unreachable(String),
    /// It answered with an error status.
    #[error("{status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
}

/// The message of an error body in any of the three shapes, or the body itself.
pub fn error_message(body: &str) -> String {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return body.trim().to_owned();
    };
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    value
        .get("error")
        .and_then(|e| e.get("message"))
        .and_then(text)
        .or_else(|| value.get("message").and_then(text))
        .or_else(|| value.get("detail").and_then(text))
        .unwrap_or_else(|| body.trim().to_owned())
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

#[derive(Deserialize)]
struct ModelCard {
    id: String,
    #[serde(default)]
    root: Option<String>,
    #[serde(default)]
    parent: Option<String>,
}

/// The adapter API of one serving pod.
#[derive(Clone, Debug)]
pub struct Server {
    http: reqwest::Client,
    base: String,
}

impl Server {
    /// The server at `ip:port`, with `timeout` per call.
    pub fn new(http: &reqwest::Client, ip: &str, port: u16) -> Self {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        Self {
            http: http.clone(),
            base: format!("http://{host}:{port}"),
        }
    }

    async fn post(&self, path: &str, body: Value) -> Result<String, ServerError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| ServerError::Unreachable(format!("{}{path}: {e}", self.base)))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| ServerError::Unreachable(format!("{}{path}: {e}", self.base)))?;
        if (200..300).contains(&status) {
            Ok(text)
        } else {
            Err(ServerError::Refused {
                status,
                message: error_message(&text),
            })
        }
    }

    /// The adapters loaded, by name, with the path each was loaded from (`root`).
    pub async fn adapters(&self) -> Result<BTreeMap<String, String>, ServerError> {
        let url = format!("{}/v1/models", self.base);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| ServerError::Unreachable(format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        if status != 200 {
            let text = response.text().await.unwrap_or_default();
            return Err(ServerError::Refused {
                status,
                message: error_message(&text),
            });
        }
        let list: ModelList = response
            .json()
            .await
            .map_err(|e| ServerError::Unreachable(format!("{url}: {e}")))?;
        // Adapters have a parent (the base model); the base models have none.
        Ok(list
            .data
            .into_iter()
            .filter(|card| card.parent.is_some())
            .map(|card| {
                let root = card.root.unwrap_or_default();
                (card.id, root)
            })
            .collect())
    }

    /// Loads `path` under `name`.
    pub async fn load(&self, name: &str, path: &str) -> Result<(), ServerError> {
        self.post(
            "/v1/load_lora_adapter",
            json!({ "lora_name": name, "lora_path": path }),
        )
        .await
        .map(drop)
    }

    /// Unloads `name`; one already gone is not an error.
    pub async fn unload(&self, name: &str) -> Result<(), ServerError> {
        match self
            .post("/v1/unload_lora_adapter", json!({ "lora_name": name }))
            .await
        {
            Err(ServerError::Refused { status: 404, .. }) | Ok(_) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// One token of completion from `model`: does the adapter answer at all.
    pub async fn smoke(&self, model: &str) -> Result<(), ServerError> {
        self.post(
            "/v1/completions",
            json!({ "model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0 }),
        )
        .await
        .map(drop)
    }
}

/// The HTTP client every server call shares.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout * 15)
        .build()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_error_shapes_are_read() {
        assert_eq!(
            error_message(
                r#"{"error":{"message":"The lora adapter 'a' cannot be found.","type":"NotFoundError","param":null,"code":404}}"#
            ),
            "The lora adapter 'a' cannot be found."
        );
        assert_eq!(
            error_message(
                r#"{"object":"error","message":"LoRA rank 64 is greater than max_lora_rank 16.","type":"BadRequestError","code":400}"#
            ),
            "LoRA rank 64 is greater than max_lora_rank 16."
        );
        assert_eq!(error_message(r#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(
            error_message(r#"{"detail":[{"loc":["body","lora_name"],"msg":"Field required"}]}"#),
            r#"[{"loc":["body","lora_name"],"msg":"Field required"}]"#
        );
        assert_eq!(
            error_message("Internal Server Error\n"),
            "Internal Server Error"
        );
    }
}

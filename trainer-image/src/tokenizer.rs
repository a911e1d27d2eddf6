//! The model's tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`),
//! and how each dataset format becomes tokens with a loss mask.

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::data::{Example, Message};
use crate::error::{Error, Result, read_input_file};

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Object { content: String },
}

impl SpecialToken {
    fn text(&self) -> &str {
        match self {
            Self::Text(text) | Self::Object { content: text } => text,
        }
    }
}

/// `chat_template` is a string, or a list of named templates.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum ChatTemplate {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Clone, Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<ChatTemplate>,
    #[serde(default)]
    bos_token: Option<SpecialToken>,
    #[serde(default)]
    eos_token: Option<SpecialToken>,
    #[serde(default)]
    pad_token: Option<SpecialToken>,
}

/// The tokenizer plus what the dataset formats need from the tokenizer config.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
    chat: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
    /// End-of-sequence id appended to text and completions.
    pub eos_id: u32,
    /// Id used for padding (never a target).
    pub pad_id: u32,
}

fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` from `model_dir`.
    pub fn load(model_dir: &Path, config: &ModelConfig) -> Result<Self> {
        let path = model_dir.join("tokenizer.json");
        let bytes = read_input_file(&path, "tokenizer")?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|err| {
            Error::invalid(format!(
                "{} is not a valid tokenizer: {err}",
                path.display()
            ))
        })?;
        let config_path = model_dir.join("tokenizer_config.json");
        let tok_config: TokenizerConfig = if config_path.exists() {
            let bytes = read_input_file(&config_path, "tokenizer config")?;
            serde_json::from_slice(&bytes).map_err(|err| {
                Error::invalid(format!("{} is not valid: {err}", config_path.display()))
            })?
        } else {
            TokenizerConfig::default()
        };
        let id_of =
            |token: &Option<SpecialToken>| token.as_ref().and_then(|t| inner.token_to_id(t.text()));
        let eos_id = id_of(&tok_config.eos_token)
            .or_else(|| config.eos_token_id.as_ref().and_then(|ids| ids.first()))
            .ok_or_else(|| {
                Error::invalid(
                    "neither tokenizer_config.json nor config.json names an end-of-sequence token",
                )
            })?;
        let pad_id = id_of(&tok_config.pad_token).unwrap_or(eos_id);
        let token_text = |token: &Option<SpecialToken>, id: Option<u32>| {
            token
                .as_ref()
                .map(|t| t.text().to_owned())
                .or_else(|| id.and_then(|id| inner.id_to_token(id)))
                .unwrap_or_default()
        };
        let bos_token = token_text(
            &tok_config.bos_token,
            config.bos_token_id.as_ref().and_then(|ids| ids.first()),
        );
        let eos_token = token_text(&tok_config.eos_token, Some(eos_id));
        let template = match tok_config.chat_template {
            None => None,
            Some(ChatTemplate::One(t)) => Some(t),
            Some(ChatTemplate::Named(list)) => list
                .iter()
                .find(|t| t.name == "default")
                .or(list.first())
                .map(|t| t.template.clone()),
        };
        let chat = match template {
            None => None,
            Some(source) => {
                let mut env = Environment::new();
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function("raise_exception", raise_exception);
                env.add_template_owned("chat", source).map_err(|err| {
                    Error::invalid(format!(
                        "the chat template in {} does not parse: {err}",
                        config_path.display()
                    ))
                })?;
                Some(env)
            }
        };
        Ok(Self {
            inner,
            chat,
            bos_token,
            eos_token,
            eos_id,
            pad_id,
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn encode(&self, text: &str, special: bool) -> Result<tokenizers::Encoding> {
        self.inner
            .encode(text, special)
            .map_err(|err| Error::Tokenizer(err.to_string()))
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|err| Error::Tokenizer(err.to_string()))
    }

    /// Renders a conversation with the chat template.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.chat.as_ref().ok_or_else(|| {
            Error::invalid("the model has no chat_template in tokenizer_config.json; use the instruction or text format")
        })?;
        let template = env
            .get_template("chat")
            .expect("the chat template was added at load");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|err| Error::invalid(format!("the chat template failed: {err}")))
    }

    /// A conversation rendered with the chat template; targets are the tokens that
    /// start inside an assistant turn (what the template adds after the previous turns
    /// and the generation prompt).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Example> {
        self.encode_chat_from(messages, 0)
    }

    /// Like [`Self::encode_chat`], with targets only in the assistant turns from message
    /// `first` on (DPO: the completion after a conversation prompt).
    pub fn encode_chat_from(&self, messages: &[Message], first: usize) -> Result<Example> {
        let full = self.render_chat(messages, false)?;
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" || i < first {
                continue;
            }
            let upto = self.render_chat(&messages[..=i], false)?;
            let with_prompt = self.render_chat(&messages[..i], true)?;
            let prefix = if upto.starts_with(&with_prompt) {
                with_prompt
            } else {
                self.render_chat(&messages[..i], false)?
            };
            if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
                return Err(Error::invalid(
                    "the chat template does not render conversations turn by turn, so assistant turns cannot be located",
                ));
            }
            spans.push(prefix.len()..upto.len());
        }
        // The template writes special tokens such as BOS itself.
        let encoding = self.encode(&full, false)?;
        let target = encoding
            .get_offsets()
            .iter()
            .map(|(start, end)| end > start && spans.iter().any(|s| s.contains(start)))
            .collect();
        Ok(Example {
            tokens: encoding.get_ids().to_vec(),
            target,
        })
    }

    /// A prompt (no loss) followed by a completion and EOS (loss).
    pub fn encode_prompt_completion(&self, prompt: &str, completion: &str) -> Result<Example> {
        let mut tokens = self.encode(prompt, true)?.get_ids().to_vec();
        let mut target = vec![false; tokens.len()];
        let completion = self.encode(completion, false)?;
        tokens.extend_from_slice(completion.get_ids());
        tokens.push(self.eos_id);
        target.resize(tokens.len(), true);
        Ok(Example { tokens, target })
    }

    /// Plain text followed by EOS, loss on every token.
    pub fn encode_text(&self, text: &str) -> Result<Example> {
        let mut tokens = self.encode(text, true)?.get_ids().to_vec();
        if tokens.last() != Some(&self.eos_id) {
            tokens.push(self.eos_id);
        }
        let target = vec![true; tokens.len()];
        Ok(Example { tokens, target })
    }
}

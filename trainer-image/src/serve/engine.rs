//! The model side of `kubetune-serve`: the base checkpoint, the adapters loaded at
//! run time, and text generation.
//!
//! Adapters are never merged into the base. Each loaded adapter is a clone of the base
//! [`Llama`] (the clone shares the base weights; candle tensors are reference-counted)
//! with that adapter set on its linear layers, so a request picks the base or one
//! adapter by name and the forward pass applies `W·x + s·B·A·x` for that request only.
//! Memory per adapter is the adapter's own tensors.
//!
//! Generation runs the prompt once and then one token at a time against a
//! [`KvCache`]. Everything here is synchronous and CPU-bound; the HTTP layer runs it on
//! tokio's blocking pool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::adapter::{AdapterConfig, CONFIG_FILE, WEIGHTS_FILE, load_adapter};
use crate::config::TokenIds;
use crate::data::Message;
use crate::error::{Error, Result};
use crate::model::{KvCache, Llama};
use crate::rng::Rng;
use crate::serve::api::ApiError;
use crate::tokenizer::TextTokenizer;

/// Ranks vLLM accepts for `--max-lora-rank` (`vllm/config/lora.py`).
pub const VLLM_LORA_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// What the engine serves and its limits.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// The Hugging Face checkpoint directory, as given (reported as the base's `root`).
    pub model: String,
    /// The names the base answers to; the first is the canonical one. Empty: `model`.
    pub served_model_names: Vec<String>,
    /// Adapters held at once; a load beyond it is refused.
    pub max_loras: usize,
    /// Largest adapter rank accepted.
    pub max_lora_rank: usize,
    /// Longest prompt plus completion in tokens; `None`: the checkpoint's
    /// `max_position_embeddings`.
    pub max_model_len: Option<usize>,
}

/// An adapter loaded under a name.
#[derive(Debug)]
pub struct LoadedAdapter {
    /// The name requests select it by.
    pub name: String,
    /// The directory it was loaded from, as given.
    pub path: String,
    /// Unix seconds when it was loaded.
    pub created: u64,
    /// Its rank.
    pub rank: usize,
    model: Arc<Llama>,
}

/// The base model, its tokenizer, and the loaded adapters.
#[derive(Debug)]
pub struct Engine {
    base: Arc<Llama>,
    chat: TextTokenizer,
    tokenizer: Tokenizer,
    stop_ids: Vec<u32>,
    names: Vec<String>,
    model_path: String,
    /// `model_path` with links and `.` resolved, to match base names against.
    canonical_path: Option<String>,
    max_model_len: usize,
    max_loras: usize,
    max_lora_rank: usize,
    created: u64,
    adapters: RwLock<BTreeMap<String, Arc<LoadedAdapter>>>,
}

/// How a completion is sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature; below 1e-5 (vLLM's threshold) decoding is greedy.
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1].
    pub top_p: f64,
    /// Seed of the sampler; `None`: a fresh one per request.
    pub seed: Option<u64>,
    /// Strings that end the completion (not included in the text).
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

/// Why generation ended, as OpenAI's `finish_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A finished completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated token ids (without the end-of-sequence token).
    pub token_ids: Vec<u32>,
    /// Their text, cut before a matched stop string.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The stop string that ended it, if one did (vLLM's `stop_reason`).
    pub stop_reason: Option<String>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn already_loaded(name: &str) -> ApiError {
    ApiError::invalid_user_input(format!(
        "The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
    ))
}

fn same_base(names: &[String], model_path: &str, adapter_base: &str) -> bool {
    let wanted = last_component(adapter_base);
    names
        .iter()
        .map(String::as_str)
        .chain(std::iter::once(model_path))
        .any(|n| n == adapter_base || last_component(n) == wanted)
}

fn last_component(name: &str) -> &str {
    name.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(name)
}

impl Engine {
    /// Loads the checkpoint and tokenizer in `options.model` onto `device`.
    pub fn load(options: &EngineOptions, device: &Device) -> Result<Self> {
        let dir = Path::new(&options.model);
        let base = Llama::load(dir, device)?;
        let chat = TextTokenizer::load(dir, &base.config)?;
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|err| {
            Error::invalid(format!(
                "{} is not a valid tokenizer: {err}",
                path.display()
            ))
        })?;
        // vLLM stops at the tokenizer's EOS and at every EOS id of the model config.
        let mut stop_ids = vec![chat.eos_id];
        match &base.config.eos_token_id {
            Some(TokenIds::One(id)) => stop_ids.push(*id),
            Some(TokenIds::Many(ids)) => stop_ids.extend(ids),
            None => {}
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let names = if options.served_model_names.is_empty() {
            vec![options.model.clone()]
        } else {
            options.served_model_names.clone()
        };
        let max_model_len = options
            .max_model_len
            .unwrap_or(base.config.max_position_embeddings);
        Ok(Self {
            base: Arc::new(base),
            chat,
            tokenizer,
            stop_ids,
            names,
            model_path: options.model.clone(),
            canonical_path: std::fs::canonicalize(dir)
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
            max_model_len,
            max_loras: options.max_loras,
            max_lora_rank: options.max_lora_rank,
            created: unix_now(),
            adapters: RwLock::new(BTreeMap::new()),
        })
    }

    /// The base model's canonical name (the first served name).
    pub fn base_name(&self) -> &str {
        &self.names[0]
    }

    /// Every name the base answers to.
    pub fn served_names(&self) -> &[String] {
        &self.names
    }

    /// The checkpoint directory as given.
    pub fn model_path(&self) -> &str {
        &self.model_path
    }

    /// Longest prompt plus completion.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// When the server loaded the base (Unix seconds).
    pub fn created(&self) -> u64 {
        self.created
    }

    /// The base model.
    pub fn base(&self) -> &Arc<Llama> {
        &self.base
    }

    fn read_adapters(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<LoadedAdapter>>> {
        // A poisoned lock only means a panicked writer; the map is still consistent
        // because every write is a single insert or remove.
        self.adapters
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_adapters(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<LoadedAdapter>>> {
        self.adapters
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The loaded adapters in name order.
    pub fn adapters(&self) -> Vec<Arc<LoadedAdapter>> {
        self.read_adapters().values().cloned().collect()
    }

    /// The model a request's `model` field selects: the base (by any served name, or
    /// when absent) or a loaded adapter. Unknown names are vLLM's 404.
    pub fn resolve(&self, model: Option<&str>) -> std::result::Result<Arc<Llama>, ApiError> {
        let Some(name) = model.filter(|m| !m.is_empty()) else {
            return Ok(self.base.clone());
        };
        if self.names.iter().any(|n| n == name) {
            return Ok(self.base.clone());
        }
        match self.read_adapters().get(name) {
            Some(adapter) => Ok(adapter.model.clone()),
            None => Err(ApiError::model_not_found(name)),
        }
    }

    /// Whether an adapter's `base_model_name_or_path` names the served base: one of the
    /// served names or the model path, or the same last path component (the trainer
    /// records the checkpoint directory's name; a Hub id such as
    /// `meta-llama/Llama-3.1-8B` matches a directory `…/Llama-3.1-8B`).
    pub fn is_same_base(&self, adapter_base: &str) -> bool {
        same_base(&self.names, &self.model_path, adapter_base)
            || self
                .canonical_path
                .as_deref()
                .is_some_and(|path| same_base(&[], path, adapter_base))
    }

    /// Loads the adapter in `path` under `name` (vLLM's `/v1/load_lora_adapter`),
    /// replacing one of that name only when `in_place`. Returns vLLM's success text.
    ///
    /// Checks in vLLM's order: the request (400 `InvalidUserInput`), the files (404
    /// `NotFoundError`), then what vLLM's engine checks (500 `InternalServerError`, as
    /// vLLM answers an engine refusal): the adapter count, the rank against
    /// `--max-lora-rank`, the base model, and every tensor's shape against the model.
    pub fn load_adapter(
        &self,
        name: &str,
        path: &str,
        in_place: bool,
    ) -> std::result::Result<String, ApiError> {
        if name.is_empty() || path.is_empty() {
            return Err(ApiError::invalid_user_input(
                "Both 'lora_name' and 'lora_path' must be provided.",
            ));
        }
        let replacing = self.read_adapters().contains_key(name);
        if replacing && !in_place {
            return Err(already_loaded(name));
        }
        let dir = PathBuf::from(path);
        if !dir.join(CONFIG_FILE).is_file() || !dir.join(WEIGHTS_FILE).is_file() {
            return Err(ApiError::adapter_not_found(name, path));
        }
        self.check_capacity(name, &self.read_adapters())?;
        let model = self.adapted_model(name, &dir).map_err(ApiError::engine)?;
        let rank = model.lora.rank;
        let mut adapters = self.write_adapters();
        // Checked again under the write lock: the server serialises loads, but the
        // engine does not rely on that.
        if adapters.contains_key(name) && !in_place {
            return Err(already_loaded(name));
        }
        self.check_capacity(name, &adapters)?;
        adapters.insert(
            name.to_owned(),
            Arc::new(LoadedAdapter {
                name: name.to_owned(),
                path: path.to_owned(),
                created: unix_now(),
                rank,
                model: Arc::new(model),
            }),
        );
        Ok(format!(
            "Success: LoRA adapter '{name}' added successfully."
        ))
    }

    /// vLLM keeps every loaded name and only evicts tensors from its CPU cache
    /// (`--max-cpu-loras`), re-reading them from the path when needed; this server
    /// has no such cache (an adapter is its tensors in memory) and refuses a load
    /// beyond `--max-loras` instead, so memory stays bounded and the refusal is
    /// visible to the caller.
    fn check_capacity(
        &self,
        name: &str,
        adapters: &BTreeMap<String, Arc<LoadedAdapter>>,
    ) -> std::result::Result<(), ApiError> {
        if adapters.contains_key(name) || adapters.len() < self.max_loras {
            return Ok(());
        }
        Err(ApiError::engine(format!(
            "failed to load LoRA adapter '{name}': {} adapters are loaded, the most this server holds (--max-loras {})",
            adapters.len(),
            self.max_loras
        )))
    }

    /// Reads and checks the adapter in `dir` and returns the base with it set.
    fn adapted_model(&self, name: &str, dir: &Path) -> std::result::Result<Llama, String> {
        let fail = |why: String| format!("failed to load LoRA adapter '{name}': {why}");
        let config_path = dir.join(CONFIG_FILE);
        let config: AdapterConfig = std::fs::read(&config_path)
            .map_err(|err| err.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|err| err.to_string()))
            .map_err(|err| {
                fail(format!(
                    "{} is not a PEFT LoRA config: {err}",
                    config_path.display()
                ))
            })?;
        if config.peft_type != "LORA" {
            return Err(fail(format!(
                "peft_type is {}, only LORA is supported",
                config.peft_type
            )));
        }
        if config.r > self.max_lora_rank {
            // vLLM's wording (`vllm/lora/peft_helper.py`).
            return Err(fail(format!(
                "LoRA rank {} is greater than max_lora_rank {}.",
                config.r, self.max_lora_rank
            )));
        }
        if let Some(base) = &config.base_model_name_or_path
            && !self.is_same_base(base)
        {
            return Err(fail(format!(
                "it was trained on base model '{base}', this server serves '{}' ({})",
                self.base_name(),
                self.model_path
            )));
        }
        if config.use_dora || !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
            return Err(fail(
                "DoRA and per-module rank_pattern/alpha_pattern are not supported".into(),
            ));
        }
        if config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            return Err(fail("modules_to_save is not supported".into()));
        }
        let (settings, pairs) =
            load_adapter(dir, self.base.device()).map_err(|err| fail(err.to_string()))?;
        if pairs.is_empty() {
            return Err(fail("the adapter has no LoRA tensors".into()));
        }
        let unlisted: Vec<&str> = settings
            .targets
            .iter()
            .map(|m| m.as_str())
            .filter(|m| !config.target_modules.iter().any(|t| t == m))
            .collect();
        if !unlisted.is_empty() {
            return Err(fail(format!(
                "it has tensors for {} but its target_modules are {:?}",
                unlisted.join(", "),
                config.target_modules
            )));
        }
        let mut model = Llama::clone(&self.base);
        model
            .set_lora(settings, pairs)
            .map_err(|err| fail(err.to_string()))?;
        Ok(model)
    }

    /// Unloads an adapter (vLLM's `/v1/unload_lora_adapter`). Requests already running
    /// with it finish with it.
    pub fn unload_adapter(&self, name: &str) -> std::result::Result<String, ApiError> {
        if name.is_empty() {
            return Err(ApiError::invalid_user_input(
                "'lora_name' needs to be provided to unload a LoRA adapter.",
            ));
        }
        match self.write_adapters().remove(name) {
            Some(_) => Ok(format!(
                "Success: LoRA adapter '{name}' removed successfully."
            )),
            None => Err(ApiError::adapter_unknown(name)),
        }
    }

    /// Tokens of a completion prompt (with the tokenizer's special tokens, e.g. BOS).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(prompt, true)
            .map_err(|err| Error::Tokenizer(err.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Tokens of a conversation rendered by the chat template with the generation
    /// prompt (the template writes BOS itself).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.chat.render_chat(messages, true)?;
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|err| Error::Tokenizer(err.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Text of generated tokens, special tokens skipped (vLLM's default).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|err| Error::Tokenizer(err.to_string()))
    }

    /// Generates a completion of `prompt` with `model` (the base or an adapter from
    /// [`Engine::resolve`]).
    pub fn generate(
        &self,
        model: &Llama,
        prompt: &[u32],
        params: &SamplingParams,
    ) -> Result<Generation> {
        let mut rng = Rng::new(params.seed.unwrap_or_else(fresh_seed));
        let mut cache = KvCache::default();
        let mut input = prompt.to_vec();
        let mut generated = Vec::new();
        loop {
            if generated.len() >= params.max_tokens {
                let text = self.decode(&generated)?;
                return Ok(Generation {
                    token_ids: generated,
                    text,
                    finish_reason: FinishReason::Length,
                    stop_reason: None,
                });
            }
            let logits = model
                .next_logits_cached(&input, &mut cache)?
                .to_vec1::<f32>()?;
            let token = sample(&logits, params, &mut rng);
            if !params.ignore_eos && self.stop_ids.contains(&token) {
                let text = self.decode(&generated)?;
                return Ok(Generation {
                    token_ids: generated,
                    text,
                    finish_reason: FinishReason::Stop,
                    stop_reason: None,
                });
            }
            input = vec![token];
            generated.push(token);
            if !params.stop.is_empty() {
                let text = self.decode(&generated)?;
                if let Some((at, stop)) = params
                    .stop
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
                    .min_by_key(|(at, _)| *at)
                {
                    return Ok(Generation {
                        token_ids: generated,
                        text: text[..at].to_owned(),
                        finish_reason: FinishReason::Stop,
                        stop_reason: Some(stop.clone()),
                    });
                }
            }
        }
    }
}

fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token: greedy below vLLM's temperature threshold, otherwise a draw
/// from `softmax(logits / temperature)` restricted to the top-p nucleus.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.temperature < 1e-5 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, ((f64::from(*l - max)) / params.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, p) in &probs {
        kept += 1;
        mass += p / total;
        if mass >= params.top_p {
            break;
        }
    }
    probs.truncate(kept);
    let kept_total: f64 = probs.iter().map(|(_, p)| p).sum();
    let mut draw = rng.next_f64() * kept_total;
    for (id, p) in &probs {
        if draw < *p {
            return *id;
        }
        draw -= p;
    }
    probs.last().map(|(id, _)| *id).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_p: f64) -> SamplingParams {
        SamplingParams {
            max_tokens: 1,
            temperature,
            top_p,
            seed: Some(1),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }

    #[test]
    fn zero_temperature_picks_the_largest_logit() {
        let logits = [0.1, 2.0, -1.0, 2.0];
        assert_eq!(sample(&logits, &params(0.0, 1.0), &mut Rng::new(1)), 1);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_draws_follow_the_softmax() {
        let logits = [0.0, (3f32).ln(), f32::NEG_INFINITY];
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..4000)
                .map(|_| sample(&logits, &params(1.0, 1.0), &mut rng))
                .collect::<Vec<_>>()
        };
        let first = draw(5);
        assert_eq!(first, draw(5));
        assert_ne!(first, draw(6));
        let ones = first.iter().filter(|t| **t == 1).count() as f64 / first.len() as f64;
        assert!(
            (ones - 0.75).abs() < 0.03,
            "token 1 drawn {ones} of the time"
        );
        assert!(!first.contains(&2), "a token of probability zero was drawn");
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = [(6f32).ln(), (3f32).ln(), 0.0];
        let mut rng = Rng::new(3);
        let draws: Vec<u32> = (0..500)
            .map(|_| sample(&logits, &params(1.0, 0.6), &mut rng))
            .collect();
        assert!(
            draws.iter().all(|t| *t == 0),
            "only token 0 is in the 0.6 nucleus"
        );
    }

    /// The cached, token-at-a-time forward pass gives the logits of a full forward
    /// pass over the whole sequence, with an adapter, for Llama (grouped-query
    /// attention, Llama 3 RoPE) and Qwen2 (q/k/v biases).
    #[test]
    fn cached_generation_logits_equal_a_full_forward_pass() {
        use candle_core::Tensor;
        use kubetune_crds::training::TargetModule;

        use crate::lora::{LoraPair, LoraSettings};
        use crate::model::Pass;
        use crate::test_support::{TinyLlama, max_abs_diff};

        for qwen2 in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            TinyLlama {
                qwen2,
                ..TinyLlama::default()
            }
            .write(dir.path())
            .expect("model");
            let mut model = Llama::load(dir.path(), &Device::Cpu).expect("load");
            let settings = LoraSettings {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                rs_lora: false,
                targets: TargetModule::ALL.to_vec(),
            };
            let mut rng = Rng::new(9);
            let mut random = |rows: usize, cols: usize| {
                let values: Vec<f32> = (0..rows * cols)
                    .map(|_| (rng.next_f64() - 0.5) as f32 * 0.2)
                    .collect();
                Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("tensor")
            };
            let mut pairs = Vec::new();
            for (layer, block) in model.blocks().iter().enumerate() {
                for module in TargetModule::ALL {
                    let (out, inp) = block.linear(module).dims().expect("dims");
                    let pair =
                        LoraPair::from_tensors(&random(4, inp), &random(out, 4)).expect("pair");
                    pairs.push((layer, module, pair));
                }
            }
            model.set_lora(settings, pairs).expect("adapter");

            let ids: Vec<u32> = vec![256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114];
            let full = model
                .logits(
                    &Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).expect("ids"),
                    Pass::EVAL,
                )
                .expect("logits");
            let mut cache = KvCache::default();
            // A 5-token prompt, then one token at a time.
            let mut fed = 5;
            let mut cached = model
                .next_logits_cached(&ids[..fed], &mut cache)
                .expect("prefill");
            loop {
                let want = full.get(0).and_then(|f| f.get(fed - 1)).expect("row");
                let diff = max_abs_diff(&cached, &want);
                assert!(diff < 1e-4, "qwen2={qwen2} position {fed}: {diff}");
                assert_eq!(cache.len(), fed);
                if fed == ids.len() {
                    break;
                }
                cached = model
                    .next_logits_cached(&ids[fed..=fed], &mut cache)
                    .expect("step");
                fed += 1;
            }
        }
    }

    #[test]
    fn adapter_base_names_match_by_name_path_or_last_component() {
        let names = ["served".to_owned()];
        let path = "/models/SmolLM2-135M";
        assert!(same_base(&names, path, "served"));
        assert!(same_base(&names, path, "/models/SmolLM2-135M"));
        assert!(same_base(&names, path, "HuggingFaceTB/SmolLM2-135M"));
        assert!(same_base(&names, path, "/other/mount/SmolLM2-135M/"));
        assert!(!same_base(&names, path, "meta-llama/Llama-3.1-8B"));
    }
}

//! `import-gguf`: turns a llama.cpp GGUF file of a Llama-architecture model into a
//! Hugging Face checkpoint directory that [`crate::model::Llama`], `kubetune-serve` and
//! transformers load like any other.
//!
//! It sits before the pipeline: the trainer only reads Hugging Face checkpoints, and
//! some small models are published only as GGUF. What it writes:
//! - `config.json`: `LlamaForCausalLM` with the `llama.*` hyperparameters,
//!   `tie_word_embeddings` when the file has no `output.weight`, `torch_dtype` float32;
//! - the weights dequantized to f32 by candle under Hugging Face names, through
//!   [`crate::full::write_weights`] (one `model.safetensors` or shards with an index);
//! - `tokenizer.json`: a byte-level BPE built from `tokenizer.ggml.tokens` and `merges`,
//!   control tokens (type 3) as special added tokens, the pre-tokenizer named by
//!   `tokenizer.ggml.pre`; `tokenizer_config.json` with the chat template and the
//!   BOS/EOS/pad/unknown tokens; `generation_config.json`.
//!
//! llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the
//! rows of each head of `q_proj` and `k_proj` from Hugging Face's rotate-half RoPE
//! layout to its interleaved one; [`unpermute_rows`] undoes that.
//!
//! The directory is written beside `--out` under a temporary name and renamed at the
//! end, so a failed import leaves nothing at `--out`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::adapter::write_atomic;
use crate::error::{Error, Result};
use crate::full::{DEFAULT_MAX_SHARD_BYTES, write_weights};

/// GGUF's token type of control tokens (`<|im_start|>`…), special in Hugging Face terms.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF's token type of user-defined added tokens (added, not special).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// What an import wrote, printed by the command as one JSON line.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportSummary {
    /// The checkpoint directory.
    pub out: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Parameters written.
    pub parameters: usize,
    /// How many tensors of the file had each ggml type, e.g. `{"Q4_1": 210}`.
    pub source_types: BTreeMap<String, usize>,
    /// Whether the LM head is the token embedding.
    pub tied_embeddings: bool,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
}

/// The hyperparameters of a `llama` GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaHyper {
    /// `llama.embedding_length`.
    pub hidden: usize,
    /// `llama.feed_forward_length`.
    pub intermediate: usize,
    /// `llama.block_count`.
    pub layers: usize,
    /// `llama.attention.head_count`.
    pub heads: usize,
    /// `llama.attention.head_count_kv` (default: the query heads).
    pub kv_heads: usize,
    /// `llama.attention.key_length`, else hidden / heads.
    pub head_dim: usize,
    /// `llama.attention.layer_norm_rms_epsilon`.
    pub rms_norm_eps: f64,
    /// `llama.rope.freq_base` (default 10000).
    pub rope_theta: f64,
    /// Linear RoPE scaling factor, if `llama.rope.scaling.type` is `linear`.
    pub rope_linear_factor: Option<f64>,
    /// `llama.context_length`.
    pub context: usize,
}

/// Imports the GGUF file `file` into a new Hugging Face checkpoint directory `out`.
pub fn import_gguf(file: &Path, out: &Path) -> Result<ImportSummary> {
    check_destination(out)?;
    let (content, mut reader) = open(file)?;
    let meta = Meta {
        map: &content.metadata,
        file,
    };
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(Error::invalid(format!(
            "{} holds a {arch:?} model; import-gguf supports the llama architecture only",
            file.display()
        )));
    }
    let hyper = LlamaHyper::read(&meta)?;
    let vocab = GgufVocab::read(&meta)?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let plan = tensor_plan(&hyper, vocab.tokens.len(), tied);
    check_tensor_names(&content, &plan, file)?;

    let mut source_types = BTreeMap::new();
    let mut tensors = Vec::with_capacity(plan.len());
    let mut parameters = 0;
    for entry in &plan {
        let info = &content.tensor_infos[&entry.gguf];
        *source_types
            .entry(format!("{:?}", info.ggml_dtype))
            .or_insert(0) += 1;
        if info.shape.dims() != entry.shape.as_slice() {
            return Err(Error::invalid(format!(
                "tensor {} in {} has shape {:?}, the llama.* metadata implies {:?}",
                entry.gguf,
                file.display(),
                info.shape.dims(),
                entry.shape
            )));
        }
        let weight = content
            .tensor(&mut reader, &entry.gguf, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(|err| {
                Error::invalid(format!(
                    "failed to read tensor {} ({:?}) from {}: {err}",
                    entry.gguf,
                    info.ggml_dtype,
                    file.display()
                ))
            })?
            .to_dtype(DType::F32)?;
        let weight = match entry.rope_heads {
            Some(heads) => unpermute_rows(&weight, heads)?,
            None => weight,
        };
        parameters += weight.elem_count();
        tensors.push((entry.hf.clone(), weight));
    }
    let tokenizer = vocab.tokenizer()?;

    let staging = Staging::new(out)?;
    let dir = staging.path();
    let json = |value: &serde_json::Value| {
        serde_json::to_vec_pretty(value).expect("a JSON value serialises")
    };
    write_atomic(
        &dir.join("config.json"),
        &json(&config_json(&hyper, &vocab, tied)),
    )?;
    write_atomic(
        &dir.join("generation_config.json"),
        &json(&serde_json::json!({
            "bos_token_id": vocab.bos,
            "eos_token_id": vocab.eos,
            "pad_token_id": vocab.pad,
        })),
    )?;
    let tokenizer_path = dir.join("tokenizer.json");
    tokenizer
        .save(&tokenizer_path, false)
        .map_err(|err| Error::Tokenizer(format!("failed to write tokenizer.json: {err}")))?;
    write_atomic(
        &dir.join("tokenizer_config.json"),
        &json(&vocab.tokenizer_config(hyper.context)),
    )?;
    let count = tensors.len();
    write_weights(dir, tensors, DEFAULT_MAX_SHARD_BYTES)?;
    staging.commit()?;
    Ok(ImportSummary {
        out: out.to_owned(),
        tensors: count,
        parameters,
        source_types,
        tied_embeddings: tied,
        vocab_size: vocab.tokens.len(),
    })
}

/// Undoes llama.cpp's RoPE row permutation of a `q_proj` (`heads` query heads) or
/// `k_proj` (`heads` key/value heads) weight `[heads·head_dim, in]`.
///
/// The converter writes `w.reshape(heads, 2, head_dim/2, in).swapaxes(1, 2)`: row `r` of
/// the first half of a head lands at `2r`, row `r` of the second half at `2r + 1`.
/// Reading the rows as `(heads, head_dim/2, 2, in)` and swapping the middle axes back
/// restores Hugging Face's order.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || !rows.is_multiple_of(heads * 2) {
        return Err(Error::invalid(format!(
            "a weight with {rows} rows does not split into {heads} heads of even width"
        )));
    }
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Refuses an `--out` that already holds something: an import never overwrites.
fn check_destination(out: &Path) -> Result<()> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::invalid(format!(
                    "{} already exists and is not empty; import-gguf writes a new directory",
                    out.display()
                )));
            }
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotADirectory => Err(Error::invalid(
            format!("{} exists and is not a directory", out.display()),
        )),
        Err(err) => Err(Error::io("list", out)(err)),
    }
}

/// A directory beside the destination that becomes it on [`Staging::commit`] and is
/// removed if dropped before.
struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl Staging {
    fn new(out: &Path) -> Result<Self> {
        let name = out.file_name().ok_or_else(|| {
            Error::invalid(format!("--out {} does not name a directory", out.display()))
        })?;
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
        let tmp = parent.join(format!(
            ".{}.import-{}.partial",
            name.to_string_lossy(),
            std::process::id()
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(Error::io("remove", &tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(Error::io("create", &tmp))?;
        Ok(Self {
            tmp,
            out: out.to_owned(),
            committed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.tmp
    }

    fn commit(mut self) -> Result<()> {
        // An empty directory at --out (checked at the start) gives way to the import.
        if self.out.is_dir() {
            std::fs::remove_dir(&self.out).map_err(Error::io("replace", &self.out))?;
        }
        std::fs::rename(&self.tmp, &self.out).map_err(Error::io("rename", &self.out))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Opens and parses the GGUF header with candle's reader.
fn open(file: &Path) -> Result<(Content, BufReader<File>)> {
    let handle = File::open(file).map_err(|err| {
        if err.kind() == std::io::ErrorKind::NotFound {
            Error::invalid(format!("GGUF file {} does not exist", file.display()))
        } else {
            Error::io("open", file)(err)
        }
    })?;
    let mut reader = BufReader::new(handle);
    let mut magic = [0u8; 4];
    let is_gguf = reader.read_exact(&mut magic).is_ok() && &magic == b"GGUF";
    if !is_gguf {
        return Err(Error::invalid(format!(
            "{} is not a GGUF file (it does not start with \"GGUF\")",
            file.display()
        )));
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(Error::io("read", file))?;
    match Content::read(&mut reader) {
        Ok(content) => Ok((content, reader)),
        Err(err) => {
            // candle names the unknown type id but not the tensor; find it.
            if let Ok(Some((tensor, id))) = tensor_of_unknown_type(file) {
                return Err(Error::invalid(format!(
                    "tensor {tensor} in {} has ggml type {} ({id}), which cannot be dequantized; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K",
                    file.display(),
                    ggml_type_name(id)
                )));
            }
            Err(Error::invalid(format!(
                "{} is not a GGUF file candle can read: {err}",
                file.display()
            )))
        }
    }
}

/// The ggml type ids candle's GGUF reader knows (`GgmlDType::from_u32`).
const CANDLE_TYPE_IDS: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

fn ggml_type_name(id: u32) -> String {
    let name = match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        _ => return format!("id {id}"),
    };
    name.to_owned()
}

/// Walks a GGUF header (the layout of ggml's `gguf.cpp`) to the first tensor whose type
/// candle does not know: only used to name it in an error.
fn tensor_of_unknown_type(file: &Path) -> std::io::Result<Option<(String, u32)>> {
    fn u32_of(r: &mut impl Read) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64_of(r: &mut impl Read) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn bad(what: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
    }
    let mut r = BufReader::new(File::open(file)?);
    let _magic = u32_of(&mut r)?;
    let version = u32_of(&mut r)?;
    let len = |r: &mut BufReader<File>| -> std::io::Result<u64> {
        if version == 1 {
            u32_of(r).map(u64::from)
        } else {
            u64_of(r)
        }
    };
    let tensors = len(&mut r)?;
    let kvs = len(&mut r)?;
    fn skip_value(
        r: &mut BufReader<File>,
        ty: u32,
        len: &dyn Fn(&mut BufReader<File>) -> std::io::Result<u64>,
        depth: usize,
    ) -> std::io::Result<()> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let n = len(r)?;
                return r.seek_relative(i64::try_from(n).map_err(|_| bad("string length"))?);
            }
            9 if depth < 4 => {
                let elem = u32_of(r)?;
                let n = len(r)?;
                for _ in 0..n {
                    skip_value(r, elem, len, depth + 1)?;
                }
                return Ok(());
            }
            _ => return Err(bad("metadata value type")),
        };
        r.seek_relative(fixed)
    }
    for _ in 0..kvs {
        skip_value(&mut r, 8, &len, 0)?;
        let ty = u32_of(&mut r)?;
        skip_value(&mut r, ty, &len, 0)?;
    }
    for _ in 0..tensors {
        let n = len(&mut r)?;
        if n > 1 << 16 {
            return Err(bad("tensor name length"));
        }
        let mut name = vec![0u8; n as usize];
        r.read_exact(&mut name)?;
        let dims = u32_of(&mut r)?;
        let width = if version == 1 { 4 } else { 8 };
        r.seek_relative(i64::from(dims.min(8)) * width)?;
        let ty = u32_of(&mut r)?;
        let _offset = u64_of(&mut r)?;
        if !CANDLE_TYPE_IDS.contains(&ty) {
            return Ok(Some((String::from_utf8_lossy(&name).into_owned(), ty)));
        }
    }
    Ok(None)
}

/// Typed access to GGUF metadata with errors that name the key and file.
struct Meta<'a> {
    map: &'a HashMap<String, Value>,
    file: &'a Path,
}

impl Meta<'_> {
    fn missing(&self, key: &str) -> Error {
        Error::invalid(format!("{} has no metadata key {key}", self.file.display()))
    }

    fn wrong(&self, key: &str, what: &str) -> Error {
        Error::invalid(format!(
            "metadata key {key} in {} is not {what}",
            self.file.display()
        ))
    }

    fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.wrong(key, "a string")),
        }
    }

    fn int(&self, key: &str) -> Result<i64> {
        self.opt_int(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_int(&self, key: &str) -> Result<Option<i64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => integer(v)
                .map(Some)
                .ok_or_else(|| self.wrong(key, "an integer")),
        }
    }

    fn count(&self, key: &str) -> Result<usize> {
        let n = self.int(key)?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| self.wrong(key, "a positive integer"))
    }

    fn opt_count(&self, key: &str) -> Result<Option<usize>> {
        match self.opt_int(key)? {
            None => Ok(None),
            Some(_) => self.count(key).map(Some),
        }
    }

    fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            // The shortest decimal that reads back as the f32 (1e-5, not 9.9999997e-6),
            // as Hugging Face configs write it.
            Some(Value::F32(v)) => Ok(Some(v.to_string().parse().unwrap_or(f64::from(*v)))),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(v) => integer(v)
                .map(|i| Some(i as f64))
                .ok_or_else(|| self.wrong(key, "a number")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong(key, "a boolean")),
        }
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        match self.map.get(key) {
            None => Err(self.missing(key)),
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(self.wrong(key, "an array")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(self.wrong(key, "an array of strings")),
            })
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .map(|v| integer(v).ok_or_else(|| self.wrong(key, "an array of integers")))
            .collect()
    }

    fn token_id(&self, key: &str, vocab: usize) -> Result<Option<u32>> {
        match self.opt_int(key)? {
            None => Ok(None),
            Some(id) if (0..vocab as i64).contains(&id) => Ok(Some(id as u32)),
            Some(id) => Err(Error::invalid(format!(
                "metadata key {key} in {} is {id}, outside the vocabulary of {vocab} tokens",
                self.file.display()
            ))),
        }
    }
}

fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

impl LlamaHyper {
    fn read(meta: &Meta) -> Result<Self> {
        let hidden = meta.count("llama.embedding_length")?;
        let heads = meta.count("llama.attention.head_count")?;
        let kv_heads = meta
            .opt_count("llama.attention.head_count_kv")?
            .unwrap_or(heads);
        if let Some(experts) = meta.opt_int("llama.expert_count")?
            && experts > 0
        {
            return Err(Error::invalid(format!(
                "{} is a mixture-of-experts model ({experts} experts); import-gguf supports dense llama models only",
                meta.file.display()
            )));
        }
        if !hidden.is_multiple_of(heads) && meta.opt_int("llama.attention.key_length")?.is_none() {
            return Err(Error::invalid(format!(
                "{}: the embedding width {hidden} does not split into {heads} heads",
                meta.file.display()
            )));
        }
        let head_dim = meta
            .opt_count("llama.attention.key_length")?
            .unwrap_or(hidden / heads);
        if let Some(rope_dims) = meta.opt_count("llama.rope.dimension_count")?
            && rope_dims != head_dim
        {
            return Err(Error::invalid(format!(
                "{}: RoPE on {rope_dims} of {head_dim} head dimensions (partial rotary) is not supported",
                meta.file.display()
            )));
        }
        if !heads.is_multiple_of(kv_heads) || !head_dim.is_multiple_of(2) {
            return Err(Error::invalid(format!(
                "{}: {heads} heads, {kv_heads} key/value heads of width {head_dim} is not a valid attention layout",
                meta.file.display()
            )));
        }
        let rope_linear_factor = match meta.opt_string("llama.rope.scaling.type")?.as_deref() {
            None | Some("none") => None,
            Some("linear") => Some(
                meta.opt_float("llama.rope.scaling.factor")?
                    .ok_or_else(|| meta.missing("llama.rope.scaling.factor"))?,
            ),
            Some(other) => {
                return Err(Error::invalid(format!(
                    "{}: RoPE scaling {other:?} is not supported (only linear)",
                    meta.file.display()
                )));
            }
        };
        Ok(Self {
            hidden,
            intermediate: meta.count("llama.feed_forward_length")?,
            layers: meta.count("llama.block_count")?,
            heads,
            kv_heads,
            head_dim,
            rms_norm_eps: meta
                .opt_float("llama.attention.layer_norm_rms_epsilon")?
                .ok_or_else(|| meta.missing("llama.attention.layer_norm_rms_epsilon"))?,
            rope_theta: meta.opt_float("llama.rope.freq_base")?.unwrap_or(10_000.0),
            rope_linear_factor,
            context: meta.opt_count("llama.context_length")?.unwrap_or(4096),
        })
    }
}

/// One tensor to convert: GGUF name, Hugging Face name, `[out, in]` shape, and the head
/// count to undo llama.cpp's RoPE permutation with (q and k only).
struct PlanEntry {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    rope_heads: Option<usize>,
}

fn tensor_plan(h: &LlamaHyper, vocab: usize, tied: bool) -> Vec<PlanEntry> {
    let entry = |gguf: String, hf: String, shape: Vec<usize>, rope_heads| PlanEntry {
        gguf,
        hf,
        shape,
        rope_heads,
    };
    let (q, kv) = (h.heads * h.head_dim, h.kv_heads * h.head_dim);
    let mut plan = vec![entry(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![vocab, h.hidden],
        None,
    )];
    for i in 0..h.layers {
        let layer = |gguf: &str, hf: &str, shape: Vec<usize>, rope| {
            entry(
                format!("blk.{i}.{gguf}.weight"),
                format!("model.layers.{i}.{hf}.weight"),
                shape,
                rope,
            )
        };
        plan.extend([
            layer(
                "attn_q",
                "self_attn.q_proj",
                vec![q, h.hidden],
                Some(h.heads),
            ),
            layer(
                "attn_k",
                "self_attn.k_proj",
                vec![kv, h.hidden],
                Some(h.kv_heads),
            ),
            layer("attn_v", "self_attn.v_proj", vec![kv, h.hidden], None),
            layer("attn_output", "self_attn.o_proj", vec![h.hidden, q], None),
            layer(
                "ffn_gate",
                "mlp.gate_proj",
                vec![h.intermediate, h.hidden],
                None,
            ),
            layer(
                "ffn_up",
                "mlp.up_proj",
                vec![h.intermediate, h.hidden],
                None,
            ),
            layer(
                "ffn_down",
                "mlp.down_proj",
                vec![h.hidden, h.intermediate],
                None,
            ),
            layer("attn_norm", "input_layernorm", vec![h.hidden], None),
            layer("ffn_norm", "post_attention_layernorm", vec![h.hidden], None),
        ]);
    }
    plan.push(entry(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![h.hidden],
        None,
    ));
    if !tied {
        plan.push(entry(
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![vocab, h.hidden],
            None,
        ));
    }
    plan
}

/// Every tensor of the file must be one the plan converts, and every planned one present.
fn check_tensor_names(content: &Content, plan: &[PlanEntry], file: &Path) -> Result<()> {
    let planned: HashSet<&str> = plan.iter().map(|e| e.gguf.as_str()).collect();
    let mut extra: Vec<&String> = content
        .tensor_infos
        .keys()
        .filter(|name| !planned.contains(name.as_str()))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        let hint = match name.as_str() {
            "rope_freqs.weight" => " (Llama 3 RoPE frequency factors are not supported)",
            n if n.ends_with(".bias") => " (biases are not part of the llama architecture)",
            _ => "",
        };
        return Err(Error::invalid(format!(
            "{} has tensor {name} that a llama checkpoint has no place for{hint}",
            file.display()
        )));
    }
    if let Some(missing) = plan
        .iter()
        .find(|e| !content.tensor_infos.contains_key(&e.gguf))
    {
        return Err(Error::invalid(format!(
            "{} has no tensor {}",
            file.display(),
            missing.gguf
        )));
    }
    Ok(())
}

/// The tokenizer metadata of a GGUF file.
#[derive(Clone, Debug)]
struct GgufVocab {
    tokens: Vec<String>,
    types: Vec<i64>,
    merges: Vec<(String, String)>,
    pre: String,
    bos: Option<u32>,
    eos: u32,
    pad: u32,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

impl GgufVocab {
    fn read(meta: &Meta) -> Result<Self> {
        let model = meta.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::invalid(format!(
                "{} has a {model:?} tokenizer; import-gguf supports gpt2-style byte-level BPE only",
                meta.file.display()
            )));
        }
        let pre = meta
            .opt_string("tokenizer.ggml.pre")?
            .unwrap_or_else(|| "default".to_owned());
        if pre_tokenizer(&pre).is_none() {
            return Err(Error::invalid(format!(
                "{} uses the pre-tokenizer {pre:?}; import-gguf supports default, gpt2 and smollm",
                meta.file.display()
            )));
        }
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let mut seen = HashSet::with_capacity(n);
        if let Some(dup) = tokens.iter().find(|t| !seen.insert(t.as_str())) {
            return Err(Error::invalid(format!(
                "{}: token {dup:?} appears twice in tokenizer.ggml.tokens",
                meta.file.display()
            )));
        }
        if let Some(declared) = meta.opt_count("llama.vocab_size")?
            && declared != n
        {
            return Err(Error::invalid(format!(
                "{}: llama.vocab_size is {declared} but tokenizer.ggml.tokens has {n} tokens",
                meta.file.display()
            )));
        }
        let types = if meta.map.contains_key("tokenizer.ggml.token_type") {
            meta.ints("tokenizer.ggml.token_type")?
        } else {
            vec![1; n]
        };
        if types.len() != n {
            return Err(Error::invalid(format!(
                "{}: tokenizer.ggml.token_type has {} entries for {n} tokens",
                meta.file.display(),
                types.len()
            )));
        }
        let merges = meta
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
                _ => Err(Error::invalid(format!(
                    "{}: merge {m:?} is not two tokens separated by a space",
                    meta.file.display()
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let eos = meta
            .token_id("tokenizer.ggml.eos_token_id", n)?
            .ok_or_else(|| meta.missing("tokenizer.ggml.eos_token_id"))?;
        Ok(Self {
            bos: meta.token_id("tokenizer.ggml.bos_token_id", n)?,
            pad: meta
                .token_id("tokenizer.ggml.padding_token_id", n)?
                .unwrap_or(eos),
            unk: meta.token_id("tokenizer.ggml.unknown_token_id", n)?,
            eos,
            add_bos: meta
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false),
            add_eos: meta
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
            chat_template: meta.opt_string("tokenizer.chat_template")?,
            tokens,
            types,
            merges,
            pre,
        })
    }

    /// A byte-level BPE tokenizer: the GGUF vocabulary and merges, control tokens as
    /// special added tokens, user-defined ones as plain added tokens.
    fn tokenizer(&self) -> Result<Tokenizer> {
        let vocab: Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, self.merges.clone())
            .build()
            .map_err(|err| Error::invalid(format!("the GGUF vocabulary is not a BPE: {err}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(pre_tokenizer(&self.pre));
        tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        let added = |kind: i64, special: bool| -> Vec<AddedToken> {
            self.tokens
                .iter()
                .zip(&self.types)
                .filter(|(_, t)| **t == kind)
                .map(|(token, _)| AddedToken::from(token.clone(), special).normalized(!special))
                .collect()
        };
        tokenizer.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
        tokenizer.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));
        let bos = self.bos.filter(|_| self.add_bos);
        let eos = Some(self.eos).filter(|_| self.add_eos);
        if bos.is_some() || eos.is_some() {
            let name = |id: u32| self.tokens[id as usize].clone();
            let mut single = Vec::new();
            let mut specials = Vec::new();
            if let Some(id) = bos {
                single.push(name(id));
                specials.push((name(id), id));
            }
            single.push("$A".to_owned());
            if let Some(id) = eos {
                single.push(name(id));
                specials.push((name(id), id));
            }
            let template = TemplateProcessing::builder()
                .try_single(single.join(" "))
                .map_err(|err| Error::Tokenizer(err.to_string()))?
                .special_tokens(specials)
                .build()
                .map_err(|err| Error::Tokenizer(err.to_string()))?;
            tokenizer.with_post_processor(Some(template));
        } else {
            tokenizer.with_post_processor(Some(ByteLevel::new(false, false, true)));
        }
        Ok(tokenizer)
    }

    fn token(&self, id: u32) -> &str {
        &self.tokens[id as usize]
    }

    fn tokenizer_config(&self, context: usize) -> serde_json::Value {
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.token(self.eos),
            "pad_token": self.token(self.pad),
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": false,
            "model_max_length": context,
        });
        if let Some(bos) = self.bos {
            config["bos_token"] = self.token(bos).into();
        }
        if let Some(unk) = self.unk {
            config["unk_token"] = self.token(unk).into();
        }
        if let Some(template) = &self.chat_template {
            config["chat_template"] = template.clone().into();
        }
        config
    }
}

/// The Hugging Face pre-tokenizer equivalent to a llama.cpp pre-tokenizer name
/// (`llama-vocab.cpp`): GPT-2's regex, after single digits for `smollm`.
fn pre_tokenizer(name: &str) -> Option<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match name {
        "default" | "gpt2" => Some(byte_level.into()),
        "smollm" => Some(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()),
        _ => None,
    }
}

fn config_json(h: &LlamaHyper, vocab: &GgufVocab, tied: bool) -> serde_json::Value {
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h.hidden,
        "intermediate_size": h.intermediate,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "num_key_value_heads": h.kv_heads,
        "head_dim": h.head_dim,
        "vocab_size": vocab.tokens.len(),
        "rms_norm_eps": h.rms_norm_eps,
        "rope_theta": h.rope_theta,
        "max_position_embeddings": h.context,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "eos_token_id": vocab.eos,
        "pad_token_id": vocab.pad,
        "torch_dtype": "float32",
    });
    if let Some(bos) = vocab.bos {
        config["bos_token_id"] = bos.into();
    }
    if let Some(factor) = h.rope_linear_factor {
        config["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor});
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_rows_inverts_llama_cpp_permutation() {
        // Two heads of width 6 over 2 input columns; llama.cpp writes row r of a head's
        // first half at 2r and of its second half at 2r + 1.
        let rows: Vec<f32> = (0..12).flat_map(|r| [r as f32, -(r as f32)]).collect();
        let hf = Tensor::from_vec(rows, (12, 2), &Device::Cpu).expect("tensor");
        let permuted = hf
            .reshape((2, 2, 3, 2))
            .and_then(|t| t.transpose(1, 2))
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape((12, 2)))
            .expect("permute");
        let first_column: Vec<f32> = permuted
            .narrow(1, 0, 1)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("column");
        assert_eq!(
            first_column,
            [0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]
        );
        let back = unpermute_rows(&permuted, 2).expect("unpermute");
        assert_eq!(
            back.to_vec2::<f32>().expect("rows"),
            hf.to_vec2::<f32>().expect("rows")
        );
    }

    #[test]
    fn unknown_pre_tokenizers_are_refused() {
        assert!(pre_tokenizer("smollm").is_some());
        assert!(pre_tokenizer("llama-bpe").is_none());
    }
}

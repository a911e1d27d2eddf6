//! Datasets: JSONL files turned into token sequences with a loss mask, and padded
//! micro-batches of them.
//!
//! Formats (one JSON object per line, blank lines skipped):
//! - `chat`: `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered with the
//!   model's chat template; loss on the assistant turns only (their content and the
//!   template's end-of-turn text, so the model learns to stop).
//! - `instruction`: `{"prompt": ..., "completion": ...}`; loss on the completion and
//!   the end-of-sequence token.
//! - `text`: `{"text": ...}`; loss on every token.
//! - `preference` (DPO): `{"prompt": ..., "chosen": ..., "rejected": ...}`, each a string
//!   or a list of chat messages (TRL's standard and conversational forms). All strings:
//!   prompt then completion and EOS, as `instruction`. Otherwise rendered with the chat
//!   template, a string prompt taken as a user message and a string completion as an
//!   assistant message; only the completion's assistant turns are targets.
//!
//! A line that does not parse is an error naming the file and line (exit code 2).
//! Sequences longer than `max_seq_length` are truncated; batches are right-padded,
//! and padding carries no loss.

use std::path::Path;

use candle_core::{Device, Tensor};
use kubetune_crds::training::DatasetFormat;
use serde::Deserialize;

use crate::error::{Error, Result, read_input_file};
use crate::rng::Rng;
use crate::tokenizer::TextTokenizer;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (other roles pass through to the template).
    pub role: String,
    /// The text.
    pub content: String,
}

#[derive(Deserialize)]
struct ChatLine {
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct InstructionLine {
    prompt: String,
    completion: String,
}

#[derive(Deserialize)]
struct TextLine {
    text: String,
}

/// A preference field: plain text or chat messages.
#[derive(Deserialize)]
#[serde(untagged)]
enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

impl Turns {
    fn into_messages(self, role: &str) -> Vec<Message> {
        match self {
            Self::Text(content) => vec![Message {
                role: role.to_owned(),
                content,
            }],
            Self::Messages(messages) => messages,
        }
    }
}

#[derive(Deserialize)]
struct PreferenceLine {
    prompt: Turns,
    chosen: Turns,
    rejected: Turns,
}

/// A DPO example: the same prompt with a preferred and a dispreferred completion.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    /// Prompt and chosen completion (targets on the completion only).
    pub chosen: Example,
    /// Prompt and rejected completion.
    pub rejected: Example,
}

/// A tokenised example: `tokens[i]` is a training target when `target[i]` is true.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Whether each token is predicted with loss.
    pub target: Vec<bool>,
}

impl Example {
    /// How many tokens carry loss (the first token never does: nothing predicts it).
    pub fn target_count(&self) -> usize {
        self.target.iter().skip(1).filter(|t| **t).count()
    }
}

/// A dataset file's text.
fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_input_file(path, "dataset")?)
        .map_err(|err| Error::invalid(format!("dataset {} is not UTF-8: {err}", path.display())))
}

/// The non-empty lines of a JSONL text, each with its index (0-based).
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
}

/// Builds the error for line `index` (0-based) of `path`.
fn line_error(path: &Path, index: usize) -> impl Fn(String) -> Error + '_ {
    move |message| Error::BadDatasetLine {
        path: path.to_owned(),
        line: index + 1,
        message,
    }
}

/// A tokenizer's complaint about one line's content, told as that line's error.
fn on_line(err: Error, bad: &impl Fn(String) -> Error) -> Error {
    match err {
        Error::InvalidInput(message) | Error::Tokenizer(message) => bad(message),
        other => other,
    }
}

/// Reads and tokenises a JSONL dataset.
pub fn load_dataset(
    path: &Path,
    format: DatasetFormat,
    tokenizer: &TextTokenizer,
    max_seq_length: usize,
) -> Result<Vec<Example>> {
    let text = read_text(path)?;
    let mut examples = Vec::new();
    for (index, line) in lines(&text) {
        let bad = line_error(path, index);
        let mut example = match format {
            DatasetFormat::Chat => {
                let parsed: ChatLine = serde_json::from_str(line).map_err(|err| {
                    bad(format!("not a chat example {{\"messages\": [...]}}: {err}"))
                })?;
                if !parsed.messages.iter().any(|m| m.role == "assistant") {
                    return Err(bad(
                        "the conversation has no assistant message to learn".into()
                    ));
                }
                tokenizer
                    .encode_chat(&parsed.messages)
                    .map_err(|err| on_line(err, &bad))?
            }
            DatasetFormat::Instruction => {
                let parsed: InstructionLine = serde_json::from_str(line).map_err(|err| {
                    bad(format!(
                        "not an instruction example {{\"prompt\", \"completion\"}}: {err}"
                    ))
                })?;
                tokenizer.encode_prompt_completion(&parsed.prompt, &parsed.completion)?
            }
            DatasetFormat::Text => {
                let parsed: TextLine = serde_json::from_str(line)
                    .map_err(|err| bad(format!("not a text example {{\"text\": ...}}: {err}")))?;
                tokenizer.encode_text(&parsed.text)?
            }
            DatasetFormat::Preference => {
                return Err(Error::invalid(
                    "the preference format is for method dpo; the other methods need chat, instruction or text",
                ));
            }
        };
        example.tokens.truncate(max_seq_length);
        example.target.truncate(max_seq_length);
        if example.target_count() > 0 {
            examples.push(example);
        } else {
            tracing::warn!(
                file = %path.display(),
                line = index + 1,
                "example has no target tokens within maxSeqLength; skipped"
            );
        }
    }
    if examples.is_empty() {
        return Err(Error::invalid(format!(
            "dataset {} has no example with target tokens",
            path.display()
        )));
    }
    Ok(examples)
}

/// Reads and tokenises a preference JSONL dataset (DPO). Each sequence is truncated to
/// `max_seq_length`; a pair whose chosen or rejected completion has no target left is
/// skipped with a warning.
pub fn load_preferences(
    path: &Path,
    tokenizer: &TextTokenizer,
    max_seq_length: usize,
) -> Result<Vec<PreferencePair>> {
    let text = read_text(path)?;
    let mut pairs = Vec::new();
    for (index, line) in lines(&text) {
        let bad = line_error(path, index);
        let parsed: PreferenceLine = serde_json::from_str(line).map_err(|err| {
            bad(format!(
                "not a preference example {{\"prompt\", \"chosen\", \"rejected\"}}, each a string or a list of messages: {err}"
            ))
        })?;
        let encode = |completion: Turns, which: &str| -> Result<Example> {
            let mut example = match (&parsed.prompt, completion) {
                (Turns::Text(prompt), Turns::Text(completion)) => {
                    tokenizer.encode_prompt_completion(prompt, &completion)?
                }
                (prompt, completion) => {
                    let prompt = match prompt {
                        Turns::Text(text) => vec![Message {
                            role: "user".into(),
                            content: text.clone(),
                        }],
                        Turns::Messages(messages) => messages.clone(),
                    };
                    let completion = completion.into_messages("assistant");
                    if !completion.iter().any(|m| m.role == "assistant") {
                        return Err(bad(format!("{which} has no assistant message")));
                    }
                    let first = prompt.len();
                    let messages: Vec<Message> = prompt.into_iter().chain(completion).collect();
                    tokenizer
                        .encode_chat_from(&messages, first)
                        .map_err(|err| on_line(err, &bad))?
                }
            };
            example.tokens.truncate(max_seq_length);
            example.target.truncate(max_seq_length);
            Ok(example)
        };
        let chosen = encode(parsed.chosen, "chosen")?;
        let rejected = encode(parsed.rejected, "rejected")?;
        if chosen.target_count() == 0 || rejected.target_count() == 0 {
            tracing::warn!(
                file = %path.display(),
                line = index + 1,
                "preference pair has a completion with no target tokens within maxSeqLength; skipped"
            );
            continue;
        }
        pairs.push(PreferencePair { chosen, rejected });
    }
    if pairs.is_empty() {
        return Err(Error::invalid(format!(
            "dataset {} has no preference pair with target tokens",
            path.display()
        )));
    }
    Ok(pairs)
}

/// Splits off `percent`% of `examples` (at least one) for evaluation, chosen by `seed`.
pub fn split_eval<T>(examples: Vec<T>, percent: u32, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    if percent == 0 {
        return Ok((examples, Vec::new()));
    }
    if percent >= 100 {
        return Err(Error::invalid(format!(
            "evalSplitPercent {percent} leaves no training data"
        )));
    }
    let n = examples.len();
    let n_eval = ((n as u64 * u64::from(percent)).div_ceil(100) as usize).max(1);
    if n_eval >= n {
        return Err(Error::invalid(format!(
            "evalSplitPercent {percent} of {n} examples leaves no training data"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    Rng::derive(seed, 0x6576_616c, 0).shuffle(&mut order);
    let mut is_eval = vec![false; n];
    for &i in &order[..n_eval] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (example, e) in examples.into_iter().zip(is_eval) {
        if e {
            eval.push(example)
        } else {
            train.push(example)
        }
    }
    Ok((train, eval))
}

/// A padded micro-batch.
#[derive(Debug)]
pub struct Batch {
    /// Input ids `[batch, seq]` (u32).
    pub ids: Tensor,
    /// Flattened `[batch·seq]` positions whose next token is a target (u32).
    pub rows: Tensor,
    /// The target token at each of `rows` (u32).
    pub targets: Tensor,
    /// Number of target tokens.
    pub target_count: usize,
    /// Number of non-padding input tokens (for throughput).
    pub token_count: usize,
}

/// Pads `examples` into a batch: inputs are tokens `[0, n−1)`, targets `[1, n)`.
pub fn make_batch(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let seq = examples
        .iter()
        .map(|e| e.tokens.len().saturating_sub(1))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![pad_id; examples.len() * seq];
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut token_count = 0;
    for (b, example) in examples.iter().enumerate() {
        let n = example.tokens.len().saturating_sub(1);
        token_count += n;
        for t in 0..n {
            ids[b * seq + t] = example.tokens[t];
            if example.target[t + 1] {
                rows.push((b * seq + t) as u32);
                targets.push(example.tokens[t + 1]);
            }
        }
    }
    let target_count = rows.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (examples.len(), seq), device)?,
        rows: Tensor::from_vec(rows, target_count, device)?,
        targets: Tensor::from_vec(targets, target_count, device)?,
        target_count,
        token_count,
    })
}

/// The order in which examples are visited in `epoch`: a permutation fixed by the seed.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::derive(seed, 0x006f_7264_6572, epoch).shuffle(&mut order);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(tokens: &[u32], target: &[bool]) -> Example {
        Example {
            tokens: tokens.to_vec(),
            target: target.to_vec(),
        }
    }

    #[test]
    fn batch_pads_on_the_right_and_targets_only_marked_tokens() {
        let a = example(&[1, 2, 3, 4], &[false, false, true, true]);
        let b = example(&[5, 6], &[false, true]);
        let batch = make_batch(&[&a, &b], 0, &Device::Cpu).expect("batch");
        assert_eq!(
            batch.ids.to_vec2::<u32>().expect("ids"),
            vec![vec![1, 2, 3], vec![5, 0, 0]]
        );
        // a predicts 3 at position 1 and 4 at 2; b predicts 6 at its position 0 (row 3).
        assert_eq!(batch.rows.to_vec1::<u32>().expect("rows"), vec![1, 2, 3]);
        assert_eq!(batch.targets.to_vec1::<u32>().expect("t"), vec![3, 4, 6]);
        assert_eq!(batch.target_count, 3);
        assert_eq!(batch.token_count, 4);
    }

    #[test]
    fn eval_split_is_disjoint_deterministic_and_sized_by_percent() {
        let examples: Vec<Example> = (0..20)
            .map(|i| example(&[i, i + 1], &[false, true]))
            .collect();
        let (train, eval) = split_eval(examples.clone(), 10, 1).expect("split");
        assert_eq!((train.len(), eval.len()), (18, 2));
        assert!(eval.iter().all(|e| !train.contains(e)));
        let (_, again) = split_eval(examples, 10, 1).expect("split");
        assert_eq!(eval, again);
    }
}

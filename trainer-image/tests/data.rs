//! Dataset formats: which tokens carry loss in each, and how truncation and bad lines
//! are handled.

use kubetune_crds::training::DatasetFormat;
use kubetune_trainer::config::ModelConfig;
use kubetune_trainer::data::{Example, Message, load_dataset, load_preferences};
use kubetune_trainer::error::Error;
use kubetune_trainer::test_support::{TinyLlama, write_jsonl};
use kubetune_trainer::tokenizer::TextTokenizer;

fn tokenizer() -> (tempfile::TempDir, TextTokenizer) {
    let dir = tempfile::tempdir().expect("tempdir");
    TinyLlama::default().write(dir.path()).expect("model");
    let config = ModelConfig::load(dir.path()).expect("config");
    let tokenizer = TextTokenizer::load(dir.path(), &config).expect("tokenizer");
    (dir, tokenizer)
}

fn target_text(tokenizer: &TextTokenizer, example: &Example) -> String {
    let ids: Vec<u32> = example
        .tokens
        .iter()
        .zip(&example.target)
        .filter(|(_, t)| **t)
        .map(|(id, _)| *id)
        .collect();
    tokenizer.decode(&ids).expect("decode")
}

fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

#[test]
fn chat_loss_covers_only_assistant_turns_and_their_end_of_turn() {
    let (_dir, tokenizer) = tokenizer();
    let example = tokenizer
        .encode_chat(&[
            message("system", "Be brief."),
            message("user", "Capital of France?"),
            message("assistant", "Paris"),
            message("user", "And of Italy?"),
            message("assistant", "Rome"),
        ])
        .expect("encode");
    assert_eq!(
        target_text(&tokenizer, &example),
        "Paris<|im_end|>\nRome<|im_end|>\n"
    );
    let all = tokenizer.decode(&example.tokens).expect("decode");
    assert!(
        all.starts_with("<|im_start|>system\nBe brief.<|im_end|>"),
        "{all}"
    );
}

#[test]
fn instruction_loss_covers_the_completion_and_eos_but_not_the_prompt() {
    let (_dir, tokenizer) = tokenizer();
    let example = tokenizer
        .encode_prompt_completion("Translate: chat", " cat")
        .expect("encode");
    assert_eq!(target_text(&tokenizer, &example), " cat<|im_end|>");
    assert_eq!(
        example.tokens[0], 256,
        "the tokenizer's post-processor adds BOS"
    );
    let text = tokenizer.encode_text("hello").expect("encode");
    assert!(text.target.iter().all(|t| *t));
    assert_eq!(text.tokens.last(), Some(&tokenizer.eos_id));
}

#[test]
fn long_examples_are_truncated_and_blank_lines_skipped() {
    let (dir, tokenizer) = tokenizer();
    let path = dir.path().join("text.jsonl");
    std::fs::write(
        &path,
        "{\"text\": \"abcdefghijklmnopqrstuvwxyz\"}\n\n{\"text\": \"hi\"}\n",
    )
    .expect("write");
    let examples = load_dataset(&path, DatasetFormat::Text, &tokenizer, 8).expect("load");
    assert_eq!(examples.len(), 2);
    assert_eq!(examples[0].tokens.len(), 8);
    assert_eq!(examples[1].tokens.len(), 4, "BOS, h, i, EOS");
}

#[test]
fn a_line_missing_the_format_fields_is_reported_with_its_line_number() {
    let (dir, tokenizer) = tokenizer();
    let path = dir.path().join("instr.jsonl");
    write_jsonl(
        &path,
        &[
            serde_json::json!({"prompt": "a", "completion": "b"}),
            serde_json::json!({"prompt": "a", "answer": "b"}),
        ],
    )
    .expect("write");
    let err = load_dataset(&path, DatasetFormat::Instruction, &tokenizer, 64).expect_err("bad");
    assert!(
        matches!(err, Error::BadDatasetLine { line: 2, .. }),
        "{err}"
    );
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("instr.jsonl:2:"), "{err}");
}

#[test]
fn preference_pairs_target_only_the_completions_in_string_and_chat_forms() {
    let (dir, tokenizer) = tokenizer();
    let path = dir.path().join("prefs.jsonl");
    write_jsonl(
        &path,
        &[
            serde_json::json!({"prompt": "Say hi.", "chosen": " hello", "rejected": " go away"}),
            serde_json::json!({
                "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": "Leave."
            }),
            serde_json::json!({"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hey"}], "rejected": [{"role": "assistant", "content": "No"}]}),
        ],
    )
    .expect("write");
    let pairs = load_preferences(&path, &tokenizer, 256).expect("pairs");
    assert_eq!(pairs.len(), 3);
    // Plain strings: prompt without loss, completion and EOS with loss.
    assert_eq!(
        target_text(&tokenizer, &pairs[0].chosen),
        " hello<|im_end|>"
    );
    assert_eq!(
        target_text(&tokenizer, &pairs[0].rejected),
        " go away<|im_end|>"
    );
    // Chat: the prompt's turns are context; only the completion's assistant turn learns.
    assert_eq!(
        target_text(&tokenizer, &pairs[1].chosen),
        "Hello!<|im_end|>\n"
    );
    assert_eq!(
        target_text(&tokenizer, &pairs[1].rejected),
        "Leave.<|im_end|>\n"
    );
    let rendered = tokenizer.decode(&pairs[1].chosen.tokens).expect("decode");
    assert!(
        rendered.starts_with("<|im_start|>system\nBe kind.<|im_end|>"),
        "{rendered}"
    );
    // A string prompt next to chat completions becomes a user message.
    let rendered = tokenizer.decode(&pairs[2].rejected.tokens).expect("decode");
    assert!(
        rendered.starts_with("<|im_start|>user\nHi?<|im_end|>"),
        "{rendered}"
    );
    assert_eq!(
        target_text(&tokenizer, &pairs[2].rejected),
        "No<|im_end|>\n"
    );
}

#[test]
fn bad_preference_lines_name_the_file_and_line() {
    let (dir, tokenizer) = tokenizer();
    let path = dir.path().join("prefs.jsonl");
    let good = serde_json::json!({"prompt": "a", "chosen": "b", "rejected": "c"});
    for (bad, why) in [
        (
            serde_json::json!({"prompt": "a", "chosen": "b"}),
            "rejected",
        ),
        (
            serde_json::json!({"prompt": "a", "chosen": 3, "rejected": "c"}),
            "preference example",
        ),
        (
            serde_json::json!({"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}),
            "chosen has no assistant message",
        ),
    ] {
        write_jsonl(&path, &[good.clone(), good.clone(), bad]).expect("write");
        let err = load_preferences(&path, &tokenizer, 64).expect_err("bad line");
        assert!(
            matches!(err, Error::BadDatasetLine { line: 3, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("prefs.jsonl:3:") && text.contains(why),
            "{text}"
        );
        assert!(err.is_invalid_input());
    }
}

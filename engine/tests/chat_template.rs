//! Chat templates render exactly what transformers renders.
//!
//! The fixtures in `tests/fixtures/chat/` were written by `scripts/gen_chat_refs.py`, which
//! renders each conversation with transformers' own `apply_chat_template` machinery. Every case
//! must come out byte for byte the same, and every case where the template raised must give
//! [`ChatTemplateError::Raised`] with the same message.

mod common;

use egpu_engine::chat::{ChatMessage, ChatTemplate, ChatTemplateError};
use egpu_engine::gguf::GgufFile;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Fixture {
    /// The GGUF the template was read from, if any.
    model_file: Option<String>,
    /// `tokenizer.chat_template` as the GGUF carries it; null when the file has none.
    gguf_chat_template: Option<String>,
    /// The template the cases were rendered with.
    chat_template: String,
    bos_token: String,
    eos_token: String,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    /// What transformers rendered; absent when the template raised.
    expected: Option<String>,
    /// The message the template raised with, when it did.
    raises: Option<String>,
}

fn load_fixture(name: &str) -> Fixture {
    let path = common::fixture(&format!("chat/{name}"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("parsing {}: {err}", path.display()))
}

/// Renders every case of `fixture` and fails with all mismatches listed, so one run shows them all.
/// Returns how many cases rendered and how many raised.
fn check_fixture(fixture: &Fixture) -> (usize, usize) {
    let template = ChatTemplate::new(
        &fixture.chat_template,
        &fixture.bos_token,
        &fixture.eos_token,
    )
    .expect("fixture template compiles");
    let mut failures = Vec::new();
    let (mut rendered, mut raised) = (0, 0);
    for case in &fixture.cases {
        let outcome = template.render(&case.messages, case.add_generation_prompt);
        match (&case.expected, &case.raises, outcome) {
            (Some(expected), None, Ok(actual)) if &actual == expected => rendered += 1,
            (None, Some(message), Err(ChatTemplateError::Raised(actual))) if &actual == message => {
                raised += 1
            }
            (expected, raises, actual) => failures.push(format!(
                "case {:?}:\n  transformers: {:?}\n  egpu:         {:?}",
                case.name,
                expected
                    .as_ref()
                    .map_or_else(|| format!("raises {raises:?}"), |e| format!("{e:?}")),
                actual
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from transformers:\n{}",
        failures.len(),
        fixture.cases.len(),
        failures.join("\n")
    );
    (rendered, raised)
}

#[test]
fn smollm2_matches_transformers() {
    let fixture = load_fixture("smollm2-135m-instruct.json");
    let (rendered, raised) = check_fixture(&fixture);
    assert!(rendered >= 8, "only {rendered} SmolLM2 cases");
    assert_eq!(raised, 0);
}

#[test]
fn gemma3_matches_transformers() {
    let fixture = load_fixture("gemma-3-270m.json");
    let (rendered, raised) = check_fixture(&fixture);
    assert!(rendered >= 8, "only {rendered} Gemma 3 cases");
    assert!(
        raised >= 1,
        "no case exercises Gemma's role-alternation error"
    );
}

#[test]
fn gemma3_role_alternation_error_is_raised() {
    let fixture = load_fixture("gemma-3-270m.json");
    let template = ChatTemplate::new(&fixture.chat_template, "<bos>", "<eos>").unwrap();
    let err = template
        .render(&[ChatMessage::user("one"), ChatMessage::user("two")], true)
        .unwrap_err();
    assert_eq!(
        err,
        ChatTemplateError::Raised(
            "Conversation roles must alternate user/assistant/user/assistant/...".to_owned()
        )
    );
    assert!(err.to_string().contains("roles must alternate"), "{err}");
}

#[test]
fn environment_features_match_transformers() {
    let fixture = load_fixture("features.json");
    let (rendered, raised) = check_fixture(&fixture);
    assert!(rendered >= 3, "only {rendered} feature cases");
    assert!(raised >= 1, "no feature case exercises raise_exception");
}

/// The fixture's template file beside the JSON is what the JSON was rendered with; a stale
/// regeneration would show up here. SmolLM2's cases use the template its GGUF carries; the Gemma
/// 3 270M GGUF carries none, so its cases use the published Gemma 3 instruct template.
#[test]
fn template_files_match_fixtures() {
    let smollm = load_fixture("smollm2-135m-instruct.json");
    assert_eq!(
        smollm.model_file.as_deref(),
        Some("SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    assert_eq!(
        smollm.gguf_chat_template.as_ref(),
        Some(&smollm.chat_template)
    );
    let gemma = load_fixture("gemma-3-270m.json");
    assert_eq!(
        gemma.model_file.as_deref(),
        Some("gemma-3-270m-q4_k_m.gguf")
    );
    assert_eq!(gemma.gguf_chat_template, None);
    for (json, jinja) in [
        ("gemma-3-270m.json", "../../../src/chat/gemma3.jinja"),
        ("features.json", "features.chat_template.jinja"),
    ] {
        let fixture = load_fixture(json);
        let source = std::fs::read_to_string(common::fixture(&format!("chat/{jinja}"))).unwrap();
        assert_eq!(
            fixture.chat_template, source,
            "{json} was not rendered from {jinja}"
        );
    }
}

/// `from_gguf` on the real model files finds what gguf-py found when the fixtures were made:
/// SmolLM2's template and token text, and no template in the Gemma 3 270M file (so the fallback).
#[test]
fn from_gguf_reads_the_real_model_files() {
    for (fixture_name, model_file) in [
        ("smollm2-135m-instruct.json", common::SMOLLM2),
        ("gemma-3-270m.json", common::GEMMA3),
    ] {
        let fixture = load_fixture(fixture_name);
        assert_eq!(fixture.model_file.as_deref(), Some(model_file));
        let file = GgufFile::open(common::model_path(model_file)).unwrap();
        let template = ChatTemplate::from_gguf(file.metadata()).unwrap();
        match &fixture.gguf_chat_template {
            Some(source) => {
                assert!(!template.is_fallback(), "{model_file}");
                assert_eq!(template.source(), source, "{model_file}");
            }
            None => {
                // The Gemma file has no template; its vocabulary selects the built-in Gemma one.
                assert!(template.is_fallback(), "{model_file} carries no template");
                assert_eq!(template.source(), fixture.chat_template, "{model_file}");
            }
        }
        assert_eq!(template.bos_token(), fixture.bos_token, "{model_file}");
        assert_eq!(template.eos_token(), fixture.eos_token, "{model_file}");
    }
}

/// The Gemma 3 file has no template of its own; the built-in one `from_gguf` picks for it
/// renders every fixture case as transformers renders Gemma's published template.
#[test]
fn gemma3_from_gguf_uses_the_builtin_gemma_template() {
    let fixture = load_fixture("gemma-3-270m.json");
    let file = GgufFile::open(common::model_path(common::GEMMA3)).unwrap();
    let template = ChatTemplate::from_gguf(file.metadata()).unwrap();
    for case in &fixture.cases {
        let rendered = template.render(&case.messages, case.add_generation_prompt);
        match (&case.expected, rendered) {
            (Some(expected), Ok(text)) => assert_eq!(&text, expected, "case {}", case.name),
            (None, Err(_)) => {}
            (expected, got) => panic!("case {}: expected {expected:?}, got {got:?}", case.name),
        }
    }
}

/// Rendering straight from the SmolLM2 file gives transformers' output for every fixture case.
#[test]
fn smollm2_from_gguf_matches_transformers() {
    let fixture = load_fixture("smollm2-135m-instruct.json");
    let file = GgufFile::open(common::model_path(common::SMOLLM2)).unwrap();
    let template = ChatTemplate::from_gguf(file.metadata()).unwrap();
    for case in &fixture.cases {
        let expected = case.expected.as_ref().expect("SmolLM2 cases all render");
        assert_eq!(
            &template
                .render(&case.messages, case.add_generation_prompt)
                .unwrap(),
            expected,
            "case {}",
            case.name
        );
    }
}

#[test]
fn fallback_renders_chatml() {
    let fallback = ChatTemplate::fallback();
    assert!(fallback.is_fallback());
    let text = fallback
        .render(
            &[
                ChatMessage::system("You are terse."),
                ChatMessage::user("Hello!"),
                ChatMessage::assistant("Hi."),
                ChatMessage::user("Bye ✋"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are terse.<|im_end|>\n\
         <|im_start|>user\nHello!<|im_end|>\n\
         <|im_start|>assistant\nHi.<|im_end|>\n\
         <|im_start|>user\nBye ✋<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // The fallback's format is SmolLM2's own (ChatML), less SmolLM2's default system prompt.
    let smollm = load_fixture("smollm2-135m-instruct.json");
    let case = smollm
        .cases
        .iter()
        .find(|c| c.name == "system_and_user")
        .unwrap();
    assert_eq!(
        fallback
            .render(&case.messages, case.add_generation_prompt)
            .unwrap(),
        *case.expected.as_ref().unwrap()
    );
}

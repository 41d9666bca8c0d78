//! Tool calling: the tools a request offers reach the model through its own chat template
//! (transformers' `tools` variable), and what the model writes back is read as calls in the
//! format its family was trained on.
//!
//! - [`ToolFormat::Hermes`]: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, one
//!   block per call (Qwen 2.5 and 3, Hermes 2 Pro and 3, and the many templates derived from
//!   them). Recognised by the template's `<tool_call>`.
//! - [`ToolFormat::LlamaJson`]: the whole answer is `{"name": …, "parameters": {…}}` (Llama 3.1,
//!   3.2 and 3.3 with custom tools), optionally after `<|python_tag|>`. Recognised by the
//!   template's `"parameters"` instruction beside its `ipython` role.
//!
//! `tool_choice` `required` or a named function makes the call certain: the output is
//! constrained ([`Constraint::Lark`] with the call's JSON schema embedded) to exactly one call
//! in the model's format whose arguments match the tool's `parameters` schema. `auto` lets the
//! model choose: any text, but once it starts a call (`<tool_call>`, or `{` opening a Llama
//! answer) the call is constrained the same way, so a call it makes always parses and matches
//! its tool's schema. `none` renders no tools.

use serde_json::{json, Value};

use crate::error::DaemonError;
use crate::scheduler::constraint::{bound_numbers, with_layout, Constraint};

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model answers in text; the tools are not shown to it.
    None,
    /// The model decides.
    #[default]
    Auto,
    /// The model calls one of the tools.
    Required,
    /// The model calls this tool.
    Function(String),
}

/// The tools a request offers, as OpenAI and transformers list them:
/// `{"type": "function", "function": {"name", "description", "parameters"}}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tools {
    pub list: Vec<Value>,
    pub choice: ToolChoice,
}

/// How a model family writes tool calls (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    LlamaJson,
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments, a JSON object.
    pub arguments: Value,
}

impl ToolFormat {
    /// The format a chat template teaches its model, if it renders tools at all.
    pub fn of_template(source: &str) -> Option<ToolFormat> {
        if !source.contains("tools") {
            return None;
        }
        if source.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if source.contains("\"parameters\"") && source.contains("ipython") {
            Some(ToolFormat::LlamaJson)
        } else {
            None
        }
    }

    /// The key the format puts the arguments under.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "arguments",
            ToolFormat::LlamaJson => "parameters",
        }
    }

    /// Reads the model's answer: the calls it made and the text around them. An answer with a
    /// call that does not parse is text, not a call.
    pub fn parse(self, text: &str) -> (String, Vec<ToolCall>) {
        match self {
            ToolFormat::Hermes => parse_hermes(text),
            ToolFormat::LlamaJson => {
                let body = text.trim();
                let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
                match call_of(body, &["parameters", "arguments"]) {
                    Some(call) => (String::new(), vec![call]),
                    None => (text.to_owned(), Vec::new()),
                }
            }
        }
    }
}

/// How a front end reads an answer given tools: in the model's format, and only as calls to
/// the tools it was offered (anything else is text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolReader {
    pub format: ToolFormat,
    pub names: Vec<String>,
}

impl ToolReader {
    pub fn new(format: ToolFormat, tools: &Tools) -> ToolReader {
        ToolReader {
            format,
            names: tools.names().map(str::to_owned).collect(),
        }
    }

    /// The answer's text and calls; an answer calling a tool that was not offered is text.
    pub fn read(&self, text: &str) -> (String, Vec<ToolCall>) {
        let (content, calls) = self.format.parse(text);
        if calls.iter().all(|c| self.names.contains(&c.name)) {
            (content, calls)
        } else {
            (text.to_owned(), Vec::new())
        }
    }
}

/// Reads a streamed answer given tools: passes on at once the text that cannot turn out to be
/// part of a call, and holds back the rest until the answer is whole, so that a text answer
/// streams as it is written and a call arrives whole.
///
/// - Hermes: everything before a `<tool_call>` is text. Held back: from the first
///   `<tool_call>` on, a tail that may be the start of one, and trailing whitespace (dropped if a
///   call follows, as [`ToolReader::read`] trims the text around calls).
/// - Llama JSON: the answer is a call only if it is one whole JSON object, so an answer whose
///   first visible character is neither `{` nor `<` (for `<|python_tag|>`) is text from there.
///
/// What [`ToolStream::push`] returns and then [`ToolStream::finish`]'s text, joined, are
/// [`ToolReader::read`]'s text for the whole answer (except whitespace at the very start of an
/// answer that turns out to hold calls, which was already sent), and the calls are its calls.
#[derive(Debug, Clone)]
pub struct ToolStream {
    reader: ToolReader,
    /// The whole answer so far.
    answer: String,
    /// How much of `answer` has been passed on.
    sent: usize,
    /// Set once the rest of the answer is held back to the end.
    holding: bool,
}

impl ToolStream {
    pub fn new(reader: ToolReader) -> ToolStream {
        ToolStream {
            reader,
            answer: String::new(),
            sent: 0,
            holding: false,
        }
    }

    /// Takes the next piece of the answer; returns the text that can be passed on now.
    pub fn push(&mut self, text: &str) -> String {
        self.answer.push_str(text);
        if self.holding {
            return String::new();
        }
        let unsent = &self.answer[self.sent..];
        let passable = match self.reader.format {
            ToolFormat::Hermes => {
                const OPEN: &str = "<tool_call>";
                if let Some(start) = unsent.find(OPEN) {
                    self.holding = true;
                    unsent[..start].trim_end().len()
                } else {
                    // Hold back a tail that could be the start of `<tool_call>`, and whitespace.
                    let tail = (1..OPEN.len().min(unsent.len() + 1))
                        .rev()
                        .find(|&n| {
                            unsent.is_char_boundary(unsent.len() - n)
                                && OPEN.starts_with(&unsent[unsent.len() - n..])
                        })
                        .unwrap_or(0);
                    unsent[..unsent.len() - tail].trim_end().len()
                }
            }
            ToolFormat::LlamaJson => match unsent.trim_start().chars().next() {
                None => 0,
                Some('{' | '<') if self.sent == 0 => {
                    self.holding = true;
                    0
                }
                Some(_) => unsent.len(),
            },
        };
        let out = unsent[..passable].to_owned();
        self.sent += passable;
        out
    }

    /// At the end of the answer: the text not yet passed on, and the calls.
    pub fn finish(self) -> (String, Vec<ToolCall>) {
        let (content, calls) = self.reader.read(&self.answer);
        let sent = &self.answer[..self.sent];
        // `read` gives the whole answer back as text when there is no call, and otherwise the
        // text around the calls trimmed, which starts with what was sent less its leading
        // whitespace.
        let rest = content
            .strip_prefix(sent)
            .or_else(|| content.strip_prefix(sent.trim_start()))
            .unwrap_or(&content);
        (rest.to_owned(), calls)
    }
}

fn parse_hermes(text: &str) -> (String, Vec<ToolCall>) {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let (mut content, mut calls, mut rest) = (String::new(), Vec::new(), text);
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        match call_of(body.trim(), &["arguments", "parameters"]) {
            Some(call) => calls.push(call),
            None => return (text.to_owned(), Vec::new()),
        }
        rest = next;
    }
    if calls.is_empty() {
        return (text.to_owned(), calls);
    }
    content.push_str(rest);
    (content.trim().to_owned(), calls)
}

/// `{"name": "...", <key>: {...}}` (the arguments may also come as a JSON string; without
/// them it is not a call: plain JSON output with a `name` field is not mistaken for one).
fn call_of(body: &str, keys: &[&str]) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(body).ok()?;
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = keys.iter().find_map(|k| value.get(*k)).cloned()?;
    let arguments = match arguments {
        Value::Null => json!({}),
        Value::String(s) => serde_json::from_str(&s).ok()?,
        v => v,
    };
    arguments
        .is_object()
        .then_some(ToolCall { name, arguments })
}

impl Tools {
    /// Checks the list and the choice; a problem is an INVALID_ARGUMENT naming it.
    pub fn validate(&self) -> Result<(), DaemonError> {
        let invalid = |m: String| Err(DaemonError::InvalidArgument(m));
        if self.list.len() > MAX_TOOLS {
            return invalid(format!("{} tools; at most {MAX_TOOLS}", self.list.len()));
        }
        for (i, tool) in self.list.iter().enumerate() {
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return invalid(format!("tools[{i}]: only tools of type \"function\" exist"));
            }
            let Some(name) = tool.pointer("/function/name").and_then(Value::as_str) else {
                return invalid(format!("tools[{i}]: function.name is missing"));
            };
            if name.is_empty() {
                return invalid(format!("tools[{i}]: function.name is empty"));
            }
            match tool.pointer("/function/parameters") {
                None | Some(Value::Object(_)) => {}
                Some(_) => {
                    return invalid(format!(
                        "tools[{i}] ({name}): parameters must be a JSON schema object"
                    ))
                }
            }
        }
        if let ToolChoice::Function(name) = &self.choice {
            if !self.names().any(|n| n == name) {
                return invalid(format!(
                    "tool_choice names {name:?}, which is not among the tools"
                ));
            }
        }
        if matches!(self.choice, ToolChoice::Required | ToolChoice::Function(_))
            && self.list.is_empty()
        {
            return invalid("tool_choice asks for a call but no tools were given".into());
        }
        Ok(())
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.list
            .iter()
            .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
    }

    /// Whether the model sees the tools at all.
    pub fn shown(&self) -> bool {
        self.choice != ToolChoice::None && !self.list.is_empty()
    }

    /// The constraint on the answer, in `format`: for `required` or a named function, exactly
    /// one call; for `auto`, any text, but a call once one starts (a lazy grammar, as llama.cpp
    /// does it: free text until the model writes `<tool_call>`, or begins with `{` in the Llama
    /// format, then a call to one of the tools with arguments that match its schema).
    pub fn constraint(&self, format: ToolFormat) -> Option<Constraint> {
        let wanted: Vec<&Value> = match &self.choice {
            ToolChoice::None => return None,
            ToolChoice::Required | ToolChoice::Auto => self.list.iter().collect(),
            ToolChoice::Function(name) => self
                .list
                .iter()
                .filter(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
                .collect(),
        };
        let key = format.arguments_key();
        let calls: Vec<Value> = wanted
            .iter()
            .map(|tool| {
                let function = &tool["function"];
                let parameters = match function.get("parameters") {
                    Some(p @ Value::Object(_)) => p.clone(),
                    _ => json!({"type": "object"}),
                };
                json!({
                    "type": "object",
                    "properties": {"name": {"const": function["name"]}, key: parameters},
                    "required": ["name", key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = if calls.len() == 1 {
            calls.into_iter().next().unwrap_or_default()
        } else {
            json!({"anyOf": calls})
        };
        bound_numbers(&mut schema);
        let schema = with_layout(schema);
        let call = format!("call: %json {schema}\n");
        let auto = self.choice == ToolChoice::Auto;
        Some(Constraint::Lark(match format {
            ToolFormat::Hermes if auto => format!(
                // `head` is lazy: it ends at the first `<tool_call>`, and a call must follow.
                "start: (head \"\\n\" call \"\\n</tool_call>\")* TEXT\n\
                 head[lazy]: TEXT \"<tool_call>\"\n\
                 TEXT: /(.|\\n)*/\n{call}"
            ),
            ToolFormat::Hermes => {
                format!("start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\n{call}")
            }
            // A Llama answer is a call when it is one JSON object, so text may not start with `{`.
            ToolFormat::LlamaJson if auto => format!(
                "start: (TEXT | WS? call | WS)?\n\
                 TEXT: /\\s*[^{{\\s](.|\\n)*/\n\
                 WS: /\\s+/\n{call}"
            ),
            ToolFormat::LlamaJson => format!("start: call\n{call}"),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_calls_are_read_out_of_the_text_around_them() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \
                    \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": \
                    \"{}\"}\n</tool_call>";
        let (content, calls) = ToolFormat::Hermes.parse(text);
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![
                ToolCall {
                    name: "weather".into(),
                    arguments: json!({"city": "Oslo"})
                },
                ToolCall {
                    name: "time".into(),
                    arguments: json!({})
                },
            ]
        );
        // A block that does not parse makes the whole answer text.
        let broken = "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\n</tool_call>";
        assert_eq!(
            ToolFormat::Hermes.parse(broken),
            (broken.to_owned(), vec![])
        );
        assert_eq!(
            ToolFormat::Hermes.parse("plain"),
            ("plain".to_owned(), vec![])
        );
    }

    #[test]
    fn llama_json_calls_are_the_whole_answer() {
        let (content, calls) = ToolFormat::LlamaJson
            .parse("<|python_tag|>{\"name\": \"weather\", \"parameters\": {\"city\": \"Oslo\"}}");
        assert_eq!(content, "");
        assert_eq!(calls[0].arguments, json!({"city": "Oslo"}));
        let text = "The weather is {\"fine\"}.";
        assert_eq!(ToolFormat::LlamaJson.parse(text), (text.to_owned(), vec![]));
        // JSON with a name but no arguments is an answer, not a call.
        let person = "{\"name\": \"Bob\", \"age\": 3}";
        assert_eq!(
            ToolFormat::LlamaJson.parse(person),
            (person.to_owned(), vec![])
        );
    }

    /// Streams `pieces` and checks that what was passed on plus the rest is `read`'s text and
    /// the calls are its calls; returns what was passed on before the end.
    fn stream(format: ToolFormat, pieces: &[&str]) -> (String, String, Vec<ToolCall>) {
        let reader = ToolReader {
            format,
            names: vec!["weather".into()],
        };
        let whole: String = pieces.concat();
        let (content, calls) = reader.read(&whole);
        let mut stream = ToolStream::new(reader);
        let early: String = pieces.iter().map(|p| stream.push(p)).collect();
        let (rest, streamed_calls) = stream.finish();
        assert_eq!(streamed_calls, calls, "{pieces:?}");
        let joined = format!("{early}{rest}");
        assert!(
            joined == content || joined.trim_start() == content,
            "{pieces:?}: {joined:?} against {content:?}"
        );
        (early, rest, calls)
    }

    #[test]
    fn streamed_answers_pass_text_on_and_hold_calls() {
        use ToolFormat::{Hermes, LlamaJson};
        // Text streams as it comes, except a tail that could open a call.
        let (early, rest, calls) = stream(Hermes, &["The weather", " is fine <tool", "ing> ok"]);
        assert_eq!(
            (early.as_str(), rest.as_str()),
            ("The weather is fine <tooling> ok", "")
        );
        assert!(calls.is_empty());
        let (early, _, _) = stream(Hermes, &["Sunny ", "<tool_"]);
        assert_eq!(early, "Sunny");
        // Text, then a call: the text before it streams; the call comes whole at the end.
        let call = "<tool_call>\n{\"name\": \"weather\", \"arguments\": {}}\n</tool_call>";
        let (early, rest, calls) = stream(
            Hermes,
            &["Let me ", "check.\n", &call[..7], &call[7..], " Done."],
        );
        assert_eq!(
            (early.as_str(), rest.as_str()),
            ("Let me check.", "\n Done.")
        );
        assert_eq!(calls.len(), 1);
        // A call to a tool that was not offered, or one that does not parse, is text after all.
        stream(
            Hermes,
            &[
                "Hi ",
                "<tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>",
            ],
        );
        stream(Hermes, &["<tool_call>{\"name\": ", "\"weather\""]);
        // Multi-byte text next to a partial tag.
        stream(Hermes, &["Grüße <", "tool_c", "é"]);
        // Llama: an answer that starts as JSON is held; one that does not streams.
        let (early, rest, calls) = stream(
            LlamaJson,
            &[" ", "{\"name\": \"weather\",", " \"parameters\": {}}"],
        );
        assert_eq!((early.as_str(), rest.as_str(), calls.len()), ("", "", 1));
        let (early, rest, _) = stream(LlamaJson, &["  ", "It is", " {sunny}"]);
        assert_eq!((early.as_str(), rest.as_str()), ("  It is {sunny}", ""));
        let (early, rest, calls) = stream(LlamaJson, &["{\"name\": \"Bob\"}"]);
        assert_eq!((early.as_str(), rest.as_str()), ("", "{\"name\": \"Bob\"}"));
        assert!(calls.is_empty());
    }

    /// Whether `constraint` lets a model write `text` (in a SentencePiece vocabulary of `▁`, the
    /// 256 bytes and an end token, so every text is spelled one way) and then, if `end`, stop.
    fn allows(constraint: &Constraint, text: &str, end: bool) -> bool {
        use crate::scheduler::constraint::Grammars;
        use egpu_engine::tokenizer::{token_type, SpecialIdSpec, Tokenizer, VocabSpec};
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "▁"].map(String::from).to_vec();
        let mut types = vec![
            token_type::UNKNOWN,
            token_type::CONTROL,
            token_type::CONTROL,
            token_type::NORMAL,
        ];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(token_type::BYTE);
        }
        let spec = VocabSpec {
            model: "llama".into(),
            scores: Some(vec![0.0; tokens.len()]),
            tokens,
            token_types: Some(types),
            special_ids: SpecialIdSpec {
                bos: Some(1),
                eos: Some(2),
                unk: Some(0),
                ..SpecialIdSpec::default()
            },
            ..VocabSpec::default()
        };
        let tokenizer = std::sync::Arc::new(Tokenizer::from_spec(&spec).unwrap());
        let n = tokenizer.vocab_size();
        let ids = tokenizer.encode_continuation(text);
        let mut matcher = Grammars::new(tokenizer).compile(constraint).unwrap();
        let (logits, mut masked) = (vec![0.0f32; n], Vec::new());
        for id in ids.into_iter().chain(end.then_some(2)) {
            if matcher.mask(&logits, &mut masked).is_err() || masked[id as usize].is_infinite() {
                return false;
            }
            if id != 2 {
                matcher.accept(id).unwrap();
            }
        }
        true
    }

    #[test]
    fn auto_leaves_text_free_and_constrains_a_call_once_it_starts() {
        let tools = Tools {
            list: vec![json!({"type": "function", "function": {"name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": false}}})],
            choice: ToolChoice::Auto,
        };
        let hermes = tools.constraint(ToolFormat::Hermes).unwrap();
        let call = "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        for (text, end, allowed) in [
            ("Sunny, {probably} <b>warm</b>.\nBye", true, true),
            ("", true, true),
            (&format!("Let me look.\n{call}"), true, true),
            (&format!("{call}\nAnd again: {call} done"), true, true),
            ("<tool_call>\nhello", false, false),
            ("<tool_call>\n{\"name\": \"time\"", false, false),
            (
                "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"town\"",
                false,
                false,
            ),
            ("<tool_call>\n{\"name\": \"weather\"", true, false),
        ] {
            assert_eq!(allows(&hermes, text, end), allowed, "hermes {text:?}");
        }
        let llama = tools.constraint(ToolFormat::LlamaJson).unwrap();
        for (text, end, allowed) in [
            ("It is sunny {today}.", true, true),
            ("", true, true),
            (
                "{\"name\": \"weather\", \"parameters\": {\"city\": \"Oslo\"}}",
                true,
                true,
            ),
            (
                "\n{\"name\": \"weather\", \"parameters\": {\"city\": \"Oslo\"}}",
                true,
                true,
            ),
            ("{\"name\": \"Bob\"", false, false),
            (" {oops", false, false),
            (
                "{\"name\": \"weather\", \"parameters\": {\"city\": \"Oslo\"}} more",
                false,
                false,
            ),
        ] {
            assert_eq!(allows(&llama, text, end), allowed, "llama {text:?}");
        }
        // `required`: the call and nothing else.
        let required = Tools {
            choice: ToolChoice::Required,
            ..tools.clone()
        };
        let required = required.constraint(ToolFormat::Hermes).unwrap();
        assert!(allows(&required, call, true));
        assert!(!allows(&required, "Sunny", false));
        // `none` shows no tools and constrains nothing.
        let none = Tools {
            choice: ToolChoice::None,
            ..tools
        };
        assert_eq!(none.constraint(ToolFormat::Hermes), None);
    }

    #[test]
    fn bad_tool_lists_and_choices_are_invalid_arguments() {
        let tool = |name: &str| json!({"type": "function", "function": {"name": name}});
        let ok = Tools {
            list: vec![tool("a")],
            choice: ToolChoice::Function("a".into()),
        };
        assert!(ok.validate().is_ok());
        let cases = [
            Tools {
                list: vec![json!({"type": "retrieval"})],
                choice: ToolChoice::Auto,
            },
            Tools {
                list: vec![json!({"type": "function", "function": {}})],
                choice: ToolChoice::Auto,
            },
            Tools {
                list: vec![tool("a")],
                choice: ToolChoice::Function("b".into()),
            },
            Tools {
                list: vec![],
                choice: ToolChoice::Required,
            },
        ];
        for tools in cases {
            assert!(
                matches!(tools.validate(), Err(DaemonError::InvalidArgument(_))),
                "{tools:?}"
            );
        }
    }

    #[test]
    fn formats_come_from_the_template() {
        assert_eq!(
            ToolFormat::of_template("{% if tools %}<tool_call>{% endif %}"),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(ToolFormat::of_template("{{ messages }}"), None);
    }
}

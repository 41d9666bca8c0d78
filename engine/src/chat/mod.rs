//! Chat templates: turning a conversation into the prompt text a model was trained on.
//!
//! Instruction-tuned models ship a Hugging Face chat template, a Jinja program that GGUF files
//! carry as `tokenizer.chat_template`. [`ChatTemplate`] renders it with minijinja inside an
//! environment built to match the one transformers' `apply_chat_template` gives templates, so
//! that the prompt egpu feeds a model is, byte for byte, the prompt transformers would build:
//!
//! - Jinja's `trim_blocks` and `lstrip_blocks` are on (transformers turns both on), and a single
//!   trailing newline of the template is dropped (Jinja's default).
//! - The template sees `messages` (a list of maps with `role` and `content`),
//!   `add_generation_prompt`, `bos_token`, `eos_token`, `tools` (none, or the request's tools)
//!   and `documents` (none).
//! - `raise_exception(message)` stops rendering with [`ChatTemplateError::Raised`] carrying the
//!   template's message; templates use it to reject conversations they cannot format, such as
//!   Gemma's "Conversation roles must alternate user/assistant/user/assistant/...".
//! - `strftime_now(format)` formats the local time with strftime codes.
//! - `tojson` is transformers' replacement for Jinja's filter: Python's `json.dumps` with
//!   `ensure_ascii=False`, `", "`/`": "` separators and no HTML escaping, accepting
//!   `ensure_ascii`, `indent`, `separators` and `sort_keys`.
//! - Python's string and dict methods that templates call (`.strip()`, `.startswith()`,
//!   `.split()`, `.items()`, `.get()`, ...) work, with Python's definition of whitespace
//!   (which also covers U+001C..U+001F) in `.strip()`, `.split()` and the `trim` filter.
//! - `{{ none }}`, `{{ true }}`, `{{ false }}` and floats print as Python prints them
//!   (`None`, `True`, `False`, `1e-05`).
//!
//! `engine/tests/chat_template.rs` checks this against fixtures rendered by transformers itself
//! (see `scripts/gen_chat_refs.py`) for SmolLM2's and Gemma 3's templates and for a synthetic
//! template that exercises the helpers above.
//!
//! Known differences, none of which the templates egpu targets rely on: printing a whole list or
//! map (`{{ [1, 'a'] }}`) quotes its strings as JSON does (`[1, "a"]`) where Python's `repr`
//! uses single quotes; floats joined with `~` or `| string` outside the range Python writes
//! positionally come out positional (`0.00001` for Python's `1e-05`); Python's `%` string
//! formatting is not available; an unknown filter is reported when rendering rather than when
//! compiling; `strftime_now` uses chrono's strftime, which agrees with C's for the common codes;
//! and one render may run at most 20 million template instructions, where transformers has no
//! limit.
//!
//! # Fallback
//!
//! A model file without a chat template whose vocabulary has Gemma's `<start_of_turn>` and
//! `<end_of_turn>` (the Gemma 3 270M GGUF that egpu tests with is one) gets Gemma's published
//! instruct template, [`ChatTemplate::builtin_gemma`]. Any other file without a template is
//! given [`ChatTemplate::fallback`], a ChatML template:
//!
//! ```text
//! <|im_start|>system
//! You are terse.<|im_end|>
//! <|im_start|>user
//! Hello!<|im_end|>
//! <|im_start|>assistant
//! ```
//!
//! ChatML is the default because it is the format the most instruction-tuned models in the GGUF
//! world were trained on (Qwen, SmolLM and many community fine-tunes), because llama.cpp falls
//! back to it too, so a model without a template behaves in egpu as it does there, and because
//! it marks every turn with an explicit role header, so even a model trained on another format
//! sees a plainly structured conversation. It adds no system prompt and no bos token of its own:
//! the fallback invents nothing model-specific, and the tokenizer adds bos where the model asks.

mod python;

use std::fmt;

use minijinja::value::ValueKind;
use minijinja::{AutoEscape, Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::gguf::Metadata;

/// The name the template is registered under inside its minijinja environment; it shows up in
/// error locations (`chat_template:3`).
const TEMPLATE_NAME: &str = "chat_template";

/// How many minijinja instructions one render may execute. A GGUF's template is untrusted input,
/// and a nested `range` loop could otherwise keep a daemon thread busy for hours. SmolLM2's and
/// Gemma 3's templates spend under a hundred instructions per message, so this still allows
/// conversations of some 200,000 messages, while a runaway template stops within a few seconds.
const RENDER_FUEL: u64 = 20_000_000;

/// The most text one render may write. A prompt longer than this would not fit any context egpu
/// serves (the daemon admits at most 16 MiB of input), and without a bound a loop printing a
/// large string writes until memory runs out, each iteration well inside the fuel.
pub const MAX_RENDERED_BYTES: usize = 64 << 20;

/// The largest width, count or indent a template may pass to a filter that allocates that much
/// at once (`indent`, `tojson(indent=...)`, `batch`, `slice`). Real templates pass single digits;
/// `indent(2**62)` would otherwise ask the allocator for exabytes in one step, and a failed
/// allocation aborts the process rather than failing the render.
pub const MAX_FILTER_WIDTH: usize = 4096;

/// Gemma 3's instruct template as published with the Hugging Face checkpoints (the fixture
/// test checks it renders as transformers renders it).
const GEMMA_SOURCE: &str = include_str!("gemma3.jinja");

/// The ChatML template [`ChatTemplate::fallback`] renders; see the module docs for why ChatML.
const FALLBACK_SOURCE: &str = "{% for message in messages %}\
<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n\
{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// One turn of a conversation, as chat templates see it: `message.role` and `message.content`,
/// and for tool use transformers' fields: an assistant's `tool_calls` (a list of
/// `{"type": "function", "function": {"name": …, "arguments": {…}}}`, arguments as a map), and
/// a tool result's `tool_call_id` and `name` (role `tool`). Absent fields are undefined in the
/// template, as in transformers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: usually `system`, `user` or `assistant`; templates decide what else they accept.
    pub role: String,
    /// What they say.
    pub content: String,
    /// The tool calls an assistant turn made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// Which call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The tool's name, on a `tool` message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("assistant", content)
    }
}

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template is not valid Jinja (as minijinja parses it); the text names the line.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`: it refuses this conversation.
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// Rendering failed for another reason, such as a call to an unknown filter or an
    /// operation on values of the wrong type; the text names the line.
    #[error("chat template failed to render: {0}")]
    Render(String),
    /// There were no messages to render; transformers refuses these too.
    #[error("cannot render an empty conversation: give at least one message")]
    EmptyConversation,
    /// Rendering wrote more than [`MAX_RENDERED_BYTES`].
    #[error("chat template output passed {limit} bytes")]
    TooLong { limit: usize },
    /// The model file's chat metadata is malformed: a template that is not a string, or a bos
    /// or eos token id outside the vocabulary.
    #[error("model metadata: {0}")]
    Metadata(String),
}

/// A compiled chat template and the special-token strings it is rendered with.
///
/// Compiling happens once, in [`ChatTemplate::new`]; [`ChatTemplate::render`] can then be called
/// any number of times, from any thread.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    environment: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    is_fallback: bool,
}

/// The error `raise_exception` returns, kept as the minijinja error's source so that
/// [`ChatTemplate::render`] can tell a template's own refusal from other failures.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

impl ChatTemplate {
    /// Compiles `source`, a Hugging Face chat template, to be rendered with the given text of
    /// the tokenizer's bos and eos tokens (what templates see as `bos_token` and `eos_token`).
    pub fn new(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        let mut environment = transformers_environment();
        environment
            .add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|err| ChatTemplateError::Syntax(describe(&err)))?;
        Ok(ChatTemplate {
            environment,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            is_fallback: false,
        })
    }

    /// Gemma's published instruct template, used for Gemma-vocabulary files that carry no
    /// template (see [`ChatTemplate::from_gguf`]).
    pub fn builtin_gemma(bos_token: &str, eos_token: &str) -> ChatTemplate {
        match ChatTemplate::new(GEMMA_SOURCE, bos_token, eos_token) {
            Ok(mut template) => {
                template.is_fallback = true;
                template
            }
            // The built-in source is compiled by the unit tests; this arm cannot be reached.
            Err(_) => ChatTemplate::fallback(),
        }
    }

    /// The template a model file carries, or [`ChatTemplate::fallback`] (keeping the given
    /// bos/eos text) when it carries none. A template that is present but does not compile is an
    /// error rather than a reason to fall back: silently prompting a model in the wrong format
    /// would be worse.
    pub fn new_or_fallback(
        source: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        match source {
            Some(source) => ChatTemplate::new(source, bos_token, eos_token),
            None => {
                let mut template = ChatTemplate::fallback();
                template.bos_token = bos_token.to_owned();
                template.eos_token = eos_token.to_owned();
                Ok(template)
            }
        }
    }

    /// The chat template a GGUF file carries (`tokenizer.chat_template`), rendered with the text
    /// of its bos and eos tokens (`tokenizer.ggml.bos_token_id`/`eos_token_id` looked up in
    /// `tokenizer.ggml.tokens`; empty when the file names none). A file without a template, or
    /// with an empty one, gets [`ChatTemplate::fallback`]. Named variants such as
    /// `tokenizer.chat_template.tool_use` are not consulted.
    pub fn from_gguf(meta: &Metadata) -> Result<ChatTemplate, ChatTemplateError> {
        const TEMPLATE_KEY: &str = "tokenizer.chat_template";
        let source = match meta.get(TEMPLATE_KEY) {
            None => None,
            Some(value) => match value.as_str() {
                Some(source) => Some(source).filter(|s| !s.is_empty()),
                None => {
                    return Err(ChatTemplateError::Metadata(format!(
                        "{TEMPLATE_KEY} is not a string"
                    )))
                }
            },
        };
        let vocabulary = meta
            .get_str_array("tokenizer.ggml.tokens")
            .unwrap_or_default();
        let token_text = |key: &str| -> Result<&str, ChatTemplateError> {
            match meta.get_u64(key) {
                None => Ok(""),
                Some(id) => usize::try_from(id)
                    .ok()
                    .and_then(|id| vocabulary.get(id))
                    .map(String::as_str)
                    .ok_or_else(|| {
                        ChatTemplateError::Metadata(format!(
                            "{key} is {id}, outside the {}-token vocabulary",
                            vocabulary.len()
                        ))
                    }),
            }
        };
        let bos_token = token_text("tokenizer.ggml.bos_token_id")?;
        let eos_token = token_text("tokenizer.ggml.eos_token_id")?;
        // Gemma files converted without their template (Gemma 3 270M is one) still have Gemma's
        // turn markers in the vocabulary: prompt them in the format they were trained on rather
        // than in ChatML, which they have never seen.
        let has = |token: &str| vocabulary.iter().any(|t| t == token);
        if source.is_none() && has("<start_of_turn>") && has("<end_of_turn>") {
            return Ok(ChatTemplate::builtin_gemma(bos_token, eos_token));
        }
        ChatTemplate::new_or_fallback(source, bos_token, eos_token)
    }

    /// The ChatML template used for models without one; the module docs say why ChatML. Its
    /// bos and eos text are empty, since ChatML uses neither.
    pub fn fallback() -> ChatTemplate {
        match ChatTemplate::new(FALLBACK_SOURCE, "", "") {
            Ok(mut template) => {
                template.is_fallback = true;
                template
            }
            // The fallback is a constant that the tests compile; failing here is a bug in egpu.
            Err(err) => unreachable!("the built-in ChatML template does not compile: {err}"),
        }
    }

    /// Whether this is [`ChatTemplate::fallback`] rather than a model's own template.
    pub fn is_fallback(&self) -> bool {
        self.is_fallback
    }

    /// The Jinja source this template was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text templates see as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The text templates see as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders `messages` into prompt text. With `add_generation_prompt`, the template appends
    /// the header that opens the assistant's reply (if it supports that), ready for generation.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with the tools a model may call, as transformers passes them
    /// (`tools`: a list of `{"type": "function", "function": {name, description, parameters}}`).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        if messages.is_empty() {
            return Err(ChatTemplateError::EmptyConversation);
        }
        let template = self
            .environment
            .get_template(TEMPLATE_NAME)
            .map_err(|err| ChatTemplateError::Render(describe(&err)))?;
        // The same variables transformers passes; `documents` is none because egpu does not
        // offer it, and templates test it with `is none`/`is not none`; so is `tools` without
        // tools.
        let context = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => tools.map_or(Value::from(()), Value::from_serialize),
            documents => Value::from(()),
        };
        let mut out = BoundedText::new(MAX_RENDERED_BYTES);
        match template.render_captured_to(context, &mut out) {
            Ok(_) => Ok(out.into_string()),
            Err(_) if out.overflowed => Err(ChatTemplateError::TooLong {
                limit: MAX_RENDERED_BYTES,
            }),
            Err(err) => Err(classify_render_error(&err)),
        }
    }
}

/// Rendered text that refuses to grow past a limit: the write that would pass it fails, which
/// stops minijinja at once.
struct BoundedText {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl BoundedText {
    fn new(limit: usize) -> BoundedText {
        BoundedText {
            bytes: Vec::new(),
            limit,
            overflowed: false,
        }
    }

    fn into_string(self) -> String {
        // minijinja writes only whole `str`s, so the bytes are UTF-8; lossy conversion costs a
        // scan but cannot fail.
        match String::from_utf8(self.bytes) {
            Ok(text) => text,
            Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
        }
    }
}

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A minijinja environment set up like the one transformers compiles chat templates in.
fn transformers_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    // Chat templates produce plain text: nothing may be HTML-escaped, whatever the name.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_formatter(python::format_output);
    env.set_unknown_method_callback(python_method);
    env.add_filter("tojson", python::tojson);
    env.add_filter("trim", trim_filter);
    env.add_filter("indent", bounded_indent);
    env.add_filter("batch", bounded_batch);
    env.add_filter("slice", bounded_slice);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// Python methods on template values: strip and whitespace split follow Python's whitespace
/// here; everything else is minijinja-contrib's `pycompat`.
fn python_method(
    state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str().filter(|_| value.kind() == ValueKind::String) {
        let side = match method {
            "strip" => Some(python::StripSide::Both),
            "lstrip" => Some(python::StripSide::Start),
            "rstrip" => Some(python::StripSide::End),
            _ => None,
        };
        if let Some(side) = side {
            let (chars,): (Option<&str>,) = minijinja::value::from_args(args)?;
            return Ok(Value::from(python::strip(s, chars, side)));
        }
        if method == "split" && args.first().is_none_or(|sep| sep.is_none()) {
            let maxsplit = match args.get(1) {
                Some(v) => Some(v.as_i64().ok_or_else(|| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, "maxsplit must be an int")
                })?),
                None => None,
            };
            if args.len() > 2 {
                return Err(minijinja::Error::from(ErrorKind::TooManyArguments));
            }
            return Ok(python::split_whitespace(s, maxsplit)
                .into_iter()
                .map(Value::from)
                .collect());
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Jinja's `trim` filter is Python's `str(value).strip(chars)`.
fn trim_filter(value: &Value, chars: Option<&str>) -> String {
    let text = match value.as_str() {
        Some(s) if value.kind() == ValueKind::String => s.to_owned(),
        _ => python::python_str(value),
    };
    python::strip(&text, chars, python::StripSide::Both).to_owned()
}

/// Refuses a size argument past [`MAX_FILTER_WIDTH`] before a filter allocates it.
pub(crate) fn check_width(filter: &str, width: usize) -> Result<(), minijinja::Error> {
    if width > MAX_FILTER_WIDTH {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("{filter}: {width} is more than the {MAX_FILTER_WIDTH} egpu allows"),
        ));
    }
    Ok(())
}

/// Jinja's `indent`, with its width bounded.
fn bounded_indent(
    value: minijinja::value::StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: minijinja::value::Kwargs,
) -> Result<Value, minijinja::Error> {
    let width_or_keyword = match width {
        Some(width) => Some(width),
        None => kwargs.peek::<Option<usize>>("width")?,
    };
    check_width("indent", width_or_keyword.unwrap_or(0))?;
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

/// Jinja's `batch`, with its count bounded.
fn bounded_batch(
    state: &minijinja::State,
    value: Value,
    count: usize,
    fill_with: Option<Value>,
) -> Result<Value, minijinja::Error> {
    check_width("batch", count)?;
    minijinja::filters::batch(state, value, count, fill_with)
}

/// Jinja's `slice`, with its count bounded.
fn bounded_slice(
    state: &minijinja::State,
    value: Value,
    count: usize,
    fill_with: Option<Value>,
) -> Result<Value, minijinja::Error> {
    check_width("slice", count)?;
    minijinja::filters::slice(state, value, count, fill_with)
}

/// transformers' `raise_exception`: aborts rendering with the template's message.
fn raise_exception(message: &Value) -> Result<Value, minijinja::Error> {
    let message = match message.as_str() {
        Some(s) if message.kind() == ValueKind::String => s.to_owned(),
        _ => python::python_str(message),
    };
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedByTemplate(message)),
    )
}

/// transformers' `strftime_now`: the local time, formatted with strftime codes.
fn strftime_now(format: &str) -> Result<String, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    use std::fmt::Write as _;

    let items: Vec<Item<'_>> = StrftimeItems::new(format).collect();
    if items.iter().any(|item| matches!(item, Item::Error)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format {format:?}"),
        ));
    }
    let mut out = String::new();
    write!(
        out,
        "{}",
        chrono::Local::now().format_with_items(items.into_iter())
    )
    .map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: cannot format {format:?}"),
        )
    })?;
    Ok(out)
}

/// A minijinja error as one line: what went wrong, where, and the errors beneath it.
fn describe(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Sorts a rendering failure into the template's own refusal or any other failure.
fn classify_render_error(err: &minijinja::Error) -> ChatTemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(raised) = cause.downcast_ref::<RaisedByTemplate>() {
            return ChatTemplateError::Raised(raised.0.clone());
        }
        source = cause.source();
    }
    ChatTemplateError::Render(describe(err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::write::GgufWriter;
    use crate::gguf::{GgufFile, MetaArray, MetaValue};

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String, ChatTemplateError> {
        ChatTemplate::new(source, "<s>", "</s>")?.render(messages, true)
    }

    #[test]
    fn fallback_is_chatml() {
        let fallback = ChatTemplate::fallback();
        assert!(fallback.is_fallback());
        let text = fallback
            .render(
                &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
                true,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = fallback.render(&[ChatMessage::user("Hi")], false).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn new_or_fallback_keeps_token_text() {
        let fallback = ChatTemplate::new_or_fallback(None, "<bos>", "<eos>").unwrap();
        assert!(fallback.is_fallback());
        assert_eq!(
            (fallback.bos_token(), fallback.eos_token()),
            ("<bos>", "<eos>")
        );
        let own = ChatTemplate::new_or_fallback(Some("{{ bos_token }}"), "<bos>", "<eos>").unwrap();
        assert!(!own.is_fallback());
        assert_eq!(
            own.render(&[ChatMessage::user("x")], false).unwrap(),
            "<bos>"
        );
    }

    fn gguf_metadata(entries: Vec<(&str, MetaValue)>) -> Metadata {
        let writer = entries
            .into_iter()
            .fold(GgufWriter::new(), |writer, (key, value)| {
                writer.kv(key, value)
            });
        GgufFile::from_bytes(writer.to_bytes())
            .unwrap()
            .metadata()
            .clone()
    }

    fn vocabulary() -> MetaValue {
        MetaValue::Array(MetaArray::String(
            ["<unk>", "<s>", "</s>", "hi"].map(String::from).to_vec(),
        ))
    }

    #[test]
    fn from_gguf_reads_template_and_token_text() {
        let meta = gguf_metadata(vec![
            (
                "tokenizer.chat_template",
                MetaValue::String("{{ bos_token }}|{{ eos_token }}".into()),
            ),
            ("tokenizer.ggml.tokens", vocabulary()),
            ("tokenizer.ggml.bos_token_id", MetaValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", MetaValue::U32(2)),
        ]);
        let template = ChatTemplate::from_gguf(&meta).unwrap();
        assert!(!template.is_fallback());
        assert_eq!(template.source(), "{{ bos_token }}|{{ eos_token }}");
        assert_eq!(
            template.render(&[ChatMessage::user("x")], true).unwrap(),
            "<s>|</s>"
        );
    }

    #[test]
    fn from_gguf_falls_back_without_a_template() {
        for template in [None, Some("")] {
            let mut entries = vec![
                ("tokenizer.ggml.tokens", vocabulary()),
                ("tokenizer.ggml.bos_token_id", MetaValue::U32(1)),
            ];
            if let Some(source) = template {
                entries.push(("tokenizer.chat_template", MetaValue::String(source.into())));
            }
            let template = ChatTemplate::from_gguf(&gguf_metadata(entries)).unwrap();
            assert!(template.is_fallback());
            assert_eq!(template.source(), ChatTemplate::fallback().source());
            assert_eq!((template.bos_token(), template.eos_token()), ("<s>", ""));
        }
        assert!(ChatTemplate::from_gguf(&Metadata::default())
            .unwrap()
            .is_fallback());
    }

    #[test]
    fn from_gguf_rejects_malformed_metadata() {
        let not_a_string = gguf_metadata(vec![("tokenizer.chat_template", MetaValue::U32(7))]);
        assert!(matches!(
            ChatTemplate::from_gguf(&not_a_string),
            Err(ChatTemplateError::Metadata(text)) if text.contains("not a string")
        ));
        let out_of_range = gguf_metadata(vec![
            ("tokenizer.ggml.tokens", vocabulary()),
            ("tokenizer.ggml.eos_token_id", MetaValue::U64(4)),
        ]);
        assert!(matches!(
            ChatTemplate::from_gguf(&out_of_range),
            Err(ChatTemplateError::Metadata(text)) if text.contains("eos_token_id is 4, outside the 4-token")
        ));
        let broken_template = gguf_metadata(vec![(
            "tokenizer.chat_template",
            MetaValue::String("{% if %}".into()),
        )]);
        assert!(matches!(
            ChatTemplate::from_gguf(&broken_template),
            Err(ChatTemplateError::Syntax(_))
        ));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err =
            ChatTemplate::new("ok\n{% for m in messages %}\n{{ m.content ", "", "").unwrap_err();
        match err {
            ChatTemplateError::Syntax(text) => assert!(text.contains("chat_template:3"), "{text}"),
            other => panic!("expected a syntax error, got {other:?}"),
        }
        assert!(matches!(
            ChatTemplate::new("{% endfor %}", "", ""),
            Err(ChatTemplateError::Syntax(_))
        ));
    }

    #[test]
    fn raise_exception_is_typed_even_inside_macros_and_loops() {
        let source = "{% macro refuse(m) %}{{ raise_exception('bad role: ' ~ m.role) }}{% endmacro %}\
                      {% for m in messages %}{% if m.role == 'tool' %}{{ refuse(m) }}{% endif %}{% endfor %}";
        let err = render(
            source,
            &[ChatMessage::user("a"), ChatMessage::new("tool", "b")],
        )
        .unwrap_err();
        assert_eq!(err, ChatTemplateError::Raised("bad role: tool".to_owned()));
    }

    #[test]
    fn other_failures_are_render_errors() {
        let err = render("{{ messages | no_such_filter }}", &[ChatMessage::user("a")]).unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::Render(ref text) if text.contains("no_such_filter")),
            "{err:?}"
        );
        let err = render(
            "{{ messages[0].content.no_such_method() }}",
            &[ChatMessage::user("a")],
        )
        .unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)), "{err:?}");
        let err = render("{{ missing.attribute }}", &[ChatMessage::user("a")]).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)), "{err:?}");
    }

    #[test]
    fn runaway_templates_stop() {
        let runaway =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let err = render(runaway, &[ChatMessage::user("a")]).unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::Render(ref text) if text.contains("fuel")),
            "{err:?}"
        );
        // The limit leaves room for long conversations.
        let long: Vec<ChatMessage> = (0..20_000)
            .map(|i| ChatMessage::user(format!("message {i}")))
            .collect();
        let text = ChatTemplate::fallback().render(&long, true).unwrap();
        assert!(text.ends_with("message 19999<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn output_is_bounded() {
        // 100 MB strings are what minijinja's own repeat allows; printing one in a loop used to
        // write until memory ran out, each iteration well inside the fuel.
        let flood =
            "{% set a = 'x' * 1000000 %}{% for i in range(100000) %}{{ a ~ i }}{% endfor %}";
        let err = render(flood, &[ChatMessage::user("a")]).unwrap_err();
        assert_eq!(
            err,
            ChatTemplateError::TooLong {
                limit: MAX_RENDERED_BYTES
            }
        );
    }

    #[test]
    fn sizes_passed_to_filters_are_bounded() {
        for source in [
            "{{ messages | tojson(indent=4611686018427387904) }}",
            "{{ messages[0].content | indent(4611686018427387904) }}",
            "{{ messages[0].content | indent(width=4611686018427387904) }}",
            "{{ messages | batch(4611686018427387904) | list }}",
            "{{ messages | slice(4611686018427387904) | list }}",
        ] {
            let err = render(source, &[ChatMessage::user("a\nb")]).unwrap_err();
            assert!(
                matches!(err, ChatTemplateError::Render(ref text) if text.contains("more than the 4096")),
                "{source}: {err:?}"
            );
        }
        // Ordinary sizes still work as Jinja's.
        assert_eq!(
            render(
                "{{ messages[0].content | indent(2) }}",
                &[ChatMessage::user("a\nb")]
            )
            .unwrap(),
            "a\n  b"
        );
        assert_eq!(
            render(
                "{{ [1, 2, 3] | batch(2) | list }}",
                &[ChatMessage::user("a")]
            )
            .unwrap(),
            "[[1, 2], [3]]"
        );
    }

    #[test]
    fn empty_conversation_is_refused() {
        assert_eq!(
            ChatTemplate::fallback().render(&[], true),
            Err(ChatTemplateError::EmptyConversation)
        );
    }

    #[test]
    fn strftime_now_formats_local_time() {
        let year = chrono::Local::now().format("%Y").to_string();
        let text = render(
            "{{ strftime_now('%Y') }}|{{ strftime_now('%d %b %Y') }}",
            &[ChatMessage::user("a")],
        )
        .unwrap();
        let (rendered_year, date) = text.split_once('|').unwrap();
        // Rendering straddling New Year's midnight would fail this; the odds are negligible.
        assert_eq!(rendered_year, year);
        assert_eq!(date.len(), "25 Nov 2026".len(), "{date}");
        assert!(matches!(
            render("{{ strftime_now('%Q') }}", &[ChatMessage::user("a")]),
            Err(ChatTemplateError::Render(_))
        ));
    }

    #[test]
    fn tojson_options() {
        let messages = [ChatMessage::user("é")];
        let rendered = |expr: &str| render(&format!("{{{{ {expr} }}}}"), &messages).unwrap();
        assert_eq!(
            rendered("messages | tojson"),
            r#"[{"role": "user", "content": "é"}]"#
        );
        assert_eq!(
            rendered("messages[0].content | tojson(true)"),
            r#""\u00e9""#
        );
        assert_eq!(
            rendered("[1, [], {}] | tojson(indent=1)"),
            "[\n 1,\n [],\n {}\n]"
        );
        assert_eq!(
            rendered("{'b': 1, 'a': 2} | tojson(indent='\t', sort_keys=true)"),
            "{\n\t\"a\": 2,\n\t\"b\": 1\n}"
        );
        assert_eq!(
            rendered("{1: none, true: 2.0} | tojson"),
            r#"{"1": null, "true": 2.0}"#
        );
        assert!(
            render("{{ x | tojson }}", &messages).is_err(),
            "undefined is not JSON"
        );
        assert!(
            render("{{ 1 | tojson(color=1) }}", &messages).is_err(),
            "unknown option"
        );
    }

    #[test]
    fn python_string_methods() {
        let messages = [ChatMessage::user(" a b ")];
        let rendered = |expr: &str| render(&format!("{{{{ {expr} }}}}"), &messages).unwrap();
        assert_eq!(rendered("messages[0].content.strip()"), "a b");
        assert_eq!(
            rendered("messages[0].content.split() | tojson"),
            r#"["a", "b"]"#
        );
        assert_eq!(
            rendered("messages[0].content.split(none, 1) | tojson"),
            r#"["a", "b "]"#
        );
        assert_eq!(
            rendered("messages[0].content.split(' ') | tojson"),
            r#"["", "a", "b", ""]"#
        );
        assert_eq!(
            rendered("'xxhixx'.strip('x') ~ '|' ~ 'ab'.startswith('a')"),
            "hi|True"
        );
        assert_eq!(
            rendered("messages[0].get('role') ~ (messages[0].items() | list | length)"),
            "user2"
        );
        assert_eq!(
            rendered("'  x  ' | trim ~ '|' ~ ('--x--' | trim('-'))"),
            "x|x"
        );
    }

    #[test]
    fn chat_template_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }
}

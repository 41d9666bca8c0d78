//! A request's text to the model's tokens: raw text with the model's BOS, or a conversation
//! rendered by the model's chat template. Tokenizing runs off the async runtime.

use std::sync::Arc;

use egpu_engine::chat::ChatMessage;
use egpu_engine::tokenizer::Tokenizer;

use super::requests::PromptInput;
use super::templates::{RenderFailure, TemplateRenderers};
use crate::error::DaemonError;
use crate::residency::Resident;

/// The prompt's tokens: raw text as it is (with the model's BOS when it wants one), or the
/// conversation rendered by the model's chat template (which writes its own special tokens).
pub async fn prompt_tokens(
    renderers: &TemplateRenderers,
    model: &Resident,
    input: Option<PromptInput>,
    raw: bool,
    tools: Option<serde_json::Value>,
) -> Result<Vec<u32>, DaemonError> {
    let messages = match input {
        None => return Err(invalid("the request has no prompt and no messages")),
        Some(PromptInput::Text(p)) if p.is_empty() => return Err(invalid("the prompt is empty")),
        Some(PromptInput::Text(p)) if raw => {
            return encode_off_runtime(model.tokenizer.clone(), p).await;
        }
        Some(PromptInput::Text(p)) => vec![ChatMessage::user(p)],
        Some(PromptInput::Messages(m)) if m.is_empty() => {
            return Err(invalid("the conversation has no messages"))
        }
        Some(PromptInput::Messages(m)) => m,
    };
    // In a renderer process: the template comes from the model file and may be hostile.
    let text = renderers
        .render(&model.template, messages, tools, true)
        .await
        .map_err(|e| match e {
            RenderFailure::Unavailable(_) => DaemonError::Internal(e.to_string()),
            _ => DaemonError::InvalidArgument(format!("the chat template failed: {e}")),
        })?;
    // Templates usually write the BOS themselves; one that does not (the ChatML fallback)
    // still gets it when the model wants one, and never twice.
    encode_off_runtime(model.tokenizer.clone(), text).await
}

/// [`encode_with_bos`] on a blocking thread: tokenizing a long text takes a while.
pub async fn encode_off_runtime(
    tokenizer: Arc<Tokenizer>,
    text: String,
) -> Result<Vec<u32>, DaemonError> {
    tokio::task::spawn_blocking(move || encode_with_bos(&tokenizer, &text))
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))
}

/// The text's tokens (special tokens written in it recognised), with the model's BOS first
/// when it uses one and the text does not already start with it. Unlike the tokenizer's
/// `add_special`, this never appends an EOS: a prompt or a scored text does not end the
/// document.
pub fn encode_with_bos(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    let mut ids = tokenizer.encode(text, false, true);
    if let (true, Some(bos)) = (tokenizer.adds_bos(), tokenizer.bos()) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    ids
}

fn invalid(message: &str) -> DaemonError {
    DaemonError::InvalidArgument(message.to_owned())
}

//! A hostile chat template and hostile messages: compiling and rendering give text or a typed
//! error, never a panic. The input is the template, a NUL byte, then messages separated by
//! NULs (roles alternate user/assistant).
//!
//! Memory a template allocates is not bounded in process (egpud renders in a capped helper
//! process for that); run with `-malloc_limit_mb`/`-rss_limit_mb` (scripts/fuzz.sh does).
#![no_main]

use egpu_engine::chat::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or("");
    let messages: Vec<ChatMessage> = parts
        .enumerate()
        .map(|(i, content)| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            ChatMessage::new(role, content)
        })
        .collect();
    let messages = if messages.is_empty() {
        vec![ChatMessage::user("Hi")]
    } else {
        messages
    };
    if let Ok(template) = ChatTemplate::new(source, "<s>", "</s>") {
        let _ = template.render(&messages, true);
    }
    let _ = ChatTemplate::fallback().render(&messages, false);
});

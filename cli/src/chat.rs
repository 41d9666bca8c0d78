//! `egpuctl chat`: a conversation that keeps its history, one reply streamed per turn.

use std::io::{BufRead as _, IsTerminal as _};
use std::path::Path;
use std::process::ExitCode;

use egpu_proto::v1::{generate_request, ChatMessage, ChatMessages, GenerateRequest};

use crate::client::{self, connect};
use crate::format;
use crate::generate::{self, SamplingArgs};

#[derive(Debug, clap::Args)]
#[command(after_help = concat!("\
On a terminal: type a message after `>>> `; /clear forgets the conversation, /bye, \
Ctrl-D or Ctrl-C ends it; Ctrl-C during a reply stops the reply.
Otherwise each line of stdin is one user message, and each reply is printed followed by \
a newline.

", exit_status_help!()))]
pub struct ChatArgs {
    /// Name of a resident model.
    model: String,
    /// A system message put before the conversation.
    #[arg(long)]
    system: Option<String>,
    /// 0 = greedy (the default).
    #[arg(long)]
    temperature: Option<f32>,
    /// At most this many tokens per reply.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_tokens: Option<u32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
}

/// The conversation so far, sent whole every turn (egpud keeps no chat state).
#[derive(Debug, Default)]
pub struct History {
    system: Option<String>,
    turns: Vec<ChatMessage>,
}

impl History {
    pub fn new(system: Option<String>) -> Self {
        History {
            system,
            turns: Vec::new(),
        }
    }

    /// The messages for the next request: the system message, then every turn.
    pub fn messages(&self) -> Vec<ChatMessage> {
        let system = self.system.iter().map(|content| message("system", content));
        system.chain(self.turns.iter().cloned()).collect()
    }

    pub fn push_user(&mut self, content: &str) {
        self.turns.push(message("user", content));
    }

    pub fn push_assistant(&mut self, content: &str) {
        self.turns.push(message("assistant", content));
    }

    /// Drops a user message whose reply failed, so the next turn does not repeat it.
    pub fn pop_unanswered(&mut self) {
        if self.turns.last().is_some_and(|m| m.role == "user") {
            self.turns.pop();
        }
    }

    /// Forgets the turns; the system message stays.
    pub fn clear(&mut self) {
        self.turns.clear();
    }
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.to_owned(),
        content: content.to_owned(),
        ..ChatMessage::default()
    }
}

/// What a line typed at the `>>> ` prompt asks for.
#[derive(Debug, PartialEq, Eq)]
enum Input<'a> {
    Bye,
    Clear,
    Empty,
    Message(&'a str),
}

fn classify(line: &str) -> Input<'_> {
    match line.trim() {
        "/bye" => Input::Bye,
        "/clear" => Input::Clear,
        "" => Input::Empty,
        text => Input::Message(text),
    }
}

pub async fn run(socket: &Path, args: &ChatArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket).await?;
    let interactive = std::io::stdin().is_terminal();
    let sampling = SamplingArgs::new(args.temperature, args.seed).to_proto();
    let mut history = History::new(args.system.clone());
    let mut lines = stdin_lines();
    loop {
        if interactive && !format::write_stdout(">>> ")? {
            break;
        }
        let line = tokio::select! {
            line = lines.recv() => line,
            () = interrupted(interactive) => None,
        };
        let Some(line) = line.transpose()? else {
            // EOF (Ctrl-D) or Ctrl-C at the prompt: end on a fresh line.
            if interactive {
                format::emit("\n")?;
            }
            break;
        };
        let text = if interactive {
            match classify(&line) {
                Input::Bye => break,
                Input::Clear => {
                    history.clear();
                    eprintln!("(conversation cleared)");
                    continue;
                }
                Input::Empty => continue,
                Input::Message(text) => text,
            }
        } else {
            // Piped input is taken literally: a line "/bye" is a message like any other.
            let text = line.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            text
        };
        history.push_user(text);
        let generate = GenerateRequest {
            model: args.model.clone(),
            input: Some(generate_request::Input::Messages(ChatMessages {
                messages: history.messages(),
            })),
            sampling: Some(sampling),
            max_tokens: args.max_tokens,
            ..GenerateRequest::default()
        };
        // Ctrl-C during a reply stops that reply (dropping the stream cancels the request)
        // and keeps the conversation, as a chat prompt is expected to.
        let turn = tokio::select! {
            result = generate::stream(&mut client, generate, format::write_stdout) => Some(result),
            () = interrupted(interactive) => None,
        };
        match turn {
            Some(Ok(Some((reply, _)))) => {
                history.push_assistant(&reply.text);
                // A blank line after each reply keeps a terminal conversation readable.
                if !format::write_stdout(if interactive { "\n\n" } else { "\n" })? {
                    break;
                }
            }
            Some(Ok(None)) => break, // stdout closed
            None => {
                format::emit("\n")?;
                eprintln!("(reply stopped)");
                // A half reply would mislead the model on the next turn: forget the turn.
                history.pop_unanswered();
            }
            // On a terminal one failed turn (a full queue, say) should not end the
            // conversation; piped input has nobody to retry, so it fails the command.
            Some(Err(error)) if interactive => {
                format::emit("\n")?;
                client::report(&error);
                history.pop_unanswered();
            }
            Some(Err(error)) => return Err(error),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Lines of stdin, read on their own thread so that waiting for input can be raced against
/// Ctrl-C. The thread reads at most one line ahead; it ends at EOF, on an error (sent on),
/// or when the receiver is gone.
fn stdin_lines() -> tokio::sync::mpsc::Receiver<std::io::Result<String>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        loop {
            let mut line = String::new();
            let read = stdin.lock().read_line(&mut line);
            let last = !matches!(read, Ok(n) if n > 0);
            let item = match read {
                Ok(0) => break,
                Ok(_) => Ok(line),
                Err(error) => Err(error),
            };
            if sender.blocking_send(item).is_err() || last {
                break;
            }
        }
    });
    receiver
}

/// Resolves on Ctrl-C when chatting on a terminal; never otherwise, so that piped use keeps
/// the default (SIGINT ends the process). The handler is only installed once this is
/// first polled, i.e. on a terminal.
async fn interrupted(enabled: bool) {
    if enabled && tokio::signal::ctrl_c().await.is_ok() {
        return;
    }
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_sends_system_then_turns_and_clear_keeps_system() {
        let mut history = History::new(Some("be brief".into()));
        history.push_user("hi");
        history.push_assistant("hello");
        history.push_user("again");
        let roles: Vec<_> = history
            .messages()
            .iter()
            .map(|m| (m.role.clone(), m.content.clone()))
            .collect();
        assert_eq!(
            roles,
            [
                ("system".into(), "be brief".into()),
                ("user".into(), "hi".into()),
                ("assistant".into(), "hello".into()),
                ("user".into(), "again".into()),
            ]
        );
        history.pop_unanswered();
        assert_eq!(history.messages().len(), 3);
        history.pop_unanswered(); // the last one is a reply now: kept
        assert_eq!(history.messages().len(), 3);
        history.clear();
        assert_eq!(history.messages().len(), 1);
        assert!(History::new(None).messages().is_empty());
    }

    #[test]
    fn prompt_commands() {
        assert_eq!(classify("/bye\n"), Input::Bye);
        assert_eq!(classify(" /clear \n"), Input::Clear);
        assert_eq!(classify("  \n"), Input::Empty);
        assert_eq!(classify("what is 2+2?\n"), Input::Message("what is 2+2?"));
    }
}

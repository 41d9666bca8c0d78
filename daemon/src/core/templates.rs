//! Chat templates render in child processes, never inside egpud.
//!
//! A chat template is a Jinja program that arrives inside a model file from the internet.
//! minijinja bounds its instruction count and egpu bounds its output and the sizes it passes to
//! filters, but nothing in-process can bound what it allocates: `{% set ns.a = ns.a ~ ns.a %}`
//! in a loop doubles a string with every few instructions, and in Rust a failed allocation
//! aborts the whole process rather than failing one render. A single instruction can also run
//! for a long time (copying a 100 MB string), so fuel alone does not bound time either.
//!
//! So egpud renders in helpers: copies of its own binary started with [`RENDERER_ARG`], each
//! capped at [`RENDERER_MEMORY`] bytes of heap by the counting allocator in `main.rs` and
//! rendering on a thread with a [`RENDER_STACK`] stack. A render that runs past
//! [`RENDER_DEADLINE`] has its helper killed; a helper that aborts (out of its memory, or a
//! stack overflow from deep macro recursion) dies alone. Either way that request gets
//! INVALID_ARGUMENT naming what happened, and egpud, every other request and every other model
//! carry on. Helpers are kept between renders (a render costs a pipe round trip, tens of
//! microseconds, not a process start), at most [`MAX_RENDERERS`] at once, and a request whose
//! client goes away mid-render kills its helper rather than leaving it running.
//!
//! The protocol is one JSON line each way: [`RenderRequest`] in, [`RenderReply`] out. The
//! parent is trusted by the helper (it is the same binary), so the helper reads lines whole.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use egpu_engine::chat::{ChatMessage, ChatTemplate, ChatTemplateError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Semaphore;

/// The first argument that makes `egpud` a template renderer instead of a daemon.
pub const RENDERER_ARG: &str = "--internal-chat-template-renderer";

/// The heap one renderer may hold: room for the largest request egpud admits (16 MiB of input,
/// held a few times over while parsed), the largest output a render may write (64 MiB) and
/// minijinja's own values, with a wide margin.
pub const RENDERER_MEMORY: usize = 512 << 20;

/// The stack renders run on. minijinja stops recursion at 500 levels; a template's macros can
/// still spend several kilobytes of native stack per level, which 64 MiB covers many times
/// over. The pages are only reserved, not used, until a deep template touches them.
pub const RENDER_STACK: usize = 64 << 20;

/// How long one render may take. Real templates render a long conversation in milliseconds.
pub const RENDER_DEADLINE: Duration = Duration::from_secs(5);

/// How many renderers run at once; more renders wait for one.
pub const MAX_RENDERERS: usize = 4;

/// How many compiled templates a renderer keeps (one per loaded model, usually).
const COMPILED_TEMPLATES_KEPT: usize = 16;

/// How much of a renderer's stderr is kept to say why it died.
const STDERR_TAIL: usize = 4096;

/// What the daemon asks a renderer.
#[derive(Debug, Serialize, Deserialize)]
pub struct RenderRequest {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    pub messages: Vec<ChatMessage>,
    /// The tools the model may call (OpenAI's / transformers' list), if any.
    #[serde(default)]
    pub tools: Option<serde_json::Value>,
    pub add_generation_prompt: bool,
}

/// What a renderer answers: the text, or the template's error as the engine typed it.
#[derive(Debug, Serialize, Deserialize)]
pub enum RenderReply {
    Text(String),
    Syntax(String),
    Raised(String),
    Render(String),
    TooLong(usize),
    EmptyConversation,
    Metadata(String),
}

impl From<Result<String, ChatTemplateError>> for RenderReply {
    fn from(result: Result<String, ChatTemplateError>) -> RenderReply {
        match result {
            Ok(text) => RenderReply::Text(text),
            Err(ChatTemplateError::Syntax(m)) => RenderReply::Syntax(m),
            Err(ChatTemplateError::Raised(m)) => RenderReply::Raised(m),
            Err(ChatTemplateError::Render(m)) => RenderReply::Render(m),
            Err(ChatTemplateError::TooLong { limit }) => RenderReply::TooLong(limit),
            Err(ChatTemplateError::EmptyConversation) => RenderReply::EmptyConversation,
            Err(ChatTemplateError::Metadata(m)) => RenderReply::Metadata(m),
        }
    }
}

impl From<RenderReply> for Result<String, ChatTemplateError> {
    fn from(reply: RenderReply) -> Result<String, ChatTemplateError> {
        match reply {
            RenderReply::Text(text) => Ok(text),
            RenderReply::Syntax(m) => Err(ChatTemplateError::Syntax(m)),
            RenderReply::Raised(m) => Err(ChatTemplateError::Raised(m)),
            RenderReply::Render(m) => Err(ChatTemplateError::Render(m)),
            RenderReply::TooLong(limit) => Err(ChatTemplateError::TooLong { limit }),
            RenderReply::EmptyConversation => Err(ChatTemplateError::EmptyConversation),
            RenderReply::Metadata(m) => Err(ChatTemplateError::Metadata(m)),
        }
    }
}

/// Why a render produced no text.
#[derive(Debug, thiserror::Error)]
pub enum RenderFailure {
    /// The template itself failed, as the engine reports it.
    #[error(transparent)]
    Template(#[from] ChatTemplateError),
    /// The template ran past [`RENDER_DEADLINE`]; its renderer was killed.
    #[error("the chat template ran past its {}-second deadline", RENDER_DEADLINE.as_secs())]
    Deadline,
    /// The renderer died while rendering: the template used more than its memory, recursed
    /// past its stack, or crashed it some other way (the text says which).
    #[error("the chat template crashed its renderer: {0}")]
    Crashed(String),
    /// egpud could not start or talk to a renderer at all: not the template's fault.
    #[error("cannot run the chat template renderer: {0}")]
    Unavailable(String),
}

/// The pool of renderer processes.
#[derive(Debug)]
pub struct TemplateRenderers {
    program: PathBuf,
    idle: Mutex<Vec<Renderer>>,
    running: Semaphore,
}

impl TemplateRenderers {
    /// Renderers run `program` (egpud's own binary) with [`RENDERER_ARG`].
    pub fn new(program: PathBuf) -> TemplateRenderers {
        TemplateRenderers {
            program,
            idle: Mutex::new(Vec::new()),
            running: Semaphore::new(MAX_RENDERERS),
        }
    }

    /// Renders `messages` with `template` in a renderer process.
    pub async fn render(
        &self,
        template: &ChatTemplate,
        messages: Vec<ChatMessage>,
        tools: Option<serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, RenderFailure> {
        let request = RenderRequest {
            source: template.source().to_owned(),
            bos_token: template.bos_token().to_owned(),
            eos_token: template.eos_token().to_owned(),
            messages,
            tools,
            add_generation_prompt,
        };
        let mut line = serde_json::to_vec(&request)
            .map_err(|e| RenderFailure::Unavailable(format!("cannot encode the request: {e}")))?;
        line.push(b'\n');
        let _turn = self
            .running
            .acquire()
            .await
            .map_err(|_| RenderFailure::Unavailable("egpud is stopping".into()))?;
        let idle = self.idle.lock().pop();
        let mut renderer = match idle {
            Some(renderer) => renderer,
            None => Renderer::start(&self.program)?,
        };
        // If this future is dropped here (the client went away), `renderer` drops with it and
        // kill_on_drop ends the process: a hostile render never outlives its request.
        let reply = renderer.ask(&line).await?;
        self.idle.lock().push(renderer);
        Result::<String, ChatTemplateError>::from(reply).map_err(RenderFailure::Template)
    }
}

/// One renderer process.
#[derive(Debug)]
struct Renderer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr_tail: Arc<Mutex<Vec<u8>>>,
}

impl Renderer {
    fn start(program: &PathBuf) -> Result<Renderer, RenderFailure> {
        let mut child = tokio::process::Command::new(program)
            .arg(RENDERER_ARG)
            // One line saying why it died, not a backtrace that pushes that line out of the tail.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RenderFailure::Unavailable(format!("{}: {e}", program.display())))?;
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(RenderFailure::Unavailable(
                "no pipes to the renderer".into(),
            ));
        };
        // Drained all along, so a chatty abort message can never block the renderer.
        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        let tail = stderr_tail.clone();
        tokio::spawn(async move {
            let mut chunk = [0u8; 1024];
            while let Ok(n) = stderr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let mut tail = tail.lock();
                tail.extend_from_slice(&chunk[..n]);
                let excess = tail.len().saturating_sub(STDERR_TAIL);
                tail.drain(..excess);
            }
        });
        Ok(Renderer {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stderr_tail,
        })
    }

    async fn ask(&mut self, line: &[u8]) -> Result<RenderReply, RenderFailure> {
        let exchange = async {
            self.stdin.write_all(line).await?;
            self.stdin.flush().await?;
            let mut reply = String::new();
            self.stdout.read_line(&mut reply).await?;
            Ok::<String, std::io::Error>(reply)
        };
        let reply = match tokio::time::timeout(RENDER_DEADLINE, exchange).await {
            Err(_) => {
                let _ = self.child.start_kill();
                return Err(RenderFailure::Deadline);
            }
            Ok(Ok(reply)) if !reply.is_empty() => reply,
            // End of file or a broken pipe: the renderer died rendering this template.
            Ok(_) => return Err(self.why_it_died().await),
        };
        serde_json::from_str(&reply)
            .map_err(|e| RenderFailure::Unavailable(format!("unreadable reply: {e}")))
    }

    /// Names what killed the renderer from its exit and the last of its stderr.
    async fn why_it_died(&mut self) -> RenderFailure {
        let status = match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            _ => {
                let _ = self.child.start_kill();
                "did not exit".to_owned()
            }
        };
        let tail = String::from_utf8_lossy(&self.stderr_tail.lock()).into_owned();
        let why = if tail.contains("memory allocation of") {
            format!(
                "it used more than the {} MiB a render may",
                RENDERER_MEMORY >> 20
            )
        } else if tail.contains("overflowed its stack") {
            "it recursed past the renderer's stack".to_owned()
        } else {
            match tail.lines().rev().find(|l| !l.trim().is_empty()) {
                Some(last) => format!("{status}: {}", last.trim()),
                None => status,
            }
        };
        RenderFailure::Crashed(why)
    }
}

/// The renderer's main loop: one [`RenderRequest`] line in, one [`RenderReply`] line out, until
/// stdin closes. `main.rs` has already capped the heap; renders run on a thread with a large
/// stack so that minijinja's recursion limit, not the stack, stops deep templates.
pub fn serve_renderer() -> std::io::Result<()> {
    let worker = std::thread::Builder::new()
        .name("chat-template-render".into())
        .stack_size(RENDER_STACK)
        .spawn(render_loop)?;
    worker
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the render thread panicked")))
}

fn render_loop() -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut output = stdout.lock();
    // Most recently used last; a model's template compiles once per renderer.
    let mut compiled: Vec<(String, String, String, ChatTemplate)> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request: RenderRequest = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        let found = compiled.iter().position(|(source, bos, eos, _)| {
            *source == request.source && *bos == request.bos_token && *eos == request.eos_token
        });
        let template = match found {
            Some(at) => {
                let entry = compiled.remove(at);
                compiled.push(entry);
                compiled.last().map(|(_, _, _, t)| t)
            }
            None => {
                match ChatTemplate::new(&request.source, &request.bos_token, &request.eos_token) {
                    Ok(template) => {
                        if compiled.len() == COMPILED_TEMPLATES_KEPT {
                            compiled.remove(0);
                        }
                        compiled.push((
                            request.source.clone(),
                            request.bos_token.clone(),
                            request.eos_token.clone(),
                            template,
                        ));
                        compiled.last().map(|(_, _, _, t)| t)
                    }
                    Err(err) => {
                        reply(&mut output, RenderReply::from(Err(err)))?;
                        continue;
                    }
                }
            }
        };
        let result = match template {
            Some(template) => template.render_with_tools(
                &request.messages,
                request.tools.as_ref(),
                request.add_generation_prompt,
            ),
            None => Err(ChatTemplateError::Render("no compiled template".into())),
        };
        reply(&mut output, RenderReply::from(result))?;
    }
}

fn reply(output: &mut impl std::io::Write, reply: RenderReply) -> std::io::Result<()> {
    serde_json::to_writer(&mut *output, &reply).map_err(std::io::Error::other)?;
    output.write_all(b"\n")?;
    output.flush()
}

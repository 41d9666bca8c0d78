//! The real binary against a fake egpud: a tonic server on a temporary Unix socket that
//! answers with canned messages. It checks what egpuctl sends (metadata, requests, the chat
//! history) and prints (streams, JSON, errors), without models or the real daemon.

use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use egpu_proto::v1::egpu_server::{Egpu, EgpuServer};
use egpu_proto::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Default)]
struct Fake {
    /// The `x-egpu-client` header of every request, in order.
    clients: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn record<T>(&self, request: &Request<T>) {
        let client = request
            .metadata()
            .get(egpu_proto::CLIENT_NAME_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("<none>");
        self.clients.lock().unwrap().push(client.to_owned());
    }
}

fn model(name: &str) -> ModelInfo {
    ModelInfo {
        name: name.to_owned(),
        source: format!("/models/{name}.gguf"),
        architecture: "llama".into(),
        quant_mix: vec![QuantShare {
            r#type: "Q4_1".into(),
            tensors: 3,
            bytes: 100,
        }],
        bytes: 104_200_000,
        bytes_estimated: 110_000_000,
        context_length: 2048,
        slots: 4,
        pinned: true,
        state: ModelState::Ready as i32,
        backend: "cpu".into(),
        ..ModelInfo::default()
    }
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!("no model named {name:?} is resident"))
}

fn chunk(text: &str, ids: &[u32], logprobs: Vec<TokenLogprobs>) -> GenerateEvent {
    GenerateEvent {
        event: Some(generate_event::Event::Chunk(GenerateChunk {
            text: text.to_owned(),
            token_ids: ids.to_vec(),
            logprobs,
        })),
    }
}

fn token(id: u32, logprob: f32) -> TokenLogprob {
    TokenLogprob {
        id,
        logprob,
        text: format!("t{id}"),
    }
}

#[tonic::async_trait]
impl Egpu for Fake {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.record(&request);
        Ok(Response::new(StatusResponse {
            device: Some(DeviceInfo {
                name: "Test CPU".into(),
                kind: "cpu".into(),
                memory_total_bytes: 16_000_000_000,
                memory_free_bytes: 8_000_000_000,
            }),
            budget_bytes: 8_000_000_000,
            used_bytes: 104_200_000,
            models: vec![model("smollm2")],
            version: "0.1.0".into(),
            uptime_seconds: 61.0,
            models_dir: "/models".into(),
            threads: 2,
        }))
    }

    type LoadStream = EventStream<LoadEvent>;

    async fn load(
        &self,
        request: Request<LoadRequest>,
    ) -> Result<Response<Self::LoadStream>, Status> {
        self.record(&request);
        let load = request.into_inner();
        if load.source == "missing" {
            return Err(Status::not_found("no model file matches \"missing\""));
        }
        let name = if load.name.is_empty() {
            load.source.clone()
        } else {
            load.name
        };
        let progress = |stage: &str, done, total| LoadEvent {
            event: Some(load_event::Event::Progress(LoadProgress {
                stage: stage.into(),
                done,
                total,
                message: String::new(),
            })),
            already_resident: false,
        };
        let mut info = model(&name);
        // Echo what was asked, so tests see the flags arrive.
        info.context_length = load.context_length;
        info.keep_alive_expires_unix_ms = load.keep_alive_ms.unwrap_or(12345);
        let events = vec![
            Ok(progress("resolving", 0, 0)),
            Ok(progress("reading weights", 50, 100)),
            Ok(progress("reading weights", 100, 100)),
            Ok(LoadEvent {
                event: Some(load_event::Event::Model(info)),
                already_resident: name == "resident",
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn unload(
        &self,
        request: Request<UnloadRequest>,
    ) -> Result<Response<UnloadResponse>, Status> {
        self.record(&request);
        let unload = request.into_inner();
        if unload.name == "busy" && !unload.force {
            return Err(Status::failed_precondition("busy has 2 running requests"));
        }
        Ok(Response::new(UnloadResponse {
            freed_bytes: 104_200_000,
            aborted_requests: u32::from(unload.force) * 2,
        }))
    }

    type GenerateStream = EventStream<GenerateEvent>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.record(&request);
        let generate = request.into_inner();
        if generate.model != "smollm2" {
            return Err(not_found(&generate.model));
        }
        let logprobs = |id| {
            if generate.top_logprobs == 0 {
                vec![]
            } else {
                vec![TokenLogprobs {
                    token: Some(token(id, -0.5)),
                    top: vec![token(id, -0.5), token(99, -1.5)],
                }]
            }
        };
        // The reply describes the request, so tests can check what egpuctl sent.
        let reply = match generate.input {
            Some(generate_request::Input::Prompt(prompt)) => format!("echo: {prompt}"),
            Some(generate_request::Input::Messages(chat)) => {
                let roles: Vec<_> = chat.messages.iter().map(|m| m.role.as_str()).collect();
                let last = chat.messages.last().map_or("", |m| m.content.as_str());
                format!("{} [{last}]", roles.join(","))
            }
            None => return Err(Status::invalid_argument("no input")),
        };
        let (first, second) = reply.split_at(reply.len() / 2);
        let events = vec![
            Ok(chunk(first, &[1], logprobs(1))),
            Ok(chunk(second, &[2], logprobs(2))),
            Ok(GenerateEvent {
                event: Some(generate_event::Event::Done(GenerateDone {
                    finish_reason: FinishReason::Length as i32,
                    prompt_tokens: 5,
                    completion_tokens: 2,
                    timings: Some(Timings {
                        prefill_tokens_per_s: 850.0,
                        decode_tokens_per_s: 95.25,
                        ..Timings::default()
                    }),
                })),
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn score(
        &self,
        request: Request<ScoreRequest>,
    ) -> Result<Response<ScoreResponse>, Status> {
        self.record(&request);
        let score = request.into_inner();
        let top = |id| {
            (0..score.top_k)
                .map(|k| token(id + k, -0.25 * (k + 1) as f32))
                .collect()
        };
        Ok(Response::new(ScoreResponse {
            token_ids: vec![1, 10, 11],
            positions: vec![
                ScorePosition {
                    logprob: None,
                    top: vec![],
                },
                ScorePosition {
                    logprob: Some(-2.0),
                    top: top(10),
                },
                ScorePosition {
                    logprob: Some(-1.0),
                    top: top(20),
                },
            ],
            total_logprob: -3.0,
        }))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        self.record(&request);
        let tokenize = request.into_inner();
        // Special handling shows in the result: a BOS only when asked for.
        let mut ids = vec![10, 11];
        let mut pieces = vec!["He".to_owned(), "llo".to_owned()];
        if tokenize.add_special {
            ids.insert(0, 1);
            pieces.insert(0, "<s>".into());
        }
        Ok(Response::new(TokenizeResponse {
            token_ids: ids,
            pieces,
        }))
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        self.record(&request);
        let ids = request.into_inner().token_ids;
        Ok(Response::new(DetokenizeResponse {
            text: ids.iter().map(|id| format!("<{id}>")).collect(),
        }))
    }

    async fn list_model_files(
        &self,
        request: Request<ListModelFilesRequest>,
    ) -> Result<Response<ListModelFilesResponse>, Status> {
        self.record(&request);
        Ok(Response::new(ListModelFilesResponse {
            models_dir: "/models".into(),
            files: vec![ModelFile {
                name: "smollm2".into(),
                path: "/models/smollm2.gguf".into(),
                size_bytes: 105_000_000,
                architecture: "llama".into(),
                resident_as: vec!["smollm2".into()],
                error: String::new(),
            }],
        }))
    }
}

/// A running fake egpud; stops and removes its socket folder when dropped.
struct FakeDaemon {
    dir: PathBuf,
    socket: PathBuf,
    clients: Arc<Mutex<Vec<String>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("egpuctl-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("egpu.sock");
        let _ = std::fs::remove_file(&socket);
        let fake = Fake::default();
        let clients = fake.clients.clone();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let path = socket.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&path).unwrap();
                ready_tx.send(()).unwrap();
                tonic::transport::Server::builder()
                    .add_service(EgpuServer::new(fake))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        async {
                            let _ = stop.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        // Bound before egpuctl runs, so no test races the server's start.
        ready.recv().unwrap();
        FakeDaemon {
            dir,
            socket,
            clients,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    fn egpuctl(&self, args: &[&str]) -> Output {
        self.egpuctl_with_stdin(args, "")
    }

    fn egpuctl_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_egpuctl"))
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .env_remove("NO_COLOR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run egpuctl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(out)).unwrap()
}

#[test]
fn status_json_and_table_and_client_name() {
    let daemon = FakeDaemon::start("status");
    let value = json(&daemon.egpuctl(&["status", "--json"]));
    let keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "budget_bytes",
            "device",
            "models",
            "models_dir",
            "uptime_seconds",
            "used_bytes",
            "version"
        ]
    );
    assert_eq!(value["models"][0]["name"], "smollm2");
    assert_eq!(value["models"][0]["state"], "ready");
    assert_eq!(value["models"][0]["quant_mix"][0]["type"], "Q4_1");
    assert_eq!(value["device"]["kind"], "cpu");

    let table = stdout(&daemon.egpuctl(&["status"]));
    let lines: Vec<_> = table.lines().collect();
    assert_eq!(
        lines[0],
        "Test CPU (cpu) · 104.2 MB / 8.0 GB used · egpud 0.1.0 · up 1m 01s"
    );
    assert!(lines[1].starts_with("NAME "), "{table}");
    assert!(lines[2].starts_with("smollm2 "), "{table}");
    assert!(
        lines[2].contains("104.2 MB") && lines[2].contains("forever"),
        "{table}"
    );

    assert_eq!(*daemon.clients.lock().unwrap(), ["egpuctl", "egpuctl"]);
}

#[test]
fn load_prints_a_sentence_or_json_and_sends_the_flags() {
    let daemon = FakeDaemon::start("load");
    let text = stdout(&daemon.egpuctl(&["load", "smollm2", "--ctx", "1024"]));
    assert!(
        text.starts_with("loaded smollm2 (llama, 104.2 MB, ctx 1024 × 4 slots) in "),
        "{text}"
    );
    assert!(text.ends_with(" s\n"), "{text}");

    let text = stdout(&daemon.egpuctl(&["load", "x", "--name", "resident"]));
    assert_eq!(text, "resident is already resident\n");

    let value = json(&daemon.egpuctl(&["load", "smollm2", "--keep-alive", "forever", "--json"]));
    assert_eq!(value["already_resident"], false);
    assert_eq!(value["keep_alive_expires_unix_ms"], -1);
    assert_eq!(value["name"], "smollm2");
    assert_eq!(value.as_object().unwrap().len(), 17);

    let value = json(&daemon.egpuctl(&["load", "smollm2", "--keep-alive", "10m", "--json"]));
    assert_eq!(value["keep_alive_expires_unix_ms"], 600_000);
}

#[test]
fn errors_from_egpud_are_one_line_and_exit_1() {
    let daemon = FakeDaemon::start("errors");
    for (args, expected) in [
        (
            &["load", "missing"][..],
            "egpuctl: NOT_FOUND: no model file matches \"missing\"\n",
        ),
        (
            &["unload", "busy"][..],
            "egpuctl: FAILED_PRECONDITION: busy has 2 running requests\n",
        ),
        (
            &["generate", "nope", "hi"][..],
            "egpuctl: NOT_FOUND: no model named \"nope\" is resident\n",
        ),
    ] {
        let out = daemon.egpuctl(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), expected);
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let text = stdout(&daemon.egpuctl(&["unload", "busy", "--force"]));
    assert_eq!(
        text,
        "unloaded busy (freed 104.2 MB), aborted 2 running requests\n"
    );
    let value = json(&daemon.egpuctl(&["unload", "smollm2", "--json"]));
    assert_eq!(
        value,
        serde_json::json!({"name": "smollm2", "freed_bytes": 104_200_000, "aborted_requests": 0})
    );
}

#[test]
fn generate_streams_text_and_stats_only_when_asked() {
    let daemon = FakeDaemon::start("generate");
    let out = daemon.egpuctl(&["generate", "smollm2", "hi there"]);
    assert_eq!(stdout(&out), "echo: hi there\n");
    // stderr is a pipe here, not a terminal: no stats unless --verbose.
    assert!(out.stderr.is_empty());

    let out = daemon.egpuctl(&["generate", "smollm2", "hi", "--verbose"]);
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "[5 prompt + 2 completion tokens · prefill 850 tok/s · decode 95.2 tok/s · length]\n"
    );

    let out = daemon.egpuctl_with_stdin(&["generate", "smollm2", "-"], "from\nstdin");
    assert_eq!(stdout(&out), "echo: from\nstdin\n");
}

#[test]
fn generate_json_with_and_without_logprobs() {
    let daemon = FakeDaemon::start("generate-json");
    let value = json(&daemon.egpuctl(&["generate", "smollm2", "hi", "--json", "--logprobs", "2"]));
    assert_eq!(
        value,
        serde_json::json!({
            "text": "echo: hi",
            "token_ids": [1, 2],
            "logprobs": [
                [{"id": 1, "logprob": -0.5}, {"id": 99, "logprob": -1.5}],
                [{"id": 2, "logprob": -0.5}, {"id": 99, "logprob": -1.5}]
            ],
            "token_logprobs": [-0.5, -0.5],
            "finish_reason": "length",
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "prefill_tokens_per_s": 850.0,
            "decode_tokens_per_s": 95.25
        })
    );
    let value = json(&daemon.egpuctl(&["generate", "smollm2", "hi", "--json"]));
    assert_eq!(value["logprobs"], serde_json::json!([]));
    assert_eq!(value["token_logprobs"], serde_json::json!([]));
}

#[test]
fn chat_from_a_pipe_sends_the_whole_history_each_turn() {
    let daemon = FakeDaemon::start("chat");
    let out = daemon.egpuctl_with_stdin(
        &["chat", "smollm2", "--system", "be brief"],
        "hello\n\n/bye\n",
    );
    // Piped lines are taken literally (even "/bye"); blank lines are skipped.
    assert_eq!(
        stdout(&out),
        "system,user [hello]\n\
         system,user,assistant,user [/bye]\n"
    );
}

#[test]
fn score_json_and_table() {
    let daemon = FakeDaemon::start("score");
    let value = json(&daemon.egpuctl(&["score", "smollm2", "Hello", "--top", "1", "--json"]));
    assert_eq!(
        value,
        serde_json::json!({
            "token_ids": [1, 10, 11],
            "logprobs": [null, -2.0, -1.0],
            "top": [[], [{"id": 10, "logprob": -0.25}], [{"id": 20, "logprob": -0.25}]]
        })
    );
    let table = stdout(&daemon.egpuctl(&["score", "smollm2", "Hello"]));
    let lines: Vec<_> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    // Token texts come from Tokenize, whose ids match the scored ones here.
    assert!(lines[1].contains("\"<s>\""), "{table}");
    assert!(
        lines[2].contains("\"He\"") && lines[2].contains("(this one)"),
        "{table}"
    );
    assert!(
        lines[3].contains("\"llo\"") && lines[3].contains("\"t20\" -0.250"),
        "{table}"
    );
    assert_eq!(lines[4], "total -3.000 over 2 tokens · perplexity 4.48");
}

#[test]
fn tokenize_detokenize_and_models() {
    let daemon = FakeDaemon::start("tokens");
    let value = json(&daemon.egpuctl(&["tokenize", "smollm2", "Hello", "--json"]));
    assert_eq!(
        value,
        serde_json::json!({"token_ids": [1, 10, 11], "pieces": ["<s>", "He", "llo"]})
    );
    let value = json(&daemon.egpuctl(&["tokenize", "smollm2", "Hello", "--no-special", "--json"]));
    assert_eq!(value["token_ids"], serde_json::json!([10, 11]));
    assert_eq!(
        stdout(&daemon.egpuctl(&["detokenize", "smollm2", "10", "11"])),
        "<10><11>\n"
    );

    let text = stdout(&daemon.egpuctl(&["models"]));
    assert!(text.starts_with("models in /models\nNAME "), "{text}");
    assert!(
        text.contains("smollm2   105.0 MB   llama   smollm2       /models/smollm2.gguf"),
        "{text}"
    );
    let value = json(&daemon.egpuctl(&["models", "--json"]));
    assert_eq!(
        value["files"][0]["resident_as"],
        serde_json::json!(["smollm2"])
    );
}

//! The gRPC service: parse and validate a request, call one thing, map the result.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egpu_engine::chat::ChatMessage;
use egpu_engine::sampler::SamplingParams;
use egpu_engine::tokenizer::Tokenizer;
use egpu_proto::v1::egpu_server::Egpu;
use egpu_proto::v1::{self as pb, generate_request::Input, load_event};
use egpu_proto::CLIENT_NAME_HEADER;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::config::KeepAlive;
use crate::device::DeviceInfo;
use crate::error::DaemonError;
use crate::residency::{LoadOptions, LoadPhase, LoadTicket, Residency, Resident};
use crate::scheduler::{
    ClientKey, GenerateJob, Job, Request as QueuedRequest, ScoreJob, TranslateJob,
};
use crate::worker::{Worker, WorkerPhase};

/// Most alternatives a request may ask for per position.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most sentences one Translate call takes (a batch that large already fills the device).
pub const MAX_TRANSLATE_TEXTS: usize = 256;
/// Most beams a Translate call may ask for.
pub const MAX_BEAMS: u32 = 16;

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Debug)]
pub struct Api {
    pub residency: Arc<Residency>,
    pub device: fn() -> DeviceInfo,
    pub started: Instant,
    pub threads: usize,
}

#[tonic::async_trait]
impl Egpu for Api {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let device = (self.device)();
        let (models, _) = self.residency.snapshot();
        let cpu = pb::DeviceInfo {
            name: device.name,
            kind: device.kind,
            memory_total_bytes: device.memory_total,
            memory_free_bytes: device.memory_free,
        };
        let cpu_used = self.residency.used_by("cpu");
        let mut backends = vec![pb::BackendStatus {
            backend: "cpu".into(),
            state: "ready".into(),
            device: Some(cpu.clone()),
            arch: std::env::consts::ARCH.into(),
            budget_bytes: self.residency.budget(),
            used_bytes: cpu_used,
            ..Default::default()
        }];
        if let Some(worker) = self.residency.worker() {
            backends.push(tinygrad_status(worker, self.residency.used_by("tinygrad")).await);
        }
        Ok(Response::new(pb::StatusResponse {
            device: Some(cpu),
            budget_bytes: self.residency.budget(),
            used_bytes: cpu_used,
            backends,
            models,
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            models_dir: self.residency.models_dir().display().to_string(),
            threads: self.threads as u32,
        }))
    }

    type LoadStream = EventStream<pb::LoadEvent>;

    async fn load(
        &self,
        request: Request<pb::LoadRequest>,
    ) -> Result<Response<Self::LoadStream>, Status> {
        let req = request.into_inner();
        let opts = LoadOptions {
            source: req.source,
            name: Some(req.name).filter(|n| !n.is_empty()),
            context: Some(req.context_length as usize).filter(|&c| c > 0),
            slots: Some(req.slots as usize).filter(|&s| s > 0),
            pin: req.pin,
            keep_alive: req.keep_alive_ms.map(KeepAlive::from_millis),
            backend: Some(req.backend).filter(|b| !b.is_empty()),
            quantize: Some(req.quantize).filter(|q| !q.is_empty()),
        };
        let ticket = self.residency.start_load(opts).await?;
        let stream: Self::LoadStream = match ticket {
            LoadTicket::Resident(r) => Box::pin(tokio_stream::once(Ok(model_event(&r, true)))),
            LoadTicket::Pending { mut phase, .. } => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    loop {
                        let current = phase.borrow_and_update().clone();
                        match current {
                            LoadPhase::Progress(p) => {
                                let event = pb::LoadEvent {
                                    event: Some(load_event::Event::Progress(p)),
                                    already_resident: false,
                                };
                                if tx.send(Ok(event)).is_err() {
                                    return; // the client left; the load goes on without it
                                }
                            }
                            LoadPhase::Done(Ok(resident)) => {
                                let _ = tx.send(Ok(model_event(&resident, false)));
                                return;
                            }
                            LoadPhase::Done(Err(err)) => {
                                let _ = tx.send(Err(err.into()));
                                return;
                            }
                        }
                        if phase.changed().await.is_err() {
                            // The sender is dropped only after Done was sent; read it.
                            if matches!(*phase.borrow(), LoadPhase::Done(_)) {
                                continue;
                            }
                            let _ = tx.send(Err(Status::internal("the load ended unexpectedly")));
                            return;
                        }
                    }
                });
                Box::pin(UnboundedReceiverStream::new(rx))
            }
        };
        Ok(Response::new(stream))
    }

    async fn unload(
        &self,
        request: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        let req = request.into_inner();
        let (freed, aborted) = self.residency.unload(&req.name, req.force).await?;
        Ok(Response::new(pb::UnloadResponse {
            freed_bytes: freed,
            aborted_requests: aborted as u32,
        }))
    }

    type GenerateStream = EventStream<pb::GenerateEvent>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let client = client_key(&request);
        let deadline = grpc_deadline(&request);
        let req = request.into_inner();
        let model = self.residency.get(&req.model)?;
        not_a_translation_model(&model)?;
        let params = sampling_params(req.sampling.as_ref())?;
        if req.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid(format!(
                "top_logprobs is {}; at most {MAX_TOP_LOGPROBS}",
                req.top_logprobs
            )));
        }
        let max_tokens = match req.max_tokens {
            Some(0) => return Err(invalid("max_tokens must be at least 1 (or unset)".into())),
            Some(n) if n as usize > model.context => {
                return Err(invalid(format!(
                    "max_tokens {n} exceeds the context of {} tokens that {} was loaded with",
                    model.context, model.name
                )))
            }
            other => other.map(|n| n as usize),
        };
        let prompt = prompt_tokens(&model, req.input, req.raw).await?;
        if prompt.is_empty() {
            return Err(invalid(
                "the prompt has no tokens (the chat template rendered nothing?)".into(),
            ));
        }
        if prompt.len() >= model.context {
            return Err(invalid(format!(
                "the prompt is {} tokens; {} was loaded with a context of {} tokens (leave room \
                 for at least one generated token, or load it with a larger --ctx)",
                prompt.len(),
                model.name,
                model.context
            )));
        }
        let span = tracing::info_span!(
            "generate",
            model = %model.name,
            client = %client.name,
            pid = client.pid.unwrap_or(-1),
            prompt_tokens = prompt.len()
        );
        let (events, rx) = mpsc::unbounded_channel();
        let job = GenerateJob {
            prompt,
            params,
            max_tokens,
            stops: req.stop,
            top_logprobs: req.top_logprobs as usize,
            stop_at_eos: req.stop_at_eos.unwrap_or(true),
            events,
        };
        model.queue.submit(QueuedRequest {
            client,
            job: Job::Generate(job),
            deadline,
            enqueued: Instant::now(),
            span,
        })?;
        Ok(Response::new(Box::pin(EndsWithDone {
            events: rx,
            ended: false,
        })))
    }

    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let client = client_key(&request);
        let deadline = grpc_deadline(&request);
        let req = request.into_inner();
        let model = self.residency.get(&req.model)?;
        not_a_translation_model(&model)?;
        if req.top_k > MAX_TOP_LOGPROBS {
            return Err(invalid(format!(
                "top_k is {}; at most {MAX_TOP_LOGPROBS}",
                req.top_k
            )));
        }
        if req.text.is_empty() {
            return Err(invalid("the text to score is empty".into()));
        }
        let tokenizer = model.tokenizer.clone();
        let raw = req.raw;
        let text = req.text;
        let tokens = tokio::task::spawn_blocking(move || {
            if raw {
                tokenizer.encode(&text, false, true)
            } else {
                encode_with_bos(&tokenizer, &text)
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        if tokens.is_empty() {
            return Err(invalid("the text has no tokens".into()));
        }
        if tokens.len() > model.context {
            return Err(invalid(format!(
                "the text is {} tokens; {} was loaded with a context of {} tokens",
                tokens.len(),
                model.name,
                model.context
            )));
        }
        let span = tracing::info_span!("score", model = %model.name, client = %client.name, tokens = tokens.len());
        let (reply, response) = oneshot::channel();
        model.queue.submit(QueuedRequest {
            client,
            job: Job::Score(ScoreJob {
                tokens,
                top_k: req.top_k as usize,
                reply,
            }),
            deadline,
            enqueued: Instant::now(),
            span,
        })?;
        reply_of(response, &model).await
    }

    async fn translate(
        &self,
        request: Request<pb::TranslateRequest>,
    ) -> Result<Response<pb::TranslateResponse>, Status> {
        let client = client_key(&request);
        let deadline = grpc_deadline(&request);
        let req = request.into_inner();
        let model = self.residency.get(&req.model)?;
        if !model.is_translation_model() {
            return Err(invalid(format!(
                "{} is a {} model, not a translation model; Translate serves Marian (opus-mt) models",
                model.name, model.summary.architecture
            )));
        }
        if req.texts.is_empty() {
            return Err(invalid("no texts to translate".into()));
        }
        if req.texts.len() > MAX_TRANSLATE_TEXTS {
            return Err(invalid(format!(
                "{} texts in one request; at most {MAX_TRANSLATE_TEXTS}",
                req.texts.len()
            )));
        }
        if req.num_beams > MAX_BEAMS {
            return Err(invalid(format!(
                "num_beams is {}; at most {MAX_BEAMS}",
                req.num_beams
            )));
        }
        let tokenizer = model.tokenizer.clone();
        let texts = req.texts;
        let sources = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|t| tokenizer.encode(t, true, false))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        for (i, source) in sources.iter().enumerate() {
            if source.len() > model.context {
                return Err(invalid(format!(
                    "text {i} is {} tokens; {} reads at most {}",
                    source.len(),
                    model.name,
                    model.context
                )));
            }
        }
        let span = tracing::info_span!("translate", model = %model.name, client = %client.name, texts = sources.len());
        let (reply, response) = oneshot::channel();
        model.queue.submit(QueuedRequest {
            client,
            job: Job::Translate(TranslateJob {
                sources,
                num_beams: req.num_beams as usize,
                max_tokens: req.max_tokens as usize,
                reply,
            }),
            deadline,
            enqueued: Instant::now(),
            span,
        })?;
        reply_of(response, &model).await
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let model = self.residency.get(&req.model)?;
        let tokenizer = model.tokenizer.clone();
        let response = tokio::task::spawn_blocking(move || {
            let ids = tokenizer.encode(&req.text, req.add_special, req.parse_special);
            let pieces = ids
                .iter()
                .map(|&id| String::from_utf8_lossy(tokenizer.token_bytes(id, true)).into_owned())
                .collect();
            pb::TokenizeResponse {
                token_ids: ids,
                pieces,
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(response))
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let req = request.into_inner();
        let model = self.residency.get(&req.model)?;
        let n_vocab = model.tokenizer.vocab_size();
        if let Some(bad) = req.token_ids.iter().find(|&&id| id as usize >= n_vocab) {
            return Err(invalid(format!(
                "token id {bad} is out of range (vocabulary of {n_vocab})"
            )));
        }
        Ok(Response::new(pb::DetokenizeResponse {
            text: model.tokenizer.decode(&req.token_ids),
        }))
    }

    async fn list_model_files(
        &self,
        _request: Request<pb::ListModelFilesRequest>,
    ) -> Result<Response<pb::ListModelFilesResponse>, Status> {
        let residency = self.residency.clone();
        let files = tokio::task::spawn_blocking(move || residency.list_files())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::ListModelFilesResponse {
            models_dir: self.residency.models_dir().display().to_string(),
            files,
        }))
    }
}

/// A Generate stream as the client sees it: the scheduler's events, and INTERNAL if they stop
/// without a `done` event or an error (the model's batching thread died), so that a
/// truncated generation never looks like a successful one.
struct EndsWithDone {
    events: mpsc::UnboundedReceiver<Result<pb::GenerateEvent, Status>>,
    ended: bool,
}

impl Stream for EndsWithDone {
    type Item = Result<pb::GenerateEvent, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                let last = match &item {
                    Ok(event) => matches!(event.event, Some(pb::generate_event::Event::Done(_))),
                    Err(_) => true,
                };
                self.ended = last;
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Err(Status::internal(
                    "the generation stopped without finishing (egpud's batching thread failed)",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The batching thread's answer to a queued request; a dropped sender means the model went away.
async fn reply_of<T>(
    response: oneshot::Receiver<Result<T, Status>>,
    model: &Resident,
) -> Result<Response<T>, Status> {
    match response.await {
        Ok(result) => result.map(Response::new),
        Err(_) => Err(DaemonError::Unloaded(model.name.clone()).into()),
    }
}

/// Generate and Score need a decoder-only model.
fn not_a_translation_model(model: &Resident) -> Result<(), Status> {
    if model.is_translation_model() {
        return Err(invalid(format!(
            "{} is a translation model (Marian); use Translate (egpuctl translate)",
            model.name
        )));
    }
    Ok(())
}

fn invalid(message: String) -> Status {
    DaemonError::InvalidArgument(message).into()
}

fn model_event(model: &Resident, already_resident: bool) -> pb::LoadEvent {
    pb::LoadEvent {
        event: Some(load_event::Event::Model(model.info())),
        already_resident,
    }
}

/// The prompt's tokens: raw text as it is (with the model's BOS when it wants one), or the
/// conversation rendered by the model's chat template (which writes its own special tokens).
async fn prompt_tokens(
    model: &Arc<Resident>,
    input: Option<Input>,
    raw: bool,
) -> Result<Vec<u32>, Status> {
    let messages = match input {
        None => return Err(invalid("the request has no prompt and no messages".into())),
        Some(Input::Prompt(p)) if p.is_empty() => {
            return Err(invalid("the prompt is empty".into()))
        }
        Some(Input::Prompt(p)) if raw => {
            let tokenizer = model.tokenizer.clone();
            return tokio::task::spawn_blocking(move || encode_with_bos(&tokenizer, &p))
                .await
                .map_err(|e| Status::internal(e.to_string()));
        }
        Some(Input::Prompt(p)) => vec![ChatMessage::user(p)],
        Some(Input::Messages(m)) if m.messages.is_empty() => {
            return Err(invalid("the conversation has no messages".into()))
        }
        Some(Input::Messages(m)) => m
            .messages
            .into_iter()
            .map(|m| ChatMessage::new(m.role, m.content))
            .collect(),
    };
    let text = model
        .template
        .render(&messages, true)
        .map_err(|e| invalid(format!("the chat template failed: {e}")))?;
    let tokenizer = model.tokenizer.clone();
    // Templates usually write the BOS themselves; one that does not (the ChatML fallback)
    // still gets it when the model wants one, and never twice.
    tokio::task::spawn_blocking(move || encode_with_bos(&tokenizer, &text))
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

/// The text's tokens (special tokens written in it recognised), with the model's BOS first
/// when it uses one and the text does not already start with it. Unlike the tokenizer's
/// `add_special`, this never appends an EOS: a prompt or a scored text does not end the
/// document.
fn encode_with_bos(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    let mut ids = tokenizer.encode(text, false, true);
    if let (true, Some(bos)) = (tokenizer.adds_bos(), tokenizer.bos()) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    ids
}

fn sampling_params(options: Option<&pb::SamplingOptions>) -> Result<SamplingParams, Status> {
    let mut params = SamplingParams::default();
    let Some(o) = options else {
        return Ok(params);
    };
    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(invalid(what.to_owned()))
        }
    };
    check(
        o.temperature.is_finite() && o.temperature >= 0.0,
        "temperature must be a finite number >= 0",
    )?;
    let top_p = o.top_p.unwrap_or(1.0);
    check(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1]")?;
    check((0.0..=1.0).contains(&o.min_p), "min_p must be in [0, 1]")?;
    let repeat = o.repeat_penalty.unwrap_or(1.0);
    check(
        repeat.is_finite() && repeat > 0.0,
        "repeat_penalty must be a finite number > 0",
    )?;
    check(
        o.frequency_penalty.is_finite() && o.presence_penalty.is_finite(),
        "frequency_penalty and presence_penalty must be finite",
    )?;
    params.temperature = o.temperature;
    params.top_k = o.top_k as usize;
    params.top_p = top_p;
    params.min_p = o.min_p;
    params.repeat_penalty = repeat;
    params.frequency_penalty = o.frequency_penalty;
    params.presence_penalty = o.presence_penalty;
    if let Some(n) = o.penalty_last_n {
        params.penalty_last_n = n as usize;
    }
    params.seed = o.seed;
    Ok(params)
}

/// The peer's uid and pid from the socket, and the name it gives itself.
fn client_key<T>(request: &Request<T>) -> ClientKey {
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred);
    let name = request
        .metadata()
        .get(CLIENT_NAME_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(64)
        .collect();
    ClientKey {
        uid: cred.map_or(u32::MAX, |c| c.uid()),
        pid: cred.and_then(|c| c.pid()),
        name,
    }
}

/// The client's deadline from the `grpc-timeout` header (`<digits><unit>`, unit one of
/// H M S m u n), as the gRPC protocol sends it.
fn grpc_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value).map(|d| Instant::now() + d)
}

fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Rejects peers running as another user. The socket's mode already keeps them out; this
/// also covers a socket whose mode was changed, or root-owned sockets shared by mistake.
pub fn check_peer(request: Request<()>) -> Result<Request<()>, Status> {
    let own = rustix::process::getuid().as_raw();
    let peer = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|c| c.uid());
    match peer {
        Some(uid) if uid == own => Ok(request),
        Some(uid) => Err(Status::permission_denied(format!(
            "egpud serves uid {own} only; this client runs as uid {uid}"
        ))),
        None => Err(Status::permission_denied(
            "egpud could not read the peer's credentials",
        )),
    }
}

/// The tinygrad backend's line in Status: the worker's phase and the device it holds.
async fn tinygrad_status(worker: &Worker, used: u64) -> pb::BackendStatus {
    let mut status = pb::BackendStatus {
        backend: "tinygrad".into(),
        used_bytes: used,
        restarts: worker.restarts(),
        detail: worker.last_failure(),
        ..Default::default()
    };
    match worker.phase() {
        WorkerPhase::Ready(link) => {
            link.refresh().await;
            let d = &link.device;
            status.state = "ready".into();
            status.device = Some(pb::DeviceInfo {
                name: if d.name.is_empty() {
                    d.device.clone()
                } else {
                    d.name.clone()
                },
                kind: "tinygrad".into(),
                memory_total_bytes: d.memory_total_bytes,
                memory_free_bytes: link.free_bytes(),
            });
            status.dev = d.dev.clone();
            status.arch = d.arch.clone();
            status.interface = d.interface.clone();
            status.budget_bytes = worker.budget(&link).unwrap_or(0);
            status.pid = link.pid;
            status.allocated_bytes = link.allocated_bytes();
        }
        WorkerPhase::Starting => status.state = "starting".into(),
        WorkerPhase::Lost { .. } => status.state = "lost".into(),
        WorkerPhase::Stopped => status.state = "stopped".into(),
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("1x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }

    #[test]
    fn sampling_validation() {
        let ok = pb::SamplingOptions {
            temperature: 0.7,
            top_p: Some(0.9),
            ..Default::default()
        };
        let params = sampling_params(Some(&ok)).unwrap();
        assert_eq!((params.temperature, params.top_p), (0.7, 0.9));
        for bad in [
            pb::SamplingOptions {
                temperature: -1.0,
                ..Default::default()
            },
            pb::SamplingOptions {
                temperature: f32::NAN,
                ..Default::default()
            },
            pb::SamplingOptions {
                top_p: Some(0.0),
                ..Default::default()
            },
            pb::SamplingOptions {
                min_p: 1.5,
                ..Default::default()
            },
            pb::SamplingOptions {
                repeat_penalty: Some(0.0),
                ..Default::default()
            },
        ] {
            let err = sampling_params(Some(&bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }
}

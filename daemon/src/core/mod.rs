//! The core API: what every front end calls, whatever its protocol.
//!
//! A request is validated here (limits, sampling settings), its text tokenized or rendered by
//! the model's chat template ([`prompt`]), and it becomes a job on the model's queue; the
//! answers come back as the scheduler's own types. The gRPC and HTTP front ends only parse
//! their protocol into [`requests`], call one method, and map the result.
//!
//! - [`requests`]: what a front end hands over, and the limits.
//! - [`prompt`]: text and conversations to tokens.
//! - [`stream`]: a generation as a stream of events.
//! - [`templates`]: chat templates rendered in capped child processes.

pub mod on_demand;
pub mod prompt;
pub mod requests;
pub mod stream;
pub mod templates;
pub mod tools;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egpu_engine::models::ModelKind;
use egpu_engine::tokenizer::TokenizerKind;
use tokio::sync::{mpsc, oneshot};

use crate::backend::device::{cpu_device, DeviceInfo};
use crate::backend::tinygrad::{Worker, WorkerPhase};
use crate::backend::BackendKind;
use crate::error::DaemonError;
use crate::metrics;
use crate::residency::{LoadOptions, LoadTicket, ModelFile, ModelInfo, Residency, Resident};
use crate::scheduler::constraint::TokenConstraint;
use crate::scheduler::events::{EmbedResult, ScoreResult, TranslateResult};
use crate::scheduler::{EmbedJob, GenerateJob, Job, Request, ScoreJob, TranslateJob};
use prompt::{encode_with_bos, prompt_tokens};
use requests::{
    check_input_bytes, check_stops, Caller, Constraint, EmbedRequest, GenerateRequest,
    ScoreRequest, TranslateRequest, MAX_BEAMS, MAX_DETOKENIZE_IDS, MAX_EMBED_INPUTS,
    MAX_TOP_LOGPROBS, MAX_TRANSLATE_TEXTS,
};
pub use stream::GenerationStream;
use templates::TemplateRenderers;
use tools::{ToolChoice, ToolFormat, ToolReader};

/// The core API over the resident models.
#[derive(Debug, Clone)]
pub struct Core {
    residency: Arc<Residency>,
    started: Instant,
    threads: usize,
    endpoints: Arc<Endpoints>,
    renderers: Arc<TemplateRenderers>,
}

/// Where egpud's HTTP front end can be reached, for Status (set by the composition root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// `http://127.0.0.1:11470`; empty when TCP is off.
    pub http_url: String,
    /// Empty when the HTTP socket is off.
    pub http_socket: String,
    /// The key file TCP clients' key is in; empty when TCP needs no key.
    pub api_key_file: String,
}

/// What Status reports.
#[derive(Debug, Clone)]
pub struct StatusReport {
    /// The CPU backend's device (the host).
    pub device: DeviceInfo,
    pub budget: u64,
    /// Bytes the CPU models hold.
    pub used: u64,
    pub backends: Vec<BackendReport>,
    /// Most recently used first.
    pub models: Vec<ModelInfo>,
    pub version: &'static str,
    pub uptime: Duration,
    pub models_dir: PathBuf,
    pub threads: usize,
    pub endpoints: Endpoints,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Ready,
    Starting,
    /// The worker died or stopped answering and is being restarted.
    Lost,
    Stopped,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Ready => "ready",
            BackendState::Starting => "starting",
            BackendState::Lost => "lost",
            BackendState::Stopped => "stopped",
        }
    }
}

/// One backend's line in Status.
#[derive(Debug, Clone)]
pub struct BackendReport {
    pub backend: BackendKind,
    pub state: BackendState,
    /// Why the last worker failed; empty if none has.
    pub detail: String,
    pub device: Option<DeviceInfo>,
    pub dev: String,
    pub arch: String,
    pub interface: String,
    pub budget: u64,
    pub used: u64,
    pub restarts: u32,
    pub pid: u32,
    /// What tinygrad itself counts as allocated on the device.
    pub allocated: u64,
}

/// What an unload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unloaded {
    pub freed_bytes: u64,
    pub aborted_requests: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub token_ids: Vec<u32>,
    pub pieces: Vec<String>,
}

impl Core {
    /// `renderer_program` is egpud's own binary, started as chat template renderers.
    pub fn new(
        residency: Arc<Residency>,
        threads: usize,
        endpoints: Endpoints,
        renderer_program: PathBuf,
    ) -> Core {
        Core {
            residency,
            renderers: Arc::new(TemplateRenderers::new(renderer_program)),
            started: Instant::now(),
            threads,
            endpoints: Arc::new(endpoints),
        }
    }

    pub fn residency(&self) -> &Arc<Residency> {
        &self.residency
    }

    pub async fn status(&self) -> StatusReport {
        let device = cpu_device();
        let cpu_used = self.residency.used_by(BackendKind::Cpu);
        let mut backends = vec![BackendReport {
            backend: BackendKind::Cpu,
            state: BackendState::Ready,
            detail: String::new(),
            device: Some(device.clone()),
            dev: String::new(),
            arch: std::env::consts::ARCH.into(),
            interface: String::new(),
            budget: self.residency.budget(),
            used: cpu_used,
            restarts: 0,
            pid: 0,
            allocated: 0,
        }];
        if let Some(worker) = self.residency.worker() {
            backends
                .push(tinygrad_status(worker, self.residency.used_by(BackendKind::Tinygrad)).await);
        }
        StatusReport {
            device,
            budget: self.residency.budget(),
            used: cpu_used,
            backends,
            models: self.residency.snapshot(),
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.started.elapsed(),
            models_dir: self.residency.models_dir().to_owned(),
            threads: self.threads,
            endpoints: (*self.endpoints).clone(),
        }
    }

    /// The Prometheus exposition: the counters as recorded, the gauges sampled now.
    pub async fn metrics_text(&self) -> String {
        let status = self.status().await;
        let m = self.residency.metrics();
        m.queue_depth.clear();
        m.busy_slots.clear();
        m.resident_bytes.clear();
        for model in &status.models {
            let labels = metrics::model(&model.name);
            m.queue_depth
                .get_or_create(&labels)
                .set(model.queued as i64);
            m.busy_slots.get_or_create(&labels).set(model.active as i64);
            m.resident_bytes
                .get_or_create(&labels)
                .set(model.bytes as i64);
        }
        for backend in &status.backends {
            let labels = metrics::BackendLabels {
                backend: backend.backend.as_str().into(),
            };
            m.budget_bytes
                .get_or_create(&labels)
                .set(backend.budget as i64);
            m.used_bytes.get_or_create(&labels).set(backend.used as i64);
        }
        m.encode()
    }

    pub async fn load(&self, opts: LoadOptions) -> Result<LoadTicket, DaemonError> {
        self.residency.start_load(opts).await
    }

    pub async fn unload(&self, name: &str, force: bool) -> Result<Unloaded, DaemonError> {
        let (freed_bytes, aborted_requests) = self.residency.unload(name, force).await?;
        Ok(Unloaded {
            freed_bytes,
            aborted_requests,
        })
    }

    /// Validates and tokenizes a generation and queues it; the stream carries its tokens.
    pub async fn generate(
        &self,
        req: GenerateRequest,
        caller: Caller,
    ) -> Result<GenerationStream, DaemonError> {
        let name = req.model.clone();
        let started = self.queue_generation(req, caller).await;
        self.count_refusal(&name, "generate", started.as_ref().err());
        started
    }

    /// A request refused before it reached a queue still counts, by why it was refused.
    fn count_refusal(&self, model: &str, kind: &str, err: Option<&DaemonError>) {
        if let Some(err) = err {
            self.residency
                .metrics()
                .request(model, kind, metrics::outcome(err));
        }
    }

    async fn queue_generation(
        &self,
        req: GenerateRequest,
        caller: Caller,
    ) -> Result<GenerationStream, DaemonError> {
        let model = self.decoder(&req.model).await?;
        let params = req.sampling.validate()?;
        if let Some(input) = &req.input {
            check_input_bytes(input.bytes(), model.context, "the prompt")?;
        }
        check_stops(&req.stop)?;
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
        let tool_format = match &req.tools {
            Some(tools) => {
                tools.validate()?;
                if req.raw && tools.shown() {
                    return Err(invalid(
                        "tools reach the model through its chat template: not with raw".into(),
                    ));
                }
                match ToolFormat::of_template(model.template.source()) {
                    Some(format) => tools.shown().then_some(format),
                    None if tools.shown() => {
                        return Err(invalid(format!(
                            "{}'s chat template does not render tools in a format egpud can \
                             read calls from (Qwen/Hermes <tool_call> or Llama 3.1 JSON)",
                            model.name
                        )))
                    }
                    None => None,
                }
            }
            None => None,
        };
        // With `auto` and a response format, the answer is that document (`reader` below), so
        // the format alone constrains it.
        let tool_constraint = req
            .tools
            .as_ref()
            .zip(tool_format)
            .filter(|(tools, _)| req.constraint.is_none() || tools.choice != ToolChoice::Auto)
            .and_then(|(tools, format)| tools.constraint(format));
        // An answer shaped by a response format is that document, never a call.
        let reader = match (&req.tools, tool_format) {
            (Some(tools), Some(format)) if req.constraint.is_none() => {
                Some(ToolReader::new(format, tools))
            }
            _ => None,
        };
        let constraint =
            match (req.constraint, tool_constraint) {
                (Some(_), Some(_)) => return Err(invalid(
                    "a required tool call and a response format cannot both constrain the output"
                        .into(),
                )),
                (own, from_tools) => own.or(from_tools),
            };
        let shown_tools = req
            .tools
            .as_ref()
            .filter(|t| t.shown())
            .map(|t| serde_json::Value::Array(t.list.clone()));
        let prompt =
            prompt_tokens(&self.renderers, &model, req.input, req.raw, shown_tools).await?;
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
            client = %caller.client.name,
            pid = caller.client.pid.unwrap_or(-1),
            prompt_tokens = prompt.len()
        );
        let constraint = match constraint {
            Some(constraint) => Some(Box::new(compile_constraint(&model, constraint).await?)),
            None => None,
        };
        let (events, rx) = mpsc::unbounded_channel();
        let job = GenerateJob {
            prompt,
            params,
            max_tokens,
            stops: req.stop,
            top_logprobs: req.top_logprobs as usize,
            stop_at_eos: req.stop_at_eos.unwrap_or(true),
            constraint,
            events,
        };
        submit(&model, caller, Job::Generate(job), span)?;
        Ok(GenerationStream::new(rx, reader))
    }

    /// The log-probability of every token of a text given the ones before it.
    pub async fn score(
        &self,
        req: ScoreRequest,
        caller: Caller,
    ) -> Result<ScoreResult, DaemonError> {
        let name = req.model.clone();
        let (reply, model) = match self.queue_score(req, caller).await {
            Ok(queued) => queued,
            Err(err) => {
                self.count_refusal(&name, "score", Some(&err));
                return Err(err);
            }
        };
        reply_of(reply, &model).await
    }

    async fn queue_score(
        &self,
        req: ScoreRequest,
        caller: Caller,
    ) -> Result<(Reply<ScoreResult>, Arc<Resident>), DaemonError> {
        let model = self.decoder(&req.model).await?;
        if req.top_k > MAX_TOP_LOGPROBS {
            return Err(invalid(format!(
                "top_k is {}; at most {MAX_TOP_LOGPROBS}",
                req.top_k
            )));
        }
        if req.text.is_empty() {
            return Err(invalid("the text to score is empty".into()));
        }
        check_input_bytes(req.text.len(), model.context, "the text")?;
        let tokenizer = model.tokenizer.clone();
        let (raw, text) = (req.raw, req.text);
        let tokens = tokio::task::spawn_blocking(move || {
            if raw {
                tokenizer.encode(&text, false, true)
            } else {
                encode_with_bos(&tokenizer, &text)
            }
        })
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?;
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
        let span = tracing::info_span!("score", model = %model.name, client = %caller.client.name, tokens = tokens.len());
        let (reply, response) = oneshot::channel();
        let job = ScoreJob {
            tokens,
            top_k: req.top_k as usize,
            reply,
        };
        submit(&model, caller, Job::Score(job), span)?;
        Ok((response, model))
    }

    /// Embeds texts with a decoder or a BERT-family model on the CPU backend: each text's final
    /// hidden states, pooled as the model file says (last token if it says nothing), unit
    /// length unless asked otherwise.
    pub async fn embed(
        &self,
        req: EmbedRequest,
        caller: Caller,
    ) -> Result<EmbedResult, DaemonError> {
        let name = req.model.clone();
        let queued = self.queue_embed(req, caller).await;
        let (reply, model) = match queued {
            Ok(queued) => queued,
            Err(err) => {
                self.count_refusal(&name, "embed", Some(&err));
                return Err(err);
            }
        };
        reply_of(reply, &model).await
    }

    async fn queue_embed(
        &self,
        req: EmbedRequest,
        caller: Caller,
    ) -> Result<(Reply<EmbedResult>, Arc<Resident>), DaemonError> {
        let model = self.residency.ready(&req.model).await?;
        if model.kind == ModelKind::Translator {
            return Err(invalid(format!(
                "{} is a translation model (Marian); it does not embed text",
                model.name
            )));
        }
        if req.inputs.is_empty() {
            return Err(invalid("no input to embed".into()));
        }
        if req.inputs.len() > MAX_EMBED_INPUTS {
            return Err(invalid(format!(
                "{} inputs; at most {MAX_EMBED_INPUTS} per request",
                req.inputs.len()
            )));
        }
        let pooling = model.pooling()?;
        let width = model.summary.embedding_length as usize;
        let dimensions = match req.dimensions {
            Some(0) => return Err(invalid("dimensions must be at least 1".into())),
            Some(d) if d as usize > width => {
                return Err(invalid(format!(
                    "dimensions is {d}; {} has {width}",
                    model.name
                )))
            }
            other => other.map(|d| d as usize),
        };
        let total: usize = req.inputs.iter().map(String::len).sum();
        check_input_bytes(total, model.context * req.inputs.len(), "the inputs")?;
        let tokenizer = model.tokenizer.clone();
        let tokenizer_end = match model.tokenizer.kind() {
            TokenizerKind::WordPiece(_) => {
                let special = model.tokenizer.special_ids();
                special.sep.or(special.eos)
            }
            _ => model
                .tokenizer
                .adds_eos()
                .then(|| model.tokenizer.eos())
                .flatten(),
        };
        let texts = req.inputs;
        // As llama.cpp embeds a text: special tokens parsed, the model's BOS first and its EOS
        // last when its vocabulary adds them.
        let inputs = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|text| {
                    if matches!(tokenizer.kind(), TokenizerKind::WordPiece(_)) {
                        // BERT frames every text as [CLS] … [SEP].
                        return tokenizer.encode(text, true, true);
                    }
                    let mut ids = encode_with_bos(&tokenizer, text);
                    if let (true, Some(eos)) = (tokenizer.adds_eos(), tokenizer.eos()) {
                        ids.push(eos);
                    }
                    ids
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let mut inputs = inputs;
        for (i, tokens) in inputs.iter_mut().enumerate() {
            if tokens.is_empty() {
                return Err(invalid(format!("input {i} has no tokens")));
            }
            if req.truncate && tokens.len() > model.context {
                // Keep the end-of-text token the tokenizer framed the text with.
                let last = tokens[tokens.len() - 1];
                let framed = tokenizer_end.is_some_and(|end| end == last);
                tokens.truncate(model.context);
                if framed {
                    tokens[model.context - 1] = last;
                }
            }
            if tokens.len() > model.context {
                return Err(invalid(format!(
                    "input {i} is {} tokens; {} was loaded with a context of {} tokens",
                    tokens.len(),
                    model.name,
                    model.context
                )));
            }
        }
        let span = tracing::info_span!("embed", model = %model.name, client = %caller.client.name, inputs = inputs.len());
        let (reply, response) = oneshot::channel();
        let job = EmbedJob {
            inputs,
            pooling,
            normalize: req.normalize.unwrap_or(true),
            dimensions,
            whole_texts: model.kind == ModelKind::Embedder,
            reply,
        };
        submit(&model, caller, Job::Embed(job), span)?;
        Ok((response, model))
    }

    /// Translates a batch of sentences with a translation model.
    pub async fn translate(
        &self,
        req: TranslateRequest,
        caller: Caller,
    ) -> Result<TranslateResult, DaemonError> {
        let name = req.model.clone();
        let (reply, model) = match self.queue_translation(req, caller).await {
            Ok(queued) => queued,
            Err(err) => {
                self.count_refusal(&name, "translate", Some(&err));
                return Err(err);
            }
        };
        reply_of(reply, &model).await
    }

    async fn queue_translation(
        &self,
        req: TranslateRequest,
        caller: Caller,
    ) -> Result<(Reply<TranslateResult>, Arc<Resident>), DaemonError> {
        let model = self.residency.ready(&req.model).await?;
        if model.kind != ModelKind::Translator {
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
        for (i, text) in req.texts.iter().enumerate() {
            check_input_bytes(text.len(), model.context, &format!("text {i}"))?;
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
        .map_err(|e| DaemonError::Internal(e.to_string()))?;
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
        let (sentences_per_pass, working_memory) =
            self.translation_memory(&model, req.num_beams as usize, req.max_tokens as usize)?;
        let span = tracing::info_span!("translate", model = %model.name, client = %caller.client.name, texts = sources.len());
        let (reply, response) = oneshot::channel();
        let job = TranslateJob {
            sources,
            num_beams: req.num_beams as usize,
            max_tokens: req.max_tokens as usize,
            sentences_per_pass,
            working_memory,
            reply,
        };
        submit(&model, caller, Job::Translate(job), span)?;
        Ok((response, model))
    }

    /// How a translation's working memory stays inside the budget: sentences go through in
    /// passes that fit what the model reserved at load (a request of 256 texts at 16 beams is
    /// far past it); a single sentence that needs more than that borrows the difference from
    /// the budget's free bytes for the job's length, or is refused when they are not there.
    fn translation_memory(
        &self,
        model: &Arc<Resident>,
        num_beams: usize,
        max_tokens: usize,
    ) -> Result<(usize, Option<Box<dyn std::any::Any + Send>>), DaemonError> {
        let Some(costs) = &model.translation else {
            return Err(DaemonError::Internal(format!(
                "{} has no translation costs",
                model.name
            )));
        };
        let (beams, length) = costs.resolve(num_beams, max_tokens);
        let one = costs.per_sentence(beams, length).max(1);
        if one <= costs.reserved {
            return Ok(((costs.reserved / one) as usize, None));
        }
        let weights = model.estimate.total.saturating_sub(costs.reserved);
        match self
            .residency
            .grow_working(model, weights.saturating_add(one))
        {
            Ok(grant) => Ok((1, Some(Box::new(grant)))),
            Err(spare) => Err(DaemonError::TranslationTooLarge {
                model: model.name.clone(),
                beams,
                length,
                needed: one,
                reserved: costs.reserved,
                spare,
            }),
        }
    }

    pub async fn tokenize(
        &self,
        model: &str,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Tokenized, DaemonError> {
        let model = self.residency.ready(model).await?;
        check_input_bytes(text.len(), model.context, "the text")?;
        let tokenizer = model.tokenizer.clone();
        tokio::task::spawn_blocking(move || {
            let token_ids = tokenizer.encode(&text, add_special, parse_special);
            let pieces = token_ids
                .iter()
                .map(|&id| String::from_utf8_lossy(tokenizer.token_bytes(id, true)).into_owned())
                .collect();
            Tokenized { token_ids, pieces }
        })
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))
    }

    pub async fn detokenize(&self, model: &str, token_ids: &[u32]) -> Result<String, DaemonError> {
        let model = self.residency.ready(model).await?;
        if token_ids.len() > MAX_DETOKENIZE_IDS {
            return Err(invalid(format!(
                "{} token ids; at most {MAX_DETOKENIZE_IDS}",
                token_ids.len()
            )));
        }
        let n_vocab = model.tokenizer.vocab_size();
        if let Some(bad) = token_ids.iter().find(|&&id| id as usize >= n_vocab) {
            return Err(invalid(format!(
                "token id {bad} is out of range (vocabulary of {n_vocab})"
            )));
        }
        // Off the runtime, like tokenizing: a long list takes a while.
        let tokenizer = model.tokenizer.clone();
        let ids = token_ids.to_vec();
        tokio::task::spawn_blocking(move || tokenizer.decode(&ids))
            .await
            .map_err(|e| DaemonError::Internal(e.to_string()))
    }

    /// The models folder's `.gguf` files.
    pub async fn list_model_files(&self) -> Result<Vec<ModelFile>, DaemonError> {
        let residency = self.residency.clone();
        tokio::task::spawn_blocking(move || residency.list_files())
            .await
            .map_err(|e| DaemonError::Internal(e.to_string()))
    }

    /// Removes HF conversions no resident model uses; the folders removed and bytes freed.
    pub async fn prune_conversions(&self) -> Result<(Vec<PathBuf>, u64), DaemonError> {
        let residency = self.residency.clone();
        tokio::task::spawn_blocking(move || residency.prune_conversions())
            .await
            .map_err(|e| DaemonError::Internal(e.to_string()))?
            .map_err(|e| DaemonError::Internal(format!("pruning conversions: {e}")))
    }

    /// A resident decoder-only model (Generate and Score need one).
    async fn decoder(&self, name: &str) -> Result<Arc<Resident>, DaemonError> {
        let model = self.residency.ready(name).await?;
        match model.kind {
            ModelKind::Decoder => Ok(model),
            ModelKind::Translator => Err(invalid(format!(
                "{} is a translation model (Marian); use Translate (egpuctl translate)",
                model.name
            ))),
            ModelKind::Embedder => Err(invalid(format!(
                "{} is an embedding model ({}): it has no LM head to generate or score with; \
                 use Embed (egpuctl embed, /v1/embeddings, /api/embed)",
                model.name, model.summary.architecture
            ))),
        }
    }
}

fn submit(
    model: &Resident,
    caller: Caller,
    job: Job,
    span: tracing::Span,
) -> Result<(), DaemonError> {
    model.queue.submit(Request {
        client: caller.client,
        job,
        deadline: caller.deadline,
        enqueued: Instant::now(),
        span,
    })
}

type Reply<T> = oneshot::Receiver<Result<T, DaemonError>>;

/// The runner's answer to a queued request; a dropped sender means the model went away.
async fn reply_of<T>(response: Reply<T>, model: &Resident) -> Result<T, DaemonError> {
    match response.await {
        Ok(result) => result,
        Err(_) => Err(DaemonError::Unloaded(model.name.clone())),
    }
}

/// Checks and compiles a generation's constraint for `model`, off the async runtime: the
/// model's first constrained request builds its vocabulary's trie, and a large schema takes a
/// while to compile.
async fn compile_constraint(
    model: &Resident,
    constraint: Constraint,
) -> Result<TokenConstraint, DaemonError> {
    let grammars = model.grammars.clone();
    tokio::task::spawn_blocking(move || grammars.compile(&constraint))
        .await
        .map_err(|e| DaemonError::Internal(format!("the grammar compiler stopped: {e}")))?
}

fn invalid(message: String) -> DaemonError {
    DaemonError::InvalidArgument(message)
}

/// The tinygrad backend's line in Status: the worker's phase and the device it holds.
async fn tinygrad_status(worker: &Worker, used: u64) -> BackendReport {
    let mut report = BackendReport {
        backend: BackendKind::Tinygrad,
        state: BackendState::Stopped,
        detail: worker.last_failure(),
        device: None,
        dev: String::new(),
        arch: String::new(),
        interface: String::new(),
        budget: 0,
        used,
        restarts: worker.restarts(),
        pid: 0,
        allocated: 0,
    };
    match worker.phase() {
        WorkerPhase::Ready(link) => {
            link.refresh().await;
            let d = &link.device;
            report.state = BackendState::Ready;
            report.device = Some(DeviceInfo {
                name: if d.name.is_empty() {
                    d.device.clone()
                } else {
                    d.name.clone()
                },
                kind: "tinygrad".into(),
                memory_total: d.memory_total_bytes,
                memory_free: link.free_bytes(),
            });
            report.dev = d.dev.clone();
            report.arch = d.arch.clone();
            report.interface = d.interface.clone();
            report.budget = worker.budget(&link).unwrap_or(0);
            report.pid = link.pid;
            report.allocated = link.allocated_bytes();
        }
        WorkerPhase::Starting => report.state = BackendState::Starting,
        WorkerPhase::Lost { .. } => report.state = BackendState::Lost,
        WorkerPhase::Stopped => report.state = BackendState::Stopped,
    }
    report
}

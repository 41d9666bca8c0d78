//! Per-model scheduling: a queue that requests are submitted to, and one runner thread per
//! model that owns the loaded model and serves the queue.
//!
//! - [`admission`]: which waiting request gets the next free slot (fair between clients).
//! - [`plan`]: which sequences and prompt chunks go into the next pass.
//! - [`decoder`]: the runner of decoder-only models (continuous batching, chunked prefill).
//! - [`translator`]: the runner of translation models (one batch of sentences at a time).
//! - [`events`]: what the runners send back.
//! - [`constraint`]: JSON-schema, regex and grammar constraints, as masks on the logits.
//!
//! The engine's logits do not depend on what else is in the batch, so a request gets the
//! same tokens whether it runs alone or beside others.

pub mod admission;
pub mod constraint;
pub mod decoder;
pub mod events;
pub mod plan;
pub mod prefix;
pub mod translator;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use egpu_engine::sampler::SamplingParams;
use egpu_engine::tokenizer::Tokenizer;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::backend::{ComputeTurns, LoadedModel};
use crate::error::DaemonError;
use crate::metrics::Metrics;
use admission::{Admission, Queued};
use events::{EmbedResult, GenerationEvent, ScoreResult, TranslateResult};

/// Who sent a request: fairness is shared out between these.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub uid: u32,
    pub pid: Option<i32>,
    pub name: String,
}

/// A generation request, tokenized and validated.
#[derive(Debug)]
pub struct GenerateJob {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stops: Vec<String>,
    pub top_logprobs: usize,
    pub stop_at_eos: bool,
    /// The grammar the output must match, compiled for this request.
    pub constraint: Option<Box<constraint::TokenConstraint>>,
    pub events: mpsc::UnboundedSender<GenerationEvent>,
}

/// A scoring request: the log-probability of every token given the ones before it.
#[derive(Debug)]
pub struct ScoreJob {
    pub tokens: Vec<u32>,
    pub top_k: usize,
    pub reply: oneshot::Sender<Result<ScoreResult, DaemonError>>,
}

/// A translation request: source ids (each ending with `</s>`), translated as one batch.
#[derive(Debug)]
pub struct TranslateJob {
    pub sources: Vec<Vec<u32>>,
    /// 0 = the model's.
    pub num_beams: usize,
    /// Most output tokens; 0 = the model's.
    pub max_tokens: usize,
    /// Sentences translated together in one pass: as many as the working memory the model
    /// may use allows (the core computes it from the budget).
    pub sentences_per_pass: usize,
    /// Held until the job is done: extra working memory counted against the budget, given
    /// back on drop (the residency manager's grant, opaque down here).
    pub working_memory: Option<Box<dyn std::any::Any + Send>>,
    pub reply: oneshot::Sender<Result<TranslateResult, DaemonError>>,
}

/// Embedding texts: each input's final hidden states, pooled (and scaled to unit length).
#[derive(Debug)]
pub struct EmbedJob {
    /// Each input's tokens.
    pub inputs: Vec<Vec<u32>>,
    pub pooling: egpu_engine::models::embedding::Pooling,
    pub normalize: bool,
    /// Keep the first this many dimensions (None: all), before normalizing.
    pub dimensions: Option<usize>,
    /// Feed each input in one pass (an encoder's tokens all see each other) rather than in
    /// chunks of `batch_tokens`.
    pub whole_texts: bool,
    pub reply: oneshot::Sender<Result<EmbedResult, DaemonError>>,
}

#[derive(Debug)]
pub enum Job {
    Generate(GenerateJob),
    Score(ScoreJob),
    Translate(TranslateJob),
    Embed(EmbedJob),
}

impl Job {
    /// The `kind` label of the request's metrics.
    fn kind(&self) -> &'static str {
        match self {
            Job::Generate(_) => "generate",
            Job::Score(_) => "score",
            Job::Translate(_) => "translate",
            Job::Embed(_) => "embed",
        }
    }

    /// Whether the client stopped waiting for the answer.
    fn is_abandoned(&self) -> bool {
        match self {
            Job::Generate(g) => g.events.is_closed(),
            Job::Score(s) => s.reply.is_closed(),
            Job::Translate(t) => t.reply.is_closed(),
            Job::Embed(e) => e.reply.is_closed(),
        }
    }

    /// Answers with `err` (the client may be gone already; nothing to do then).
    fn fail(self, err: DaemonError) {
        match self {
            Job::Generate(g) => {
                let _ = g.events.send(GenerationEvent::Failed(err));
            }
            Job::Score(s) => {
                let _ = s.reply.send(Err(err));
            }
            Job::Translate(t) => {
                let _ = t.reply.send(Err(err));
            }
            Job::Embed(e) => {
                let _ = e.reply.send(Err(err));
            }
        }
    }
}

#[derive(Debug)]
pub struct Request {
    pub client: ClientKey,
    pub job: Job,
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
    pub span: tracing::Span,
}

impl Queued for Request {
    type Client = ClientKey;
    fn client(&self) -> &ClientKey {
        &self.client
    }
}

/// Why a runner must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Unloaded (by a user, eviction or keep-alive expiry); running requests end with ABORTED.
    Unload,
    /// egpud is exiting; running requests end with UNAVAILABLE.
    Shutdown,
    /// The runner panicked (a bug); requests get INTERNAL until the model is reloaded.
    Crashed,
    /// The model's device went away (the tinygrad worker died or stopped answering);
    /// running requests end with UNAVAILABLE "device lost".
    DeviceLost,
    /// The model's file was written in place while loaded; running requests end with ABORTED.
    FileChanged,
}

/// Counters Status reads.
#[derive(Debug, Clone, Copy)]
pub struct QueueCounts {
    pub active: usize,
    pub queued: usize,
    pub served: u64,
    pub last_used: SystemTime,
    /// When the model last became idle (no active or queued request); None while busy.
    pub idle_since: Option<Instant>,
}

#[derive(Debug)]
struct QueueState {
    admission: Admission<Request>,
    stop: Option<StopReason>,
    served: u64,
    last_used: SystemTime,
    idle_since: Option<Instant>,
}

impl QueueState {
    /// A running request ended; `served` if it was answered (successfully or with its own
    /// error), not when its client left.
    fn finished(&mut self, client: &ClientKey, served: bool) {
        self.admission.finished(client);
        if served {
            self.served += 1;
        }
        self.last_used = SystemTime::now();
    }
}

/// The door between the core API and a model's runner.
#[derive(Debug)]
pub struct ModelQueue {
    model: String,
    max_queue: usize,
    state: Mutex<QueueState>,
    wake: Condvar,
    /// Told whenever the model becomes idle, so keep-alive expiry is re-checked.
    idle: Arc<Notify>,
    /// Bytes the model holds, measured after each step.
    memory: AtomicU64,
    /// The runner's prompt-prefix reuse, for Status.
    prefix: PrefixCounters,
    metrics: Arc<Metrics>,
}

/// How often a model's new generations found part of their prompt in a slot's cache.
#[derive(Debug, Default)]
pub struct PrefixCounters {
    lookups: AtomicU64,
    hits: AtomicU64,
    reused_tokens: AtomicU64,
    copies: AtomicU64,
    copied_tokens: AtomicU64,
}

/// A snapshot of [`PrefixCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Generations admitted.
    pub lookups: u64,
    /// Of those, the ones that reused at least one cached token.
    pub hits: u64,
    /// Prompt tokens taken from slot caches instead of prefilled.
    pub reused_tokens: u64,
    /// Of the hits, the ones whose prefix was copied from another slot (a shared system
    /// prompt), and the tokens copied (part of `reused_tokens`).
    pub copies: u64,
    pub copied_tokens: u64,
}

impl ModelQueue {
    pub fn new(
        model: String,
        max_queue: usize,
        idle: Arc<Notify>,
        memory: u64,
        metrics: Arc<Metrics>,
    ) -> ModelQueue {
        ModelQueue {
            model,
            max_queue,
            state: Mutex::new(QueueState {
                admission: Admission::new(),
                stop: None,
                served: 0,
                last_used: SystemTime::now(),
                idle_since: Some(Instant::now()),
            }),
            wake: Condvar::new(),
            idle,
            memory: AtomicU64::new(memory),
            prefix: PrefixCounters::default(),
            metrics,
        }
    }

    /// Queues a request. Fails when the queue is full or the model is going away.
    pub fn submit(&self, request: Request) -> Result<(), DaemonError> {
        let mut st = self.state.lock();
        if let Some(reason) = st.stop {
            return Err(self.stop_error(reason));
        }
        if st.admission.waiting() >= self.max_queue {
            return Err(DaemonError::QueueFull {
                model: self.model.clone(),
                limit: self.max_queue,
            });
        }
        st.admission.enqueue(request);
        st.idle_since = None;
        st.last_used = SystemTime::now();
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    pub fn counts(&self) -> QueueCounts {
        let st = self.state.lock();
        QueueCounts {
            active: st.admission.running(),
            queued: st.admission.waiting(),
            served: st.served,
            last_used: st.last_used,
            idle_since: st.idle_since,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.load(Ordering::Relaxed)
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        PrefixStats {
            lookups: self.prefix.lookups.load(Ordering::Relaxed),
            hits: self.prefix.hits.load(Ordering::Relaxed),
            reused_tokens: self.prefix.reused_tokens.load(Ordering::Relaxed),
            copies: self.prefix.copies.load(Ordering::Relaxed),
            copied_tokens: self.prefix.copied_tokens.load(Ordering::Relaxed),
        }
    }

    /// Sets what the model holds now (the residency manager grows it for a translation whose
    /// working memory passes the load's reservation, and shrinks it back after).
    pub fn set_memory_bytes(&self, bytes: u64) {
        self.memory.store(bytes, Ordering::Relaxed);
    }

    /// Asks the runner to end, unless the model is busy and `force` is false.
    /// Returns the number of requests that will be aborted.
    pub fn stop(&self, reason: StopReason, force: bool) -> Result<usize, DaemonError> {
        let mut st = self.state.lock();
        let (active, queued) = (st.admission.running(), st.admission.waiting());
        if active + queued > 0 && !force {
            return Err(DaemonError::Busy {
                model: self.model.clone(),
                active,
                queued,
            });
        }
        st.stop.get_or_insert(reason);
        drop(st);
        self.wake.notify_one();
        Ok(active + queued)
    }

    /// Whether the model has no active or queued request.
    pub fn is_idle(&self) -> bool {
        let st = self.state.lock();
        st.admission.running() == 0 && st.admission.waiting() == 0
    }

    /// What requests get when the model ends for `reason`.
    fn stop_error(&self, reason: StopReason) -> DaemonError {
        match reason {
            StopReason::Unload => DaemonError::Unloaded(self.model.clone()),
            StopReason::Shutdown => DaemonError::ShuttingDown,
            StopReason::Crashed => DaemonError::Internal(format!(
                "the batching thread of {} failed; unload and load the model again",
                self.model
            )),
            StopReason::FileChanged => DaemonError::ModelFileChanged(self.model.clone()),
            StopReason::DeviceLost => DaemonError::DeviceLost(format!(
                "{} was on the tinygrad device, whose worker stopped; egpud is restarting it",
                self.model
            )),
        }
    }

    /// Fails every waiting request with `reason`'s error and forgets the running ones (the
    /// model is ending).
    fn fail_waiting(&self, st: &mut QueueState, reason: StopReason) {
        for req in st.admission.drain() {
            self.fail(req.job, self.stop_error(reason));
        }
    }

    /// Forgets waiting requests whose client left, and fails those whose deadline passed.
    fn forget_abandoned(&self, st: &mut QueueState) {
        let now = Instant::now();
        let gone = st.admission.take_waiting_where(|req| {
            req.job.is_abandoned() || req.deadline.is_some_and(|d| d <= now)
        });
        for req in gone {
            if req.job.is_abandoned() {
                self.metrics
                    .request(&self.model, req.job.kind(), "cancelled");
            } else {
                self.fail(req.job, DaemonError::DeadlineExceeded { generated: 0 });
            }
        }
    }

    /// Answers a job that never ran with `err`, and counts it.
    fn fail(&self, job: Job, err: DaemonError) {
        self.metrics
            .request(&self.model, job.kind(), crate::metrics::outcome(&err));
        job.fail(err);
    }

    /// Waits until a request can be admitted (`admit` says whether there is room for one)
    /// or the model must stop. Marks the model idle while it waits with nothing running.
    fn wait_for_work(&self, st: &mut parking_lot::MutexGuard<'_, QueueState>) {
        if st.admission.running() == 0 && st.idle_since.is_none() {
            st.idle_since = Some(Instant::now());
            self.idle.notify_one();
        }
        self.wake.wait(st);
    }

    /// After the runner panicked: refuse new requests and fail the waiting ones, so that no
    /// client waits for an answer that will not come.
    fn abandon(&self) {
        let mut st = self.state.lock();
        st.stop = Some(StopReason::Crashed);
        st.idle_since = Some(Instant::now());
        self.fail_waiting(&mut st, StopReason::Crashed);
        drop(st);
        self.idle.notify_one();
    }
}

/// Settings of a model's runner.
#[derive(Debug, Clone, Copy)]
pub struct RunnerSettings {
    pub batch_tokens: usize,
}

/// Runs a model until its queue is stopped. Call on a dedicated thread. A panic (a bug) ends
/// only this model's requests: the streams it was serving close, waiting requests and new
/// ones get INTERNAL, and the rest of egpud keeps serving.
pub fn run_model(
    model: LoadedModel,
    tokenizer: Arc<Tokenizer>,
    queue: Arc<ModelQueue>,
    turns: Arc<ComputeTurns>,
    settings: RunnerSettings,
) {
    let run = std::panic::AssertUnwindSafe(|| match model {
        LoadedModel::Decoder(model) => decoder::serve(model, &tokenizer, &queue, &turns, settings),
        LoadedModel::Translator(model) => translator::serve(&model, &tokenizer, &queue, &turns),
    });
    if std::panic::catch_unwind(run).is_err() {
        tracing::error!(model = %queue.model, "model runner panicked; the model stops serving");
        queue.abandon();
    }
}

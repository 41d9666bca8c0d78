//! Per-model continuous batching.
//!
//! Each resident model has one batching thread that owns the loaded model and its slots, and
//! a [`ModelQueue`] that API handlers submit requests to. Every step, the thread:
//!
//! 1. drops sequences whose client went away or whose deadline passed (freeing their slot),
//! 2. admits waiting requests into free slots, fairly between clients,
//! 3. builds one batch: a token for every decoding sequence, then prompt chunks that fill
//!    the remaining `batch_tokens` (chunked prefill: a long prompt never holds the device
//!    for more than one such pass),
//! 4. takes the device (shared by all resident models, in arrival order) for one forward pass,
//! 5. samples, detokenizes and streams each sequence's token.
//!
//! The engine's logits do not depend on what else is in the batch, so a request gets the
//! same tokens whether it runs alone or beside others.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::LogitsWanted;
use egpu_engine::ops::log_softmax;
use egpu_engine::sampler::{Sampler, SamplingParams, StopMatcher, StopStatus};
use egpu_engine::tokenizer::{StreamDecoder, Tokenizer};
use egpu_proto::v1::{
    generate_event, FinishReason, GenerateChunk, GenerateDone, GenerateEvent, ScorePosition,
    ScoreResponse, Timings, TokenLogprob, TokenLogprobs, TranslateResponse, Translation,
};
use parking_lot::{Condvar, FairMutex, Mutex};
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::Status;

use crate::backend::{LoadedModel, MarianCpu, SlotStep};
use crate::error::DaemonError;

/// The one device all models share. Its lock is fair, so models with work take turns step by
/// step instead of one starving the others.
#[derive(Debug)]
pub struct Device {
    pub(crate) pool: FairMutex<ThreadPool>,
}

impl Device {
    pub fn new(threads: usize) -> Device {
        Device {
            pool: FairMutex::new(ThreadPool::new(threads)),
        }
    }
}

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
    pub events: mpsc::UnboundedSender<Result<GenerateEvent, Status>>,
}

/// A scoring request: the log-probability of every token given the ones before it.
#[derive(Debug)]
pub struct ScoreJob {
    pub tokens: Vec<u32>,
    pub top_k: usize,
    pub reply: oneshot::Sender<Result<ScoreResponse, Status>>,
}

/// A translation request: source ids (each ending with `</s>`), translated as one batch.
#[derive(Debug)]
pub struct TranslateJob {
    pub sources: Vec<Vec<u32>>,
    /// 0 = the model's.
    pub num_beams: usize,
    /// Most output tokens; 0 = the model's.
    pub max_tokens: usize,
    pub reply: oneshot::Sender<Result<TranslateResponse, Status>>,
}

#[derive(Debug)]
pub enum Job {
    Generate(GenerateJob),
    Score(ScoreJob),
    Translate(TranslateJob),
}

impl Job {
    fn is_closed(&self) -> bool {
        match self {
            Job::Generate(g) => g.events.is_closed(),
            Job::Score(s) => s.reply.is_closed(),
            Job::Translate(t) => t.reply.is_closed(),
        }
    }

    fn fail(self, err: DaemonError) {
        match self {
            Job::Generate(g) => g.fail(err),
            Job::Score(s) => s.fail(err),
            Job::Translate(t) => {
                let _ = t.reply.send(Err(err.into()));
            }
        }
    }
}

impl GenerateJob {
    fn fail(self, err: DaemonError) {
        // The client may be gone already; nothing to do then.
        let _ = self.events.send(Err(err.into()));
    }
}

impl ScoreJob {
    fn fail(self, err: DaemonError) {
        let _ = self.reply.send(Err(err.into()));
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

/// Why a batching thread must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Unloaded (by a user, eviction or keep-alive expiry); running requests end with ABORTED.
    Unload,
    /// egpud is exiting; running requests end with UNAVAILABLE.
    Shutdown,
    /// The batching thread panicked (a bug); requests get INTERNAL until the model is reloaded.
    Crashed,
    /// The model's device went away (the tinygrad worker died or stopped answering);
    /// running requests end with UNAVAILABLE "device lost".
    DeviceLost,
}

fn device_lost(model: &str) -> DaemonError {
    DaemonError::DeviceLost(format!(
        "{model} was on the tinygrad device, whose worker stopped; egpud is restarting it"
    ))
}

/// Counters the API reads for Status.
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
    waiting: VecDeque<(u64, Request)>,
    active_by_client: HashMap<ClientKey, usize>,
    /// Admission number of each client's latest admitted request: clients take turns.
    last_admitted: HashMap<ClientKey, u64>,
    admissions: u64,
    active: usize,
    next_id: u64,
    stop: Option<StopReason>,
    served: u64,
    last_used: SystemTime,
    idle_since: Option<Instant>,
}

/// The door between API handlers and a model's batching thread.
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
}

impl ModelQueue {
    pub fn new(model: String, max_queue: usize, idle: Arc<Notify>, memory: u64) -> ModelQueue {
        ModelQueue {
            model,
            max_queue,
            state: Mutex::new(QueueState {
                waiting: VecDeque::new(),
                active_by_client: HashMap::new(),
                last_admitted: HashMap::new(),
                admissions: 0,
                active: 0,
                next_id: 0,
                stop: None,
                served: 0,
                last_used: SystemTime::now(),
                idle_since: Some(Instant::now()),
            }),
            wake: Condvar::new(),
            idle,
            memory: AtomicU64::new(memory),
        }
    }

    /// Queues a request. Fails when the queue is full or the model is going away.
    pub fn submit(&self, request: Request) -> Result<(), DaemonError> {
        let mut st = self.state.lock();
        match st.stop {
            Some(StopReason::Unload) => return Err(DaemonError::Unloaded(self.model.clone())),
            Some(StopReason::Shutdown) => return Err(DaemonError::ShuttingDown),
            Some(StopReason::Crashed) => return Err(self.crashed()),
            Some(StopReason::DeviceLost) => return Err(device_lost(&self.model)),
            None => {}
        }
        if st.waiting.len() >= self.max_queue {
            return Err(DaemonError::QueueFull {
                model: self.model.clone(),
                limit: self.max_queue,
            });
        }
        let id = st.next_id;
        st.next_id += 1;
        st.waiting.push_back((id, request));
        st.idle_since = None;
        st.last_used = SystemTime::now();
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    pub fn counts(&self) -> QueueCounts {
        let st = self.state.lock();
        QueueCounts {
            active: st.active,
            queued: st.waiting.len(),
            served: st.served,
            last_used: st.last_used,
            idle_since: st.idle_since,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.load(Ordering::Relaxed)
    }

    /// Asks the batching thread to end, unless the model is busy and `force` is false.
    /// Returns the number of requests that will be aborted.
    pub fn stop(&self, reason: StopReason, force: bool) -> Result<usize, DaemonError> {
        let mut st = self.state.lock();
        let busy = st.active + st.waiting.len();
        if busy > 0 && !force {
            return Err(DaemonError::Busy {
                model: self.model.clone(),
                active: st.active,
                queued: st.waiting.len(),
            });
        }
        st.stop.get_or_insert(reason);
        drop(st);
        self.wake.notify_one();
        Ok(busy)
    }

    /// What requests get when the model ends for `reason`.
    fn stop_error(&self, reason: StopReason) -> DaemonError {
        match reason {
            StopReason::Unload => DaemonError::Unloaded(self.model.clone()),
            StopReason::Shutdown => DaemonError::ShuttingDown,
            StopReason::Crashed => self.crashed(),
            StopReason::DeviceLost => device_lost(&self.model),
        }
    }

    /// Fails every waiting request with `reason`'s error and forgets the running ones (the
    /// model is ending).
    fn fail_waiting(&self, st: &mut QueueState, reason: StopReason) {
        for (_, req) in st.waiting.drain(..) {
            req.job.fail(self.stop_error(reason));
        }
        st.active = 0;
        st.active_by_client.clear();
    }

    fn crashed(&self) -> DaemonError {
        DaemonError::Internal(format!(
            "the batching thread of {} failed; unload and load the model again",
            self.model
        ))
    }

    /// After the batching thread panicked: refuse new requests and fail the waiting ones,
    /// so that no client waits for an answer that will not come.
    fn abandon(&self) {
        let mut st = self.state.lock();
        st.stop = Some(StopReason::Crashed);
        st.idle_since = Some(Instant::now());
        self.fail_waiting(&mut st, StopReason::Crashed);
    }

    /// Whether the model has no active or queued request.
    pub fn is_idle(&self) -> bool {
        let st = self.state.lock();
        st.active == 0 && st.waiting.is_empty()
    }
}

/// Settings of a batching thread.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    pub batch_tokens: usize,
}

/// Runs a model until its queue is stopped. Call on a dedicated thread. A panic (a bug) ends
/// only this model's requests: the streams it was serving close, waiting requests and new
/// ones get INTERNAL, and the rest of egpud keeps serving.
pub fn run_batcher(
    model: LoadedModel,
    tokenizer: Arc<Tokenizer>,
    queue: Arc<ModelQueue>,
    device: Arc<Device>,
    settings: BatchSettings,
) {
    let run = std::panic::AssertUnwindSafe(|| {
        batch_until_stopped(model, tokenizer, queue.clone(), device, settings)
    });
    if std::panic::catch_unwind(run).is_err() {
        tracing::error!(model = %queue.model, "batching thread panicked; the model stops serving");
        queue.abandon();
        queue.idle.notify_one();
    }
}

fn batch_until_stopped(
    model: LoadedModel,
    tokenizer: Arc<Tokenizer>,
    queue: Arc<ModelQueue>,
    device: Arc<Device>,
    settings: BatchSettings,
) {
    let model = match model {
        LoadedModel::Marian(translator) => {
            return translate_until_stopped(&translator, &tokenizer, &queue, &device);
        }
        other => other,
    };
    let mut model = model;
    let n_slots = model.n_slots();
    let mut slots: Vec<Option<Sequence<'_>>> = (0..n_slots).map(|_| None).collect();
    let mut batcher = Batcher {
        tokenizer: &tokenizer,
        queue: &queue,
        settings,
    };
    loop {
        if let Some(reason) = batcher.admit(&mut slots, &mut model) {
            batcher.end_all(&mut slots, &mut model, reason);
            return;
        }
        batcher.step(&mut slots, &mut model, &device);
    }
}

struct Batcher<'a> {
    tokenizer: &'a Tokenizer,
    queue: &'a ModelQueue,
    settings: BatchSettings,
}

/// A request that holds a slot.
struct Sequence<'t> {
    client: ClientKey,
    deadline: Option<Instant>,
    enqueued: Instant,
    admitted: Instant,
    span: tracing::Span,
    /// Tokens to feed before the first prediction: the prompt (or the text being scored,
    /// minus its last token).
    input: Vec<u32>,
    /// How many of `input` are in the cache.
    fed: usize,
    kind: SeqKind<'t>,
}

enum SeqKind<'t> {
    Generate(Box<Generation<'t>>),
    Score(Box<Scoring>),
}

struct Generation<'t> {
    job: GenerateJob,
    sampler: Sampler,
    decoder: StreamDecoder<'t>,
    stops: StopMatcher,
    generated: Vec<u32>,
    /// The last sampled token, to be fed in the next step.
    pending: Option<u32>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

struct Scoring {
    job: ScoreJob,
    positions: Vec<ScorePosition>,
}

/// How a sequence ended.
enum Outcome {
    Continue,
    /// Done: the last event is sent only after the slot is released, so a client that
    /// reads it and then asks for Status sees its request counted as served, not active.
    Finished(Box<LastEvent>),
    /// The client is gone.
    Cancelled,
}

/// A stream's final `done` event and where it goes.
struct LastEvent {
    events: mpsc::UnboundedSender<Result<GenerateEvent, Status>>,
    done: GenerateEvent,
}

impl<'t> Batcher<'t> {
    /// Waits until there is work, admitting waiting requests into free slots. Returns the
    /// stop reason when the model must end.
    fn admit(
        &mut self,
        slots: &mut [Option<Sequence<'t>>],
        model: &mut LoadedModel,
    ) -> Option<StopReason> {
        let mut st = self.queue.state.lock();
        loop {
            if let Some(reason) = st.stop {
                return Some(reason);
            }
            forget_abandoned(&mut st);

            while let Some(free) = slots.iter().position(Option::is_none) {
                let Some(req) = pick_fair(&mut st) else { break };
                let client = req.client.clone();
                let seq = match self.start(req, model.slot_capacity(free)) {
                    Ok(seq) => seq,
                    Err(job) => {
                        // The API sends translations only to translation models.
                        (*job).fail(DaemonError::InvalidArgument(format!(
                            "{} is not a translation model",
                            self.queue.model
                        )));
                        continue;
                    }
                };
                *st.active_by_client.entry(client).or_default() += 1;
                st.active += 1;
                model.clear_slot(free);
                slots[free] = Some(seq);
            }
            if st.active > 0 {
                return None;
            }
            if st.idle_since.is_none() {
                st.idle_since = Some(Instant::now());
                self.queue.idle.notify_one();
            }
            self.queue.wake.wait(&mut st);
        }
    }

    /// A sequence for a Generate or Score request; other jobs come back.
    fn start(&self, req: Request, capacity: usize) -> Result<Sequence<'t>, Box<Job>> {
        let admitted = Instant::now();
        let (input, kind) = match req.job {
            job @ Job::Translate(_) => return Err(Box::new(job)),
            Job::Generate(job) => {
                let mut sampler = Sampler::new(job.params.clone());
                sampler.accept_all(&job.prompt);
                let stops = StopMatcher::new(job.stops.iter().cloned());
                let input = job.prompt.clone();
                let generation = Generation {
                    job,
                    sampler,
                    decoder: self.tokenizer.stream_decoder(),
                    stops,
                    generated: Vec::new(),
                    pending: None,
                    first_token_at: None,
                    last_token_at: None,
                };
                (input, SeqKind::Generate(Box::new(generation)))
            }
            Job::Score(job) => {
                let input = job.tokens[..job.tokens.len().saturating_sub(1)].to_vec();
                let mut positions = Vec::with_capacity(job.tokens.len());
                positions.push(ScorePosition {
                    logprob: None,
                    top: Vec::new(),
                });
                (input, SeqKind::Score(Box::new(Scoring { job, positions })))
            }
        };
        debug_assert!(input.len() <= capacity);
        req.span.in_scope(|| {
            tracing::debug!(
                queue_ms = admitted.duration_since(req.enqueued).as_secs_f64() * 1e3,
                input_tokens = input.len(),
                "admitted"
            )
        });
        Ok(Sequence {
            client: req.client,
            deadline: req.deadline,
            enqueued: req.enqueued,
            admitted,
            span: req.span,
            input,
            fed: 0,
            kind,
        })
    }

    /// One batched forward pass and what follows from it.
    fn step(
        &mut self,
        slots: &mut [Option<Sequence<'t>>],
        model: &mut LoadedModel,
        device: &Device,
    ) {
        // Cancelled or expired sequences give their slot back before the pass.
        let now = Instant::now();
        for slot in 0..slots.len() {
            let Some(seq) = &slots[slot] else { continue };
            let (closed, generated) = match &seq.kind {
                SeqKind::Generate(g) => (g.job.events.is_closed(), g.generated.len()),
                SeqKind::Score(s) => (s.job.reply.is_closed(), 0),
            };
            let expired = seq.deadline.is_some_and(|d| d <= now);
            if closed {
                seq.span
                    .in_scope(|| tracing::info!(generated, "client went away; cancelled"));
                self.release(slots, slot, false);
            } else if expired {
                let seq = slots[slot].take().expect("checked above");
                seq.span
                    .in_scope(|| tracing::info!(generated, "deadline exceeded"));
                fail_sequence(seq, DaemonError::DeadlineExceeded { generated });
                self.release_counts(slots, true);
            }
        }

        // Decode tokens first (one each), then prompt chunks in admission order.
        let budget = self.settings.batch_tokens;
        let mut plan: Vec<(usize, usize, usize, LogitsWanted)> = Vec::new(); // slot, from, len
        let mut used = 0;
        for (slot, seq) in slots.iter().enumerate() {
            if let Some(Sequence {
                kind: SeqKind::Generate(g),
                ..
            }) = seq
            {
                if g.pending.is_some() {
                    plan.push((slot, 0, 1, LogitsWanted::Last));
                    used += 1;
                }
            }
        }
        let mut prefilling: Vec<usize> = slots
            .iter()
            .enumerate()
            .filter_map(|(slot, seq)| {
                let seq = seq.as_ref()?;
                let waiting_input = seq.fed < seq.input.len();
                let decoding = matches!(&seq.kind, SeqKind::Generate(g) if g.pending.is_some());
                (waiting_input && !decoding).then_some(slot)
            })
            .collect();
        prefilling.sort_by_key(|&slot| slots[slot].as_ref().map(|s| s.admitted));
        for slot in prefilling {
            let seq = slots[slot].as_ref().expect("filtered above");
            let left = budget.saturating_sub(used);
            if left == 0 {
                break;
            }
            let n = (seq.input.len() - seq.fed).min(left);
            let last_chunk = seq.fed + n == seq.input.len();
            let wanted = match &seq.kind {
                SeqKind::Score(_) => LogitsWanted::All,
                SeqKind::Generate(_) if last_chunk => LogitsWanted::Last,
                SeqKind::Generate(_) => LogitsWanted::None,
            };
            plan.push((slot, seq.fed, n, wanted));
            used += n;
        }
        // A score of a one-token text, or sequences whose input is empty, finish without a pass.
        for slot in 0..slots.len() {
            let ready = matches!(&slots[slot], Some(Sequence { kind: SeqKind::Score(_), input, .. }) if input.is_empty());
            if ready {
                self.finish_score(slots, slot);
            }
        }
        if plan.is_empty() {
            return;
        }
        plan.sort_by_key(|p| p.0);

        let pending_tokens: Vec<[u32; 1]> = plan
            .iter()
            .map(|&(slot, ..)| match &slots[slot] {
                Some(Sequence {
                    kind: SeqKind::Generate(g),
                    ..
                }) => [g.pending.unwrap_or(0)],
                _ => [0],
            })
            .collect();
        let steps: Vec<SlotStep<'_>> = plan
            .iter()
            .zip(&pending_tokens)
            .map(|(&(slot, from, n, logits), pending)| {
                let seq = slots[slot].as_ref().expect("planned");
                let decoding = matches!(&seq.kind, SeqKind::Generate(g) if g.pending.is_some());
                let tokens: &[u32] = if decoding {
                    pending
                } else {
                    &seq.input[from..from + n]
                };
                SlotStep {
                    slot,
                    tokens,
                    logits,
                }
            })
            .collect();

        let result = model.forward(device, &steps);
        drop(steps);
        let logits = match result {
            Ok(logits) => logits,
            Err(err) => {
                // An engine error ends the sequences of this pass, never the daemon.
                tracing::error!(model = %self.queue.model, cause = %err, "forward pass failed");
                for &(slot, ..) in &plan {
                    if let Some(seq) = slots[slot].take() {
                        fail_sequence(seq, err.clone());
                        self.release_counts(slots, true);
                    }
                }
                return;
            }
        };
        self.queue
            .memory
            .store(model.memory_bytes(), Ordering::Relaxed);

        for (item, &(slot, _, n, _)) in plan.iter().enumerate() {
            let outcome = {
                let seq = slots[slot].as_mut().expect("planned");
                match &mut seq.kind {
                    SeqKind::Generate(g) => {
                        if g.pending.take().is_none() {
                            seq.fed += n;
                        }
                        match logits.last(item) {
                            Some(row) if seq.fed == seq.input.len() => {
                                let capacity = model.slot_capacity(slot);
                                self.generate_token(seq, row, capacity)
                            }
                            _ => Outcome::Continue,
                        }
                    }
                    SeqKind::Score(s) => {
                        for row in 0..logits.n_rows(item) {
                            let position = seq.fed + row + 1;
                            let target = s.job.tokens[position];
                            let values = logits.row(item, row).expect("row in range");
                            s.positions.push(score_position(
                                self.tokenizer,
                                values,
                                target,
                                s.job.top_k,
                            ));
                        }
                        seq.fed += n;
                        Outcome::Continue
                    }
                }
            };
            match outcome {
                Outcome::Continue => {
                    let done_scoring = matches!(&slots[slot], Some(Sequence { kind: SeqKind::Score(_), fed, input, .. }) if fed == &input.len());
                    if done_scoring {
                        self.finish_score(slots, slot);
                    }
                }
                Outcome::Finished(last) => {
                    self.release(slots, slot, true);
                    // The client may have left in the meantime; nothing to do then.
                    let _ = last.events.send(Ok(last.done));
                }
                Outcome::Cancelled => self.release(slots, slot, false),
            }
        }
    }

    /// Samples the next token of a generation from its logits and streams it.
    fn generate_token(&self, seq: &mut Sequence<'t>, row: &[f32], capacity: usize) -> Outcome {
        let SeqKind::Generate(g) = &mut seq.kind else {
            unreachable!("generate_token on a score")
        };
        let now = Instant::now();
        let token = g.sampler.sample(row);
        g.first_token_at.get_or_insert(now);
        g.last_token_at = Some(now);
        if g.job.stop_at_eos && self.tokenizer.is_end_of_generation(token) {
            return finish_generation(seq, FinishReason::Stop, String::new());
        }
        let logprobs = if g.job.top_logprobs > 0 {
            vec![token_logprobs(
                self.tokenizer,
                row,
                token,
                g.job.top_logprobs,
            )]
        } else {
            Vec::new()
        };
        g.sampler.accept(token);
        g.generated.push(token);
        let text = g.decoder.push(token);
        let (text, stopped) = match g.stops.push(&text) {
            StopStatus::Continue(text) => (text, false),
            StopStatus::Stopped(text) => (text, true),
        };
        let chunk = GenerateEvent {
            event: Some(generate_event::Event::Chunk(GenerateChunk {
                text,
                token_ids: vec![token],
                logprobs,
            })),
        };
        if g.job.events.send(Ok(chunk)).is_err() {
            return Outcome::Cancelled;
        }
        if stopped {
            return finish_generation(seq, FinishReason::StopString, String::new());
        }
        if g.job.max_tokens.is_some_and(|m| g.generated.len() >= m) {
            let tail = flush_text(g);
            return finish_generation(seq, FinishReason::Length, tail);
        }
        // Feeding this token must leave the cache within its capacity.
        if seq.input.len() + g.generated.len() > capacity {
            let tail = flush_text(g);
            return finish_generation(seq, FinishReason::ContextLength, tail);
        }
        g.pending = Some(token);
        Outcome::Continue
    }

    fn finish_score(&mut self, slots: &mut [Option<Sequence<'t>>], slot: usize) {
        let Some(seq) = slots[slot].take() else {
            return;
        };
        let SeqKind::Score(s) = seq.kind else {
            slots[slot] = Some(seq);
            return;
        };
        let total_logprob = s
            .positions
            .iter()
            .filter_map(|p| p.logprob)
            .map(f64::from)
            .sum();
        let response = ScoreResponse {
            token_ids: s.job.tokens.clone(),
            positions: s.positions,
            total_logprob,
        };
        seq.span.in_scope(|| {
            tracing::info!(
                tokens = s.job.tokens.len(),
                ms = seq.admitted.elapsed().as_secs_f64() * 1e3,
                "scored"
            )
        });
        // Counted before the reply goes out, as for generations.
        self.release_counts(slots, true);
        let _ = s.job.reply.send(Ok(response));
    }

    /// Frees a slot whose sequence has ended (its events were already sent, or it was
    /// cancelled).
    fn release(&mut self, slots: &mut [Option<Sequence<'t>>], slot: usize, served: bool) {
        if slots[slot].take().is_some() {
            self.release_counts(slots, served);
        }
    }

    fn release_counts(&mut self, slots: &[Option<Sequence<'t>>], served: bool) {
        let mut st = self.queue.state.lock();
        st.active = st.active.saturating_sub(1);
        // Recount per client from the slots: cheap, and always right.
        st.active_by_client.clear();
        for seq in slots.iter().flatten() {
            *st.active_by_client.entry(seq.client.clone()).or_default() += 1;
        }
        if served {
            st.served += 1;
        }
        st.last_used = SystemTime::now();
    }

    /// Ends every running and waiting request because the model is going away.
    fn end_all(
        &mut self,
        slots: &mut [Option<Sequence<'t>>],
        model: &mut LoadedModel,
        reason: StopReason,
    ) {
        for (slot, seq) in slots.iter_mut().enumerate() {
            if let Some(seq) = seq.take() {
                fail_sequence(seq, self.queue.stop_error(reason));
                model.clear_slot(slot);
            }
        }
        let mut st = self.queue.state.lock();
        self.queue.fail_waiting(&mut st, reason);
    }
}

/// Forgets queued requests whose client left, and fails those whose deadline passed.
fn forget_abandoned(st: &mut QueueState) {
    let now = Instant::now();
    let mut kept = VecDeque::with_capacity(st.waiting.len());
    while let Some((id, req)) = st.waiting.pop_front() {
        if req.job.is_closed() {
            continue;
        }
        if req.deadline.is_some_and(|d| d <= now) {
            req.job.fail(DaemonError::DeadlineExceeded { generated: 0 });
            continue;
        }
        kept.push_back((id, req));
    }
    st.waiting = kept;
}

/// The waiting request to admit next: from the client with the fewest running sequences,
/// then the client admitted least recently (one never admitted first), then the oldest
/// request. Clients with waiting requests thus take turns, so a client with 50 queued
/// requests cannot keep another client's single request waiting for more than one free slot.
fn pick_fair(st: &mut QueueState) -> Option<Request> {
    let best = st
        .waiting
        .iter()
        .enumerate()
        .min_by_key(|(_, (id, req))| {
            let running = st.active_by_client.get(&req.client).copied().unwrap_or(0);
            let last = st.last_admitted.get(&req.client).map_or(0, |&n| n + 1);
            (running, last, *id)
        })
        .map(|(index, _)| index)?;
    let (_, req) = st.waiting.remove(best)?;
    st.admissions += 1;
    let admission = st.admissions;
    st.last_admitted.insert(req.client.clone(), admission);
    // Forget clients with nothing waiting or running, so the table stays small.
    let QueueState {
        waiting,
        active_by_client,
        last_admitted,
        ..
    } = st;
    last_admitted.retain(|client, _| {
        client == &req.client
            || active_by_client.contains_key(client)
            || waiting.iter().any(|(_, r)| &r.client == client)
    });
    Some(req)
}

fn flush_text(g: &mut Generation<'_>) -> String {
    let tail = g.decoder.finish();
    match g.stops.push(&tail) {
        StopStatus::Continue(text) => text + &g.stops.finish(),
        StopStatus::Stopped(text) => text,
    }
}

/// Sends the final text and the `done` event.
fn finish_generation(seq: &mut Sequence<'_>, reason: FinishReason, tail: String) -> Outcome {
    let SeqKind::Generate(g) = &mut seq.kind else {
        unreachable!("finish_generation on a score")
    };
    let tail = if reason == FinishReason::Stop {
        flush_text(g)
    } else {
        tail
    };
    if !tail.is_empty() {
        let chunk = GenerateEvent {
            event: Some(generate_event::Event::Chunk(GenerateChunk {
                text: tail,
                token_ids: Vec::new(),
                logprobs: Vec::new(),
            })),
        };
        if g.job.events.send(Ok(chunk)).is_err() {
            return Outcome::Cancelled;
        }
    }
    let ms = |from: Instant, to: Option<Instant>| {
        to.map_or(0.0, |to| to.duration_since(from).as_secs_f64() * 1e3)
    };
    let first = g.first_token_at.unwrap_or(seq.admitted);
    let prefill_ms = ms(seq.admitted, Some(first));
    let decode_ms = ms(first, g.last_token_at);
    let rate = |tokens: usize, ms: f64| {
        if ms > 0.0 {
            tokens as f64 / (ms / 1e3)
        } else {
            0.0
        }
    };
    let timings = Timings {
        queue_ms: ms(seq.enqueued, Some(seq.admitted)),
        prefill_ms,
        decode_ms,
        prefill_tokens_per_s: rate(seq.input.len(), prefill_ms),
        decode_tokens_per_s: rate(g.generated.len().saturating_sub(1), decode_ms),
    };
    seq.span.in_scope(|| {
        tracing::info!(
            finish = reason.as_str_name(),
            prompt_tokens = seq.input.len(),
            completion_tokens = g.generated.len(),
            prefill_tok_s = format!("{:.1}", timings.prefill_tokens_per_s),
            decode_tok_s = format!("{:.1}", timings.decode_tokens_per_s),
            "generated"
        )
    });
    let done = GenerateEvent {
        event: Some(generate_event::Event::Done(GenerateDone {
            finish_reason: reason as i32,
            prompt_tokens: seq.input.len() as u32,
            completion_tokens: g.generated.len() as u32,
            timings: Some(timings),
        })),
    };
    Outcome::Finished(Box::new(LastEvent {
        events: g.job.events.clone(),
        done,
    }))
}

fn fail_sequence(seq: Sequence<'_>, err: DaemonError) {
    match seq.kind {
        SeqKind::Generate(g) => g.job.fail(err),
        SeqKind::Score(s) => s.job.fail(err),
    }
}

/// The top `k` tokens of a log-softmax, most likely first (ties: lower id first).
fn top_k(tokenizer: &Tokenizer, logprobs: &[f64], k: usize) -> Vec<TokenLogprob> {
    let mut best: Vec<(usize, f64)> = Vec::with_capacity(k + 1);
    for (id, &lp) in logprobs.iter().enumerate() {
        if best.len() == k && best.last().is_some_and(|&(_, worst)| lp <= worst) {
            continue;
        }
        let at = best.partition_point(|&(_, v)| v >= lp);
        best.insert(at, (id, lp));
        best.truncate(k);
    }
    best.into_iter()
        .map(|(id, lp)| token_logprob(tokenizer, id as u32, lp))
        .collect()
}

fn token_logprob(tokenizer: &Tokenizer, id: u32, logprob: f64) -> TokenLogprob {
    TokenLogprob {
        id,
        logprob: logprob as f32,
        text: String::from_utf8_lossy(tokenizer.token_bytes(id, true)).into_owned(),
    }
}

fn token_logprobs(tokenizer: &Tokenizer, row: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let lp = log_softmax(row);
    TokenLogprobs {
        token: Some(token_logprob(tokenizer, token, lp[token as usize])),
        top: top_k(tokenizer, &lp, k),
    }
}

fn score_position(tokenizer: &Tokenizer, row: &[f32], target: u32, k: usize) -> ScorePosition {
    let lp = log_softmax(row);
    ScorePosition {
        // Load checks that every token id has a logit; `get` keeps a bad file from panicking.
        logprob: lp.get(target as usize).map(|&v| v as f32),
        top: top_k(tokenizer, &lp, k),
    }
}

/// The loop of a translation model: one request (a batch of sentences) at a time, fairly between
/// clients, taking the device for the encoder and for each decoder step so that other models
/// keep their turns. A request whose client goes away or whose deadline passes is dropped
/// between steps.
fn translate_until_stopped(
    translator: &MarianCpu,
    tokenizer: &Tokenizer,
    queue: &ModelQueue,
    device: &Device,
) {
    loop {
        let req = {
            let mut st = queue.state.lock();
            loop {
                if let Some(reason) = st.stop {
                    queue.fail_waiting(&mut st, reason);
                    return;
                }
                forget_abandoned(&mut st);
                if let Some(req) = pick_fair(&mut st) {
                    *st.active_by_client.entry(req.client.clone()).or_default() += 1;
                    st.active += 1;
                    break req;
                }
                if st.idle_since.is_none() {
                    st.idle_since = Some(Instant::now());
                    queue.idle.notify_one();
                }
                queue.wake.wait(&mut st);
            }
        };
        let client = req.client.clone();
        let finished = run_translation(translator, tokenizer, device, req);
        let served = finished
            .as_ref()
            .is_some_and(|(_, outcome)| outcome.is_ok());
        let mut st = queue.state.lock();
        st.active = st.active.saturating_sub(1);
        if let Some(n) = st.active_by_client.get_mut(&client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.active_by_client.remove(&client);
            }
        }
        if served {
            st.served += 1;
        }
        st.last_used = SystemTime::now();
        drop(st);
        // Replied only after the counts: a client that reads its answer and then asks for
        // Status sees its request served.
        if let Some((reply, outcome)) = finished {
            let _ = reply.send(outcome);
        }
    }
}

type TranslateReply = (
    oneshot::Sender<Result<TranslateResponse, Status>>,
    Result<TranslateResponse, Status>,
);

/// Runs one translation request; returns the reply to send, or None when there is nobody to
/// send it to (or it was already sent).
fn run_translation(
    translator: &MarianCpu,
    tokenizer: &Tokenizer,
    device: &Device,
    req: Request,
) -> Option<TranslateReply> {
    let Job::Translate(job) = req.job else {
        req.job.fail(DaemonError::InvalidArgument(
            "a translation model serves only Translate".into(),
        ));
        return None;
    };
    let _entered = req.span.enter();
    let started = Instant::now();
    let queued_ms = started.duration_since(req.enqueued).as_secs_f64() * 1e3;
    let mut settings = translator.model().search_settings().clone();
    if job.num_beams > 0 {
        settings.num_beams = job.num_beams;
    }
    if job.max_tokens > 0 {
        // max_length counts the decoder start token.
        settings.max_length = job.max_tokens + 1;
    }
    let deadline = req.deadline;
    let reply = job.reply;
    let mut deadline_passed = false;
    let mut keep_going = || {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            deadline_passed = true;
            return false;
        }
        !reply.is_closed()
    };
    // Passing the device lends its thread pool pass by pass (`PoolAccess`).
    let result = translator
        .model()
        .translate(device, &job.sources, &settings, &mut keep_going);
    let outcome = match result {
        Ok(Some(hypotheses)) => Ok(TranslateResponse {
            translations: hypotheses
                .into_iter()
                .zip(&job.sources)
                .map(|(h, source)| Translation {
                    text: tokenizer.decode(&h.tokens).trim_start().to_owned(),
                    token_ids: h.tokens,
                    score: h.score,
                    source_tokens: source.len() as u32,
                })
                .collect(),
            num_beams: settings.num_beams as u32,
            queued_ms,
            translate_ms: started.elapsed().as_secs_f64() * 1e3,
        }),
        Ok(None) if deadline_passed => Err(DaemonError::DeadlineExceeded { generated: 0 }.into()),
        Ok(None) => {
            tracing::info!("client went away; translation abandoned");
            return None;
        }
        Err(e) => Err(DaemonError::InvalidArgument(e.to_string()).into()),
    };
    Some((reply, outcome))
}

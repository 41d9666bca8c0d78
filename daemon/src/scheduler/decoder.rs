//! The runner of a decoder-only model: continuous batching over its slots.
//!
//! Every step, the runner:
//!
//! 1. drops sequences whose client went away or whose deadline passed (freeing their slot),
//! 2. admits waiting requests into free slots ([`super::admission`]), each into the slot whose
//!    cache already holds the longest prefix of its input ([`super::prefix`]),
//! 3. plans one pass ([`super::plan`]): a token for every decoding sequence, then prompt chunks,
//! 4. takes its compute turn (CPU) or its worker turn (tinygrad) for the forward pass,
//! 5. samples, detokenizes and streams each sequence's token.

use std::sync::atomic::Ordering;
use std::time::Instant;

use egpu_engine::models::decoder::Logits;
use egpu_engine::models::embedding::{self, Pooled};
use egpu_engine::ops::log_softmax;
use egpu_engine::sampler::{Sampler, StopMatcher, StopStatus};
use egpu_engine::tokenizer::{StreamDecoder, Tokenizer};
use tokio::sync::mpsc;

use super::events::{
    EmbedResult, FinishReason, GenerationDone, GenerationEvent, ScorePosition, ScoreResult,
    Timings, TokenChunk, TokenLogprob, TokenLogprobs,
};
use super::plan::{plan_step, SlotView, StepPlan, Work};
use super::prefix::{choose_slot, SlotChoice, SlotHistory};
use super::{
    ClientKey, EmbedJob, GenerateJob, Job, ModelQueue, Request, RunnerSettings, ScoreJob,
    StopReason,
};
use crate::backend::{ComputeTurns, DecoderModel, SlotStep};
use crate::error::DaemonError;
use crate::metrics::{self, Metrics};

/// Serves the queue until it is stopped.
pub(super) fn serve(
    model: DecoderModel,
    tokenizer: &Tokenizer,
    queue: &ModelQueue,
    turns: &ComputeTurns,
    settings: RunnerSettings,
) {
    let mut slots: Vec<Option<Sequence<'_>>> = (0..model.n_slots()).map(|_| None).collect();
    let mut model = CachedSlots::new(model);
    let runner = Runner {
        tokenizer,
        queue,
        settings,
    };
    let mut embeds = Embeds::default();
    loop {
        if let Some(reason) = runner.admit(&mut slots, &mut model, &mut embeds) {
            runner.end_embeds(&mut embeds, &mut model, reason);
            runner.end_all(&mut slots, &mut model, reason);
            return;
        }
        runner.advance_embedding(&mut embeds, &slots, &mut model, turns);
        if slots.iter().any(Option::is_some) {
            runner.step(&mut slots, &mut model, turns);
        }
    }
}

/// Embedding requests: one runs at a time in a free slot it holds, a chunk of at most
/// `batch_tokens` per runner iteration between the batched steps (so streams keep flowing and
/// its scratch stays within what the model was budgeted); one more may wait for it.
#[derive(Default)]
struct Embeds {
    running: Option<Embedding>,
    waiting: Option<Request>,
}

struct Embedding {
    client: ClientKey,
    deadline: Option<Instant>,
    job: EmbedJob,
    slot: usize,
    /// The input being embedded, and how many of its tokens are in the slot's cache.
    input: usize,
    fed: usize,
    /// The current text's pooling so far.
    pooled: Pooled,
    result: EmbedResult,
}

/// The model with a record of what each slot's cache holds, kept in step with it: every pass
/// appends what it fed, a failed pass forgets its slots, and a new sequence keeps only the
/// prefix it shares with its slot.
struct CachedSlots {
    model: DecoderModel,
    histories: Vec<SlotHistory>,
    /// Counts passes, for the histories' recency.
    passes: u64,
}

impl CachedSlots {
    fn new(model: DecoderModel) -> CachedSlots {
        let histories = vec![SlotHistory::default(); model.n_slots()];
        CachedSlots {
            model,
            histories,
            passes: 0,
        }
    }

    /// Places a new sequence with `input` in one of `free`, cutting that slot's cache to the
    /// prefix it reuses (at most `reusable` tokens). When a longer prefix is to be copied into
    /// it from another slot (`copy_from`), the slot's record already says it holds that prefix
    /// (so later placements in the same admission see it), and [`CachedSlots::copy_prefix`]
    /// must run before the slot's next pass.
    fn place(&mut self, free: &[usize], input: &[u32], reusable: usize) -> SlotChoice {
        let choice = choose_slot(&self.histories, free, input, reusable);
        let history = &mut self.histories[choice.slot];
        if choice.copy_from.is_some() {
            history.tokens = input[..choice.reused].to_vec();
        } else {
            self.model.keep_prefix(choice.slot, choice.reused);
            history.truncate(choice.reused);
        }
        history.prompt_len = input.len();
        choice
    }

    /// Copies the prefix `place` chose into `choice.slot` from `choice.copy_from`. A worker
    /// call on tinygrad: never made while the queue's lock is held (see `Runner::admit`).
    /// Returns false, with the slot cleared, when the copy failed: not expected (same model,
    /// lengths from the histories), but a copy that failed on the device may have written part
    /// of the slot, so nothing of it is reused and the sequence prefills its whole input.
    fn copy_prefix(&mut self, choice: &SlotChoice) -> bool {
        let Some(from) = choice.copy_from else {
            return true;
        };
        match self.model.copy_prefix(from, choice.slot, choice.reused) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(cause = %err, "prefix copy between slots failed");
                self.clear(choice.slot);
                false
            }
        }
    }

    fn forward(
        &mut self,
        turns: &ComputeTurns,
        steps: &[SlotStep<'_>],
    ) -> Result<Logits, DaemonError> {
        self.passes += 1;
        let result = self.model.forward(turns, steps);
        for step in steps {
            match &result {
                Ok(_) => self.histories[step.slot]
                    .tokens
                    .extend_from_slice(step.tokens),
                // What the failed pass left in the cache is unknown: nothing of it is reused.
                Err(_) => self.clear(step.slot),
            }
            self.histories[step.slot].last_used = self.passes;
        }
        result
    }

    /// Forgets a slot's cache and its record.
    fn clear(&mut self, slot: usize) {
        self.model.clear_slot(slot);
        self.histories[slot].tokens.clear();
    }
}

struct Runner<'a> {
    tokenizer: &'a Tokenizer,
    queue: &'a ModelQueue,
    settings: RunnerSettings,
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
    /// How many of `input` were in the slot's cache already when it was admitted.
    reused: usize,
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
    /// The logits with the constraint's mask applied (only used by constrained generations).
    masked: Vec<f32>,
    /// The last sampled token, to be fed in the next step.
    pending: Option<u32>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

struct Scoring {
    job: ScoreJob,
    positions: Vec<ScorePosition>,
}

impl Sequence<'_> {
    fn view(&self, slot: usize) -> SlotView {
        SlotView {
            slot,
            admitted: self.admitted,
            input_len: self.input.len(),
            fed: self.fed,
            decoding: matches!(&self.kind, SeqKind::Generate(g) if g.pending.is_some()),
            wants_every_position: matches!(self.kind, SeqKind::Score(_)),
        }
    }

    fn is_abandoned(&self) -> bool {
        match &self.kind {
            SeqKind::Generate(g) => g.job.events.is_closed(),
            SeqKind::Score(s) => s.job.reply.is_closed(),
        }
    }

    fn generated(&self) -> usize {
        match &self.kind {
            SeqKind::Generate(g) => g.generated.len(),
            SeqKind::Score(_) => 0,
        }
    }

    fn fail(self, err: DaemonError) {
        match self.kind {
            SeqKind::Generate(g) => {
                let _ = g.job.events.send(GenerationEvent::Failed(err));
            }
            SeqKind::Score(s) => {
                let _ = s.job.reply.send(Err(err));
            }
        }
    }
}

/// How a sequence ended.
enum Outcome {
    Continue,
    /// Done: the last event is sent only after the slot is released, so a client that
    /// reads it and then asks for Status sees its request counted as served, not active.
    Finished(Box<LastEvent>),
    /// The client is gone.
    Cancelled,
    /// The generation cannot go on (its grammar admits nothing more).
    Failed(DaemonError),
}

/// A stream's final event and where it goes.
struct LastEvent {
    events: mpsc::UnboundedSender<GenerationEvent>,
    done: GenerationDone,
}

impl<'t> Runner<'t> {
    /// Waits until there is work, admitting waiting requests into free slots, then copies the
    /// prompt prefixes their slots were chosen to get from other slots. Returns the stop
    /// reason when the model must end.
    /// An embedding request admitted here waits in `embeds` for a free slot (one at a time:
    /// while one waits, nothing more is admitted); the running one's slot is not free.
    fn admit(
        &self,
        slots: &mut [Option<Sequence<'t>>],
        model: &mut CachedSlots,
        embeds: &mut Embeds,
    ) -> Option<StopReason> {
        let mut placed = Vec::new();
        let stop = self.admit_locked(slots, model, embeds, &mut placed);
        // Prefix copies run only now, without the queue's lock: on tinygrad a copy is a worker
        // call that egpud's runtime threads carry, and those threads take that lock too (a
        // submit, a status answer, the keep-alive check). Holding it through the call let
        // them block on it while the call waited for them: egpud hung (CI, stop 34).
        for choice in placed {
            let Some(seq) = slots[choice.slot].as_mut() else {
                continue;
            };
            let copied = model.copy_prefix(&choice);
            if !copied {
                seq.fed = 0;
                seq.reused = 0;
            }
            self.count_reuse(seq, choice.copy_from.is_some() && copied);
        }
        stop
    }

    /// `admit`'s part under the queue's lock. Every placement is pushed to `placed`, in order:
    /// their prefix copies are made afterwards, in that order (a later placement may copy from
    /// an earlier one's slot, whose record already holds what its own copy will bring).
    fn admit_locked(
        &self,
        slots: &mut [Option<Sequence<'t>>],
        model: &mut CachedSlots,
        embeds: &mut Embeds,
        placed: &mut Vec<SlotChoice>,
    ) -> Option<StopReason> {
        let held = embeds.running.as_ref().map(|e| e.slot);
        let mut st = self.queue.state.lock();
        loop {
            if let Some(reason) = st.stop {
                return Some(reason);
            }
            self.queue.forget_abandoned(&mut st);
            loop {
                let free: Vec<usize> = (0..slots.len())
                    .filter(|&s| slots[s].is_none() && held != Some(s))
                    .collect();
                if free.is_empty() || embeds.waiting.is_some() {
                    break;
                }
                let Some(req) = st.admission.admit_next() else {
                    break;
                };
                if matches!(req.job, Job::Embed(_)) {
                    embeds.waiting = Some(req);
                    break;
                }
                match self.start(req, model.model.slot_capacity(free[0])) {
                    Ok(mut seq) => {
                        let reusable = match seq.kind {
                            // The last input token is fed to get the logits it predicts from.
                            SeqKind::Generate(_) => seq.input.len().saturating_sub(1),
                            // A scoring needs every position's logits.
                            SeqKind::Score(_) => 0,
                        };
                        let choice = model.place(&free, &seq.input, reusable);
                        seq.fed = choice.reused;
                        seq.reused = choice.reused;
                        slots[choice.slot] = Some(seq);
                        placed.push(choice);
                    }
                    Err(req) => {
                        // The core API sends translations only to translation models.
                        st.finished(&req.client, true);
                        let err = DaemonError::InvalidArgument(format!(
                            "{} is not a translation model",
                            self.queue.model
                        ));
                        self.queue.fail(req.job, err);
                    }
                }
            }
            if st.admission.running() > 0 {
                return None;
            }
            self.queue.wait_for_work(&mut st);
        }
    }

    /// A sequence for a Generate or Score request; other jobs come back.
    fn start(&self, req: Request, capacity: usize) -> Result<Sequence<'t>, Box<Request>> {
        if matches!(req.job, Job::Translate(_) | Job::Embed(_)) {
            return Err(Box::new(req));
        }
        let admitted = Instant::now();
        let (input, kind) = match req.job {
            Job::Translate(_) | Job::Embed(_) => unreachable!("returned above"),
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
                    masked: Vec::new(),
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
            reused: 0,
            kind,
        })
    }

    /// One batched forward pass and what follows from it.
    fn step(
        &self,
        slots: &mut [Option<Sequence<'t>>],
        model: &mut CachedSlots,
        turns: &ComputeTurns,
    ) {
        self.drop_abandoned(slots);
        // A score of a one-token text has nothing to feed: it is finished already.
        for slot in 0..slots.len() {
            let ready = matches!(&slots[slot], Some(Sequence { kind: SeqKind::Score(_), input, .. }) if input.is_empty());
            if ready {
                self.finish_score(slots, slot);
            }
        }
        let views: Vec<SlotView> = slots
            .iter()
            .enumerate()
            .filter_map(|(slot, seq)| Some(seq.as_ref()?.view(slot)))
            .collect();
        let plan = plan_step(&views, self.settings.batch_tokens);
        if plan.is_empty() {
            return;
        }

        let result = {
            let pending: Vec<[u32; 1]> = plan
                .slots
                .iter()
                .map(|p| match &slots[p.slot] {
                    Some(Sequence {
                        kind: SeqKind::Generate(g),
                        ..
                    }) => [g.pending.unwrap_or(0)],
                    _ => [0],
                })
                .collect();
            let steps: Vec<SlotStep<'_>> = plan
                .slots
                .iter()
                .zip(&pending)
                .map(|(p, pending)| {
                    let seq = slots[p.slot].as_ref().expect("planned slots are occupied");
                    let tokens: &[u32] = match p.work {
                        Work::Decode => pending,
                        Work::Prefill { from, len } => &seq.input[from..from + len],
                    };
                    SlotStep {
                        slot: p.slot,
                        tokens,
                        logits: p.logits,
                    }
                })
                .collect();
            model.forward(turns, &steps)
        };
        let logits = match result {
            Ok(logits) => logits,
            Err(err) => {
                // A failed pass ends the sequences of this pass, never the daemon.
                tracing::error!(model = %self.queue.model, cause = %err, "forward pass failed");
                for p in &plan.slots {
                    if let Some(seq) = slots[p.slot].take() {
                        let client = seq.client.clone();
                        self.fail(seq, err.clone());
                        self.release(&client, true);
                    }
                }
                return;
            }
        };
        self.queue
            .memory
            .store(model.model.memory_bytes(), Ordering::Relaxed);
        self.take_results(slots, &model.model, &plan, &logits);
    }

    /// Gives back the slots of sequences whose client went away or whose deadline passed.
    fn drop_abandoned(&self, slots: &mut [Option<Sequence<'t>>]) {
        let now = Instant::now();
        for entry in slots.iter_mut() {
            let Some(seq) = entry.as_ref() else { continue };
            let generated = seq.generated();
            if seq.is_abandoned() {
                let seq = entry.take().expect("checked above");
                seq.span
                    .in_scope(|| tracing::info!(generated, "client went away; cancelled"));
                self.record(&seq, "cancelled");
                self.release(&seq.client, false);
            } else if seq.deadline.is_some_and(|d| d <= now) {
                let seq = entry.take().expect("checked above");
                seq.span
                    .in_scope(|| tracing::info!(generated, "deadline exceeded"));
                let client = seq.client.clone();
                self.fail(seq, DaemonError::DeadlineExceeded { generated });
                self.release(&client, true);
            }
        }
    }

    /// Feeds the pass's logits to its sequences: samples and streams tokens, records scores.
    fn take_results(
        &self,
        slots: &mut [Option<Sequence<'t>>],
        model: &DecoderModel,
        plan: &StepPlan,
        logits: &Logits,
    ) {
        for (item, p) in plan.slots.iter().enumerate() {
            let outcome = {
                let seq = slots[p.slot].as_mut().expect("planned slots are occupied");
                match &mut seq.kind {
                    SeqKind::Generate(g) => {
                        if g.pending.take().is_none() {
                            seq.fed += p.tokens();
                        }
                        match logits.last(item) {
                            Some(row) if seq.fed == seq.input.len() => {
                                let capacity = model.slot_capacity(p.slot);
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
                        seq.fed += p.tokens();
                        Outcome::Continue
                    }
                }
            };
            match outcome {
                Outcome::Continue => {
                    let done_scoring = matches!(&slots[p.slot], Some(Sequence { kind: SeqKind::Score(_), fed, input, .. }) if fed == &input.len());
                    if done_scoring {
                        self.finish_score(slots, p.slot);
                    }
                }
                Outcome::Finished(last) => {
                    if let Some(seq) = slots[p.slot].take() {
                        self.record(&seq, "ok");
                        self.release(&seq.client, true);
                    }
                    // The client may have left in the meantime; nothing to do then.
                    let _ = last.events.send(GenerationEvent::Done(last.done));
                }
                Outcome::Cancelled => {
                    if let Some(seq) = slots[p.slot].take() {
                        self.record(&seq, "cancelled");
                        self.release(&seq.client, false);
                    }
                }
                Outcome::Failed(err) => {
                    if let Some(seq) = slots[p.slot].take() {
                        let client = seq.client.clone();
                        self.fail(seq, err);
                        self.release(&client, true);
                    }
                }
            }
        }
    }

    /// Samples the next token of a generation from its logits and streams it.
    fn generate_token(&self, seq: &mut Sequence<'t>, row: &[f32], capacity: usize) -> Outcome {
        let SeqKind::Generate(g) = &mut seq.kind else {
            unreachable!("generate_token on a score")
        };
        let token = match g.job.constraint.as_mut() {
            // The grammar's mask first, then the request's sampling settings over what is left.
            Some(constraint) => match constraint.mask(row, &mut g.masked) {
                Ok(()) => g.sampler.sample(&g.masked),
                Err(err) => return Outcome::Failed(err),
            },
            None => g.sampler.sample(row),
        };
        let now = Instant::now();
        g.first_token_at.get_or_insert(now);
        g.last_token_at = Some(now);
        let ends = match &g.job.constraint {
            // A grammar allows the end tokens exactly where its output is complete, and they
            // end it there whatever `stop_at_eos` says (they are not text it could continue).
            Some(constraint) => constraint.is_end(token),
            None => g.job.stop_at_eos && self.tokenizer.is_end_of_generation(token),
        };
        if ends {
            return finish_generation(seq, FinishReason::Stop, String::new());
        }
        if let Some(constraint) = g.job.constraint.as_mut() {
            if let Err(err) = constraint.accept(token) {
                return Outcome::Failed(err);
            }
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
        let chunk = TokenChunk {
            text,
            token_ids: vec![token],
            logprobs,
        };
        if g.job.events.send(GenerationEvent::Chunk(chunk)).is_err() {
            return Outcome::Cancelled;
        }
        if stopped {
            return finish_generation(seq, FinishReason::StopString, String::new());
        }
        if g.job.constraint.as_ref().is_some_and(|c| c.is_complete()) {
            // Nothing but an end token could follow: end without a pass to sample it.
            return finish_generation(seq, FinishReason::Stop, String::new());
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

    fn finish_score(&self, slots: &mut [Option<Sequence<'t>>], slot: usize) {
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
        let result = ScoreResult {
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
        self.metrics().request(&self.queue.model, "score", "ok");
        self.metrics()
            .prompt_tokens
            .get_or_create(&metrics::model(&self.queue.model))
            .inc_by(seq.fed as u64);
        self.release(&seq.client, true);
        let _ = s.job.reply.send(Ok(result));
    }

    fn metrics(&self) -> &Metrics {
        &self.queue.metrics
    }

    /// Counts a generation's prefix-cache lookup, and what it reused (`copied`: from another
    /// slot).
    fn count_reuse(&self, seq: &Sequence<'t>, copied: bool) {
        if !matches!(seq.kind, SeqKind::Generate(_)) {
            return;
        }
        self.queue.prefix.lookups.fetch_add(1, Ordering::Relaxed);
        let model = metrics::model(&self.queue.model);
        self.metrics()
            .prefix_cache_lookups
            .get_or_create(&model)
            .inc();
        if seq.reused > 0 {
            self.queue.prefix.hits.fetch_add(1, Ordering::Relaxed);
            self.queue
                .prefix
                .reused_tokens
                .fetch_add(seq.reused as u64, Ordering::Relaxed);
            self.metrics().prefix_cache_hits.get_or_create(&model).inc();
            self.metrics()
                .prefix_cache_reused_tokens
                .get_or_create(&model)
                .inc_by(seq.reused as u64);
        }
        if seq.reused > 0 && copied {
            let prefix = &self.queue.prefix;
            prefix.copies.fetch_add(1, Ordering::Relaxed);
            prefix
                .copied_tokens
                .fetch_add(seq.reused as u64, Ordering::Relaxed);
            self.metrics()
                .prefix_cache_copies
                .get_or_create(&model)
                .inc();
            self.metrics()
                .prefix_cache_copied_tokens
                .get_or_create(&model)
                .inc_by(seq.reused as u64);
        }
        seq.span
            .in_scope(|| tracing::debug!(reused = seq.reused, "prompt prefix from the slot cache"));
    }

    /// Starts the waiting embedding in a free slot if none runs, then feeds the running one
    /// its next chunk; answers it when its last input is pooled.
    fn advance_embedding(
        &self,
        embeds: &mut Embeds,
        slots: &[Option<Sequence<'t>>],
        model: &mut CachedSlots,
        turns: &ComputeTurns,
    ) {
        if embeds.running.is_none() {
            let free = (0..slots.len()).find(|&s| slots[s].is_none());
            if let (Some(slot), Some(req)) = (free, embeds.waiting.take()) {
                let Job::Embed(job) = req.job else {
                    unreachable!("only embeddings wait here")
                };
                model.clear(slot);
                let pooled = Pooled::new(job.pooling);
                embeds.running = Some(Embedding {
                    client: req.client,
                    deadline: req.deadline,
                    result: EmbedResult {
                        embeddings: Vec::with_capacity(job.inputs.len()),
                        prompt_tokens: 0,
                    },
                    job,
                    slot,
                    input: 0,
                    fed: 0,
                    pooled,
                });
            }
        }
        let Some(mut e) = embeds.running.take() else {
            return;
        };
        let outcome = if e.job.reply.is_closed() {
            Some(Err(None))
        } else if e.deadline.is_some_and(|d| Instant::now() > d) {
            Some(Err(Some(DaemonError::DeadlineExceeded { generated: 0 })))
        } else {
            match self.embed_chunk(&mut e, model, turns) {
                Ok(true) => Some(Ok(())),
                Ok(false) => None,
                Err(err) => Some(Err(Some(err))),
            }
        };
        match outcome {
            None => embeds.running = Some(e),
            Some(outcome) => {
                model.clear(e.slot);
                self.answer_embedding(e, outcome);
            }
        }
    }

    /// Feeds the running embedding's next chunk; true once every input is pooled. Texts that
    /// fit in one pass together (at most `batch_tokens` tokens in all) share it; a longer text
    /// goes alone, in chunks (one pass for an encoder, which must see it whole).
    fn embed_chunk(
        &self,
        e: &mut Embedding,
        model: &mut CachedSlots,
        turns: &ComputeTurns,
    ) -> Result<bool, DaemonError> {
        if e.fed == 0 {
            let inputs = &e.job.inputs;
            let budget = self.settings.batch_tokens.max(1);
            let (mut end, mut used) = (e.input, 0);
            while end < inputs.len()
                && end - e.input < MAX_TEXTS_PER_PASS
                && used + inputs[end].len() <= budget
            {
                used += inputs[end].len();
                end += 1;
            }
            if end - e.input >= 2 {
                let texts: Vec<&[u32]> = inputs[e.input..end].iter().map(Vec::as_slice).collect();
                let wanted = e.job.pooling.rows_wanted(true, true);
                let states = model.model.hidden_texts(turns, e.slot, &texts, wanted)?;
                model.clear(e.slot);
                let lengths: Vec<usize> = texts.iter().map(|t| t.len()).collect();
                for (i, n_tokens) in lengths.into_iter().enumerate() {
                    e.pooled.add(states.item(i), states.n_vocab(), true, true);
                    finish_text(e, n_tokens);
                }
                e.input = end;
                return Ok(e.input == e.job.inputs.len());
            }
        }
        let tokens = &e.job.inputs[e.input];
        let end = if e.job.whole_texts {
            tokens.len()
        } else {
            (e.fed + self.settings.batch_tokens.max(1)).min(tokens.len())
        };
        let (first_chunk, last_chunk) = (e.fed == 0, end == tokens.len());
        let wanted = e.job.pooling.rows_wanted(first_chunk, last_chunk);
        let states = model
            .model
            .hidden(turns, e.slot, &tokens[e.fed..end], e.fed, wanted)?;
        e.pooled
            .add(states.values(), states.n_vocab(), first_chunk, last_chunk);
        e.fed = end;
        if !last_chunk {
            return Ok(false);
        }
        finish_text(e, tokens.len());
        (e.input, e.fed) = (e.input + 1, 0);
        model.clear(e.slot);
        Ok(e.input == e.job.inputs.len())
    }

    /// Sends an embedding's answer (None: its client left) and counts it.
    fn answer_embedding(&self, e: Embedding, outcome: Result<(), Option<DaemonError>>) {
        let m = self.metrics();
        let name = metrics::model(&self.queue.model);
        m.prompt_tokens
            .get_or_create(&name)
            .inc_by(e.result.prompt_tokens as u64);
        match outcome {
            Ok(()) => {
                m.request(&self.queue.model, "embed", "ok");
                self.release(&e.client, true);
                let _ = e.job.reply.send(Ok(e.result));
            }
            Err(Some(err)) => {
                m.request(&self.queue.model, "embed", metrics::outcome(&err));
                self.release(&e.client, true);
                let _ = e.job.reply.send(Err(err));
            }
            Err(None) => {
                m.request(&self.queue.model, "embed", "cancelled");
                self.release(&e.client, false);
            }
        }
    }

    /// Ends the running and waiting embeddings because the model is going away.
    fn end_embeds(&self, embeds: &mut Embeds, model: &mut CachedSlots, reason: StopReason) {
        if let Some(e) = embeds.running.take() {
            model.clear(e.slot);
            self.answer_embedding(e, Err(Some(self.queue.stop_error(reason))));
        }
        if let Some(req) = embeds.waiting.take() {
            self.release(&req.client, true);
            req.job.fail(self.queue.stop_error(reason));
        }
    }

    /// Answers a running sequence with `err`, and counts it.
    fn fail(&self, seq: Sequence<'t>, err: DaemonError) {
        self.record(&seq, metrics::outcome(&err));
        seq.fail(err);
    }

    /// Counts a sequence that ends with `outcome`: the request, its tokens, its times.
    fn record(&self, seq: &Sequence<'t>, outcome: &str) {
        let m = self.metrics();
        let model = metrics::model(&self.queue.model);
        let kind = match seq.kind {
            SeqKind::Generate(_) => "generate",
            SeqKind::Score(_) => "score",
        };
        m.request(&self.queue.model, kind, outcome);
        m.prompt_tokens
            .get_or_create(&model)
            .inc_by((seq.fed - seq.reused) as u64);
        let SeqKind::Generate(g) = &seq.kind else {
            return;
        };
        m.generated_tokens
            .get_or_create(&model)
            .inc_by(g.generated.len() as u64);
        if let Some(first) = g.first_token_at {
            m.time_to_first_token
                .get_or_create(&model)
                .observe(first.duration_since(seq.enqueued).as_secs_f64());
            m.prefill_seconds
                .get_or_create(&model)
                .inc_by(first.duration_since(seq.admitted).as_secs_f64());
            if let Some(last) = g.last_token_at {
                m.decode_seconds
                    .get_or_create(&model)
                    .inc_by(last.duration_since(first).as_secs_f64());
            }
        }
    }

    /// Counts a sequence that left its slot as ended.
    fn release(&self, client: &ClientKey, served: bool) {
        self.queue.state.lock().finished(client, served);
    }

    /// Ends every running and waiting request because the model is going away.
    fn end_all(
        &self,
        slots: &mut [Option<Sequence<'t>>],
        model: &mut CachedSlots,
        reason: StopReason,
    ) {
        for (slot, seq) in slots.iter_mut().enumerate() {
            if let Some(seq) = seq.take() {
                self.fail(seq, self.queue.stop_error(reason));
                model.clear(slot);
            }
        }
        let mut st = self.queue.state.lock();
        self.queue.fail_waiting(&mut st, reason);
    }
}

fn flush_text(g: &mut Generation<'_>) -> String {
    let tail = g.decoder.finish();
    match g.stops.push(&tail) {
        StopStatus::Continue(text) => text + &g.stops.finish(),
        StopStatus::Stopped(text) => text,
    }
}

/// Sends the final text, and prepares the last event.
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
        let chunk = TokenChunk {
            text: tail,
            ..TokenChunk::default()
        };
        if g.job.events.send(GenerationEvent::Chunk(chunk)).is_err() {
            return Outcome::Cancelled;
        }
    }
    let since = |from: Instant, to: Option<Instant>| {
        to.map_or(Default::default(), |to| to.duration_since(from))
    };
    let first = g.first_token_at.unwrap_or(seq.admitted);
    let prefill = since(seq.admitted, Some(first));
    let decode = since(first, g.last_token_at);
    let rate = |tokens: usize, d: std::time::Duration| {
        if d.is_zero() {
            0.0
        } else {
            tokens as f64 / d.as_secs_f64()
        }
    };
    let timings = Timings {
        queue: since(seq.enqueued, Some(seq.admitted)),
        prefill,
        decode,
        prefill_tokens_per_s: rate(seq.input.len() - seq.reused, prefill),
        decode_tokens_per_s: rate(g.generated.len().saturating_sub(1), decode),
    };
    seq.span.in_scope(|| {
        tracing::info!(
            finish = ?reason,
            prompt_tokens = seq.input.len(),
            cached_tokens = seq.reused,
            completion_tokens = g.generated.len(),
            prefill_tok_s = format!("{:.1}", timings.prefill_tokens_per_s),
            decode_tok_s = format!("{:.1}", timings.decode_tokens_per_s),
            "generated"
        )
    });
    Outcome::Finished(Box::new(LastEvent {
        events: g.job.events.clone(),
        done: GenerationDone {
            finish_reason: reason,
            prompt_tokens: seq.input.len(),
            cached_prompt_tokens: seq.reused,
            completion_tokens: g.generated.len(),
            timings,
        },
    }))
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
        token: token_logprob(tokenizer, token, lp[token as usize]),
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

/// Most texts one embedding pass carries: each brings its own small cache and output rows.
const MAX_TEXTS_PER_PASS: usize = 64;

/// Ends the running embedding's current text: its pooled vector, cut to the dimensions asked
/// for and scaled to unit length if asked, joins the answer.
fn finish_text(e: &mut Embedding, n_tokens: usize) {
    let mut vector = e.pooled.finish();
    if let Some(d) = e.job.dimensions {
        vector.truncate(d);
    }
    if e.job.normalize {
        embedding::normalize(&mut vector);
    }
    e.result.embeddings.push(vector);
    e.result.prompt_tokens += n_tokens;
}

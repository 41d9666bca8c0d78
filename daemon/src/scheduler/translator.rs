//! The runner of a translation model: one request (a batch of sentences) at a time, admitted
//! fairly between clients as the decoder runner admits, taking a compute turn for the encoder
//! and for each decoder step so that other models keep their turns. A request whose client
//! goes away or whose deadline passes is dropped between steps.

use std::time::Instant;

use egpu_engine::tokenizer::Tokenizer;
use tokio::sync::oneshot;

use super::events::{TranslateResult, Translation};
use super::{Job, ModelQueue, Request};
use crate::backend::{ComputeTurns, MarianCpu};
use crate::error::DaemonError;

/// Serves the queue until it is stopped.
pub(super) fn serve(
    translator: &MarianCpu,
    tokenizer: &Tokenizer,
    queue: &ModelQueue,
    turns: &ComputeTurns,
) {
    loop {
        let req = {
            let mut st = queue.state.lock();
            loop {
                if let Some(reason) = st.stop {
                    queue.fail_waiting(&mut st, reason);
                    return;
                }
                queue.forget_abandoned(&mut st);
                if let Some(req) = st.admission.admit_next() {
                    break req;
                }
                queue.wait_for_work(&mut st);
            }
        };
        let client = req.client.clone();
        let finished = run_translation(translator, tokenizer, turns, queue, req);
        let served = finished
            .as_ref()
            .is_some_and(|(_, outcome)| outcome.is_ok());
        let outcome = match &finished {
            Some((_, Ok(_))) => "ok",
            Some((_, Err(err))) => crate::metrics::outcome(err),
            None => "cancelled",
        };
        queue.metrics.request(&queue.model, "translate", outcome);
        queue.state.lock().finished(&client, served);
        // Replied only after the counts: a client that reads its answer and then asks for
        // Status sees its request served.
        if let Some((reply, outcome)) = finished {
            let _ = reply.send(outcome);
        }
    }
}

type TranslateReply = (
    oneshot::Sender<Result<TranslateResult, DaemonError>>,
    Result<TranslateResult, DaemonError>,
);

/// Runs one translation request; returns the reply to send, or None when there is nobody to
/// send it to (or it was already sent).
fn run_translation(
    translator: &MarianCpu,
    tokenizer: &Tokenizer,
    turns: &ComputeTurns,
    queue: &ModelQueue,
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
    let queued = started.duration_since(req.enqueued);
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
    let mut stopped = None;
    // Asked between decoder steps: a deadline, a client that left, or the model ending (an
    // Unload with force, egpud shutting down) ends the translation there.
    let mut keep_going = || {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            deadline_passed = true;
            return false;
        }
        if let Some(reason) = queue.state.lock().stop {
            stopped = Some(reason);
            return false;
        }
        !reply.is_closed()
    };
    // Passing the compute turns lends the thread pool pass by pass (`PoolAccess`). Sentences
    // are independent, so passes of `sentences_per_pass` give what one batch would, in the
    // working memory the core allowed.
    let per_pass = job.sentences_per_pass.max(1);
    if job.sources.len() > per_pass {
        tracing::info!(
            sentences = job.sources.len(),
            per_pass,
            "translating in passes that fit the model's working memory"
        );
    }
    let mut result = Ok(Some(Vec::with_capacity(job.sources.len())));
    for pass in job.sources.chunks(per_pass) {
        let done = translator
            .model()
            .translate(turns, pass, &settings, &mut keep_going);
        result = match (result, done) {
            (Ok(Some(mut all)), Ok(Some(more))) => {
                all.extend(more);
                Ok(Some(all))
            }
            (_, other) => other,
        };
        if !matches!(result, Ok(Some(_))) {
            break;
        }
    }
    drop(job.working_memory);
    let outcome = match result {
        Ok(Some(hypotheses)) => Ok(TranslateResult {
            translations: hypotheses
                .into_iter()
                .zip(&job.sources)
                .map(|(h, source)| Translation {
                    text: tokenizer.decode(&h.tokens).trim_start().to_owned(),
                    token_ids: h.tokens,
                    score: h.score,
                    source_tokens: source.len(),
                })
                .collect(),
            num_beams: settings.num_beams,
            queued,
            translating: started.elapsed(),
        }),
        Ok(None) => match stopped {
            _ if deadline_passed => Err(DaemonError::DeadlineExceeded { generated: 0 }),
            Some(reason) => Err(queue.stop_error(reason)),
            None => {
                tracing::info!("client went away; translation abandoned");
                return None;
            }
        },
        Err(e) => Err(DaemonError::InvalidArgument(e.to_string())),
    };
    Some((reply, outcome))
}

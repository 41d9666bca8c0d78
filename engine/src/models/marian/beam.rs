//! Greedy and beam-search decoding, as transformers' `generate` does it for Marian models.
//!
//! The rules below were read from transformers 5.24 and confirmed by a small Python
//! reimplementation that matched its `generate` token for token over 1920 settings (beams,
//! lengths, length penalties, early stopping); egpu's outputs are tested against transformers'
//! on the committed fixture.
//!
//! **Logits processors** (in transformers' order, on log-probabilities in beam search and on raw
//! logits in greedy search): every forbidden token (`bad_words_ids`, the pad token for opus-mt)
//! gets −∞; at the last position (`max_length − 1`) every token but the forced end token gets −∞.
//!
//! **Beam search** (transformers' vectorized `_beam_search`), per sentence with `K` beams:
//! - scores are sums of log-softmax values in f32; at the first step only the first beam is live;
//! - each step takes the best `2K` candidates (beam, token) by running score;
//! - a candidate ending in `</s>` (any candidate, at the length limit) among the best `K` becomes
//!   a finished hypothesis, scored by its sum divided by (generated tokens, `</s>` included) ^ `length_penalty`; the `K` best finished
//!   hypotheses are kept; with `early_stopping = true`, none is added once `K` are kept;
//! - the best `K` candidates that did not end become the running beams;
//! - a sentence is done when no running beam could beat its worst kept hypothesis (a running
//!   beam's score is divided by its current length, or by the longest possible one under
//!   `early_stopping = "never"`), when `K` hypotheses are kept under `early_stopping = true`, or at
//!   `max_length`;
//! - the result is the best kept hypothesis.

use crate::gguf::Metadata;

use super::{
    on_pool, DecoderCache, EncodedSource, MarianConfig, MarianError, MarianModel, PoolAccess,
    StepRow,
};

/// transformers' stand-in for "minus infinity" in beam bookkeeping.
const NEG_LARGE: f32 = -1.0e9;

/// `early_stopping` of `generation_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `false`: stop when no running beam can beat the worst kept hypothesis at its current length.
    Heuristic,
    /// `true`: stop as soon as `num_beams` hypotheses are kept.
    AsSoonAsFull,
    /// `"never"`: stop when no running beam can beat it even at the longest length.
    Never,
}

/// How a translation is decoded (from the model's `generation_config.json`; a request may
/// override beams and length).
#[derive(Debug, Clone, PartialEq)]
pub struct SearchSettings {
    /// 1 = greedy.
    pub num_beams: usize,
    /// Most decoder tokens, the start token included (transformers' `max_length`).
    pub max_length: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Tokens never generated.
    pub bad_words: Vec<u32>,
    /// Token forced at position `max_length − 1`.
    pub forced_eos: Option<u32>,
    /// Beam search: log-softmax the scores again after the processors (`renormalize_logits`).
    pub renormalize: bool,
}

impl SearchSettings {
    /// The settings `marian.generation.*` holds (the model's `generation_config.json`).
    pub fn from_metadata(meta: &Metadata, config: &MarianConfig) -> SearchSettings {
        let int = |key: &str| meta.get_u64(key).map(|v| v as usize);
        SearchSettings {
            num_beams: int("marian.generation.num_beams").unwrap_or(1).max(1),
            max_length: int("marian.generation.max_length")
                .unwrap_or(config.max_positions)
                .clamp(2, config.max_positions),
            length_penalty: meta
                .get_f32("marian.generation.length_penalty")
                .unwrap_or(1.0),
            early_stopping: match int("marian.generation.early_stopping") {
                Some(1) => EarlyStopping::AsSoonAsFull,
                Some(2) => EarlyStopping::Never,
                _ => EarlyStopping::Heuristic,
            },
            bad_words: match meta.get_array("marian.generation.bad_words_ids") {
                Some(a) => (0..a.len())
                    .filter_map(|i| a.get_i64(i).map(|v| v as u32))
                    .collect(),
                None => vec![config.pad],
            },
            forced_eos: int("marian.generation.forced_eos_token_id").map(|v| v as u32),
            renormalize: meta
                .get_bool("marian.generation.renormalize_logits")
                .unwrap_or(false),
        }
    }
}

/// A translation: generated ids (without the decoder start token; with `</s>` when the model
/// ended the sentence) and the score beam search ranked it by (the sum of log-probabilities for
/// greedy search).
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f32,
}

impl MarianModel {
    /// Translates a batch of encoded sources (each the source ids, ending with `</s>`). The
    /// callback `keep_going` is asked before every decoder step; returning false abandons the
    /// batch (a client that went away) with `Ok(None)`.
    pub fn translate(
        &self,
        pools: &dyn PoolAccess,
        sources: &[Vec<u32>],
        settings: &SearchSettings,
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Vec<Hypothesis>>, MarianError> {
        let mut encoded = Vec::with_capacity(sources.len());
        for source in sources {
            if !keep_going() {
                return Ok(None);
            }
            encoded.push(on_pool(pools, |pool| self.encode(pool, source))?);
        }
        let settings = SearchSettings {
            max_length: settings.max_length.clamp(2, self.config.max_positions),
            num_beams: settings.num_beams.max(1),
            ..settings.clone()
        };
        if settings.num_beams == 1 {
            self.greedy(pools, &encoded, &settings, keep_going)
        } else {
            self.beam_search(pools, &encoded, &settings, keep_going)
        }
    }

    /// Applies the logits processors to one row: forbidden tokens, and the forced end at the
    /// last position. `cur_len` is the number of decoder tokens so far (start included).
    fn process(&self, row: &mut [f32], cur_len: usize, settings: &SearchSettings) {
        for &bad in &settings.bad_words {
            if let Some(v) = row.get_mut(bad as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        if let Some(eos) = settings.forced_eos {
            if cur_len == settings.max_length - 1 && (eos as usize) < row.len() {
                row.fill(f32::NEG_INFINITY);
                row[eos as usize] = 0.0;
            }
        }
    }

    fn greedy(
        &self,
        pools: &dyn PoolAccess,
        sources: &[EncodedSource],
        settings: &SearchSettings,
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Vec<Hypothesis>>, MarianError> {
        let v = self.config.n_vocab;
        let eos = self.config.eos;
        let mut caches: Vec<DecoderCache> =
            sources.iter().map(|_| self.new_decoder_cache()).collect();
        let mut out: Vec<Hypothesis> = sources
            .iter()
            .map(|_| Hypothesis {
                tokens: Vec::new(),
                score: 0.0,
            })
            .collect();
        let ended = |h: &Hypothesis| h.tokens.last() == Some(&eos);
        let mut cur_len = 1;
        while cur_len < settings.max_length && !out.iter().all(ended) {
            if !keep_going() {
                return Ok(None);
            }
            // One row per sentence that has not ended, in sentence order.
            let mut rows = Vec::with_capacity(out.len());
            for ((cache, hyp), source) in caches.iter_mut().zip(&out).zip(sources) {
                if !ended(hyp) {
                    let token = hyp.tokens.last().copied();
                    rows.push(StepRow {
                        cache,
                        token: token.unwrap_or(self.config.decoder_start),
                        source,
                    });
                }
            }
            let mut logits = on_pool(pools, |pool| self.decode_step(pool, &mut rows))?;
            drop(rows);
            let live = out.iter_mut().filter(|h| !ended(h));
            for (row, hyp) in logits.chunks_exact_mut(v).zip(live) {
                self.process(row, cur_len, settings);
                let next = argmax(row);
                hyp.score += row[next] - log_sum_exp(row);
                hyp.tokens.push(next as u32);
            }
            cur_len += 1;
        }
        Ok(Some(out))
    }

    fn beam_search(
        &self,
        pools: &dyn PoolAccess,
        sources: &[EncodedSource],
        settings: &SearchSettings,
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Vec<Hypothesis>>, MarianError> {
        let k = settings.num_beams;
        let v = self.config.n_vocab;
        let eos = self.config.eos;
        let mut items: Vec<BeamItem> = sources
            .iter()
            .map(|_| BeamItem {
                running: vec![Running {
                    tokens: Vec::new(),
                    score: 0.0,
                    cache: self.new_decoder_cache(),
                }],
                finished: Vec::new(),
                done: false,
            })
            .collect();
        let mut cur_len = 1;
        while cur_len < settings.max_length && items.iter().any(|it| !it.done) {
            if !keep_going() {
                return Ok(None);
            }
            // One decoder pass over every running beam of every unfinished sentence.
            let mut rows = Vec::new();
            let mut owners = Vec::new();
            for (i, item) in items.iter_mut().enumerate() {
                if item.done {
                    continue;
                }
                for beam in item.running.iter_mut() {
                    owners.push(i);
                    rows.push(StepRow {
                        token: beam
                            .tokens
                            .last()
                            .copied()
                            .unwrap_or(self.config.decoder_start),
                        cache: &mut beam.cache,
                        source: &sources[i],
                    });
                }
            }
            let logits = on_pool(pools, |pool| self.decode_step(pool, &mut rows))?;
            drop(rows);
            let mut log_probs: Vec<Vec<f32>> = logits
                .chunks_exact(v)
                .map(|row| {
                    let mut row = row.to_vec();
                    log_softmax_in_place(&mut row);
                    row
                })
                .collect();
            let mut at = 0;
            for (i, item) in items.iter_mut().enumerate() {
                if item.done {
                    continue;
                }
                let n_beams = item.running.len();
                let rows = &mut log_probs[at..at + n_beams];
                at += n_beams;
                debug_assert!(owners[at - 1] == i);
                for (row, beam) in rows.iter_mut().zip(&item.running) {
                    self.process(row, cur_len, settings);
                    if settings.renormalize {
                        log_softmax_in_place(row);
                    }
                    for x in row.iter_mut() {
                        *x += beam.score;
                    }
                }
                item.step(rows, k, eos, cur_len, settings);
            }
            cur_len += 1;
        }
        Ok(Some(items.into_iter().map(|item| item.best()).collect()))
    }
}

struct Running {
    tokens: Vec<u32>,
    score: f32,
    cache: DecoderCache,
}

struct BeamItem {
    running: Vec<Running>,
    /// Kept hypotheses, best first, at most `num_beams`.
    finished: Vec<Hypothesis>,
    done: bool,
}

impl BeamItem {
    /// One step of bookkeeping over this sentence's scored candidates (`rows[beam][token]`, the
    /// running score already added). `cur_len` counts decoder tokens before this step's.
    fn step(
        &mut self,
        rows: &[Vec<f32>],
        k: usize,
        eos: u32,
        cur_len: usize,
        settings: &SearchSettings,
    ) {
        let v = rows.first().map_or(0, Vec::len);
        // The best 2K candidates, best first (ties: lower flat index first, as torch.topk).
        let candidates = top_candidates(rows, 2 * k);
        // Tokens generated with this one, the start token not counted.
        let generated = cur_len as f32;
        let full =
            self.finished.len() >= k && settings.early_stopping == EarlyStopping::AsSoonAsFull;
        // At the length limit every candidate ends, `</s>` or not.
        let last_step = cur_len + 1 >= settings.max_length;
        let mut next_running = Vec::with_capacity(k);
        let mut just_finished = Vec::new();
        for (rank, &(score, flat)) in candidates.iter().enumerate() {
            let (beam, token) = (flat / v, (flat % v) as u32);
            if token == eos || last_step {
                if rank < k && !full && score > NEG_LARGE / 2.0 {
                    let mut tokens = self.running[beam].tokens.clone();
                    tokens.push(token);
                    just_finished.push(Hypothesis {
                        tokens,
                        score: score / generated.powf(settings.length_penalty),
                    });
                }
            } else if next_running.len() < k && score > NEG_LARGE / 2.0 {
                next_running.push((beam, token, score));
            }
        }
        // Kept hypotheses: the best K of those kept and those just finished (earlier ones first
        // on equal scores, as a stable top-k over [kept, new] gives).
        self.finished.extend(just_finished);
        sort_stable_desc(&mut self.finished);
        self.finished.truncate(k);

        let old = std::mem::take(&mut self.running);
        let mut taken: Vec<Option<Running>> = old.into_iter().map(Some).collect();
        let mut uses = vec![0usize; taken.len()];
        for &(beam, _, _) in &next_running {
            uses[beam] += 1;
        }
        for (beam, token, score) in next_running {
            uses[beam] -= 1;
            // The last user of a beam takes its cache; others copy it.
            let source = if uses[beam] == 0 {
                taken[beam].take()
            } else {
                None
            };
            let (mut tokens, cache) = match source {
                Some(r) => (r.tokens, r.cache),
                None => {
                    let r = taken[beam]
                        .as_ref()
                        .expect("a beam still used is still there");
                    (r.tokens.clone(), r.cache.clone())
                }
            };
            tokens.push(token);
            self.running.push(Running {
                tokens,
                score,
                cache,
            });
        }

        let complete = self.finished.len() >= k;
        self.done = self.running.is_empty()
            || match settings.early_stopping {
                EarlyStopping::AsSoonAsFull => complete,
                EarlyStopping::Heuristic | EarlyStopping::Never if !complete => false,
                EarlyStopping::Heuristic => {
                    let best =
                        self.running[0].score / (cur_len as f32).powf(settings.length_penalty);
                    best <= self.worst_kept()
                }
                EarlyStopping::Never => {
                    let longest = (settings.max_length - 1) as f32;
                    let best = if settings.length_penalty > 0.0 {
                        self.running[0].score / longest.powf(settings.length_penalty)
                    } else {
                        self.running[0].score / (cur_len as f32).powf(settings.length_penalty)
                    };
                    best <= self.worst_kept()
                }
            };
    }

    fn worst_kept(&self) -> f32 {
        self.finished.last().map_or(NEG_LARGE, |h| h.score)
    }

    fn best(self) -> Hypothesis {
        match self.finished.into_iter().next() {
            Some(h) => h,
            // Unreachable with a forced end token; without one, the best unfinished beam.
            None => self
                .running
                .into_iter()
                .next()
                .map(|r| Hypothesis {
                    tokens: r.tokens,
                    score: r.score,
                })
                .unwrap_or(Hypothesis {
                    tokens: Vec::new(),
                    score: NEG_LARGE,
                }),
        }
    }
}

fn sort_stable_desc(hyps: &mut [Hypothesis]) {
    hyps.sort_by(|a, b| b.score.total_cmp(&a.score));
}

/// The `n` best (score, flat index) over all rows, best first; equal scores by lower index.
fn top_candidates(rows: &[Vec<f32>], n: usize) -> Vec<(f32, usize)> {
    let v = rows.first().map_or(0, Vec::len);
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(n + 1);
    for (b, row) in rows.iter().enumerate() {
        for (t, &s) in row.iter().enumerate() {
            if best.len() == n && best.last().is_some_and(|&(w, _)| s <= w) {
                continue;
            }
            let at = best.partition_point(|&(x, _)| x >= s);
            best.insert(at, (s, b * v + t));
            best.truncate(n);
        }
    }
    best
}

/// `ln Σ eˣ` over the row, in f32 as transformers computes it (exponentials with the engine's
/// vectorizable `exp`, summed in f64). −∞ for a row of −∞.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    // Entries of −∞ (forbidden tokens) contribute nothing; `exp` clamps, so skip them.
    let sum: f64 = row
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| f64::from(crate::ops::exp(x - max)))
        .sum();
    max + sum.ln() as f32
}

/// Log-softmax in place.
fn log_softmax_in_place(row: &mut [f32]) {
    let lse = log_sum_exp(row);
    if lse == f32::NEG_INFINITY {
        return;
    }
    for x in row.iter_mut() {
        *x -= lse;
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

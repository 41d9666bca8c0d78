//! Choosing the next token from logits, and stopping generation.
//!
//! The chain follows llama.cpp's default order so that the same settings mean the same thing:
//! penalties → top-k → top-p → min-p → temperature → draw. A temperature of 0 (or below) is
//! greedy: the highest logit wins, ties going to the lowest id.
//!
//! Randomness comes from a seeded xoshiro256** generator owned by the sampler, so a request with
//! a seed is reproducible token for token whatever else the daemon is doing.

/// Sampling settings for one sequence. `Default` is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 or below: greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p ×` the most likely one; 0 disables.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens; 1 disables.
    pub repeat_penalty: f32,
    /// Subtract `count × frequency_penalty` from each recently seen token's logit.
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` once from each recently seen token's logit.
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at (prompt included); 0 disables penalties.
    pub penalty_last_n: usize,
    /// Seed for the random draw; `None` picks one from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Settings close to Ollama's and llama.cpp's interactive defaults.
    pub fn creative() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            ..Default::default()
        }
    }

    fn has_penalties(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }
}

/// A seeded xoshiro256** generator (public-domain algorithm by Blackman and Vigna).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Expand the seed with splitmix64 so that nearby seeds give unrelated streams.
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks tokens for one sequence; remembers recent tokens for the penalties.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    recent: std::collections::VecDeque<u32>,
    /// Reused across calls so sampling allocates nothing per token: the kept tokens, the
    /// penalized logits, the recent tokens sorted and a draw's weights over the whole
    /// vocabulary.
    candidates: Vec<(u32, f32)>,
    penalized: Vec<f32>,
    recent_sorted: Vec<u32>,
    weights: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Sampler {
            rng: Rng::new(seed),
            recent: Default::default(),
            candidates: Vec::new(),
            penalized: Vec::new(),
            recent_sorted: Vec::new(),
            weights: Vec::new(),
            params,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a token (prompt or generated) for the penalties.
    pub fn accept(&mut self, token: u32) {
        if self.params.penalty_last_n == 0 {
            return;
        }
        if self.recent.len() == self.params.penalty_last_n {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    pub fn accept_all(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.accept(t);
        }
    }

    /// Chooses the next token from `logits` (one per vocabulary entry). Does not `accept` it.
    ///
    /// Costs a few passes over the logits, not a sort of them: a vocabulary of 262,144
    /// (Gemma 3) took 11 ms per token with OpenAI's default settings when every candidate was
    /// sorted, as long as the model's own decode step (`examples/sampler_bench`).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let logits: &[f32] = if p.has_penalties() {
            penalize(
                p,
                &self.recent,
                logits,
                &mut self.recent_sorted,
                &mut self.penalized,
            );
            &self.penalized
        } else {
            logits
        };
        crate::kernels::run_vectorized(Choice {
            p,
            logits,
            candidates: &mut self.candidates,
            weights: &mut self.weights,
            rng: &mut self.rng,
        })
    }
}

/// One token's choice, as work for `kernels::run_vectorized` ([`choose_token_body`]).
struct Choice<'a> {
    p: &'a SamplingParams,
    logits: &'a [f32],
    candidates: &'a mut Vec<(u32, f32)>,
    weights: &'a mut Vec<f32>,
    rng: &'a mut Rng,
}

impl crate::kernels::Vectorized for Choice<'_> {
    type Output = u32;
    #[inline(always)]
    fn run(self) -> u32 {
        choose_token_body(self.p, self.logits, self.candidates, self.weights, self.rng)
    }
}

/// [`Sampler::sample`] after the penalties: greedy, or top-k, top-p and min-p, temperature and
/// the draw. Runs as `kernels::run_vectorized` compiles it for this CPU; every pass keeps its
/// lanes and order whatever the register width, so the choice does not depend on the CPU.
#[inline(always)]
pub(crate) fn choose_token_body(
    p: &SamplingParams,
    logits: &[f32],
    candidates: &mut Vec<(u32, f32)>,
    weights: &mut Vec<f32>,
    rng: &mut Rng,
) -> u32 {
    let inv_t = 1.0 / p.temperature;
    // A temperature so small that 1/T overflows is greedy too.
    if p.temperature <= 0.0 || !inv_t.is_finite() {
        return greedy(logits);
    }
    // No finite candidate (a grammar's mask, or NaN): nothing to draw from; an infinite logit
    // (a penalty can make one) is certain: the first such token, as greedy takes it.
    let max = max_ignoring_nan(logits);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    if max == f32::INFINITY {
        return greedy(logits);
    }
    if !keep(p, logits, max, candidates, weights) {
        // Nothing is cut: draw from every token, in id order.
        let u = rng.next_f64();
        return draw_all(logits, max, inv_t, u, weights);
    }

    // Temperature, then a draw from the renormalised distribution, most likely first.
    // The kept tokens are few: their weights are computed twice rather than stored.
    let c = &*candidates;
    let kept_weight = |l: f32| (((l - max) * inv_t) as f64).exp();
    let total: f64 = c.iter().map(|&(_, l)| kept_weight(l)).sum();
    let mut target = rng.next_f64() * total;
    for &(id, l) in c {
        let w = kept_weight(l);
        if target < w {
            return id;
        }
        target -= w;
    }
    // Rounding left the target past the end: the least likely kept token (the best one if
    // nothing was kept, which `keep` never leaves).
    c.last().map_or_else(|| greedy(logits), |&(id, _)| id)
}

/// `logits` with the penalties of `p` applied to the tokens in `recent`, into `out`: a
/// positive logit divided by the repeat penalty (a negative one multiplied), then
/// `count × frequency_penalty` and `presence_penalty` subtracted (llama.cpp's order). Only the
/// recent tokens' entries change; the rest is a copy. `ids` is scratch.
fn penalize(
    p: &SamplingParams,
    recent: &std::collections::VecDeque<u32>,
    logits: &[f32],
    ids: &mut Vec<u32>,
    out: &mut Vec<f32>,
) {
    out.clear();
    out.extend_from_slice(logits);
    ids.clear();
    ids.extend(recent);
    ids.sort_unstable();
    for run in ids.chunk_by(|a, b| a == b) {
        let Some(l) = out.get_mut(run[0] as usize) else {
            continue;
        };
        let scaled = if *l > 0.0 {
            *l / p.repeat_penalty
        } else {
            *l * p.repeat_penalty
        };
        *l = scaled - run.len() as f32 * p.frequency_penalty - p.presence_penalty;
    }
}

/// Lanes of the sampler's passes over the logits: independent maxima and sums that the
/// compiler keeps in one vector register each.
const LANES: usize = 16;

/// The largest logit, NaN ignored; −∞ when there is none.
#[inline(always)]
fn max_ignoring_nan(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            // `f32::max` ignores NaN.
            *m = m.max(v);
        }
    }
    for &v in chunks.remainder() {
        lanes[0] = lanes[0].max(v);
    }
    lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// The highest logit's id, the lowest on ties; 0 when every logit is −∞ or NaN.
#[inline(always)]
fn greedy(logits: &[f32]) -> u32 {
    let max = max_ignoring_nan(logits);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    // Blocks with a compare that vectorizes, then the position within the block that has it.
    for (b, block) in logits.chunks(LANES).enumerate() {
        if block.iter().fold(false, |hit, &l| hit | (l == max)) {
            let i = block.iter().position(|&l| l == max).unwrap_or(0);
            return (b * LANES + i) as u32;
        }
    }
    0
}

/// `e^((l − max)/T)` for a logit `l` at or below `max` (`inv_t` = 1/T), 0 for −∞ and NaN.
#[inline(always)]
fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    let x = (l - max) * inv_t;
    // `exp` clamps below −87.3 (to about 1e−38, not 0); NaN fails the test too.
    if x > -87.0 {
        crate::ops::exp(x)
    } else {
        0.0
    }
}

/// `weights[i] = e^((logits[i] − max)/T)` (0 for −∞ and NaN), as a loop over a sized buffer:
/// `extend` would run outside the target features `kernels::run_vectorized` compiles this for.
#[inline(always)]
fn fill_weights(logits: &[f32], max: f32, inv_t: f32, weights: &mut Vec<f32>) {
    weights.resize(logits.len(), 0.0);
    for (w, &l) in weights.iter_mut().zip(logits) {
        *w = weight(l, max, inv_t);
    }
}

/// Σ `weights[i]` over the tokens whose logit is at or above `floor`: blocks summed in lanes
/// ([`lane_sum`]), the blocks' sums in f64.
#[inline(always)]
fn sum_above(logits: &[f32], weights: &[f32], floor: f32) -> f64 {
    let mut block = [0f32; SUM_BLOCK];
    logits
        .chunks(SUM_BLOCK)
        .zip(weights.chunks(SUM_BLOCK))
        .map(|(ls, ws)| {
            let kept = &mut block[..ls.len()];
            for ((k, &l), &w) in kept.iter_mut().zip(ls).zip(ws) {
                *k = if l >= floor { w } else { 0.0 };
            }
            lane_sum(kept)
        })
        .sum()
}

/// How many logits are at or above `floor` (NaN is not), in one vectorized pass.
#[inline(always)]
fn count_at_or_above(logits: &[f32], floor: f32) -> usize {
    logits
        .iter()
        .fold(0usize, |n, &l| n + usize::from(l >= floor))
}

/// Weights per block of [`sum_above`] and [`draw_all`]: short enough that an f32 sum of
/// one stays precise, long enough that the blocks' sums are few.
const SUM_BLOCK: usize = 1024;

/// Σ `values` over [`LANES`] interleaved lanes, then the lanes in f64: vectorized, where one
/// chain of dependent adds (f64 or f32) was the slowest part of a draw over every token.
#[inline(always)]
fn lane_sum(values: &[f32]) -> f64 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (acc, &v) in lanes.iter_mut().zip(chunk) {
            *acc += v;
        }
    }
    for (acc, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *acc += v;
    }
    lanes.iter().map(|&v| f64::from(v)).sum()
}

/// Most likely first, the lower id first on equal logits (a total order: ids differ).
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// How far below the best logit the searches for kept tokens look, in turn, up to every token.
/// Each band is first checked with a vectorized pass (does it hold top-k's `k` tokens, or
/// top-p's mass?) and gathered only if it can: a small model's logits can hold tens of
/// thousands of tokens within 16 of the best, or a confident one fewer than 40, and gathering
/// more than needed cost more than the rest of the choice.
const BANDS: [f32; 6] = [4.0, 8.0, 16.0, 32.0, 64.0, f32::INFINITY];

/// Fills `c` with the tokens that top-k, top-p and min-p keep (in that order, as llama.cpp
/// applies them), most likely first. Returns false, with `c` empty, when none of them is set
/// and so every token stays.
///
/// Instead of sorting the whole vocabulary, it gathers the tokens within a band below the best
/// logit ([`BANDS`]), and sorts only what the settings can keep: top-k's `k` after a
/// selection, or for top-p a growing prefix (64, 512, … most likely) until its probability mass
/// is reached. A band is gathered only once a vectorized pass shows it holds what decides the
/// cut: top-k's `k` tokens, top-p's mass, or every token min-p can keep. Probabilities for
/// top-p and min-p are at temperature 1 over what top-k left (every token without top-k), as
/// llama.cpp computes them.
#[inline(always)]
fn keep(
    p: &SamplingParams,
    logits: &[f32],
    max: f32,
    c: &mut Vec<(u32, f32)>,
    weights: &mut Vec<f32>,
) -> bool {
    c.clear();
    let top_k = p.top_k > 0;
    let top_p = p.top_p < 1.0;
    let min_p = p.min_p > 0.0;
    if !(top_k || top_p || min_p) {
        return false;
    }
    // min-p keeps a token with probability at least min_p times the best one's, that is
    // e^(l − max) ≥ min_p: nothing below `max − min_p_band` ever stays (at least 1: only the
    // best tokens then).
    let min_p_band = if min_p {
        (-p.min_p.ln()).max(0.0)
    } else {
        f32::INFINITY
    };
    // Where top-p's mass is over top-k's tokens, those below min-p's floor count too: only
    // there may a band not stop at min-p's.
    let narrow_to_min_p = !(top_k && top_p);
    // Without top-k, top-p's mass is over every token: every weight, computed once for the
    // bands' checks.
    let everything = if top_p && !top_k {
        fill_weights(logits, max, 1.0, weights);
        sum_above(logits, weights, f32::NEG_INFINITY)
    } else {
        0.0
    };
    let mut searched = None;
    for band in BANDS {
        let band = if narrow_to_min_p && band.is_finite() {
            band.min(min_p_band)
        } else {
            band
        };
        if searched == Some(band) {
            continue;
        }
        searched = Some(band);
        let wide = band == f32::INFINITY;
        let floor = if wide { f32::NEG_INFINITY } else { max - band };
        // The band holds every token min-p could keep, and nothing else decides below it.
        let holds_min_p = narrow_to_min_p && band >= min_p_band;
        if !wide {
            let holds = if top_k {
                (holds_min_p && !top_p) || count_at_or_above(logits, floor) >= p.top_k
            } else if top_p {
                holds_min_p || sum_above(logits, weights, floor) >= f64::from(p.top_p) * everything
            } else {
                holds_min_p
            };
            if !holds {
                continue;
            }
        }
        gather(logits, floor, c);
        if top_k && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        let mass = if top_k {
            c.iter().map(|&(_, l)| f64::from(weight(l, max, 1.0))).sum()
        } else {
            everything
        };
        // Past the band's end only where min-p cuts there, or every token was searched.
        if let Some(keep) = cut(p, c, max, mass, holds_min_p || wide) {
            c.truncate(keep.max(1));
            return true;
        }
    }
    // The last band holds every token, and its cut always answers.
    true
}

/// Fills `c` with the finite logits at or above `floor` and their ids, in id order. Blocks
/// whose maximum is below it (most of a vocabulary) are skipped after one vectorized pass.
#[inline(always)]
fn gather(logits: &[f32], floor: f32, c: &mut Vec<(u32, f32)>) {
    // One register's worth: few tokens are near the best, so most blocks are skipped and the
    // scalar pass over a block that is not stays short.
    const BLOCK: usize = LANES;
    c.clear();
    for (b, block) in logits.chunks(BLOCK).enumerate() {
        if max_ignoring_nan(block) < floor {
            continue;
        }
        let first = b * BLOCK;
        for (i, &l) in block.iter().enumerate() {
            if l >= floor && l > f32::NEG_INFINITY {
                c.push(((first + i) as u32, l));
            }
        }
    }
}

/// Sorts the most likely of `c` (all of it, or a growing prefix) and returns how many of them
/// top-p and min-p keep, `mass` being the total probability mass they are fractions of. When
/// top-p's share of `mass` is more than `c` holds (every entry then sorted): all of `c` if
/// `past_the_end` (no token past it could stay), else `None`.
fn cut(
    p: &SamplingParams,
    c: &mut [(u32, f32)],
    max: f32,
    mass: f64,
    past_the_end: bool,
) -> Option<usize> {
    let top_p = p.top_p < 1.0;
    let mut sorted = if top_p { 64.min(c.len()) } else { c.len() };
    loop {
        if sorted < c.len() {
            c.select_nth_unstable_by(sorted - 1, by_logit_desc);
        }
        c[..sorted].sort_unstable_by(by_logit_desc);
        let mut keep = sorted;
        if top_p {
            let want = f64::from(p.top_p) * mass;
            let mut cumulative = 0f64;
            let reached = c[..sorted].iter().position(|&(_, l)| {
                cumulative += f64::from(weight(l, max, 1.0));
                cumulative >= want
            });
            match reached {
                Some(i) => keep = i + 1,
                None if sorted < c.len() => {
                    sorted = (sorted * 8).min(c.len());
                    continue;
                }
                // Top-p would keep tokens past `c`: all of `c`, where nothing past it stays.
                None if past_the_end => keep = c.len(),
                None => return None,
            }
        }
        if p.min_p > 0.0 {
            let above = c[..keep]
                .iter()
                .take_while(|&&(_, l)| weight(l, max, 1.0) >= p.min_p)
                .count();
            keep = keep.min(above.max(1));
        }
        return Some(keep);
    }
}

/// Draws a token from every logit's `e^((l − max)/T)`, in id order, with `u` uniform in
/// [0, 1): blocks of the weights are summed first, then the draw walks to its block and
/// within it. `weights` is scratch.
#[inline(always)]
fn draw_all(logits: &[f32], max: f32, inv_t: f32, u: f64, weights: &mut Vec<f32>) -> u32 {
    const BLOCK: usize = SUM_BLOCK;
    fill_weights(logits, max, inv_t, weights);
    // Block sums twice (the total, then the walk to the draw's block) rather than stored.
    let total: f64 = weights.chunks(BLOCK).map(lane_sum).sum();
    let mut target = u * total;
    let mut last = 0;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let sum = lane_sum(block);
        if sum > 0.0 {
            last = b;
        }
        if target >= sum {
            target -= sum;
            continue;
        }
        for (i, &w) in block.iter().enumerate() {
            let w = f64::from(w);
            if target < w {
                return (b * BLOCK + i) as u32;
            }
            target -= w;
        }
        // Rounding left the target at the block's end: its last token that has weight.
        return last_weighted(block, b * BLOCK);
    }
    // Rounding left the target past the end: the last token that has weight.
    let block = &weights[last * BLOCK..((last + 1) * BLOCK).min(weights.len())];
    last_weighted(block, last * BLOCK)
}

/// The id of the last entry of `block` (ids from `first`) with a nonzero weight.
fn last_weighted(block: &[f32], first: usize) -> u32 {
    let i = block.iter().rposition(|&w| w > 0.0).unwrap_or(0);
    (first + i) as u32
}

/// Index of the largest value (lowest index on ties); `None` for an empty slice.
pub fn argmax(values: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// Watches streamed text for stop strings. Text that might be the start of a stop string is
/// held back until it is decided, so a client never sees part of a stop string.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to do with the text seen so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStatus {
    /// Emit this text and keep generating.
    Continue(String),
    /// Emit this text (what came before the stop string) and stop.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: impl IntoIterator<Item = String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopStatus {
        self.pending.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let emit = self.pending[..at].to_owned();
            self.pending.clear();
            return StopStatus::Stopped(emit);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for stop in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let suffix = &self.pending[i..];
                if suffix.len() < stop.len() && stop.starts_with(suffix) {
                    hold = hold.max(suffix.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        StopStatus::Continue(emit)
    }

    /// Text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.0, 2.9]
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits()), 1);
        assert_eq!(argmax(&logits()), Some(1));
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            seed: Some(42),
            ..SamplingParams::creative()
        };
        let run = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        let other = SamplingParams {
            seed: Some(43),
            ..params.clone()
        };
        assert_ne!(run(&params), run(&other));
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_support() {
        let draws = |params: SamplingParams| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(7),
                temperature: 1.0,
                ..params
            });
            let mut seen: Vec<u32> = (0..2000).map(|_| s.sample(&logits())).collect();
            seen.sort_unstable();
            seen.dedup();
            seen
        };
        assert_eq!(
            draws(SamplingParams {
                top_k: 2,
                ..Default::default()
            }),
            [1, 5]
        );
        assert_eq!(
            draws(SamplingParams {
                top_k: 1,
                ..Default::default()
            }),
            [1]
        );
        // p(1) ≈ 0.36, p(5) ≈ 0.33, p(2) ≈ 0.22: top-p 0.6 needs ids 1 and 5.
        assert_eq!(
            draws(SamplingParams {
                top_p: 0.6,
                ..Default::default()
            }),
            [1, 5]
        );
        // min-p 0.5 keeps tokens at least half as likely as id 1: ids 1, 5, 2 (e^-0.5 ≈ 0.61).
        assert_eq!(
            draws(SamplingParams {
                min_p: 0.5,
                ..Default::default()
            }),
            [1, 2, 5]
        );
        assert_eq!(
            draws(SamplingParams::default().with_temperature(1.0)).len(),
            6
        );
    }

    impl SamplingParams {
        fn with_temperature(mut self, t: f32) -> Self {
            self.temperature = t;
            self
        }
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let count_top = |t: f32| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(1),
                temperature: t,
                ..Default::default()
            });
            (0..4000).filter(|_| s.sample(&logits()) == 1).count()
        };
        let cold = count_top(0.1);
        let warm = count_top(1.0);
        let hot = count_top(5.0);
        assert!(cold > warm && warm > hot, "{cold} {warm} {hot}");
        // At t=1, p(1) = e^3 / Σ e^l ≈ 0.36: allow a generous sampling margin.
        let expected = 4000.0 * 3f32.exp() / logits().iter().map(|l| l.exp()).sum::<f32>();
        assert!(
            (warm as f32 - expected).abs() < 150.0,
            "{warm} vs {expected}"
        );
    }

    #[test]
    fn penalties_follow_llama_cpp() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..Default::default()
        });
        s.accept_all(&[1, 1]);
        // id 1: 3.0 / 2 = 1.5 < 2.9 (id 5) → greedy now picks 5.
        assert_eq!(s.sample(&logits()), 5);
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.1,
            presence_penalty: 0.0,
            ..Default::default()
        });
        s.accept_all(&[1, 1]); // 3.0 - 0.2 = 2.8 < 2.9
        assert_eq!(s.sample(&logits()), 5);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.05,
            ..Default::default()
        });
        s.accept_all(&[1, 1]); // 3.0 - 0.05 = 2.95 > 2.9
        assert_eq!(s.sample(&logits()), 1);
        // Only the last `penalty_last_n` tokens count.
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            penalty_last_n: 1,
            ..Default::default()
        });
        s.accept_all(&[1, 4]);
        assert_eq!(s.sample(&logits()), 1);
    }

    /// Logits shaped like a model's (see `examples/sampler_bench`), over several of the draw's
    /// blocks, with a few masked (−∞) and NaN entries.
    fn vocabulary_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|i| {
                let (u, v) = (rng.next_f64() as f32, rng.next_f64() as f32);
                match i % 997 {
                    13 => f32::NEG_INFINITY,
                    14 => f32::NAN,
                    _ if u < 0.02 => 12.0 - 6.0 * v,
                    _ => 10.0 * v - 8.0,
                }
            })
            .collect()
    }

    /// What top-k, top-p and min-p keep, the way llama.cpp describes it: every finite
    /// candidate sorted, probabilities at temperature 1 over what top-k left.
    fn kept_by_sorting_everything(p: &SamplingParams, logits: &[f32]) -> Vec<u32> {
        let mut c: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(id, &l)| (id as u32, l))
            .collect();
        c.sort_unstable_by(by_logit_desc);
        if p.top_k > 0 {
            c.truncate(p.top_k);
        }
        let max = c[0].1;
        let weights: Vec<f64> = c.iter().map(|&(_, l)| f64::from(l - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = c.len();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            keep = weights
                .iter()
                .position(|w| {
                    cumulative += w / total;
                    cumulative >= f64::from(p.top_p)
                })
                .map_or(c.len(), |i| i + 1);
        }
        if p.min_p > 0.0 {
            let above = weights
                .iter()
                .take_while(|&&w| w >= f64::from(p.min_p))
                .count();
            keep = keep.min(above.max(1));
        }
        c.truncate(keep);
        c.iter().map(|&(id, _)| id).collect()
    }

    #[test]
    fn the_kept_tokens_are_those_of_sorting_every_token() {
        let mut compared = 0;
        for seed in 0..4 {
            let logits = vocabulary_logits(6000, seed);
            let max = max_ignoring_nan(&logits);
            for top_k in [0, 1, 40, 500, 10_000] {
                for top_p in [1.0, 0.95, 0.5, 0.05] {
                    // 0.01 and 0.001 put min-p's floor past the first band, 1 at the best.
                    for min_p in [0.0, 0.001, 0.01, 0.05, 0.5, 1.0] {
                        let p = SamplingParams {
                            temperature: 1.0,
                            top_k,
                            top_p,
                            min_p,
                            ..Default::default()
                        };
                        let mut c = Vec::new();
                        if !keep(&p, &logits, max, &mut c, &mut Vec::new()) {
                            assert!(top_k == 0 && top_p == 1.0 && min_p == 0.0);
                            continue;
                        }
                        let ids: Vec<u32> = c.iter().map(|&(id, _)| id).collect();
                        assert_eq!(
                            ids,
                            kept_by_sorting_everything(&p, &logits),
                            "seed {seed}, top_k {top_k}, top_p {top_p}, min_p {min_p}"
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 400);
    }

    #[test]
    fn top_p_reaches_below_the_first_band_when_the_tail_holds_its_mass() {
        // One likely token, ten less likely ones, and a long flat tail 17 below the best (below
        // `BANDS`' second) that holds 1.5% of the mass: top-p 0.99 needs some of the tail.
        let mut logits = vec![-17.0f32; 400_000];
        logits[7] = 0.0;
        logits[100..110].fill(-5.0);
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.99,
            ..Default::default()
        };
        let mut c = Vec::new();
        assert!(keep(&p, &logits, 0.0, &mut c, &mut Vec::new()));
        let ids: Vec<u32> = c.iter().map(|&(id, _)| id).collect();
        let want = kept_by_sorting_everything(&p, &logits);
        // The cut falls among equal tail logits, each worth 4·10⁻⁸ of the mass, so sums in
        // another order may move it by a few of them: the same order, within 0.1% in length.
        let common = ids.len().min(want.len());
        assert!(common > 11, "kept only {}", ids.len());
        assert!(ids[..common] == want[..common], "a different order");
        assert!(
            ids.len().abs_diff(want.len()) * 1000 <= want.len(),
            "kept {} where sorting everything keeps {}",
            ids.len(),
            want.len()
        );
    }

    #[test]
    fn a_draw_over_every_token_follows_the_probabilities() {
        // Four likely tokens in different blocks of the draw, the rest far less likely; two
        // entries masked.
        let n = 5000;
        let mut logits = vec![-4.0f32; n];
        for (id, l) in [(3, 2.0), (1500, 1.0), (2049, 1.5), (4999, 0.5)] {
            logits[id] = l;
        }
        logits[10] = f32::NEG_INFINITY;
        logits[11] = f32::NAN;
        let total: f64 = logits
            .iter()
            .filter(|l| l.is_finite())
            .map(|&l| f64::from(l).exp())
            .sum();
        let draws = 40_000;
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        });
        let mut counts = vec![0usize; n];
        for _ in 0..draws {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[10] + counts[11], 0, "a masked token was drawn");
        for id in [3, 1500, 2049, 4999] {
            let p = f64::from(logits[id]).exp() / total;
            let expected = p * draws as f64;
            let sigma = (draws as f64 * p * (1.0 - p)).sqrt();
            let got = counts[id] as f64;
            assert!(
                (got - expected).abs() < 5.0 * sigma,
                "id {id}: {got} draws, expected {expected:.0} ± {sigma:.0}"
            );
        }
        // The unlikely tail as a whole, too.
        let tail_p = (n - 6) as f64 * (-4f64).exp() / total;
        let tail: usize = counts.iter().sum::<usize>()
            - [3, 1500, 2049, 4999]
                .iter()
                .map(|&i| counts[i])
                .sum::<usize>();
        let expected = tail_p * draws as f64;
        let sigma = (draws as f64 * tail_p * (1.0 - tail_p)).sqrt();
        assert!(
            (tail as f64 - expected).abs() < 5.0 * sigma,
            "tail: {tail} draws, expected {expected:.0} ± {sigma:.0}"
        );
    }

    #[test]
    fn the_compiled_for_this_cpu_choice_is_the_plain_bodys() {
        // `kernels::run_vectorized` runs the body compiled for AVX2 where the CPU has it; called
        // directly, the body is compiled for the baseline. Same logits, seed and settings: the
        // same tokens.
        let settings = [
            SamplingParams::default(),
            SamplingParams::default().with_temperature(1.0),
            SamplingParams::creative(),
            SamplingParams {
                top_p: 0.9,
                ..SamplingParams::default().with_temperature(0.7)
            },
            SamplingParams {
                min_p: 0.01,
                ..SamplingParams::default().with_temperature(1.0)
            },
            SamplingParams {
                top_k: 40,
                min_p: 0.05,
                ..SamplingParams::default().with_temperature(1.0)
            },
        ];
        for (i, p) in settings.iter().enumerate() {
            let (mut rng_a, mut rng_b) = (Rng::new(i as u64), Rng::new(i as u64));
            let (mut c_a, mut c_b, mut w_a, mut w_b) = (vec![], vec![], vec![], vec![]);
            for seed in 0..20 {
                let logits = vocabulary_logits(5000, 100 + seed);
                let a = crate::kernels::run_vectorized(Choice {
                    p,
                    logits: &logits,
                    candidates: &mut c_a,
                    weights: &mut w_a,
                    rng: &mut rng_a,
                });
                let b = choose_token_body(p, &logits, &mut c_b, &mut w_b, &mut rng_b);
                assert_eq!(a, b, "setting {i}, logits {seed}");
            }
        }
    }

    #[test]
    fn greedy_takes_the_lowest_id_of_equal_maxima_and_skips_nan() {
        let mut logits = vocabulary_logits(3000, 9);
        logits[0] = f32::NAN;
        logits[2100] = 50.0;
        logits[2500] = 50.0;
        assert_eq!(greedy(&logits), 2100);
        assert_eq!(greedy(&[f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(greedy(&[]), 0);
        // Sampling with nothing finite to draw from gives 0 too, without a panic.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        });
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NAN]), 0);
    }

    #[test]
    fn infinite_logits_tiny_temperatures_and_min_p_past_one_choose_without_panicking() {
        let sample = |params: SamplingParams, logits: &[f32]| {
            Sampler::new(SamplingParams {
                seed: Some(5),
                ..params
            })
            .sample(logits)
        };
        let t1 = SamplingParams::default().with_temperature(1.0);
        // An infinite logit (a penalty can make one) is certain, whatever cuts are set.
        let with_inf = [0.0, f32::INFINITY, 1.0, f32::INFINITY];
        for params in [
            t1.clone(),
            SamplingParams::creative(),
            SamplingParams {
                top_k: 2,
                ..t1.clone()
            },
        ] {
            assert_eq!(sample(params, &with_inf), 1);
        }
        assert_eq!(sample(t1.clone(), &[f32::NEG_INFINITY, f32::INFINITY]), 1);
        // 1/T overflows: greedy, not a masked or least likely token.
        let tiny = SamplingParams::default().with_temperature(1e-40);
        assert_eq!(sample(tiny.clone(), &[f32::NEG_INFINITY, 5.0, 1.0]), 1);
        assert_eq!(
            sample(
                SamplingParams { top_k: 3, ..tiny },
                &[f32::NEG_INFINITY, 5.0, 1.0]
            ),
            1
        );
        // min-p above 1 keeps only the best token.
        let min_p = SamplingParams { min_p: 1.5, ..t1 };
        assert_eq!(sample(min_p, &[0.0, 1.0]), 1);
    }

    #[test]
    fn penalties_of_ids_past_the_vocabulary_are_ignored() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..Default::default()
        });
        s.accept_all(&[1, 1, 1_000_000]);
        assert_eq!(s.sample(&logits()), 5);
    }

    #[test]
    fn stop_strings_across_chunks() {
        let mut m = StopMatcher::new(["</s>".to_string(), "\n\nUser:".to_string()]);
        assert_eq!(m.push("Hello"), StopStatus::Continue("Hello".into()));
        assert_eq!(m.push(" world<"), StopStatus::Continue(" world".into()));
        assert_eq!(m.push("/"), StopStatus::Continue(String::new()));
        assert_eq!(m.push("s> tail"), StopStatus::Stopped("".into()));

        let mut m = StopMatcher::new(["\n\nUser:".to_string()]);
        assert_eq!(m.push("a\n"), StopStatus::Continue("a".into()));
        assert_eq!(m.push("\nUs"), StopStatus::Continue(String::new()));
        assert_eq!(m.push("e"), StopStatus::Continue(String::new()));
        assert_eq!(m.push("d it"), StopStatus::Continue("\n\nUsed it".into()));
        assert_eq!(m.push("x\n\nUser: hi"), StopStatus::Stopped("x".into()));

        let mut m = StopMatcher::new(["ab".to_string()]);
        assert_eq!(m.push("éa"), StopStatus::Continue("é".into()));
        assert_eq!(m.finish(), "a");
    }
}

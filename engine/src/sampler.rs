//! Choosing the next token from logits, and stopping generation.
//!
//! The chain follows llama.cpp's default order so that the same settings mean the same thing:
//! penalties → top-k → top-p → min-p → temperature → draw. A temperature of 0 (or below) is
//! greedy: the highest logit wins, ties going to the lowest id.
//!
//! Randomness comes from a seeded xoshiro256** generator owned by the sampler, so a request with
//! a seed is reproducible token for token whatever else the daemon is doing.

use std::collections::HashMap;

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
    /// Reused across calls so sampling allocates nothing per token.
    candidates: Vec<(u32, f32)>,
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
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let penalties = p.has_penalties().then(|| self.penalty_counts());
        let adjusted = |id: usize, logit: f32| -> f32 {
            let Some(counts) = &penalties else {
                return logit;
            };
            match counts.get(&(id as u32)) {
                None => logit,
                Some(&n) => {
                    let l = if logit > 0.0 {
                        logit / p.repeat_penalty
                    } else {
                        logit * p.repeat_penalty
                    };
                    l - n as f32 * p.frequency_penalty - p.presence_penalty
                }
            }
        };

        if p.temperature <= 0.0 {
            let mut best = (0u32, f32::NEG_INFINITY);
            for (id, &logit) in logits.iter().enumerate() {
                let l = adjusted(id, logit);
                if l > best.1 {
                    best = (id as u32, l);
                }
            }
            return best.0;
        }

        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(id, &l)| (id as u32, adjusted(id, l)))
                // −∞ is a token that must not be drawn (a grammar's mask): leaving it out also
                // keeps the draw's rounding from ever landing on it.
                .filter(|(_, l)| !l.is_nan() && *l > f32::NEG_INFINITY),
        );
        if c.is_empty() {
            return 0;
        }
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);

        // Probabilities at temperature 1 for top-p and min-p, as llama.cpp computes them.
        let max = c[0].1;
        let mut probs: Vec<f32> = c.iter().map(|&(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        let mut keep = c.len();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, q) in probs.iter().enumerate() {
                cumulative += q;
                if cumulative >= p.top_p {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            let above = probs.iter().take_while(|&&q| q >= floor).count();
            keep = keep.min(above.max(1));
        }
        c.truncate(keep);

        // Temperature, then a draw from the renormalised distribution.
        let inv_t = 1.0 / p.temperature;
        let weights: Vec<f64> = c
            .iter()
            .map(|&(_, l)| (((l - max) * inv_t) as f64).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut target = self.rng.next_f64() * total;
        for (&(id, _), w) in c.iter().zip(&weights) {
            if target < *w {
                return id;
            }
            target -= w;
        }
        c[c.len() - 1].0
    }

    fn penalty_counts(&self) -> HashMap<u32, u32> {
        let mut counts = HashMap::new();
        for &t in &self.recent {
            *counts.entry(t).or_insert(0) += 1;
        }
        counts
    }
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

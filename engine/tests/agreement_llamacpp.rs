//! The forward pass on the real models against llama.cpp's outputs, and (in exact-f32 mode)
//! against transformers float32 on the same dequantized weights, both recorded in
//! `engine/tests/fixtures/llamacpp/<model>.json` (made by `scripts/gen_llamacpp_refs.py` with
//! llama.cpp 0c1e57098 on the CPU, f16 KV cache; schema in that script).
//!
//! For every reference prompt:
//! - teacher forcing: the whole sequence (prompt + llama.cpp's greedy continuation) is scored
//!   and, at each position, our log-probability of the actual next token is compared with
//!   llama.cpp's; our top-1 token must be llama.cpp's wherever llama.cpp's top-1/top-2 logit
//!   gap exceeds 0.5;
//! - greedy decoding from the prompt must reproduce llama.cpp's continuation up to the first
//!   near-tie (top-1/top-2 gap below 0.2 in either reference: llama.cpp's decode or
//!   teacher-forced pass, or an exact-f32 pass of this engine over llama.cpp's tokens), after
//!   which either choice is legitimate.
//!
//! Why the numbers differ at all: llama.cpp rounds activations to 8 bits (Q8_0/Q8_1/Q8_K
//! blocks) before each quantized matmul, rounds queries to f16 for attention and evaluates
//! GELU through an f16 table; egpu's kernels also round activations to 8 bits but in their own
//! blocks and order. Each such rounding moves logits by ~1e-2 and log-probs by a few 1e-2 on
//! average; the top-1 token only moves where two candidates are within about that distance.

mod common;

use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model};
use egpu_engine::ops::log_softmax;
use serde_json::Value;

/// llama.cpp gaps above this must give the same top-1 token (brief: 0.5, about 10× the
/// typical logit difference between the two implementations).
const DECISIVE_GAP: f64 = 0.5;
/// Gaps below this are near-ties: greedy continuations may part there. The exact-f32 pass is
/// one of the references because both llama.cpp and egpu round activations to 8 bits, which
/// moves each one's gaps by up to ~0.25 (SmolLM2 "fibonacci", first token: exact 0.07,
/// llama.cpp 0.28 one way, egpu 0.21 the other).
const NEAR_TIE: f64 = 0.2;
// Log-prob tolerances. Measured over the five prompts of each model (~300 positions):
//
//                           8-bit-activation kernels          exact-f32 matmuls
//   SmolLM2 Q4_1            mean 0.055-0.056, max 0.74-0.92   mean 0.047, max 0.38
//   Gemma 3 270M Q4_K_M     mean 0.064-0.065, max 0.62-0.77   mean 0.059, max 0.73
//
// (The ranges are over code changes that move activations by ~1e-7, e.g. another exp: with
// 8-bit activations such a change flips roundings and reshuffles differences of ~0.1.)
// The mean is the number to watch (the shared reference notes expect ≈ 0.05 for an exact-f32
// engine on SmolLM2): 0.1 leaves room for kernel changes, while any structural error (a wrong
// norm, RoPE, mask or scale) costs whole nats on most positions. The largest differences sit
// at tokens the model finds very unlikely (log-prob −15 inside SmolLM2's chat template) or
// where Gemma's large activations magnify rounding (exact or 8-bit kernels alike; rounding
// queries to f16 as llama.cpp does changes nothing material), so each position is held to
// 0.75 + 5 % of the reference's |log-prob|.
const MEAN_LOGPROB_TOLERANCE: f64 = 0.1;
const LOGPROB_ABS_TOLERANCE: f64 = 0.75;
const LOGPROB_REL_TOLERANCE: f64 = 0.05;

// Exact against exact (our exact-f32 mode vs transformers float32), measured:
//   SmolLM2: |Δ log-prob| mean 0.00065, max 0.0127; Gemma 3: mean 0.00035, max 0.0044;
//   top-1 equal at every position with a gap above 0.05.
// What remains is our f16 KV cache (11-bit keys and values) and f32 summation order. Bounds
// at about 2.5× the measurements: a structural error costs orders of magnitude more.
const EXACT_LOGPROB_TOLERANCE: f64 = 0.03;
const EXACT_MEAN_LOGPROB_TOLERANCE: f64 = 0.002;
/// Logits move by ~1e-2 at most between the two exact implementations; larger gaps must give
/// the same top-1.
const EXACT_DECISIVE_GAP: f64 = 0.05;

/// Tokens scored per forward pass when teacher forcing (bounds the logits buffer: Gemma's
/// vocabulary is 262,144).
const SCORE_CHUNK: usize = 32;

struct Prompt {
    name: String,
    prompt_ids: Vec<u32>,
    continuation_ids: Vec<u32>,
    token_ids: Vec<u32>,
    generated_gap: Vec<f64>,
    next_token: Vec<Option<u32>>,
    logprob_next: Vec<Option<f64>>,
    top1: Vec<u32>,
    top1_minus_top2: Vec<f64>,
    /// Transformers in float32 on the dequantized weights (no activation rounding).
    exact_logprob_next: Vec<Option<f64>>,
    exact_argmax: Vec<u32>,
    exact_top1_minus_top2: Vec<f64>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn load_prompts(model_file: &str) -> Vec<Prompt> {
    let stem = model_file.trim_end_matches(".gguf");
    let path = common::fixture(&format!("llamacpp/{stem}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(json["schema"], "egpu-llamacpp-ref-v1");
    assert_eq!(json["model"]["file"], model_file);
    json["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| {
            let pos = &p["positions"];
            Prompt {
                name: p["name"].as_str().expect("name").to_owned(),
                prompt_ids: ids(&p["prompt_ids"]),
                continuation_ids: ids(&p["continuation_ids"]),
                token_ids: ids(&p["token_ids"]),
                generated_gap: floats(&p["generated_gap"]),
                next_token: pos["next_token"]
                    .as_array()
                    .expect("next_token")
                    .iter()
                    .map(|v| v.as_u64().map(|x| x as u32))
                    .collect(),
                logprob_next: pos["logprob_next"]
                    .as_array()
                    .expect("logprob_next")
                    .iter()
                    .map(Value::as_f64)
                    .collect(),
                top1: pos["top10"]
                    .as_array()
                    .expect("top10")
                    .iter()
                    .map(|t| t[0][0].as_u64().expect("top-1 id") as u32)
                    .collect(),
                top1_minus_top2: floats(&pos["top1_minus_top2"]),
                exact_logprob_next: p["exact_f32"]["logprob_next"]
                    .as_array()
                    .expect("exact_f32.logprob_next")
                    .iter()
                    .map(Value::as_f64)
                    .collect(),
                exact_argmax: ids(&p["exact_f32"]["argmax"]),
                exact_top1_minus_top2: floats(&p["exact_f32"]["top1_minus_top2"]),
            }
        })
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32
}

fn gap(v: &[f32]) -> f64 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    f64::from(a - b)
}

/// Per position: log-probability of the next token (none at the last), top-1, top-1/top-2 gap.
type Scored = Vec<(Option<f64>, u32, f64)>;

/// `tokens` teacher-forced through `model`.
fn teacher_forced(model: &Model, pool: &ThreadPool, tokens: &[u32]) -> Scored {
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(tokens.len()).unwrap();
    let mut out = Vec::with_capacity(tokens.len());
    for chunk in tokens.chunks(SCORE_CHUNK) {
        let logits = model
            .forward(
                pool,
                &mut scratch,
                &mut [BatchItem::append(&mut cache, chunk, LogitsWanted::All)],
            )
            .unwrap();
        for i in 0..chunk.len() {
            let row = logits.row(0, i).unwrap();
            let p = out.len();
            let logprob = tokens
                .get(p + 1)
                .map(|&next| log_softmax(row)[next as usize]);
            out.push((logprob, argmax(row), gap(row)));
        }
    }
    out
}

/// Greedy continuation of `prompt`, one token per decode step, with our gap at each step.
fn greedy(model: &Model, pool: &ThreadPool, prompt: &[u32], n: usize) -> Vec<(u32, f64)> {
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(prompt.len() + n).unwrap();
    let logits = model
        .forward(
            pool,
            &mut scratch,
            &mut [BatchItem::append(&mut cache, prompt, LogitsWanted::Last)],
        )
        .unwrap();
    let row = logits.last(0).unwrap();
    let mut out = vec![(argmax(row), gap(row))];
    while out.len() < n {
        let token = [out.last().unwrap().0];
        let logits = model
            .forward(
                pool,
                &mut scratch,
                &mut [BatchItem::append(&mut cache, &token, LogitsWanted::Last)],
            )
            .unwrap();
        let row = logits.last(0).unwrap();
        out.push((argmax(row), gap(row)));
    }
    out
}

/// Runs every check on one model, printing max and mean |Δ log-prob| over all positions.
fn check_model(model_file: &str) {
    let prompts = load_prompts(model_file);
    assert!(!prompts.is_empty());
    let model = Model::open(common::model_path(model_file)).unwrap();
    let mut exact = Model::open(common::model_path(model_file)).unwrap();
    exact.set_exact_matmuls(true);
    let pool = ThreadPool::new(2);
    let exact_rows: Vec<Scored> = prompts
        .iter()
        .map(|p| teacher_forced(&exact, &pool, &p.token_ids))
        .collect();
    check_exact_against_transformers(model_file, &prompts, &exact_rows);
    let (mut sum, mut count, mut worst) = (0f64, 0usize, 0f64);
    let (mut decisive, mut decisive_agree) = (0usize, 0usize);
    let mut failures = Vec::new();
    for (p, exact) in prompts.iter().zip(&exact_rows) {
        let ours = teacher_forced(&model, &pool, &p.token_ids);
        let (mut p_sum, mut p_count, mut p_worst) = (0f64, 0usize, 0f64);
        for (pos, &(logprob, top1, _)) in ours.iter().enumerate() {
            if let (Some(reference), Some(logprob), Some(_)) =
                (p.logprob_next[pos], logprob, p.next_token[pos])
            {
                let d = (logprob - reference).abs();
                if d > LOGPROB_ABS_TOLERANCE + LOGPROB_REL_TOLERANCE * reference.abs() {
                    failures.push(format!(
                        "{}: position {pos}: log-prob {logprob:.4}, llama.cpp {reference:.4}",
                        p.name
                    ));
                }
                if d > 0.5 {
                    println!(
                        "  {} position {pos}: log-prob {logprob:.4}, llama.cpp {reference:.4}",
                        p.name
                    );
                }
                p_sum += d;
                p_count += 1;
                p_worst = p_worst.max(d);
            }
            if p.top1_minus_top2[pos] > DECISIVE_GAP {
                decisive += 1;
                if top1 == p.top1[pos] {
                    decisive_agree += 1;
                } else {
                    failures.push(format!(
                        "{}: position {pos}: top-1 {top1}, llama.cpp {} (gap {})",
                        p.name, p.top1[pos], p.top1_minus_top2[pos]
                    ));
                }
            }
        }
        sum += p_sum;
        count += p_count;
        worst = worst.max(p_worst);

        let generated = greedy(&model, &pool, &p.prompt_ids, p.continuation_ids.len());
        let n_prompt = p.prompt_ids.len();
        let mut compared = 0;
        for (i, (&(token, _), &expected)) in generated.iter().zip(&p.continuation_ids).enumerate() {
            let forced_gap = p.top1_minus_top2[n_prompt - 1 + i];
            let f32_gap = exact[n_prompt - 1 + i].2;
            if p.generated_gap[i] < NEAR_TIE || forced_gap < NEAR_TIE || f32_gap < NEAR_TIE {
                break;
            }
            if token != expected {
                failures.push(format!(
                    "{}: greedy token {i} is {token}, llama.cpp {expected} (gaps: llama.cpp \
                     {}, teacher-forced {forced_gap}, exact f32 {:.4}, ours {:.4})",
                    p.name, p.generated_gap[i], f32_gap, generated[i].1
                ));
                break;
            }
            compared += 1;
        }
        let identical = generated
            .iter()
            .zip(&p.continuation_ids)
            .take_while(|(g, e)| g.0 == **e)
            .count();
        println!(
            "{model_file} {:>9}: |Δ log-prob| max {p_worst:.4} mean {:.4} over {p_count}; \
             greedy equal for {compared} tokens before the first near-tie ({identical}/{} \
             identical in all)",
            p.name,
            p_sum / p_count as f64,
            p.continuation_ids.len()
        );
    }
    let mean = sum / count as f64;
    println!(
        "{model_file}: |Δ log-prob| max {worst:.4} mean {mean:.4} over {count} positions; \
         top-1 equal at {decisive_agree}/{decisive} positions with llama.cpp gap > {DECISIVE_GAP}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        mean <= MEAN_LOGPROB_TOLERANCE,
        "mean |Δ log-prob| {mean} > {MEAN_LOGPROB_TOLERANCE}"
    );
}

/// This engine with exact-f32 matmuls against transformers in float32 on the same dequantized
/// weights: two exact implementations, so only the f16 KV cache (ours; transformers keeps f32)
/// and summation order separate them. Also an independent check of the Gemma 3 graph
/// (transformers' `Gemma3ForCausalLM`), where llama.cpp's activation rounding is too noisy to
/// catch small mistakes.
fn check_exact_against_transformers(model_file: &str, prompts: &[Prompt], exact: &[Scored]) {
    let (mut sum, mut count, mut worst) = (0f64, 0usize, 0f64);
    let (mut compared, mut agree) = (0usize, 0usize);
    let mut failures = Vec::new();
    for (p, ours) in prompts.iter().zip(exact) {
        for (pos, &(logprob, top1, _)) in ours.iter().enumerate() {
            if let (Some(ours), Some(reference)) = (logprob, p.exact_logprob_next[pos]) {
                let d = (ours - reference).abs();
                sum += d;
                count += 1;
                worst = worst.max(d);
                if d > EXACT_LOGPROB_TOLERANCE {
                    failures.push(format!(
                        "{}: position {pos}: log-prob {ours:.4}, transformers {reference:.4}",
                        p.name
                    ));
                }
            }
            if p.exact_top1_minus_top2[pos] > EXACT_DECISIVE_GAP {
                compared += 1;
                if top1 == p.exact_argmax[pos] {
                    agree += 1;
                } else {
                    failures.push(format!(
                        "{}: position {pos}: top-1 {top1}, transformers {} (gap {})",
                        p.name, p.exact_argmax[pos], p.exact_top1_minus_top2[pos]
                    ));
                }
            }
        }
    }
    println!(
        "{model_file} exact-f32 vs transformers f32: |Δ log-prob| max {worst:.5} mean {:.5} \
         over {count} positions; top-1 equal at {agree}/{compared} positions with gap > \
         {EXACT_DECISIVE_GAP}",
        sum / count as f64
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let mean = sum / count as f64;
    assert!(
        mean <= EXACT_MEAN_LOGPROB_TOLERANCE,
        "mean |Δ log-prob| {mean} > {EXACT_MEAN_LOGPROB_TOLERANCE}"
    );
}

#[test]
fn smollm2_q4_1_agrees_with_transformers_and_llamacpp() {
    check_model(common::SMOLLM2);
}

#[test]
fn gemma3_270m_q4_k_m_agrees_with_transformers_and_llamacpp() {
    check_model(common::GEMMA3);
}

//! Properties of the batched forward pass that the daemon relies on:
//! - a sequence's logits do not depend on what else is in the batch;
//! - a prompt fed in chunks gives the logits of one-shot prefill;
//! - rewinding a cache and feeding other tokens equals starting afresh;
//! - sliding-window layers see exactly the window;
//! - bad input is an error (naming what is wrong), never a panic, and leaves caches as they were.

mod common;

use std::sync::Arc;

use common::synthetic::{self, Rng, TinyGemma3};
use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model, ModelError};

/// Batch composition only changes how many activation rows each matmul sees. The kernels must
/// compute every (row, token) output by the same sequence of operations whatever that number
/// (they round activations to 8 bits per row, which is batch-independent); attention here is
/// per token by construction. 1e-3 on logits of magnitude ≲ 30 allows f32 round-off only.
/// Note that with 8-bit activations a kernel whose summation order depends on the number of
/// tokens does not stay at round-off: an output that moves by 1e-6 can flip an activation's
/// rounding in the next layer, and such flips add up to logit differences of ~0.5.
const ROUND_OFF: f32 = 1e-3;

fn tiny(name: &str) -> Model {
    Model::open(common::fixture(&format!("models/{name}.gguf"))).expect("load fixture model")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of every position of `tokens`: one-shot prefill of all but the last token, then a
/// one-token decode step; the sequence alone in its batch.
fn alone(model: &Model, pool: &ThreadPool, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(tokens.len()).unwrap();
    let n = tokens.len();
    let prefill = model
        .forward(
            pool,
            &mut scratch,
            &mut [BatchItem::append(
                &mut cache,
                &tokens[..n - 1],
                LogitsWanted::All,
            )],
        )
        .unwrap();
    let mut rows: Vec<Vec<f32>> = (0..n - 1)
        .map(|i| prefill.row(0, i).unwrap().to_vec())
        .collect();
    let decode = model
        .forward(
            pool,
            &mut scratch,
            &mut [BatchItem::append(
                &mut cache,
                &tokens[n - 1..],
                LogitsWanted::Last,
            )],
        )
        .unwrap();
    rows.push(decode.last(0).unwrap().to_vec());
    assert_eq!(cache.len(), n);
    rows
}

/// Three sequences of different lengths, advanced together in steps that mix prefill chunks
/// and decode tokens at different positions, compared with each sequence run alone.
fn check_batch_independence(model: &Model, seed: u64) -> f32 {
    let pool = ThreadPool::new(2);
    let n_vocab = model.config().n_vocab as u32;
    let mut rng = Rng::new(seed);
    let a = rng.tokens(9, n_vocab);
    let b = rng.tokens(6, n_vocab);
    let c = rng.tokens(13, n_vocab);
    let expected: Vec<Vec<Vec<f32>>> = [&a, &b, &c]
        .iter()
        .map(|s| alone(model, &pool, s))
        .collect();

    let mut scratch = model.new_scratch();
    let mut caches: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|s| model.new_kv_cache(s.len()).unwrap())
        .collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    let [ca, cb, cc] = &mut caches[..] else {
        unreachable!()
    };
    // Step 1: A's prompt (all but its last token), B's first two tokens.
    let l = model
        .forward(
            &pool,
            &mut scratch,
            &mut [
                BatchItem::append(ca, &a[..8], LogitsWanted::All),
                BatchItem::append(cb, &b[..2], LogitsWanted::All),
            ],
        )
        .unwrap();
    got[0].extend((0..8).map(|i| l.row(0, i).unwrap().to_vec()));
    got[1].extend((0..2).map(|i| l.row(1, i).unwrap().to_vec()));
    // Step 2: the rest of B's prompt, all of C's, and A's decode step.
    let l = model
        .forward(
            &pool,
            &mut scratch,
            &mut [
                BatchItem::append(cb, &b[2..5], LogitsWanted::All),
                BatchItem::append(cc, &c[..12], LogitsWanted::All),
                BatchItem::append(ca, &a[8..], LogitsWanted::Last),
            ],
        )
        .unwrap();
    got[1].extend((0..3).map(|i| l.row(0, i).unwrap().to_vec()));
    got[2].extend((0..12).map(|i| l.row(1, i).unwrap().to_vec()));
    got[0].push(l.last(2).unwrap().to_vec());
    assert_eq!(l.n_rows(2), 1);
    // Step 3: decode steps of C and B.
    let l = model
        .forward(
            &pool,
            &mut scratch,
            &mut [
                BatchItem::append(cc, &c[12..], LogitsWanted::Last),
                BatchItem::append(cb, &b[5..], LogitsWanted::Last),
            ],
        )
        .unwrap();
    got[2].push(l.last(0).unwrap().to_vec());
    got[1].push(l.last(1).unwrap().to_vec());

    let mut worst = 0f32;
    for (seq, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g.len(), e.len(), "sequence {seq}");
        for (pos, (gr, er)) in g.iter().zip(e).enumerate() {
            let d = max_abs_diff(gr, er);
            assert!(
                d <= ROUND_OFF,
                "sequence {seq} position {pos}: batched differs from alone by {d}"
            );
            worst = worst.max(d);
        }
    }
    assert_eq!(ca.len(), a.len());
    assert_eq!(cb.len(), b.len());
    assert_eq!(cc.len(), c.len());
    worst
}

/// One-shot prefill vs the same prompt in chunks of 5, 1 and 7 tokens.
fn check_chunked_prefill(model: &Model, seed: u64) -> f32 {
    let pool = ThreadPool::new(2);
    let mut scratch = model.new_scratch();
    let tokens = Rng::new(seed).tokens(13, model.config().n_vocab as u32);
    let mut cache = model.new_kv_cache(16).unwrap();
    let one_shot = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(&mut cache, &tokens, LogitsWanted::All)],
        )
        .unwrap();
    let mut cache = model.new_kv_cache(16).unwrap();
    let mut rows = Vec::new();
    for chunk in [&tokens[..5], &tokens[5..6], &tokens[6..]] {
        let l = model
            .forward(
                &pool,
                &mut scratch,
                &mut [BatchItem::append(&mut cache, chunk, LogitsWanted::All)],
            )
            .unwrap();
        rows.extend((0..chunk.len()).map(|i| l.row(0, i).unwrap().to_vec()));
    }
    let mut worst = 0f32;
    for (pos, row) in rows.iter().enumerate() {
        let d = max_abs_diff(row, one_shot.row(0, pos).unwrap());
        assert!(d <= ROUND_OFF, "position {pos}: chunked differs by {d}");
        worst = worst.max(d);
    }
    worst
}

#[test]
fn batching_and_chunking_on_every_tiny_architecture() {
    for name in [
        "tiny-gpt2",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-llama31",
        "tiny-llama31-q8_0",
    ] {
        let model = tiny(name);
        let batch = check_batch_independence(&model, 7);
        let chunked = check_chunked_prefill(&model, 8);
        println!("{name}: batched vs alone {batch:.1e}, chunked vs one-shot {chunked:.1e}");
    }
    let gemma = Model::load(Arc::new(TinyGemma3::default().file(3))).unwrap();
    let batch = check_batch_independence(&gemma, 7);
    let chunked = check_chunked_prefill(&gemma, 8);
    println!("tiny gemma3: batched vs alone {batch:.1e}, chunked vs one-shot {chunked:.1e}");
}

#[test]
fn batching_and_chunking_on_smollm2() {
    let model = Model::open(common::model_path(common::SMOLLM2)).unwrap();
    let batch = check_batch_independence(&model, 11);
    let chunked = check_chunked_prefill(&model, 12);
    println!("SmolLM2: batched vs alone {batch:.1e}, chunked vs one-shot {chunked:.1e}");
}

/// The same with exact-f32 matmuls, whose every output is one fixed sequence of operations
/// whatever the number of tokens: this isolates the model code (caches, attention, slots)
/// from the kernels, so a failure of the test above alone points at the kernels.
#[test]
fn batching_and_chunking_on_smollm2_with_exact_matmuls() {
    let mut model = Model::open(common::model_path(common::SMOLLM2)).unwrap();
    model.set_exact_matmuls(true);
    let batch = check_batch_independence(&model, 11);
    let chunked = check_chunked_prefill(&model, 12);
    assert_eq!(
        (batch, chunked),
        (0.0, 0.0),
        "exact matmuls are bit-for-bit batch-invariant"
    );
}

#[test]
fn batching_and_chunking_on_gemma3() {
    let model = Model::open(common::model_path(common::GEMMA3)).unwrap();
    let batch = check_batch_independence(&model, 13);
    let chunked = check_chunked_prefill(&model, 14);
    println!("Gemma 3: batched vs alone {batch:.1e}, chunked vs one-shot {chunked:.1e}");
}

/// Sequences longer than attention's query tiles (16) and key blocks (64), with a sliding
/// window that does not align with either: chunked or batched, each position's logits are
/// those of one-shot prefill.
#[test]
fn long_sequences_across_tiles_and_key_blocks() {
    let llama = tiny("tiny-llama31");
    let gemma = Model::load(Arc::new(
        TinyGemma3 {
            n_layer: 6,
            sliding_window: 70,
            ..TinyGemma3::default()
        }
        .file(21),
    ))
    .unwrap();
    let pool = ThreadPool::new(2);
    for model in [&llama, &gemma] {
        let mut scratch = model.new_scratch();
        let mut rng = Rng::new(17);
        let n_vocab = model.config().n_vocab as u32;
        let long = rng.tokens(150, n_vocab);
        let short = rng.tokens(40, n_vocab);

        let mut cache = model.new_kv_cache(150).unwrap();
        let one_shot = model
            .forward(
                &pool,
                &mut scratch,
                &mut [BatchItem::append(&mut cache, &long, LogitsWanted::All)],
            )
            .unwrap();

        let mut cache = model.new_kv_cache(150).unwrap();
        let mut other = model.new_kv_cache(40).unwrap();
        let mut rows = Vec::new();
        for (k, (a, b)) in [
            (0..37, 0..20),
            (37..38, 20..40),
            (38..118, 0..0),
            (118..150, 0..0),
        ]
        .into_iter()
        .enumerate()
        {
            let mut items = vec![BatchItem::append(
                &mut cache,
                &long[a.clone()],
                LogitsWanted::All,
            )];
            if k < 2 {
                items.insert(
                    0,
                    BatchItem::append(&mut other, &short[b], LogitsWanted::All),
                );
            }
            let l = model.forward(&pool, &mut scratch, &mut items).unwrap();
            let item = items.len() - 1;
            rows.extend((0..a.len()).map(|i| l.row(item, i).unwrap().to_vec()));
        }
        for (pos, row) in rows.iter().enumerate() {
            let d = max_abs_diff(row, one_shot.row(0, pos).unwrap());
            assert!(d <= ROUND_OFF, "position {pos} differs by {d}");
        }
    }
}

#[test]
fn rewinding_a_cache_equals_starting_afresh() {
    let model = tiny("tiny-qwen2");
    let pool = ThreadPool::new(2);
    let mut scratch = model.new_scratch();
    let mut rng = Rng::new(5);
    let first = rng.tokens(10, model.config().n_vocab as u32);
    let other = rng.tokens(4, model.config().n_vocab as u32);

    let mut cache = model.new_kv_cache(16).unwrap();
    model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(&mut cache, &first, LogitsWanted::None)],
        )
        .unwrap();
    let rewound = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::new(&mut cache, &other, 6, LogitsWanted::All)],
        )
        .unwrap();
    assert_eq!(cache.len(), 10);

    let mut fresh_tokens = first[..6].to_vec();
    fresh_tokens.extend_from_slice(&other);
    let mut fresh_cache = model.new_kv_cache(16).unwrap();
    let fresh = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(
                &mut fresh_cache,
                &fresh_tokens,
                LogitsWanted::All,
            )],
        )
        .unwrap();
    for i in 0..other.len() {
        let d = max_abs_diff(rewound.row(0, i).unwrap(), fresh.row(0, 6 + i).unwrap());
        assert!(d <= ROUND_OFF, "row {i} differs by {d}");
    }
}

/// Another sequence's cache holding the same first tokens can stand in for prefilling them
/// (egpud copies a shared prefix, e.g. a system prompt, into a new sequence's slot): the tokens
/// after it get the bits a fresh prefill of the whole input gives. The prefix crosses a key
/// block and was written by a chunk and a decode step; the copy lands in a cache of another
/// capacity.
#[test]
fn a_prefix_copied_from_another_cache_equals_prefilling_it() {
    let model = tiny("tiny-qwen2");
    let pool = ThreadPool::new(2);
    let mut scratch = model.new_scratch();
    let mut rng = Rng::new(11);
    let n_vocab = model.config().n_vocab as u32;
    let shared = rng.tokens(70, n_vocab);
    let (tail_a, tail_b) = (rng.tokens(9, n_vocab), rng.tokens(7, n_vocab));
    let mut run = |cache: &mut egpu_engine::models::decoder::KvCache, tokens: &[u32]| {
        model
            .forward(
                &pool,
                &mut scratch,
                &mut [BatchItem::append(cache, tokens, LogitsWanted::All)],
            )
            .unwrap()
    };

    let mut donor = model.new_kv_cache(100).unwrap();
    run(&mut donor, &shared[..69]);
    run(&mut donor, &shared[69..]);
    run(&mut donor, &tail_a);

    let mut copied = model.new_kv_cache(90).unwrap();
    run(&mut copied, &tail_a); // whatever it held is overwritten
    copied.copy_prefix_from(&donor, shared.len()).unwrap();
    assert_eq!(copied.len(), shared.len());
    let from_copy = run(&mut copied, &tail_b);

    let mut whole = shared.clone();
    whole.extend_from_slice(&tail_b);
    let mut fresh_cache = model.new_kv_cache(whole.len()).unwrap();
    let fresh = run(&mut fresh_cache, &whole);
    for i in 0..tail_b.len() {
        let (a, b) = (
            from_copy.row(0, i).unwrap(),
            fresh.row(0, shared.len() + i).unwrap(),
        );
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "row {i} differs from a fresh prefill by up to {}",
            max_abs_diff(a, b)
        );
    }

    // More than the donor holds, more than fits, or another model's cache: an error, and the
    // cache keeps what it held.
    let before = copied.len();
    assert!(copied.copy_prefix_from(&donor, donor.len() + 1).is_err());
    let mut small = model.new_kv_cache(8).unwrap();
    assert!(small.copy_prefix_from(&donor, 9).is_err());
    let other = tiny("tiny-gpt2");
    let foreign = other.new_kv_cache(100).unwrap();
    assert!(copied.copy_prefix_from(&foreign, 0).is_err());
    assert_eq!((copied.len(), small.len()), (before, 0));
}

/// In a Gemma 3 of five layers, all sliding-window layers (window 3), position p sees tokens
/// back to p − 5·(3 − 1) and no further: changing token 0 must leave logits from position 11
/// on exactly unchanged and must change them at position 1. With a window as long as the
/// sequence, token 0 reaches every position.
#[test]
fn sliding_window_limits_what_a_position_sees() {
    let shape = TinyGemma3::default();
    assert_eq!((shape.n_layer, shape.sliding_window), (5, 3));
    let model = Model::load(Arc::new(shape.file(9))).unwrap();
    assert!(model.config().swa_layers.iter().all(|&swa| swa));
    let pool = ThreadPool::new(2);
    let mut scratch = model.new_scratch();
    let tokens = Rng::new(4).tokens(16, shape.n_vocab as u32);
    let mut changed = tokens.clone();
    changed[0] = (tokens[0] + 1) % shape.n_vocab as u32;

    let mut run = |model: &Model, tokens: &[u32]| {
        let mut cache = model.new_kv_cache(16).unwrap();
        let l = model
            .forward(
                &pool,
                &mut scratch,
                &mut [BatchItem::append(&mut cache, tokens, LogitsWanted::All)],
            )
            .unwrap();
        (0..16)
            .map(|i| l.row(0, i).unwrap().to_vec())
            .collect::<Vec<_>>()
    };
    let base = run(&model, &tokens);
    let other = run(&model, &changed);
    assert_ne!(base[1], other[1], "token 0 must reach position 1");
    for pos in 11..16 {
        assert_eq!(base[pos], other[pos], "token 0 leaked into position {pos}");
    }

    let wide = TinyGemma3 {
        sliding_window: 16,
        ..TinyGemma3::default()
    };
    let wide_model = Model::load(Arc::new(wide.file(9))).unwrap();
    let base = run(&wide_model, &tokens);
    let other = run(&wide_model, &changed);
    assert_ne!(
        base[15], other[15],
        "a full window must reach the last position"
    );
}

#[test]
fn bad_batches_are_errors_and_leave_caches_alone() {
    let model = tiny("tiny-llama31");
    let pool = ThreadPool::new(1);
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(8).unwrap();
    model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(
                &mut cache,
                &[1, 2, 3],
                LogitsWanted::None,
            )],
        )
        .unwrap();
    assert_eq!(cache.len(), 3);

    let mut other_cache = model.new_kv_cache(8).unwrap();
    let too_long = [5u32; 6];
    let err = model
        .forward(
            &pool,
            &mut scratch,
            &mut [
                BatchItem::append(&mut other_cache, &[1], LogitsWanted::Last),
                BatchItem::append(&mut cache, &too_long, LogitsWanted::Last),
            ],
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextOverflow {
                needed: 9,
                capacity: 8
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("context overflow"));
    assert_eq!((cache.len(), other_cache.len()), (3, 0));

    let n_vocab = model.config().n_vocab as u32;
    let err = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(
                &mut cache,
                &[n_vocab],
                LogitsWanted::Last,
            )],
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidToken { token, .. } if token == n_vocab));

    let err = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::new(&mut cache, &[1], 4, LogitsWanted::Last)],
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidBatch(_)), "{err}");
    let err = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(&mut cache, &[], LogitsWanted::Last)],
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidBatch(_)), "{err}");
    assert!(matches!(
        model.forward(&pool, &mut scratch, &mut []),
        Err(ModelError::InvalidBatch(_))
    ));

    let qwen3 = tiny("tiny-qwen3");
    let mut foreign = qwen3.new_kv_cache(8).unwrap();
    let err = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(&mut foreign, &[1], LogitsWanted::Last)],
        )
        .unwrap_err();
    assert!(err.to_string().contains("another shape"), "{err}");
    assert_eq!(cache.len(), 3);
    assert!(model.new_kv_cache(0).is_err());
    assert!(matches!(
        model.new_kv_cache(usize::MAX / 2),
        Err(ModelError::CacheAllocation { .. })
    ));
}

/// The daemon shares one model between threads and moves caches and scratch between them.
#[test]
fn model_is_shareable_and_per_sequence_state_movable() {
    fn shareable<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    shareable::<Model>();
    movable::<egpu_engine::models::decoder::KvCache>();
    movable::<egpu_engine::models::decoder::Scratch>();
    movable::<egpu_engine::models::decoder::Logits>();
}

#[test]
fn unsupported_architecture_names_the_supported_ones() {
    let err = Model::load(Arc::new(synthetic::with_architecture("mamba"))).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ModelError::UnsupportedArchitecture { .. }));
    for arch in ["\"mamba\"", "llama", "qwen2", "qwen3", "gemma3", "gpt2"] {
        assert!(message.contains(arch), "{message}");
    }
}

#[test]
fn missing_and_unreadable_tensors_are_named() {
    let err = Model::load(Arc::new(synthetic::gemma3_without_tensor(
        "blk.1.ffn_up.weight",
    )))
    .unwrap_err();
    assert!(matches!(&err, ModelError::MissingTensor(name) if name == "blk.1.ffn_up.weight"));
    assert!(err.to_string().contains("blk.1.ffn_up.weight"));

    let err = Model::load(Arc::new(synthetic::gemma3_without_tensor(
        "blk.0.post_ffw_norm.weight",
    )))
    .unwrap_err();
    assert!(
        err.to_string().contains("blk.0.post_ffw_norm.weight"),
        "{err}"
    );

    let err = Model::load(Arc::new(synthetic::gemma3_with_unreadable_tensor(
        "blk.2.attn_k.weight",
    )))
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("blk.2.attn_k.weight") && message.contains("I32"),
        "{message}"
    );
}

//! Resident memory of a running model: the file mapping, the KV cache and small scratch
//! buffers, nothing else. This test is alone in its binary so that no other test's
//! allocations are counted.

mod common;

use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model};

/// `VmHWM` (peak resident set) of this process, in bytes; Linux only.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// SmolLM2 with a 2048-token cache, after a chunked prefill and decode steps: the peak
/// resident set stays within file size + KV cache + 20 MB (the budget for code, the runtime,
/// activations and logits).
#[test]
fn smollm2_at_2048_context_fits_file_plus_cache_plus_20mb() {
    let Some(before) = peak_resident_bytes() else {
        eprintln!("no /proc/self/status: resident memory cannot be measured here");
        return;
    };
    let model = Model::open(common::model_path(common::SMOLLM2)).unwrap();
    let file_bytes = model.file().file_bytes();
    let pool = ThreadPool::new(2);
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(2048).unwrap();
    let kv_bytes = cache.bytes() as u64;
    assert_eq!(
        kv_bytes,
        2048 * model.config().kv_bytes_per_token() as u64,
        "the cache is f16 for 2048 positions"
    );

    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + i * 7).collect();
    for (i, chunk) in prompt.chunks(64).enumerate() {
        let wanted = if i == 1 {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        model
            .forward(
                &pool,
                &mut scratch,
                &mut [BatchItem::append(&mut cache, chunk, wanted)],
            )
            .unwrap();
    }
    for step in 0..8u32 {
        let token = [300 + step];
        let logits = model
            .forward(
                &pool,
                &mut scratch,
                &mut [BatchItem::append(&mut cache, &token, LogitsWanted::Last)],
            )
            .unwrap();
        assert_eq!(logits.n_rows(0), 1);
    }
    assert_eq!(cache.len(), 136);
    // Activations for 64-token chunks: 64 × (3·576 + 576 + 2·192 + 576 + 2·1536) f32 ≈ 1.6 MB.
    let scratch_bytes = scratch.bytes();
    assert!(
        scratch_bytes < 3 * 1024 * 1024,
        "scratch holds {scratch_bytes} bytes"
    );

    let peak = peak_resident_bytes().unwrap();
    let budget = file_bytes + kv_bytes + 20 * 1024 * 1024;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "peak resident {:.1} MiB (before loading {:.1} MiB, scratch {:.2} MiB); file {:.1} MiB \
         + KV cache {:.1} MiB + 20 MiB = {:.1} MiB",
        mib(peak),
        mib(before),
        mib(scratch_bytes as u64),
        mib(file_bytes),
        mib(kv_bytes),
        mib(budget)
    );
    assert!(
        peak <= budget,
        "peak resident {} bytes exceeds {} bytes",
        peak,
        budget
    );
    // Stricter: the cache reserves its 2048 positions but only the pages of positions written
    // become resident, so the 20 MB must also cover everything else against the cache
    // actually used. (The cache is block-major in a huge-page arena: what is resident beyond
    // the positions written is the rest of their 64-position block and of its 2 MiB page, a
    // few MiB at most, which this slack and the 20 MB absorb.)
    let cfg = model.config();
    let used_kv =
        (cache.len() * cfg.kv_bytes_per_token() + cfg.n_layer * cfg.n_head_kv * 2 * 4096) as u64;
    assert!(
        peak <= file_bytes + used_kv + 20 * 1024 * 1024,
        "peak resident {:.1} MiB: more than 20 MiB beyond the file and the {:.1} MiB of cache in use",
        mib(peak),
        mib(used_kv)
    );
}

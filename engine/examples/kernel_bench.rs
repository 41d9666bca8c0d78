//! Micro-benchmark of the matmul kernels on real model weights.
//!
//! ```text
//! cargo run -p egpu-engine --release --example kernel_bench -- [MODEL.gguf] [--threads N] [--quick] [--path NAME]
//!     [--matvec-only | --matmat-only] [--interleaved]
//! ```
//!
//! `--interleaved` runs the matrices in the interleaved layout that models use for decode on
//! AVX2 machines (`ArenaWeights`), where their type has one; without it, in GGUF's.
//!
//! Reports, for each available kernel path and the exact-f32 reference:
//! - mat-vec (1 token) over every layer's ffn matrices in turn, as weight GB/s (the matrices
//!   together exceed the caches, so this is streaming from memory);
//! - mat-mat with 512 tokens on one ffn matrix, as GFLOP/s (2 flops per multiply-add);
//! - a decode step's worth of matmuls (every 2-D weight of the model once, mat-vec), as an
//!   upper bound on decode tokens/s from the matmuls alone.
//!
//! Timings on a shared machine are noisy: compare paths within one run.

use std::time::Instant;

use egpu_engine::gguf::GgufFile;
use egpu_engine::kernels::{
    matmul_reference, matmul_with_path, ArenaWeights, KernelPath, ThreadPool, WeightMatrix,
};
use egpu_engine::quant::GgmlType;

/// Nanoseconds this process's threads have run on a CPU (Linux), to tell kernel efficiency
/// from time lost to other processes on a shared machine.
fn cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Wall seconds and CPU seconds of `f`.
fn timed(f: impl FnOnce()) -> (f64, f64) {
    let (cpu0, start) = (cpu_ns(), Instant::now());
    f();
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu0, cpu_ns()) {
        (Some(a), Some(b)) => (b - a) as f64 * 1e-9,
        _ => f64::NAN,
    };
    (wall, cpu)
}

fn best(samples: impl Iterator<Item = (f64, f64)>) -> (f64, f64) {
    samples.fold((f64::MAX, f64::MAX), |(w, c), (w2, c2)| {
        (w.min(w2), c.min(c2))
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut model = None;
    let mut threads = 2;
    let mut quick = false;
    let mut only: Option<String> = None;
    let (mut matvec, mut matmat) = (true, true);
    let mut interleaved = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threads" => threads = args.next().ok_or("--threads needs a value")?.parse()?,
            "--quick" => quick = true,
            "--matvec-only" => matmat = false,
            "--matmat-only" => matvec = false,
            "--interleaved" => interleaved = true,
            "--path" => only = Some(args.next().ok_or("--path needs a value")?),
            _ => model = Some(arg),
        }
    }
    let model = model.unwrap_or_else(|| {
        let dir = std::env::var("EGPU_MODELS").unwrap_or_else(|_| "models".into());
        format!("{dir}/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let file = GgufFile::open(&model)?;
    let pool = ThreadPool::new(threads);
    println!(
        "model {model}, {threads} threads, paths {:?}",
        KernelPath::available()
    );

    let matrices = |filter: &dyn Fn(&str) -> bool| -> Vec<(String, WeightMatrix)> {
        file.tensors()
            .iter()
            .filter(|t| t.dims.len() == 2 && filter(&t.name))
            .filter_map(|t| Some((t.name.clone(), WeightMatrix::from_tensor(&file, t).ok()?)))
            .filter(|(_, w)| egpu_engine::kernels::is_supported(w.ty))
            .collect()
    };
    let ffn = matrices(&|n| n.contains("ffn_"));
    let all = matrices(&|n| n.starts_with("blk.") || n == "output.weight");
    let all = if all.iter().any(|(n, _)| n == "output.weight") {
        all
    } else {
        // Tied embeddings: the output projection is token_embd.
        let mut all = all;
        all.extend(matrices(&|n| n == "token_embd.weight"));
        all
    };
    // The interleaved copies, where the type has that layout, replace the mapped matrices.
    let pack = |mats: &[(String, WeightMatrix)]| -> Vec<Option<ArenaWeights>> {
        mats.iter()
            .map(|(_, w)| {
                interleaved
                    .then(|| ArenaWeights::interleaved(w, |_| {}))
                    .flatten()
            })
            .collect()
    };
    let (ffn_packed, all_packed) = (pack(&ffn), pack(&all));
    fn swap<'a>(
        mats: Vec<(String, WeightMatrix<'a>)>,
        packed: &'a [Option<ArenaWeights>],
    ) -> Vec<(String, WeightMatrix<'a>)> {
        mats.into_iter()
            .zip(packed)
            .map(|((name, w), p)| (name, p.as_ref().map_or(w, |p| p.matrix())))
            .collect()
    }
    let ffn = swap(ffn, &ffn_packed);
    let all = swap(all, &all_packed);
    let max_cols = all.iter().map(|(_, w)| w.cols).max().unwrap_or(0);
    let max_rows = all.iter().map(|(_, w)| w.rows).max().unwrap_or(0);
    let x: Vec<f32> = (0..512 * max_cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
        .collect();
    let mut y = vec![0f32; 512 * max_rows];

    type Run<'a> = dyn Fn(&WeightMatrix, &[f32], usize, &mut [f32]) + 'a;
    let mut runners: Vec<(String, Box<Run>)> = KernelPath::available()
        .into_iter()
        .filter(|p| *p != KernelPath::Scalar || !quick)
        .filter(|p| only.as_deref().is_none_or(|o| o == p.name()))
        .map(|p| {
            let pool = &pool;
            let f: Box<Run> = Box::new(move |w, x, n, y| {
                matmul_with_path(pool, w, x, n, y, p).expect("matmul");
            });
            (p.name().to_string(), f)
        })
        .collect();
    if !quick && only.as_deref().is_none_or(|o| o == "reference") {
        let pool = &pool;
        runners.push((
            "reference".into(),
            Box::new(move |w, x, n, y| matmul_reference(pool, w, x, n, y).expect("matmul")),
        ));
    }

    let ffn_bytes: usize = ffn.iter().map(|(_, w)| w.data.len()).sum();
    let all_bytes: usize = all.iter().map(|(_, w)| w.data.len()).sum();
    let types: std::collections::BTreeSet<String> =
        ffn.iter().map(|(_, w)| w.ty.to_string()).collect();
    println!(
        "mat-vec over {} ffn matrices ({:.1} MB, {types:?}); decode step = {} matrices ({:.1} MB)",
        ffn.len(),
        ffn_bytes as f64 / 1e6,
        all.len(),
        all_bytes as f64 / 1e6
    );
    if matvec {
        // Pool hand-off cost: empty jobs, one part per thread and four.
        for parts in [threads, 4 * threads] {
            let n = 20_000;
            let (wall, _) = timed(|| {
                for _ in 0..n {
                    pool.run_parts(parts, &|_, _| {});
                }
            });
            println!(
                "  dispatch: {:5.2} µs per empty job of {parts} parts",
                wall / n as f64 * 1e6
            );
        }
        // The ceiling: just reading the same bytes (summed as u64s, which the compiler
        // vectorizes), on the same threads.
        let read = || {
            timed(|| {
                let parts: Vec<u64> = (0..threads)
                    .map(|_| std::sync::atomic::AtomicU64::new(0))
                    .map(|a| a.into_inner())
                    .collect();
                let sums: Vec<std::sync::atomic::AtomicU64> = parts
                    .into_iter()
                    .map(std::sync::atomic::AtomicU64::new)
                    .collect();
                for (_, w) in &ffn {
                    pool.run(&|i, n| {
                        let bytes = w.data.len() / 8 * 8;
                        let (a, b) = (bytes / 8 * i / n * 8, bytes / 8 * (i + 1) / n * 8);
                        let s = w.data[a..b].chunks_exact(8).fold(0u64, |s, c| {
                            s.wrapping_add(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        });
                        sums[i].fetch_add(s, std::sync::atomic::Ordering::Relaxed);
                    });
                }
                std::hint::black_box(&sums);
            })
        };
        read();
        let (wall, cpu) = best((0..20).map(|_| read()));
        println!(
            "  raw read: {:6.2} GB/s ({:7.3} ms/pass, {:4.2} CPUs busy)",
            ffn_bytes as f64 / wall / 1e9,
            wall * 1e3,
            cpu / wall
        );
    }
    for (name, run) in runners.iter().filter(|_| matvec) {
        let slow = name == "reference" || name == "scalar";
        let reps = if slow { 1 } else { 20 };
        // Warm-up, then best of `reps` passes over all ffn matrices.
        let pass = |mats: &[(String, WeightMatrix)], y: &mut [f32]| {
            timed(|| {
                for (_, w) in mats {
                    run(w, &x[..w.cols], 1, &mut y[..w.rows]);
                }
            })
        };
        pass(&ffn, &mut y);
        let (wall, cpu) = best((0..reps).map(|_| pass(&ffn, &mut y)));
        let (step, _) = best((0..reps.min(5)).map(|_| pass(&all, &mut y)));
        // The same first ffn matrix over and over: it stays in L2, so this is the kernel's
        // compute ceiling rather than memory's.
        let hot = &ffn[..1];
        let (hot_wall, _) = best((0..reps * 10).map(|_| pass(hot, &mut y)));
        let hot_bytes = hot[0].1.data.len() as f64;
        println!(
            "  {name:>9}: mat-vec {:6.2} GB/s ({:7.3} ms/pass, {:4.2} CPUs busy), \
             cache-hot {:6.2} GB/s | decode-step matmuls {:7.3} ms = {:6.1} tok/s",
            ffn_bytes as f64 / wall / 1e9,
            wall * 1e3,
            cpu / wall,
            hot_bytes / hot_wall / 1e9,
            step * 1e3,
            1.0 / step
        );
    }

    // Small batches (several sequences decoding together): every ffn matrix, n tokens.
    for (name, run) in runners
        .iter()
        .filter(|(n, _)| matvec && n != "reference" && n != "scalar")
    {
        let mut line = format!("  {name:>9}: batched decode over the ffn matrices:");
        for n in [1usize, 2, 3, 4, 8, 16] {
            let pass = |y: &mut [f32]| {
                timed(|| {
                    for (_, w) in &ffn {
                        run(w, &x[..n * w.cols], n, &mut y[..n * w.rows]);
                    }
                })
            };
            pass(&mut y);
            let (wall, _) = best((0..5).map(|_| pass(&mut y)));
            line += &format!(" {n} tok {:5.2} GB/s", ffn_bytes as f64 / wall / 1e9);
        }
        println!("{line}");
    }

    // Mat-mat: 512 tokens through one ffn matrix of each shape.
    let mut shapes = std::collections::BTreeMap::new();
    for (name, w) in &ffn {
        shapes
            .entry((w.rows, w.cols, w.ty.to_string()))
            .or_insert((name.clone(), *w));
    }
    let n_tokens = 512;
    for ((rows, cols, ty), (name, w)) in shapes.iter().filter(|_| matmat) {
        let flops = 2.0 * (*rows * *cols * n_tokens) as f64;
        for (path, run) in &runners {
            let slow = path == "reference" || path == "scalar";
            // The slow paths get fewer tokens, scaled back up.
            let n = if slow { 32 } else { n_tokens };
            let scale = (n_tokens / n) as f64;
            let reps = if slow { 1 } else { 3 };
            let (wall, cpu) = best((0..reps).map(|_| {
                let (wall, cpu) = timed(|| run(w, &x[..n * cols], n, &mut y[..n * rows]));
                (wall * scale, cpu * scale)
            }));
            println!(
                "  mat-mat {name} {ty} {rows}x{cols} x {n_tokens} tokens, {path:>9}: \
                 {:7.2} GFLOP/s ({:8.2} ms), {:7.2} GFLOP per CPU-second",
                flops / wall / 1e9,
                wall * 1e3,
                flops / cpu / 1e9
            );
        }
    }
    // Float weights (none in these models' matrices): a synthetic 1536 × 576 matrix per type.
    // It fits in L3, so its mat-vec figure is cache bandwidth, not memory bandwidth.
    if !quick {
        let (rows, cols) = (1536, 576);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let data: Vec<u8> = match ty {
                GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                GgmlType::F16 => values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => values
                    .iter()
                    .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
            };
            let w = WeightMatrix::rows(ty, rows, cols, &data);
            for (path, run) in &runners {
                let slow = path == "reference" || path == "scalar";
                let n = if slow { 8 } else { 128 };
                let (mv, _) =
                    best((0..10).map(|_| timed(|| run(&w, &x[..cols], 1, &mut y[..rows]))));
                let (mm, _) =
                    best((0..3).map(|_| timed(|| run(&w, &x[..n * cols], n, &mut y[..n * rows]))));
                println!(
                    "  {ty:>4} {rows}x{cols} {path:>9}: mat-vec {:6.2} GB/s | mat-mat ({n} tokens) {:6.2} GFLOP/s",
                    data.len() as f64 / mv / 1e9,
                    2.0 * (rows * cols * n) as f64 / mm / 1e9
                );
            }
        }
    }
    Ok(())
}

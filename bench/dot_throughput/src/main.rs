//! Peak int8 multiply-add rates of one core with `vpdpbusd` (AVX-512 VNNI) on ymm and on zmm,
//! each on sixteen independent accumulators so that throughput, not latency, bounds the loop,
//! and no loads. Prints MACs per nanosecond, best of five runs.
#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::hint::black_box;
use std::time::Instant;

const ITERS: usize = 20_000_000;
const CHAINS: usize = 16;

/// Best MACs/ns of five runs of `f`, which does `macs` multiply-adds.
fn best(macs: f64, f: impl Fn()) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            f();
            macs / start.elapsed().as_nanos() as f64
        })
        .fold(0.0, f64::max)
}

#[target_feature(enable = "avx512f,avx512vnni,avx512vl")]
fn dpbusd_zmm() -> i32 {
    let (w, x) = (_mm512_set1_epi8(3), _mm512_set1_epi8(5));
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..ITERS {
        let (w, x) = (black_box(w), black_box(x));
        for a in &mut acc {
            *a = _mm512_dpbusd_epi32(*a, w, x);
        }
    }
    acc.iter()
        .map(|&a| _mm512_reduce_add_epi32(a))
        .fold(0, i32::wrapping_add)
}

#[target_feature(enable = "avx2,avx512f,avx512vnni,avx512vl")]
fn dpbusd_ymm() -> i32 {
    let (w, x) = (_mm256_set1_epi8(3), _mm256_set1_epi8(5));
    let mut acc = [_mm256_setzero_si256(); CHAINS];
    for _ in 0..ITERS {
        let (w, x) = (black_box(w), black_box(x));
        for a in &mut acc {
            *a = _mm256_dpbusd_epi32(*a, w, x);
        }
    }
    acc.iter()
        .map(|&a| _mm256_extract_epi32::<0>(a))
        .fold(0, i32::wrapping_add)
}

fn main() {
    let macs = |bytes: usize| (ITERS * CHAINS * bytes) as f64;
    println!("int8 multiply-adds per ns, one core, {CHAINS} independent accumulators:");
    if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
        // SAFETY: AVX-512 F/VL/VNNI are available (checked).
        let ymm = best(macs(32), || {
            black_box(unsafe { dpbusd_ymm() });
        });
        // SAFETY: as above.
        let zmm = best(macs(64), || {
            black_box(unsafe { dpbusd_zmm() });
        });
        println!("  vpdpbusd, ymm: {ymm:6.1}");
        println!("  vpdpbusd, zmm: {zmm:6.1} ({:.2}x ymm)", zmm / ymm);
    } else {
        println!("  (no AVX-512 VNNI here)");
    }
}

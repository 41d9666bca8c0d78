// What the accumulation order costs: int8 (u8 weights × i8 activations) inner kernels over
// eight rows interleaved in lanes (the layout of the engine's interleaved mat-vec and its
// rows-in-lanes prefill tile), on synthetic L2-resident data, timed per token count.
// Kernel A: every 4-element `vpdpbusd` group converted to f32 and added with an FMA (the order
//           the engine's x86 kernels share, which keeps them bit-identical).
// Kernel B: `vpdpbusd` chained over the whole 32-element block in int32, one conversion and
//           one FMA per block (llama.cpp's order for Q8_0-style blocks).
// Kernel C: B with 512-bit registers holding 16 rows (two 8-row groups).
// A measurement for planning the change of order (issue 19), not part of the engine.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::time::Instant;

const K: usize = 2048; // row length
const NB: usize = K / 32; // blocks per row

#[repr(C, align(32))]
#[derive(Clone, Copy)]
struct Rec {
    s: [f32; 8],        // per-row scale for this block
    q: [[u8; 32]; 8],   // q[j][4r..4r+4] = row r quants for elements 4j..4j+4
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Rec16 {
    s: [f32; 16],
    q: [[u8; 64]; 8], // q[j][4r..4r+4], r = 0..16
}

// ---------------- tiny deterministic RNG ----------------
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

// ---------------- Kernel A ----------------
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kern_a<const NT: usize>(w: &[Rec], x: &[i8], xs: &[f32], y: &mut [f32], t_total: usize, m: usize) {
    assert!(t_total % NT == 0);
    let ng = m / 8;
    assert!(m % 8 == 0 && w.len() >= ng * NB && x.len() >= t_total * K && xs.len() >= t_total * NB && y.len() >= t_total * m);
    unsafe {
        let wp = w.as_ptr();
        let xp0 = x.as_ptr();
        let xsp = xs.as_ptr();
        let yp = y.as_mut_ptr();
        for g in 0..ng {
            let wg = wp.add(g * NB);
            let mut t0 = 0;
            while t0 < t_total {
                let mut acc = [[_mm256_setzero_ps(); 8]; NT];
                for c in 0..NB {
                    let r = &*wg.add(c);
                    let rs = _mm256_load_ps(r.s.as_ptr());
                    let mut wv = [_mm256_setzero_si256(); 8];
                    for j in 0..8 {
                        wv[j] = _mm256_load_si256(r.q[j].as_ptr() as *const __m256i);
                    }
                    for t in 0..NT {
                        let tt = t0 + t;
                        let f = _mm256_mul_ps(rs, _mm256_set1_ps(*xsp.add(tt * NB + c)));
                        let xp = xp0.add(tt * K + c * 32) as *const i32;
                        for j in 0..8 {
                            let b = _mm256_set1_epi32(xp.add(j).read_unaligned());
                            let s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv[j], b);
                            acc[t][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), f, acc[t][j]);
                        }
                    }
                }
                for t in 0..NT {
                    let a = &acc[t];
                    let s01 = _mm256_add_ps(a[0], a[1]);
                    let s23 = _mm256_add_ps(a[2], a[3]);
                    let s45 = _mm256_add_ps(a[4], a[5]);
                    let s67 = _mm256_add_ps(a[6], a[7]);
                    let s = _mm256_add_ps(_mm256_add_ps(s01, s23), _mm256_add_ps(s45, s67));
                    _mm256_storeu_ps(yp.add((t0 + t) * m + g * 8), s);
                }
                t0 += NT;
            }
        }
    }
}

// ---------------- Kernel B ----------------
// CH = number of independent dpbusd chains per block (1, 2 or 4), combined with vpaddd.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kern_b<const NT: usize, const CH: usize>(w: &[Rec], x: &[i8], xs: &[f32], y: &mut [f32], t_total: usize, m: usize) {
    assert!(t_total % NT == 0);
    assert!(CH == 1 || CH == 2 || CH == 4);
    let ng = m / 8;
    assert!(m % 8 == 0 && w.len() >= ng * NB && x.len() >= t_total * K && xs.len() >= t_total * NB && y.len() >= t_total * m);
    unsafe {
        let wp = w.as_ptr();
        let xp0 = x.as_ptr();
        let xsp = xs.as_ptr();
        let yp = y.as_mut_ptr();
        for g in 0..ng {
            let wg = wp.add(g * NB);
            let mut t0 = 0;
            while t0 < t_total {
                let mut acc = [_mm256_setzero_ps(); NT];
                for c in 0..NB {
                    let r = &*wg.add(c);
                    let rs = _mm256_load_ps(r.s.as_ptr());
                    let mut wv = [_mm256_setzero_si256(); 8];
                    for j in 0..8 {
                        wv[j] = _mm256_load_si256(r.q[j].as_ptr() as *const __m256i);
                    }
                    for t in 0..NT {
                        let tt = t0 + t;
                        let xp = xp0.add(tt * K + c * 32) as *const i32;
                        let bx = |j: usize| _mm256_set1_epi32(xp.add(j).read_unaligned());
                        // CH independent dpbusd chains over j (j % CH), then integer tree add.
                        let mut s = [_mm256_setzero_si256(); CH];
                        for k in 0..CH {
                            s[k] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv[k], bx(k));
                        }
                        for j in CH..8 {
                            s[j % CH] = _mm256_dpbusd_epi32(s[j % CH], wv[j], bx(j));
                        }
                        let isum = match CH {
                            1 => s[0],
                            2 => _mm256_add_epi32(s[0], s[1]),
                            _ => _mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3])),
                        };
                        let f = _mm256_mul_ps(rs, _mm256_set1_ps(*xsp.add(tt * NB + c)));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), f, acc[t]);
                    }
                }
                for t in 0..NT {
                    _mm256_storeu_ps(yp.add((t0 + t) * m + g * 8), acc[t]);
                }
                t0 += NT;
            }
        }
    }
}

// ---------------- Kernel C (zmm, 16 rows) ----------------
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kern_c<const NT: usize>(w: &[Rec16], x: &[i8], xs: &[f32], y: &mut [f32], t_total: usize, m: usize) {
    assert!(t_total % NT == 0);
    let ng16 = m / 16;
    assert!(m % 16 == 0 && w.len() >= ng16 * NB && x.len() >= t_total * K && xs.len() >= t_total * NB && y.len() >= t_total * m);
    unsafe {
        let wp = w.as_ptr();
        let xp0 = x.as_ptr();
        let xsp = xs.as_ptr();
        let yp = y.as_mut_ptr();
        for g in 0..ng16 {
            let wg = wp.add(g * NB);
            let mut t0 = 0;
            while t0 < t_total {
                let mut acc = [_mm512_setzero_ps(); NT];
                for c in 0..NB {
                    let r = &*wg.add(c);
                    let rs = _mm512_load_ps(r.s.as_ptr());
                    let mut wv = [_mm512_setzero_si512(); 8];
                    for j in 0..8 {
                        wv[j] = _mm512_load_si512(r.q[j].as_ptr() as *const __m512i);
                    }
                    for t in 0..NT {
                        let tt = t0 + t;
                        let xp = xp0.add(tt * K + c * 32) as *const i32;
                        let bx = |j: usize| _mm512_set1_epi32(xp.add(j).read_unaligned());
                        let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[0], bx(0));
                        let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[4], bx(4));
                        s0 = _mm512_dpbusd_epi32(s0, wv[1], bx(1));
                        s1 = _mm512_dpbusd_epi32(s1, wv[5], bx(5));
                        s0 = _mm512_dpbusd_epi32(s0, wv[2], bx(2));
                        s1 = _mm512_dpbusd_epi32(s1, wv[6], bx(6));
                        s0 = _mm512_dpbusd_epi32(s0, wv[3], bx(3));
                        s1 = _mm512_dpbusd_epi32(s1, wv[7], bx(7));
                        let isum = _mm512_add_epi32(s0, s1);
                        let f = _mm512_mul_ps(rs, _mm512_set1_ps(*xsp.add(tt * NB + c)));
                        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), f, acc[t]);
                    }
                }
                for t in 0..NT {
                    _mm512_storeu_ps(yp.add((t0 + t) * m + g * 16), acc[t]);
                }
                t0 += NT;
            }
        }
    }
}

/// Rough core clock estimate: a chain of dependent 1-cycle integer adds.
fn estimate_ghz() -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let n: u64 = 50_000_000;
        let st = Instant::now();
        unsafe {
            let mut a: u64 = 0;
            let mut c = n;
            std::arch::asm!(
                "2:",
                "add {a}, 1", "add {a}, 1", "add {a}, 1", "add {a}, 1",
                "add {a}, 1", "add {a}, 1", "add {a}, 1", "add {a}, 1",
                "dec {c}",
                "jnz 2b",
                a = inout(reg) a, c = inout(reg) c,
                options(nomem, nostack)
            );
            std::hint::black_box((a, c));
        }
        best = best.min(st.elapsed().as_secs_f64());
    }
    (50_000_000.0 * 8.0) / best / 1e9
}

type KFn = unsafe fn(&[Rec], &[i8], &[f32], &mut [f32], usize, usize);
type KFn16 = unsafe fn(&[Rec16], &[i8], &[f32], &mut [f32], usize, usize);

enum Kern {
    W8(KFn),
    W16(KFn16),
}

struct Variant {
    fam: &'static str, // "A", "B", "B1", "C"
    nt: usize,
    k: Kern,
}

fn main() {
    let ok = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    if !ok {
        eprintln!("required CPU features (avx2,fma,avx512f/bw/vl/vnni) not detected");
        std::process::exit(1);
    }
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    #[allow(non_snake_case)]
    let M: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(512);
    assert!(M % 16 == 0);
    #[allow(non_snake_case)]
    let NG = M / 8;
    #[allow(non_snake_case)]
    let NG16 = M / 16;
    println!("rows M = {M}, K = {K}, reps = {reps}");
    let ghz = estimate_ghz();
    println!("estimated core clock (dependent-add chain): {ghz:.2} GHz");

    let mut rng = Rng(0x9E3779B97F4A7C15);
    // logical weights q[row][k] in 0..15, row scales ws[row][c]
    let mut q = vec![0u8; M * K];
    for v in q.iter_mut() {
        *v = (rng.next() % 16) as u8;
    }
    let mut ws = vec![0f32; M * NB];
    for v in ws.iter_mut() {
        *v = 0.001 + 0.01 * rng.f();
    }
    // 8-row records
    let zero8 = Rec { s: [0.0; 8], q: [[0; 32]; 8] };
    let mut w8 = vec![zero8; NG * NB];
    for g in 0..NG {
        for c in 0..NB {
            let r = &mut w8[g * NB + c];
            for rr in 0..8 {
                let row = g * 8 + rr;
                r.s[rr] = ws[row * NB + c];
                for j in 0..8 {
                    for e in 0..4 {
                        r.q[j][4 * rr + e] = q[row * K + c * 32 + 4 * j + e];
                    }
                }
            }
        }
    }
    let zero16 = Rec16 { s: [0.0; 16], q: [[0; 64]; 8] };
    let mut w16 = vec![zero16; NG16 * NB];
    for g in 0..NG16 {
        for c in 0..NB {
            let r = &mut w16[g * NB + c];
            for rr in 0..16 {
                let row = g * 16 + rr;
                r.s[rr] = ws[row * NB + c];
                for j in 0..8 {
                    for e in 0..4 {
                        r.q[j][4 * rr + e] = q[row * K + c * 32 + 4 * j + e];
                    }
                }
            }
        }
    }
    println!(
        "weights: 8-row layout {} KiB, 16-row layout {} KiB",
        w8.len() * std::mem::size_of::<Rec>() / 1024,
        w16.len() * std::mem::size_of::<Rec16>() / 1024
    );

    let variants: Vec<Variant> = vec![
        Variant { fam: "A", nt: 1, k: Kern::W8(kern_a::<1>) },
        Variant { fam: "A", nt: 2, k: Kern::W8(kern_a::<2>) },
        Variant { fam: "A", nt: 4, k: Kern::W8(kern_a::<4>) },
        Variant { fam: "B", nt: 1, k: Kern::W8(kern_b::<1, 2>) },
        Variant { fam: "B", nt: 2, k: Kern::W8(kern_b::<2, 2>) },
        Variant { fam: "B", nt: 4, k: Kern::W8(kern_b::<4, 2>) },
        Variant { fam: "B", nt: 8, k: Kern::W8(kern_b::<8, 2>) },
        Variant { fam: "B", nt: 16, k: Kern::W8(kern_b::<16, 2>) },
        Variant { fam: "B1", nt: 1, k: Kern::W8(kern_b::<1, 1>) },
        Variant { fam: "B1", nt: 2, k: Kern::W8(kern_b::<2, 1>) },
        Variant { fam: "B1", nt: 4, k: Kern::W8(kern_b::<4, 1>) },
        Variant { fam: "B1", nt: 8, k: Kern::W8(kern_b::<8, 1>) },
        Variant { fam: "B4", nt: 1, k: Kern::W8(kern_b::<1, 4>) },
        Variant { fam: "B4", nt: 2, k: Kern::W8(kern_b::<2, 4>) },
        Variant { fam: "B4", nt: 4, k: Kern::W8(kern_b::<4, 4>) },
        Variant { fam: "B4", nt: 8, k: Kern::W8(kern_b::<8, 4>) },
        Variant { fam: "C", nt: 1, k: Kern::W16(kern_c::<1>) },
        Variant { fam: "C", nt: 2, k: Kern::W16(kern_c::<2>) },
        Variant { fam: "C", nt: 4, k: Kern::W16(kern_c::<4>) },
        Variant { fam: "C", nt: 8, k: Kern::W16(kern_c::<8>) },
        Variant { fam: "C", nt: 16, k: Kern::W16(kern_c::<16>) },
    ];

    let ts = [1usize, 2, 4, 8, 16, 64];
    let mut summary: Vec<(usize, Vec<(&str, f64, usize)>)> = Vec::new();
    let mut worst_rel_all = 0f64;
    for &t in &ts {
        // activations
        let mut x = vec![0i8; t * K];
        for v in x.iter_mut() {
            *v = ((rng.next() % 255) as i32 - 127) as i8;
        }
        let mut xs = vec![0f32; t * NB];
        for v in xs.iter_mut() {
            *v = 0.001 + 0.02 * rng.f();
        }
        // f64 reference, and per-output L1 magnitude (sum |terms|)
        let mut yref = vec![0f64; t * M];
        let mut ymag = vec![0f64; t * M];
        for tt in 0..t {
            for row in 0..M {
                let mut acc = 0f64;
                let mut mag = 0f64;
                for c in 0..NB {
                    let mut isum = 0i64;
                    for i in 0..32 {
                        isum += q[row * K + c * 32 + i] as i64 * x[tt * K + c * 32 + i] as i64;
                    }
                    let term = ws[row * NB + c] as f64 * xs[tt * NB + c] as f64 * isum as f64;
                    acc += term;
                    mag += term.abs();
                }
                yref[tt * M + row] = acc;
                ymag[tt * M + row] = mag;
            }
        }
        let macs = (M * K * t) as f64;
        let inner = ((64 * 512 / M) / t).max(1); // calls per timed sample (~64M MAC per sample)
        println!("\nT = {t}  ({} calls/sample, best & median of {reps} samples)", inner);
        let mut fam_best: Vec<(&str, f64, usize)> = Vec::new();
        for v in &variants {
            if t % v.nt != 0 {
                continue;
            }
            let mut y = vec![f32::NAN; t * M];
            let call = |y: &mut [f32]| unsafe {
                match v.k {
                    Kern::W8(f) => f(&w8, &x, &xs, y, t, M),
                    Kern::W16(f) => f(&w16, &x, &xs, y, t, M),
                }
            };
            call(&mut y);
            // verify
            let mut max_rel_mag = 0f64; // |err| / sum|terms|
            let mut max_rel = 0f64; // |err| / |ref|, over outputs with |ref| > 1e-3*mag
            let mut n_rel_gt = 0usize; // outputs with |err|/|ref| > 1e-5 (any ref)
            for i in 0..t * M {
                let e = (y[i] as f64 - yref[i]).abs();
                if e > 1e-5 * yref[i].abs() {
                    n_rel_gt += 1;
                }
                max_rel_mag = max_rel_mag.max(e / ymag[i]);
                if yref[i].abs() > 1e-3 * ymag[i] {
                    max_rel = max_rel.max(e / yref[i].abs());
                }
            }
            let pass = max_rel_mag < 1e-5 && y.iter().all(|v| v.is_finite());
            worst_rel_all = worst_rel_all.max(max_rel_mag);
            // warmup
            for _ in 0..10 {
                call(&mut y);
            }
            let mut samples = Vec::with_capacity(reps);
            for _ in 0..reps {
                let st = Instant::now();
                for _ in 0..inner {
                    call(std::hint::black_box(&mut y));
                }
                samples.push(st.elapsed().as_secs_f64() / inner as f64);
            }
            samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let best = samples[0];
            let med = samples[samples.len() / 2];
            let gb = macs / best / 1e9;
            let gm = macs / med / 1e9;
            println!(
                "  {:<2} NT={:<2}  best {:8.2} us  {:7.1} GMAC/s   (median {:7.1})   err/L1 {:.2e}  err/|ref| {:.2e} (#>1e-5: {}/{})  {}",
                v.fam,
                v.nt,
                best * 1e6,
                gb,
                gm,
                max_rel_mag,
                max_rel,
                n_rel_gt,
                t * M,
                if pass { "OK" } else { "FAIL" }
            );
            match fam_best.iter_mut().find(|e| e.0 == v.fam) {
                Some(e) => {
                    if gb > e.1 {
                        e.1 = gb;
                        e.2 = v.nt;
                    }
                }
                None => fam_best.push((v.fam, gb, v.nt)),
            }
        }
        summary.push((t, fam_best));
    }
    println!("\nSUMMARY (best NT per family, GMAC/s, best-of-{reps})");
    println!("{:>4} | {:>14} | {:>14} | {:>14} | {:>14} | {:>14} | {:>6} | {:>8} | {:>6}", "T", "A", "B(2 chains)", "B1(1 chain)", "B4(4 chains)", "C(zmm)", "B/A", "bestB/A", "C/A");
    for (t, fb) in &summary {
        let get = |f: &str| fb.iter().find(|e| e.0 == f).map(|e| (e.1, e.2)).unwrap_or((f64::NAN, 0));
        let (a, an) = get("A");
        let (b, bn) = get("B");
        let (b1, b1n) = get("B1");
        let (b4, b4n) = get("B4");
        let (c, cn) = get("C");
        let bbest = b.max(b1).max(b4);
        println!(
            "{:>4} | {:>7.1} (NT{:<2}) | {:>7.1} (NT{:<2}) | {:>7.1} (NT{:<2}) | {:>7.1} (NT{:<2}) | {:>7.1} (NT{:<2}) | {:>6.2} | {:>8.2} | {:>6.2}",
            t, a, an, b, bn, b1, b1n, b4, b4n, c, cn, b / a, bbest / a, c / a
        );
    }
    println!("worst |err|/sum|terms| over all kernels: {:.2e}", worst_rel_all);
    let ghz2 = estimate_ghz();
    println!("clock estimate at end: {ghz2:.2} GHz; MAC/cycle at best: A {:.1}  B {:.1}  C {:.1} (T=64, using start clock)",
        summary.last().unwrap().1.iter().find(|e| e.0 == "A").unwrap().1 / ghz,
        summary.last().unwrap().1.iter().find(|e| e.0 == "B").unwrap().1 / ghz,
        summary.last().unwrap().1.iter().find(|e| e.0 == "C").unwrap().1 / ghz);
}

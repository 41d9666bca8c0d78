//! The element-wise and per-row operations of a transformer forward pass, in plain f32.
//!
//! Matrix products live in [`crate::kernels`]; everything else a model computes is here:
//! normalisation, rotary position embeddings, activations, softmax and the dot products and
//! accumulations attention needs over the f16 KV cache.
//!
//! The hot loops (dot products, `axpy`, norms) run over fixed-width chunks with independent
//! accumulators so that the compiler can keep them in vector registers without bounds checks.
//! Reductions whose rounding matters for agreement with llama.cpp (the sums inside the norms)
//! accumulate in f64, as ggml does.

use half::f16;
use half::slice::HalfFloatSliceExt;

pub use crate::kernels::math::{axpy, exp};

/// Width of the unrolled inner loops: two 128-bit or one 256-bit register of f32.
const LANES: usize = 8;

/// `Σ a[i]·b[i]` over equal-length slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let a_chunks = a.chunks_exact(LANES);
    let b_chunks = b.chunks_exact(LANES);
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        let x: &[f32; LANES] = x.try_into().expect("chunk of LANES");
        let y: &[f32; LANES] = y.try_into().expect("chunk of LANES");
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y[i] += x[i]` (residual connections).
#[inline]
pub fn add_assign(y: &mut [f32], x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (y, x) in y.iter_mut().zip(x) {
        *y += x;
    }
}

/// `x[i] *= s`.
#[inline]
pub fn scale(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

/// Widens f16 values (the KV cache) to f32, using the CPU's conversion instructions when it
/// has them.
#[inline]
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    crate::kernels::widen_f16(src, dst);
}

/// Rounds f32 values to f16 (round to nearest even), for the KV cache.
#[inline]
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    dst.convert_from_f32_slice(src);
}

/// RMSNorm: `out = x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert!(x.len() == weight.len() && x.len() == out.len());
    let sum_sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let mean = (sum_sq / x.len() as f64) as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// RMSNorm of `x` in place (QK-norm over one head).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), weight.len());
    let sum_sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let mean = (sum_sq / x.len() as f64) as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = *v * inv * w;
    }
}

/// LayerNorm: `out = (x − mean) / sqrt(var + eps) · weight + bias`.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    debug_assert!(x.len() == weight.len() && x.len() == out.len());
    let (mean, inv) = layer_norm_stats(x, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v - mean) * inv * w;
    }
    if let Some(b) = bias {
        add_assign(out, b);
    }
}

/// A row's mean and `1 / sqrt(variance + eps)`, summed in f64.
fn layer_norm_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = (x.iter().map(|&v| f64::from(v)).sum::<f64>() / n) as f32;
    let var: f64 = x
        .iter()
        .map(|&v| {
            let d = f64::from(v - mean);
            d * d
        })
        .sum::<f64>()
        / n;
    let inv = 1.0 / (var as f32 + eps).sqrt();
    (mean, inv)
}

/// [`layer_norm`] of `x` into itself (the same operations, so the same bits).
pub fn layer_norm_in_place(x: &mut [f32], weight: &[f32], bias: Option<&[f32]>, eps: f32) {
    debug_assert!(x.len() == weight.len());
    let (mean, inv) = layer_norm_stats(x, eps);
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = (*v - mean) * inv * w;
    }
    if let Some(b) = bias {
        add_assign(x, b);
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: the original LLaMA layout (ggml's mode 0).
    Normal,
    /// Halves `(x[i], x[i + n_rot/2])`: GPT-NeoX, Qwen, Gemma (ggml's `GGML_ROPE_TYPE_NEOX`).
    Neox,
}

/// The rotation angles of rotary embeddings for one layer kind.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFrequencies {
    pub style: RopeStyle,
    /// Rotated dimensions per head (the first `n_rot`; the rest pass through).
    pub n_rot: usize,
    /// `θ_i(pos) = pos · inv_freq[i]` for `i < n_rot/2`, with linear scaling and LLaMA-3.1
    /// frequency factors already folded in.
    pub inv_freq: Vec<f64>,
}

impl RopeFrequencies {
    /// `inv_freq[i] = freq_scale · base^(−2i/n_rot) / factor[i]`, as ggml's `rope_ext` with
    /// `ext_factor = 0` (no YaRN): `freq_scale` is linear position interpolation (1/factor) and
    /// `factors` the per-frequency divisors of LLaMA 3.1's `rope_freqs.weight`.
    pub fn new(
        style: RopeStyle,
        n_rot: usize,
        freq_base: f32,
        freq_scale: f32,
        factors: Option<&[f32]>,
    ) -> RopeFrequencies {
        let half = n_rot / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let base = f64::from(freq_base).powf(-2.0 * i as f64 / n_rot as f64);
                let factor = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
                f64::from(freq_scale) * base / f64::from(factor)
            })
            .collect();
        RopeFrequencies {
            style,
            n_rot,
            inv_freq,
        }
    }

    /// Writes `cos θ_i(pos)` and `sin θ_i(pos)` (`n_rot/2` each) for one position.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let theta = pos as f64 * f;
            *c = theta.cos() as f32;
            *s = theta.sin() as f32;
        }
    }
}

/// Rotates one head in place by the angles whose cosines and sines are given (`n_rot/2` each).
pub fn apply_rope(head: &mut [f32], style: RopeStyle, cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    match style {
        RopeStyle::Normal => {
            for ((pair, &c), &s) in head[..2 * half].chunks_exact_mut(2).zip(cos).zip(sin) {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * c - x1 * s;
                pair[1] = x0 * s + x1 * c;
            }
        }
        RopeStyle::Neox => {
            let (lo, hi) = head[..2 * half].split_at_mut(half);
            for (((x0, x1), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                let (a, b) = (*x0, *x1);
                *x0 = a * c - b * s;
                *x1 = a * s + b * c;
            }
        }
    }
}

/// `tanh(x) = 1 − 2/(e^{2x} + 1)`, with [`exp`]: absolute error ~1e-7.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// SiLU (swish): `x · σ(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// GELU, tanh approximation (ggml's `ggml_gelu`):
/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline]
pub fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF: f32 = 0.044_715;
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * x * (1.0 + COEF * x * x)))
}

/// The exact GELU, `x · Φ(x) = 0.5·x·(1 + erf(x/√2))` (transformers' `"gelu"`, as Marian
/// configs name it), with erf evaluated in f64 ([`erf`]; Rust's std has none).
pub fn gelu_erf(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// The error function to within 1.2e-7 absolute (Numerical Recipes' `erfc` by a Chebyshev
/// fit of `exp(-z²)·t·P(t)`), for [`gelu_erf`].
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

/// SwiGLU in place: `gate[i] = silu(gate[i]) · up[i]`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// GeGLU in place: `gate[i] = gelu(gate[i]) · up[i]`.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu(*g) * u;
    }
}

/// The exact GELU in f32 for whole rows: `0.5·x·(1 + erf(x/√2))` with erf by Abramowitz and
/// Stegun 7.1.26 (absolute error ≤ 1.5e-7) and [`exp`], plain arithmetic and selects so the loop
/// vectorizes. [`gelu_erf`] (f64) is its reference: within 4e-7·(1 + |x|) of it (tested). A BERT
/// layer evaluates it n_ff times per token, which in f64 through libm's `exp` cost a fifth of
/// all-MiniLM-L6-v2's time.
pub fn gelu_erf_in_place(x: &mut [f32]) {
    for v in x {
        let z = *v * std::f32::consts::FRAC_1_SQRT_2;
        let a = z.abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * a);
        let poly = t
            * (0.254_829_6
                + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
        let erf_abs = 1.0 - poly * exp(-a * a);
        let erf = if z < 0.0 { -erf_abs } else { erf_abs };
        *v = 0.5 * *v * (1.0 + erf);
    }
}

/// GELU in place.
pub fn gelu_in_place(x: &mut [f32]) {
    for v in x {
        *v = gelu(*v);
    }
}

/// Softmax in place, subtracting the maximum first so that no exponent overflows.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let sum: f32 = x.iter().sum();
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `log softmax(logits)[i]` for every `i`, in f64 (for scoring, not for the hot path).
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = logits
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln();
    logits.iter().map(|&v| v as f64 - max - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    #[test]
    fn the_f32_exact_gelu_follows_the_f64_one() {
        let mut worst = 0f32;
        let mut xs: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 * 2.5e-4).collect();
        xs.extend([-30.0, -9.5, 9.5, 30.0, 0.0, -0.0]);
        let mut fast = xs.clone();
        gelu_erf_in_place(&mut fast);
        for (&x, &y) in xs.iter().zip(&fast) {
            let d = (y - gelu_erf(x)).abs() / (1.0 + x.abs());
            worst = worst.max(d);
        }
        assert!(worst <= 4e-7, "worst {worst}");
    }

    #[test]
    fn dot_matches_naive_sum_for_every_tail_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
            assert!(close(dot(&a, &b), naive as f32, 1e-5), "n = {n}");
        }
    }

    #[test]
    fn rms_norm_gives_unit_root_mean_square() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let w = [1.0f32; 4];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 0.0, &mut out);
        let rms = (out.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!(close(rms, 1.0, 1e-6));
        // The weight scales each element.
        let w2 = [2.0f32, 1.0, 1.0, 0.5];
        let mut out2 = [0f32; 4];
        rms_norm(&x, &w2, 0.0, &mut out2);
        assert!(close(out2[0], 2.0 * out[0], 1e-6) && close(out2[3], 0.5 * out[3], 1e-6));
        let mut inplace = x;
        rms_norm_in_place(&mut inplace, &w2, 0.0);
        assert_eq!(inplace, out2);
    }

    #[test]
    fn layer_norm_centres_and_scales() {
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let w = [1.0f32; 4];
        let b = [0.5f32; 4];
        let mut out = [0f32; 4];
        layer_norm(&x, &w, Some(&b), 0.0, &mut out);
        let mean: f32 = out.iter().sum::<f32>() / 4.0;
        assert!(close(mean, 0.5, 1e-6));
        let var: f32 = out.iter().map(|v| (v - 0.5) * (v - 0.5)).sum::<f32>() / 4.0;
        assert!(close(var, 1.0, 1e-5));
        // In place: the same bits.
        let mut inplace = [0.3f32, -1.7, 2.9, 4.0];
        let mut copy = [0f32; 4];
        layer_norm(&inplace, &[0.9, 1.1, 1.0, 0.5], Some(&b), 1e-5, &mut copy);
        layer_norm_in_place(&mut inplace, &[0.9, 1.1, 1.0, 0.5], Some(&b), 1e-5);
        assert_eq!(inplace, copy);
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let freqs = RopeFrequencies::new(RopeStyle::Normal, 4, 10000.0, 1.0, None);
        assert_eq!(freqs.inv_freq.len(), 2);
        assert!((freqs.inv_freq[1] - 0.01).abs() < 1e-12); // 10000^(-2/4)
        let (mut cos, mut sin) = ([0f32; 2], [0f32; 2]);
        freqs.cos_sin(3, &mut cos, &mut sin);
        let mut head = [1.0f32, 0.0, 0.0, 1.0, 7.0];
        apply_rope(&mut head, RopeStyle::Normal, &cos, &sin);
        // Pair 0 rotated by 3 rad, pair 1 by 0.03 rad; the fifth (unrotated) value untouched.
        assert!(close(head[0], 3f32.cos(), 1e-6) && close(head[1], 3f32.sin(), 1e-6));
        assert!(close(head[2], -(0.03f32.sin()), 1e-6) && close(head[3], 0.03f32.cos(), 1e-6));
        assert_eq!(head[4], 7.0);

        // NeoX pairs dimension i with i + n_rot/2.
        let mut neox = [1.0f32, 0.0, 0.0, 1.0];
        apply_rope(&mut neox, RopeStyle::Neox, &cos, &sin);
        assert!(close(neox[0], 3f32.cos(), 1e-6) && close(neox[2], 3f32.sin(), 1e-6));
        assert!(close(neox[1], -(0.03f32.sin()), 1e-6) && close(neox[3], 0.03f32.cos(), 1e-6));
    }

    #[test]
    fn rope_position_zero_is_identity_and_factors_divide_frequencies() {
        let factors = [1.0f32, 4.0];
        let f = RopeFrequencies::new(RopeStyle::Neox, 4, 100.0, 0.5, Some(&factors));
        assert!((f.inv_freq[0] - 0.5).abs() < 1e-12);
        assert!((f.inv_freq[1] - 0.5 * 0.1 / 4.0).abs() < 1e-12);
        let (mut cos, mut sin) = ([0f32; 2], [0f32; 2]);
        f.cos_sin(0, &mut cos, &mut sin);
        let mut head = [0.3f32, -1.0, 2.0, 0.25];
        let before = head;
        apply_rope(&mut head, RopeStyle::Neox, &cos, &sin);
        assert_eq!(head, before);
    }

    #[test]
    fn exact_gelu_matches_the_erf_definition() {
        // 0.5·x·(1 + erf(x/√2)) from Python's math.erf.
        for (x, want) in [
            (-3.0, -0.004_049_694_094_890_31),
            (-1.0, -0.158_655_253_931_457_07),
            (-0.5, -0.154_268_769_362_993_44),
            (0.0, 0.0),
            (0.5, 0.345_731_230_637_006_56),
            (1.0, 0.841_344_746_068_542_9),
            (2.0, 1.954_499_736_103_641_6),
            (5.0, 4.999_998_566_742_141),
        ] {
            assert!(
                (gelu_erf(x as f32) as f64 - want).abs() < 2e-7,
                "{x}: {}",
                gelu_erf(x as f32)
            );
        }
    }

    #[test]
    fn activations_match_their_definitions() {
        assert!(close(silu(0.0), 0.0, 1e-7));
        assert!(close(silu(2.0), 2.0 / (1.0 + (-2f32).exp()), 1e-6));
        assert!(close(gelu(0.0), 0.0, 1e-7));
        // Known values of the tanh approximation.
        assert!(close(gelu(1.0), 0.841_192, 1e-5));
        assert!(close(gelu(-1.0), -0.158_808, 1e-4));
        let mut g = [1.0f32, -2.0];
        swiglu(&mut g, &[2.0, 3.0]);
        assert!(close(g[0], 2.0 * silu(1.0), 1e-6) && close(g[1], 3.0 * silu(-2.0), 1e-6));
        let mut g = [1.0f32];
        geglu(&mut g, &[0.5]);
        assert!(close(g[0], 0.5 * gelu(1.0), 1e-6));
    }

    #[test]
    fn exp_and_tanh_are_accurate_over_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - exact).abs() / exact);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
        for i in -400..=400 {
            let x = i as f32 * 0.025;
            assert!((tanh(x) - x.tanh()).abs() < 3e-7, "tanh({x})");
        }
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_inputs() {
        let mut x = [1000.0f32, 1001.0, 999.0];
        softmax(&mut x);
        assert!(close(x.iter().sum::<f32>(), 1.0, 1e-6));
        assert!(x[1] > x[0] && x[0] > x[2]);
        let lp = log_softmax(&[0.0, 0.0]);
        assert!((lp[0] - 0.5f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn f16_round_trip() {
        let x = [0.5f32, -1.25, 3.0e-3, 65504.0];
        let mut h = [f16::ZERO; 4];
        f32_to_f16(&x, &mut h);
        let mut back = [0f32; 4];
        f16_to_f32(&h, &mut back);
        for (a, b) in x.iter().zip(&back) {
            assert!(close(*b, *a, 1e-3));
        }
    }
}

//! AVX2 mat-vec over interleaved weights (see `super::interleaved` for the layout and why).
//!
//! Lane `r` of every register belongs to row `r` of an eight-row group. For each chunk, one
//! 32-byte load of quants gives four consecutive elements of all eight rows (nibbles give two
//! such groups), the four matching activations are broadcast, and `maddubs`/`madd` produce each
//! row's sum of four products in its lane. Register `j` accumulates element group `j` (elements
//! `4j..4j+4` of every chunk), which is what lane `j` of a row's accumulator holds in the
//! row-major kernels: the eight registers here are the row-major accumulator transposed, so
//! every output sees the same operations in the same order as in `avx2::tile` and
//! `avx2::matvec_in_tile_order`, and the final reduction `((j0+j4)+(j2+j6))+((j1+j5)+(j3+j7))`
//! is `avx2::sum_lanes`' order. Results are bit-identical to the row-major path.
//!
//! Every function here is `unsafe` because it must only run where `avx2::available` is true.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::avx2::{ByteDot, Maddubs};
use super::decoded::{QuantizedActivations, CHUNK};
use super::interleaved::{
    GROUP_ROWS, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES, Q6_K_QH, Q6_K_QL, Q6_K_SCALES,
};
use crate::quant::GgmlType;

/// How far ahead of the record in use the weights are prefetched: the records are consumed in
/// address order, so this keeps a few hundred nanoseconds of loads in flight.
pub(super) const PREFETCH_AHEAD: usize = 1024;

/// One interleaved type's record: where its quants, scales and offsets are.
pub(super) trait Record {
    /// Bytes per record (eight rows' blocks).
    const BYTES: usize;
    /// Quants are signed bytes (Q8_0), multiplied as `|q| · (x · sign q)`.
    const SIGNED: bool;
    /// Chunks have an offset term (`offset · Σx` per half).
    const OFFSET: bool;
    /// Element groups `k` and `k + 4` (`k < 4`) of the eight rows: 32 bytes each, row `r` at
    /// bytes `4r..4r+4`.
    unsafe fn groups(record: *const u8, k: usize) -> (__m256i, __m256i);
    /// The rows' offsets (the same for both halves of a chunk in every interleaved type).
    unsafe fn offsets(record: *const u8) -> __m256;
}

/// The rows' f16 values at `record + at` (eight of them), widened.
#[inline(always)]
pub(super) unsafe fn halves_at(record: *const u8, at: usize) -> __m256 {
    // SAFETY: the caller's record holds 16 bytes at `at`; `loadu` needs no alignment.
    _mm256_cvtph_ps(_mm_loadu_si128(record.add(at).cast()))
}

/// Low and high nibbles of the 32 bytes at `at + 32k`: element groups `k` and `k + 4`.
#[inline(always)]
unsafe fn nibble_groups(record: *const u8, at: usize, k: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0F);
    // SAFETY: the caller's record holds 128 bytes of nibbles at `at`.
    let v = _mm256_loadu_si256(record.add(at + 32 * k).cast());
    (
        _mm256_and_si256(v, m4),
        _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
    )
}

/// 16 where bit `j` of each byte of `high` is set, else 0 (Q5's fifth bit for element group
/// `j`). One 16-bit shift moves bit `j` to bit 4; bits shifted in from the neighbouring byte
/// land below bit 4 (left shifts of at most 4) or above it (right shifts of at most 3).
#[inline(always)]
unsafe fn fifth_bit(high: __m256i, j: usize) -> __m256i {
    let moved = match j {
        0 => _mm256_slli_epi16(high, 4),
        1 => _mm256_slli_epi16(high, 3),
        2 => _mm256_slli_epi16(high, 2),
        3 => _mm256_slli_epi16(high, 1),
        4 => high,
        5 => _mm256_srli_epi16(high, 1),
        6 => _mm256_srli_epi16(high, 2),
        _ => _mm256_srli_epi16(high, 3),
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(16))
}

pub(super) struct Q4_0;
pub(super) struct Q4_1;
pub(super) struct Q5_0;
pub(super) struct Q5_1;
pub(super) struct Q8_0;

impl Record for Q4_0 {
    const BYTES: usize = 144;
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn groups(record: *const u8, k: usize) -> (__m256i, __m256i) {
        nibble_groups(record, 16, k)
    }
    #[inline(always)]
    unsafe fn offsets(record: *const u8) -> __m256 {
        _mm256_mul_ps(_mm256_set1_ps(-8.0), halves_at(record, 0))
    }
}

impl Record for Q4_1 {
    const BYTES: usize = 160;
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn groups(record: *const u8, k: usize) -> (__m256i, __m256i) {
        nibble_groups(record, 32, k)
    }
    #[inline(always)]
    unsafe fn offsets(record: *const u8) -> __m256 {
        halves_at(record, 16)
    }
}

impl Record for Q5_0 {
    const BYTES: usize = 176;
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn groups(record: *const u8, k: usize) -> (__m256i, __m256i) {
        let (lo, hi) = nibble_groups(record, 48, k);
        // SAFETY: the record holds 32 bytes of fifth bits at 16.
        let high = _mm256_loadu_si256(record.add(16).cast());
        (
            _mm256_or_si256(lo, fifth_bit(high, k)),
            _mm256_or_si256(hi, fifth_bit(high, k + 4)),
        )
    }
    #[inline(always)]
    unsafe fn offsets(record: *const u8) -> __m256 {
        _mm256_mul_ps(_mm256_set1_ps(-16.0), halves_at(record, 0))
    }
}

impl Record for Q5_1 {
    const BYTES: usize = 192;
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn groups(record: *const u8, k: usize) -> (__m256i, __m256i) {
        let (lo, hi) = nibble_groups(record, 64, k);
        // SAFETY: the record holds 32 bytes of fifth bits at 32.
        let high = _mm256_loadu_si256(record.add(32).cast());
        (
            _mm256_or_si256(lo, fifth_bit(high, k)),
            _mm256_or_si256(hi, fifth_bit(high, k + 4)),
        )
    }
    #[inline(always)]
    unsafe fn offsets(record: *const u8) -> __m256 {
        halves_at(record, 16)
    }
}

impl Record for Q8_0 {
    const BYTES: usize = 272;
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn groups(record: *const u8, k: usize) -> (__m256i, __m256i) {
        // SAFETY: the record holds 256 bytes of quants at 16.
        (
            _mm256_loadu_si256(record.add(16 + 32 * k).cast()),
            _mm256_loadu_si256(record.add(16 + 32 * (k + 4)).cast()),
        )
    }
    #[inline(always)]
    unsafe fn offsets(_: *const u8) -> __m256 {
        _mm256_setzero_ps()
    }
}

/// Panics unless `w` is an interleaved matrix of `record_bytes`-byte records of
/// `chunks_per_record` chunks each, `groups` lie within it, and `acts` holds the tokens up to
/// `tokens` of `w.cols` values (a failure is a caller's bug).
pub(super) fn check_inputs(
    w: &super::WeightMatrix,
    groups: &std::ops::Range<usize>,
    acts: &QuantizedActivations,
    tokens: usize,
    record_bytes: usize,
    chunks_per_record: usize,
) {
    let nc = acts.n_chunks;
    assert!(
        w.cols == nc * CHUNK
            && nc.is_multiple_of(chunks_per_record)
            && w.layout == super::Layout::Interleaved8
            && w.rows.is_multiple_of(GROUP_ROWS)
            && groups.end * GROUP_ROWS <= w.rows
            && w.data.len() == w.rows / GROUP_ROWS * nc / chunks_per_record * record_bytes
            && acts.q.len() >= tokens * nc
            && acts.d.len() >= tokens * nc
            && acts.half_sums.len() >= tokens * nc
    );
}

/// Asks for the cache lines of the `bytes`-byte record `ahead` bytes past `record`: the records
/// are consumed in address order, so this keeps loads in flight. A prefetch never faults, even
/// past the end of the matrix (`wrapping_add` keeps the address computation defined).
#[inline(always)]
pub(super) unsafe fn prefetch_record(record: *const u8, bytes: usize, ahead: usize) {
    let ahead = record.wrapping_add(ahead);
    let mut line = 0;
    while line < bytes {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
        line += 64;
    }
}

/// The offset terms of one token, in the row-major kernels' order: half `h`'s term
/// `offsets[h] · half_sums[h]` goes into accumulator `h mod 8` for the whole runs of eight
/// halves, and the rest into the returned tail, summed in order.
///
/// # Safety
/// `sums` must point at the token's `offsets.len()` half sums.
#[inline(always)]
pub(super) unsafe fn add_offset_terms(
    acc: &mut [__m256; 8],
    offsets: &[__m256],
    sums: *const f32,
) -> __m256 {
    let full = offsets.len() / 8 * 8;
    for (k, run) in offsets[..full].chunks_exact(8).enumerate() {
        for (j, (acc_j, offset)) in acc.iter_mut().zip(run).enumerate() {
            // SAFETY: 8k + j < offsets.len(), within the token's half sums.
            let term = _mm256_broadcast_ss(&*sums.add(8 * k + j));
            *acc_j = _mm256_fmadd_ps(*offset, term, *acc_j);
        }
    }
    let mut tail = _mm256_setzero_ps();
    for (h, offset) in offsets.iter().enumerate().skip(full) {
        // SAFETY: as above.
        let term = _mm256_mul_ps(*offset, _mm256_broadcast_ss(&*sums.add(h)));
        tail = _mm256_add_ps(tail, term);
    }
    tail
}

/// Stores one token's outputs of group `g` ([`group_outputs`]).
#[inline(always)]
unsafe fn store_group(
    acc: &[__m256; 8],
    tail: __m256,
    g: usize,
    t: usize,
    store: &mut impl FnMut(usize, usize, f32),
) {
    for (r, y) in group_outputs(acc, tail).into_iter().enumerate() {
        store(t, g * GROUP_ROWS + r, y);
    }
}

/// One token's eight row outputs from its eight accumulators: reduced as `sum_lanes` reduces a
/// row-major accumulator, `((j0+j4)+(j2+j6))+((j1+j5)+(j3+j7))`, plus the offset tail.
#[inline(always)]
unsafe fn group_outputs(acc: &[__m256; 8], tail: __m256) -> [f32; GROUP_ROWS] {
    let (p0, p1) = (_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[1], acc[5]));
    let (p2, p3) = (_mm256_add_ps(acc[2], acc[6]), _mm256_add_ps(acc[3], acc[7]));
    let sum = _mm256_add_ps(_mm256_add_ps(p0, p2), _mm256_add_ps(p1, p3));
    let mut out = [0f32; GROUP_ROWS];
    // SAFETY: `out` is 8 writable f32.
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(sum, tail));
    out
}

/// Defines an entry point `$name` of the interleaved mat-vec for one instruction set: the
/// byte dot product `$dot` and the `target_feature`s it needs, into which every record
/// type's kernel is inlined.
macro_rules! matvec_entry {
    ($(#[$doc:meta])* $name:ident, $dot:ty, $features:literal) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(
            w: &super::WeightMatrix,
            groups: std::ops::Range<usize>,
            acts: &QuantizedActivations,
            first_token: usize,
            n_tokens: usize,
            store: impl FnMut(usize, usize, f32),
        ) {
            let (g, a, t, n, s) = (groups, acts, first_token, n_tokens, store);
            match w.ty {
                GgmlType::Q4_0 => matvec_records::<Legacy<Q4_0>, $dot>(w, g, a, t, n, s),
                GgmlType::Q4_1 => matvec_records::<Legacy<Q4_1>, $dot>(w, g, a, t, n, s),
                GgmlType::Q5_0 => matvec_records::<Legacy<Q5_0>, $dot>(w, g, a, t, n, s),
                GgmlType::Q5_1 => matvec_records::<Legacy<Q5_1>, $dot>(w, g, a, t, n, s),
                GgmlType::Q8_0 => matvec_records::<Legacy<Q8_0>, $dot>(w, g, a, t, n, s),
                GgmlType::Q4_K => matvec_records::<Q4K, $dot>(w, g, a, t, n, s),
                GgmlType::Q6_K => matvec_records::<Q6K, $dot>(w, g, a, t, n, s),
                other => panic!("no interleaved form for {other}"),
            }
        }
    };
}

matvec_entry!(
    /// `n_tokens` tokens (from `first_token` of `acts`) through the eight-row groups `groups`
    /// of the interleaved matrix `w`; calls `store(t, r, y)` for every output, `t` counted in
    /// `acts`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C. `w` must be interleaved (`super::Layout`) with
    /// consistent shape and a type `interleaved::has_interleaved_form` accepts, and `acts` must
    /// hold `first_token + n_tokens` tokens of `w.cols` values (checked; failing is a caller's
    /// bug and panics).
    matvec,
    Maddubs,
    "avx2,fma,f16c"
);

/// What [`matvec_records`] needs of an interleaved record type.
trait RecordKernel {
    /// Bytes per record (eight rows' blocks).
    const BYTES: usize;
    /// 32-element chunks per record: 1 for the legacy types, 8 for a K-quant super-block.
    const CHUNKS: usize;
    /// Whether chunks have offset terms (`offset · Σx` per half).
    const OFFSET: bool;
    /// How far ahead of the record in use to prefetch.
    const AHEAD: usize;
    /// Adds one token's products with the record's chunks to `acc`, chunk after chunk for each
    /// accumulator, exactly as the row-major kernels add them. `at` is the index in `acts` of
    /// the token's chunk that the record starts at. With `offsets` (a group's first token),
    /// also writes the rows' offsets of the record's `2 · CHUNKS` half-chunks.
    ///
    /// # Safety
    /// `record` must be a whole record and `acts` must hold chunks `at..at + CHUNKS`.
    unsafe fn accumulate<D: ByteDot>(
        record: *const u8,
        acts: &QuantizedActivations,
        at: usize,
        acc: &mut [__m256; 8],
        offsets: Option<&mut [__m256]>,
    );
}

/// The byte dot product of element group `j` (`q`, eight rows) with activation word `j` of the
/// chunk at `x`, converted and added into `acc` times `factor`.
#[inline(always)]
unsafe fn add_group<D: ByteDot>(
    acc: &mut __m256,
    q: __m256i,
    x: *const i32,
    j: usize,
    factor: __m256,
) {
    // SAFETY: the caller's chunk has 8 activation words.
    let xj = _mm256_set1_epi32(x.add(j).read_unaligned());
    let sums = D::dot(q, xj);
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), factor, *acc);
}

/// A legacy (32-element block) type's records: one chunk each.
struct Legacy<R>(std::marker::PhantomData<R>);

impl<R: Record> RecordKernel for Legacy<R> {
    const BYTES: usize = R::BYTES;
    const CHUNKS: usize = 1;
    const OFFSET: bool = R::OFFSET;
    const AHEAD: usize = PREFETCH_AHEAD;
    #[inline(always)]
    unsafe fn accumulate<D: ByteDot>(
        record: *const u8,
        acts: &QuantizedActivations,
        at: usize,
        acc: &mut [__m256; 8],
        offsets: Option<&mut [__m256]>,
    ) {
        if let Some(offsets) = offsets {
            if R::OFFSET {
                offsets.fill(R::offsets(record));
            }
        }
        // SAFETY: chunk `at` exists (the caller's contract).
        let xd = _mm256_broadcast_ss(&*acts.d.as_ptr().add(at));
        let factor = _mm256_mul_ps(halves_at(record, 0), xd);
        let x = acts.q.as_ptr().add(at).cast::<i32>();
        for k in 0..4 {
            let (low, high) = R::groups(record, k);
            for (j, q) in [(k, low), (k + 4, high)] {
                if R::SIGNED {
                    // |q| · (x · sign q): `maddubs` multiplies unsigned by signed bytes.
                    // SAFETY: word j < 8 of the chunk.
                    let xj = _mm256_sign_epi8(_mm256_set1_epi32(x.add(j).read_unaligned()), q);
                    let sums = D::dot(_mm256_abs_epi8(q), xj);
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), factor, acc[j]);
                } else {
                    add_group::<D>(&mut acc[j], q, x, j, factor);
                }
            }
        }
    }
}

/// The eight rows' 6-bit scale and minimum of chunk `c` (< 8) of a Q4_K super-block, one byte
/// per row, from the transposed scale bytes `p` (`p[j]` holds byte `j` of every row): ggml's
/// `get_scale_min_k4` on eight rows at once. Shifts move whole 64-bit words, so each mask keeps
/// only bits that came from the same byte.
#[inline(always)]
pub(super) fn q4_k_scale_min(p: &[u64; 12], c: usize) -> (u64, u64) {
    const LOW6: u64 = 0x3F3F_3F3F_3F3F_3F3F;
    const LOW4: u64 = 0x0F0F_0F0F_0F0F_0F0F;
    const BITS45: u64 = 0x3030_3030_3030_3030;
    if c < 4 {
        (p[c] & LOW6, p[c + 4] & LOW6)
    } else {
        (
            (p[c + 4] & LOW4) | ((p[c - 4] >> 2) & BITS45),
            ((p[c + 4] >> 4) & LOW4) | ((p[c] >> 2) & BITS45),
        )
    }
}

/// Eight bytes (one per row) widened to f32 lanes.
#[inline(always)]
pub(super) unsafe fn byte_lanes(v: u64) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)))
}

/// Q4_K records: one super-block of eight chunks. Per chunk the scale is `d · sc` and the
/// offset `−(dmin · m)`, computed exactly as the row-major decoder does.
struct Q4K;

impl RecordKernel for Q4K {
    const BYTES: usize = 8 * 144;
    const CHUNKS: usize = 8;
    const OFFSET: bool = true;
    const AHEAD: usize = 2 * PREFETCH_AHEAD;
    #[inline(always)]
    unsafe fn accumulate<D: ByteDot>(
        record: *const u8,
        acts: &QuantizedActivations,
        at: usize,
        acc: &mut [__m256; 8],
        mut offsets: Option<&mut [__m256]>,
    ) {
        let m4 = _mm256_set1_epi8(0x0F);
        let d = halves_at(record, 0);
        let dmin = halves_at(record, Q4_K_DMIN);
        let mut packed = [0u64; 12];
        for (j, p) in packed.iter_mut().enumerate() {
            // SAFETY: the record holds 96 scale bytes at Q4_K_SCALES.
            *p = record
                .add(Q4_K_SCALES + 8 * j)
                .cast::<u64>()
                .read_unaligned();
        }
        for k in 0..4 {
            let mut factors = [_mm256_setzero_ps(); 2];
            let mut x = [std::ptr::null::<i32>(); 2];
            for (h, (factor, x)) in factors.iter_mut().zip(&mut x).enumerate() {
                let c = 2 * k + h;
                let (sc, m) = q4_k_scale_min(&packed, c);
                let scale = _mm256_mul_ps(d, byte_lanes(sc));
                // SAFETY: chunk at + c exists (the caller's contract).
                *factor = _mm256_mul_ps(scale, _mm256_broadcast_ss(&*acts.d.as_ptr().add(at + c)));
                *x = acts.q.as_ptr().add(at + c).cast::<i32>();
                if let Some(offsets) = offsets.as_deref_mut() {
                    // −(dmin·m), negated by the sign bit as `-x` is (not 0 − x, which turns
                    // −0 into +0).
                    let product = _mm256_mul_ps(dmin, byte_lanes(m));
                    offsets[2 * c..2 * c + 2].fill(_mm256_xor_ps(product, _mm256_set1_ps(-0.0)));
                }
            }
            for (j, acc_j) in acc.iter_mut().enumerate() {
                // SAFETY: the record holds 1024 bytes of nibbles at Q4_K_QS.
                let v = _mm256_loadu_si256(record.add(Q4_K_QS + 32 * (8 * k + j)).cast());
                add_group::<D>(acc_j, _mm256_and_si256(v, m4), x[0], j, factors[0]);
                let high = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                add_group::<D>(acc_j, high, x[1], j, factors[1]);
            }
        }
    }
}

/// Eight signed bytes (one per row) widened to f32 lanes.
#[inline(always)]
pub(super) unsafe fn signed_byte_lanes(v: u64) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v as i64)))
}

/// Q6_K records: one super-block of eight chunks. Chunk `c` lies in half `c / 4` of the
/// super-block: nibble `(c % 4) / 2` of `ql` run `2·(c / 4) + c % 2`, and bits `2·(c % 4)` of
/// `qh` run `c / 4`. Its two 16-element halves have their own scales `d · sc[2c]`,
/// `d · sc[2c + 1]` (element groups 0–3 and 4–7) and offsets `−32` times those, computed as the
/// row-major decoder computes them.
struct Q6K;

impl RecordKernel for Q6K {
    const BYTES: usize = 8 * 210;
    const CHUNKS: usize = 8;
    const OFFSET: bool = true;
    const AHEAD: usize = 2 * PREFETCH_AHEAD;
    #[inline(always)]
    unsafe fn accumulate<D: ByteDot>(
        record: *const u8,
        acts: &QuantizedActivations,
        at: usize,
        acc: &mut [__m256; 8],
        mut offsets: Option<&mut [__m256]>,
    ) {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x03);
        let d = halves_at(record, 0);
        for half in 0..2 {
            // Per chunk k of this half: the factors of its two halves, its activations.
            let mut factors = [[_mm256_setzero_ps(); 2]; 4];
            let mut x = [std::ptr::null::<i32>(); 4];
            for (k, (factors, x)) in factors.iter_mut().zip(&mut x).enumerate() {
                let c = 4 * half + k;
                // SAFETY: chunk at + c exists (the caller's contract).
                let xd = _mm256_broadcast_ss(&*acts.d.as_ptr().add(at + c));
                *x = acts.q.as_ptr().add(at + c).cast::<i32>();
                for (i, factor) in factors.iter_mut().enumerate() {
                    // SAFETY: the record holds 16 × 8 scale bytes at Q6_K_SCALES.
                    let sc = record.add(Q6_K_SCALES + 8 * (2 * c + i)).cast::<u64>();
                    let scale = _mm256_mul_ps(d, signed_byte_lanes(sc.read_unaligned()));
                    *factor = _mm256_mul_ps(scale, xd);
                    if let Some(offsets) = offsets.as_deref_mut() {
                        offsets[2 * c + i] = _mm256_mul_ps(_mm256_set1_ps(-32.0), scale);
                    }
                }
            }
            for (j, acc_j) in acc.iter_mut().enumerate() {
                // SAFETY: the record's ql holds 32 words and qh 16 words per row.
                let ql0 = _mm256_loadu_si256(record.add(Q6_K_QL + 32 * (16 * half + j)).cast());
                let ql1 = _mm256_loadu_si256(record.add(Q6_K_QL + 32 * (16 * half + 8 + j)).cast());
                let qh = _mm256_loadu_si256(record.add(Q6_K_QH + 32 * (8 * half + j)).cast());
                let low = [
                    _mm256_and_si256(ql0, m4),
                    _mm256_and_si256(ql1, m4),
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                ];
                let high = [
                    _mm256_and_si256(qh, m2),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 4), m2),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 6), m2),
                ];
                // Chunks in order, as every output accumulates them.
                for k in 0..4 {
                    let q = _mm256_or_si256(low[k], _mm256_slli_epi16(high[k], 4));
                    add_group::<D>(acc_j, q, x[k], j, factors[k][j / 4]);
                }
            }
        }
    }
}

/// [`matvec`] for one record type: for each group and token, the records in order, then the
/// offset terms and the final reduction (`add_offset_terms`, `store_group`). Inlined into the
/// entry points (`matvec_entry!`).
#[inline(always)]
unsafe fn matvec_records<K: RecordKernel, D: ByteDot>(
    w: &super::WeightMatrix,
    groups: std::ops::Range<usize>,
    acts: &QuantizedActivations,
    first_token: usize,
    n_tokens: usize,
    mut store: impl FnMut(usize, usize, f32),
) {
    let nc = acts.n_chunks;
    let n_records = nc / K::CHUNKS;
    let tokens = first_token + n_tokens;
    check_inputs(w, &groups, acts, tokens, K::BYTES, K::CHUNKS);
    let zero = _mm256_setzero_ps();
    // Each half-chunk's offsets for the eight rows, taken on a group's first token.
    let mut offsets = vec![zero; if K::OFFSET { 2 * nc } else { 0 }];
    let per_record = 2 * K::CHUNKS;
    for g in groups {
        let group = w.data[g * n_records * K::BYTES..].as_ptr();
        for t in first_token..tokens {
            let mut acc = [zero; 8];
            for i in 0..n_records {
                // SAFETY: the group holds `n_records` records (checked).
                let record = group.add(i * K::BYTES);
                let record_offsets = if t == first_token {
                    prefetch_record(record, K::BYTES, K::AHEAD);
                    offsets.get_mut(i * per_record..(i + 1) * per_record)
                } else {
                    None
                };
                // SAFETY: chunks t · nc + i · CHUNKS.. of the token exist (checked).
                K::accumulate::<D>(
                    record,
                    acts,
                    t * nc + i * K::CHUNKS,
                    &mut acc,
                    record_offsets,
                );
            }
            // SAFETY: the token's half sums start at t · nc pairs (checked).
            let sums = acts.half_sums[t * nc..].as_flattened().as_ptr();
            let tail = add_offset_terms(&mut acc, &offsets, sums);
            store_group(&acc, tail, g, t, &mut store);
        }
    }
}

/// Bytes of one chunk of eight decoded rows in `super::avx512::tile_decoded`'s layout: eight element groups
/// of 32 bytes, row `r`'s four quants of group `j` at `32j + 4r`.
pub(crate) const DECODED_GROUP_BYTES: usize = 8 * 32;

/// Eight f32 lanes (one per row of a group), aligned as a 256-bit vector.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(32))]
pub(crate) struct Lanes8(pub [f32; GROUP_ROWS]);

/// Writes row `r` (< 8) of an eight-row group, decoded (`chunks`, `offsets`: one entry per
/// chunk, as `decoded::decode_row_scalar` writes them), into `super::avx512::tile_decoded`'s
/// layout: `q`
/// holds [`DECODED_GROUP_BYTES`] per chunk, `scales` and `offsets_out` eight lanes (rows) per
/// half-chunk.
pub(crate) fn scatter_decoded_row(
    r: usize,
    chunks: &[super::decoded::DecodedChunk],
    offsets: &[[f32; 2]],
    q: &mut [u8],
    scales: &mut [Lanes8],
    offsets_out: &mut [Lanes8],
) {
    for (c, (chunk, offset)) in chunks.iter().zip(offsets).enumerate() {
        let q = &mut q[c * DECODED_GROUP_BYTES..(c + 1) * DECODED_GROUP_BYTES];
        for j in 0..8 {
            q[32 * j + 4 * r..32 * j + 4 * r + 4].copy_from_slice(&chunk.q[4 * j..4 * j + 4]);
        }
        for h in 0..2 {
            scales[2 * c + h].0[r] = chunk.scale[4 * h];
            offsets_out[2 * c + h].0[r] = offset[h];
        }
    }
}

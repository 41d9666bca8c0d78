//! The interleaved records (see `super::interleaved` for the layout and why) as AVX2 registers,
//! for the rows-in-lanes kernels of `super::lanes`: each legacy type's element groups and
//! offsets ([`Record`]), Q4_K's (and Q5_K's) and Q6_K's scale unpacking, and the layout those kernels' prefill
//! tile reads decoded rows in ([`scatter_decoded_row`]).
//!
//! Lane `r` of every register belongs to row `r` of an eight-row group: one 32-byte load of
//! quants gives four consecutive elements of all eight rows (nibbles give two such groups).
//!
//! Every function here is `unsafe` because it must only run where `avx2::available` is true.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::decoded::{offset_multiple, quant_bits, QuantizedActivations, CHUNK};
use super::interleaved::GROUP_ROWS;
use crate::quant::{GgmlType, IQ4_NL_VALUES};

/// How far ahead of the record in use the legacy types' records are prefetched into L1 (the
/// K-quants that prefetch into L1 go twice as far, past their larger records): the records are
/// consumed in address order, so this keeps a few hundred nanoseconds of loads in flight.
pub(super) const PREFETCH_AHEAD: usize = 1024;

/// How far ahead of the record in use the records of [`Prefetch::L2`] types are prefetched:
/// about half a microsecond of loads at 30 GB/s.
pub(super) const L2_PREFETCH_AHEAD: usize = 16 * 1024;

/// Where a type's records are prefetched to, and so how far ahead.
///
/// Measured on a 2-vCPU Zen 4 (BENCHMARKS.md, "Issue 19: Q4_K, Q5_K and Q6_K decode prefetch
/// into L2"): prefetching Q6_K's records 1–2 KiB ahead into L1 left one core with too few lines
/// in flight, and its decode read only 10–13 GB/s per core whatever that distance (0, 2, 4, 8
/// KiB: all the same); 8–32 KiB ahead into L2 took it from 10 to 18–20 tok/s on one thread
/// and by about 1.45× on two, Q5_K likewise, Q4_K by 1.05× (1.3× on one thread). The types
/// whose decode is bound by unpacking, not by memory (Q2_K, Q3_K, IQ4_XS), and the legacy
/// types' small records did as well or 2–9% better (within the noise) with the L1 prefetch,
/// so they keep it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Prefetch {
    /// Into L1, this many bytes ahead.
    L1(usize),
    /// Into L2, [`L2_PREFETCH_AHEAD`] bytes ahead; the hardware prefetcher brings the lines on
    /// into L1.
    L2,
}

/// One interleaved type's record: where its quants, scales and offsets are.
pub(super) trait Record {
    /// Bytes per record (eight rows' blocks).
    const BYTES: usize;
    /// Quants are signed bytes (Q8_0, IQ4_NL's table values), multiplied as `|q| · (x · sign q)`
    /// on AVX2.
    const SIGNED: bool;
    /// Chunks have an offset term (`offset · Σx` per half).
    const OFFSET: bool;
    /// `k` where the offset is `−k` scales (`decoded::offset_multiple`), else 0.
    const OFFSET_MULTIPLE: i32 = 0;
    /// The bits of the unsigned quants (`decoded::quant_bits`), 8 for signed ones.
    const QUANT_BITS: u32;
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
pub(super) unsafe fn nibble_groups(record: *const u8, at: usize, k: usize) -> (__m256i, __m256i) {
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
pub(super) struct Iq4Nl;

/// IQ4_NL's (and IQ4_XS's) values for the nibbles in each byte of `nibbles`: a byte shuffle of
/// the 16-entry table in each 128-bit half.
#[inline(always)]
pub(super) unsafe fn iq4_values(nibbles: __m256i) -> __m256i {
    // SAFETY: the table is 16 readable bytes.
    let table = _mm_loadu_si128(IQ4_NL_VALUES.as_ptr().cast());
    _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(table), nibbles)
}

impl Record for Q4_0 {
    const QUANT_BITS: u32 = quant_bits(GgmlType::Q4_0);
    const BYTES: usize = 144;
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    const OFFSET_MULTIPLE: i32 = offset_multiple(GgmlType::Q4_0);
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
    const QUANT_BITS: u32 = quant_bits(GgmlType::Q4_1);
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
    const QUANT_BITS: u32 = quant_bits(GgmlType::Q5_0);
    const BYTES: usize = 176;
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    const OFFSET_MULTIPLE: i32 = offset_multiple(GgmlType::Q5_0);
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
    const QUANT_BITS: u32 = quant_bits(GgmlType::Q5_1);
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
    const QUANT_BITS: u32 = quant_bits(GgmlType::Q8_0);
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

impl Record for Iq4Nl {
    const QUANT_BITS: u32 = quant_bits(GgmlType::IQ4_NL);
    const BYTES: usize = 144;
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn groups(record: *const u8, k: usize) -> (__m256i, __m256i) {
        let (lo, hi) = nibble_groups(record, 16, k);
        (iq4_values(lo), iq4_values(hi))
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

/// Asks for the cache lines of the `bytes`-byte record `ahead` bytes past `record`, into the
/// cache level `HINT` names (`_MM_HINT_T0`: L1; `_MM_HINT_T1`: L2): the records are consumed
/// in address order, so this keeps loads in flight. A prefetch never faults, even past the end
/// of the matrix (`wrapping_add` keeps the address computation defined).
#[inline(always)]
pub(super) unsafe fn prefetch_record<const HINT: i32>(
    record: *const u8,
    bytes: usize,
    ahead: usize,
) {
    let ahead = record.wrapping_add(ahead);
    let mut line = 0;
    while line < bytes {
        _mm_prefetch::<HINT>(ahead.wrapping_add(line).cast());
        line += 64;
    }
}

/// [`prefetch_record`] as `how` says: into L1, or into L2 [`L2_PREFETCH_AHEAD`] bytes ahead.
#[inline(always)]
pub(super) unsafe fn prefetch_record_to(how: Prefetch, record: *const u8, bytes: usize) {
    match how {
        Prefetch::L1(ahead) => prefetch_record::<_MM_HINT_T0>(record, bytes, ahead),
        Prefetch::L2 => prefetch_record::<_MM_HINT_T1>(record, bytes, L2_PREFETCH_AHEAD),
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

/// Eight signed bytes (one per row) widened to f32 lanes.
#[inline(always)]
pub(super) unsafe fn signed_byte_lanes(v: u64) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v as i64)))
}

/// Bytes of one chunk of eight decoded rows in the layout of `super::lanes`' prefill tile: eight
/// element groups of 32 bytes, row `r`'s four quants of group `j` at `32j + 4r`.
pub(crate) const DECODED_GROUP_BYTES: usize = 8 * 32;

/// Eight f32 lanes (one per row of a group), aligned as a 256-bit vector.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(32))]
pub(crate) struct Lanes8(pub [f32; GROUP_ROWS]);

/// Writes row `r` (< 8) of an eight-row group, decoded (`chunks`, `offsets`: one entry per
/// chunk, as `decoded::decode_row_scalar` writes them), into the layout of `super::lanes`'
/// prefill tile: `q`
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

//! The quantized kernels of both x86-64 paths, rows in lanes with per-block integer sums.
//!
//! - **Rows in lanes.** Every quantized kernel works on eight rows at once, row `r` in lane `r`
//!   of 256-bit registers: the interleaved decode mat-vec ([`matvec_vnni`], [`matvec_avx2`]:
//!   records unpacked in registers) and the prefill tile ([`tile_decoded_avx2`]: over groups
//!   unpacked once per call by the kernels' `run_quantized_in_lanes`, from the interleaved
//!   records by [`unpack_group`] or decoded row by row from GGUF's layout). A token's factor
//!   `scale · dx` is one multiply for eight rows, and no lane reduction is needed. On AVX-512
//!   the prefill tile takes two groups at a time, sixteen rows per 512-bit register
//!   ([`tile_pair_vnni`], over pairs [`pack_pair`] joins once per call): each `vpdpbusd` takes
//!   an activation word broadcast from memory, so on 256-bit registers the loads bound the tile.
//! - **Per-block integer sums.** Each chunk's eight element groups are summed into one 32-bit
//!   integer per row (per 16-element half for the types with 16-element sub-blocks,
//!   `decoded::has_half_scales`) and converted and scaled once: one conversion and one FMA per
//!   32 elements, where scaling every four-element group took eight. That float work, not the
//!   byte products, was the limit: a standalone measurement of the two orders on this loop
//!   (`bench/accumulation_order`) gave 1.5–1.6× for summing in integers on a Zen 4.
//!   Offsets that are whole multiples of the scale (`decoded::offset_multiple`: Q4_0, Q5_0,
//!   Q3_K, Q6_K) are taken off the same integer sums, `Σ q·x − k·Σx`, so those types do no
//!   float work for their offsets at all (2–6% more prefill speed on a Zen 4).
//! - **Byte dot products** ([`LaneDot`]): AVX-512 VNNI's `vpdpbusd` accumulates four
//!   `u8 × i8` products per lane straight into the integer sum ([`Vnni`]; signed quants as the
//!   unsigned `q + 128`, with `128 · Σx` taken back off); AVX2 adds two groups' `maddubs` pairs
//!   in 16 bits before one `madd` ([`Maddubs`]; the bound is in its docs).
//!
//! **Bits.** The integer sums are exact whichever instructions form them, so only the f32
//! operations decide the bits, and every kernel here performs, per output, the operations of
//! the scalar twin `portable::dot_block_sums_scalar`: a token's result is the same whichever
//! kernel, batch, thread count or x86 path computed it (a test checks every type, layout,
//! token count and thread count against the twin on both paths).
//!
//! Every function here is `unsafe` because it must only run where its instruction set is
//! available (`avx2::available`, and `avx512::available` for the VNNI entry points).
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::avx2_interleaved::{
    byte_lanes, check_inputs, halves_at, prefetch_record, prefetch_record_to, q4_k_scale_min,
    signed_byte_lanes, Lanes8, Prefetch, Record, DECODED_GROUP_BYTES, PREFETCH_AHEAD,
};
use super::decoded::{
    has_half_scales, has_offset, is_signed, offset_multiple, quant_bits, QuantizedActivations,
    CHUNK,
};
use super::interleaved::{
    GROUP_ROWS, IQ4_XS_QS, IQ4_XS_SCALES_H, IQ4_XS_SCALES_L, Q2_K_DMIN, Q2_K_QS, Q2_K_SCALES,
    Q3_K_HMASK, Q3_K_QS, Q3_K_SCALES, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES, Q5_K_QH, Q5_K_QS, Q6_K_QH,
    Q6_K_QL, Q6_K_SCALES,
};
use crate::quant::GgmlType;

/// How a chunk's byte products reach its integer sums, per instruction set.
pub(crate) trait LaneDot {
    /// The most tokens a sweep of the interleaved mat-vec takes: each sweep unpacks every
    /// record again, so a batched decode step of up to eight sequences is one sweep on
    /// AVX-512 and two on AVX2 (whose 16 registers hold four tokens' accumulators beside the
    /// weights; eight measured no faster).
    const MATVEC_SWEEP: usize;
    /// The chunk's weight groups as this instruction set multiplies them, once per chunk for
    /// all tokens of a sweep: for VNNI, unsigned bytes `q + 128` for signed quants and
    /// `q + 128 − k` for offsets of `−k` scales; for AVX2, `|q|` for signed quants.
    unsafe fn prepare(kind: ChunkKind, q: &[__m256i; 8]) -> [__m256i; 8];
    /// One token's exact integer sums of the chunk's products, per half (elements 0..16 in
    /// `[0]`), less `k · Σx` for offsets of `−k` scales: `prepared` from
    /// [`LaneDot::prepare`], `q` the raw groups, `x` the token's eight activation words and
    /// `neg128` their sums `−128 · Σx` over the chunk and per half.
    ///
    /// # Safety
    /// `x` must point at 8 readable words and `neg128`'s pointers at one value each.
    unsafe fn sums(
        kind: ChunkKind,
        prepared: &[__m256i; 8],
        q: &[__m256i; 8],
        x: *const i32,
        neg128: (*const i32, *const [i32; 2]),
    ) -> [__m256i; 2];
}

/// The sums a chunk's integer sums start from: `neg128`'s `−128 · Σx` values (the chunk's
/// in `[0]`, or each half's where the halves have their own scales) for signed quants and
/// offsets of `−k` scales, arithmetically shifted right by `shift`; zero for the other kinds.
///
/// # Safety
/// `neg128`'s pointers must point at one value each.
#[inline(always)]
unsafe fn start_sums(
    kind: ChunkKind,
    neg128: (*const i32, *const [i32; 2]),
    shift: i32,
) -> [__m256i; 2] {
    let count = _mm_cvtsi32_si128(shift);
    let broadcast = |v: i32| _mm256_sra_epi32(_mm256_set1_epi32(v), count);
    if !(kind.signed || kind.int_offsets()) {
        [_mm256_setzero_si256(); 2]
    } else if kind.split {
        let halves = *neg128.1;
        [broadcast(halves[0]), broadcast(halves[1])]
    } else {
        [broadcast(*neg128.0), _mm256_setzero_si256()]
    }
}

/// AVX-512 VNNI: `vpdpbusd` chained over each half's four groups.
pub(crate) struct Vnni;

impl LaneDot for Vnni {
    const MATVEC_SWEEP: usize = 8;
    #[inline(always)]
    unsafe fn prepare(kind: ChunkKind, q: &[__m256i; 8]) -> [__m256i; 8] {
        let mut prepared = *q;
        if kind.signed {
            // q + 128 as an unsigned byte: the sign bit flipped.
            for g in &mut prepared {
                *g = _mm256_xor_si256(*g, _mm256_set1_epi8(i8::MIN));
            }
        } else if kind.int_offsets() {
            // q − k + 128: at least 96 and at most 159 for every such type (Q6_K's 63 − 32).
            let bias = _mm256_set1_epi8((128 - kind.offset_multiple) as u8 as i8);
            for g in &mut prepared {
                *g = _mm256_add_epi8(*g, bias);
            }
        }
        prepared
    }
    #[inline(always)]
    unsafe fn sums(
        kind: ChunkKind,
        prepared: &[__m256i; 8],
        _: &[__m256i; 8],
        x: *const i32,
        neg128: (*const i32, *const [i32; 2]),
    ) -> [__m256i; 2] {
        // Σ (w + 128)·x = Σ w·x + 128·Σx, with w = q (signed quants) or q − k (offsets of
        // −k scales): start from −128·Σx. (Signed types share one scale over the chunk, so
        // only the chunk's total is used.)
        let mut sums = start_sums(kind, neg128, 0);
        for (j, &u) in prepared.iter().enumerate() {
            sums[j / 4] = _mm256_dpbusd_epi32(sums[j / 4], u, word(x, j));
        }
        sums
    }
}

/// AVX2: `maddubs` (pairs of products into 16 bits), then `madd` by ones (into 32). Unsigned
/// quants of `b` bits and activations of at most 127 in magnitude make `maddubs` pairs of at
/// most `2 · (2^b − 1) · 127`, so several groups' pairs add in 16 bits before one `madd`
/// (`ChunkKind::groups_per_madd`: two for 6-bit quants, four for 5-bit, eight for 4-bit).
/// Signed quants (at most 128 in magnitude, as `|q| · (x · sign q)`) make pairs up to 32512,
/// so each group has its own `madd`.
pub(crate) struct Maddubs;

impl LaneDot for Maddubs {
    const MATVEC_SWEEP: usize = 4;
    #[inline(always)]
    unsafe fn prepare(kind: ChunkKind, q: &[__m256i; 8]) -> [__m256i; 8] {
        let mut prepared = *q;
        if kind.signed {
            for g in &mut prepared {
                *g = _mm256_abs_epi8(*g);
            }
        }
        prepared
    }
    #[inline(always)]
    unsafe fn sums(
        kind: ChunkKind,
        prepared: &[__m256i; 8],
        q: &[__m256i; 8],
        x: *const i32,
        neg128: (*const i32, *const [i32; 2]),
    ) -> [__m256i; 2] {
        let ones = _mm256_set1_epi16(1);
        // For offsets of −k scales, start from −k·Σx: −128·Σx shifted right (exactly: k is a
        // power of two, at most 128). Signed quants need no start here.
        let mut sums = if kind.int_offsets() {
            let shift = 7 - kind.offset_multiple.trailing_zeros() as i32;
            start_sums(kind, neg128, shift)
        } else {
            [_mm256_setzero_si256(); 2]
        };
        if kind.signed {
            for j in 0..8 {
                let pairs = _mm256_maddubs_epi16(prepared[j], _mm256_sign_epi8(word(x, j), q[j]));
                sums[j / 4] = _mm256_add_epi32(sums[j / 4], _mm256_madd_epi16(pairs, ones));
            }
        } else {
            // Runs of `groups_per_madd` groups add their pairs in 16 bits, then one `madd`.
            let n = kind.groups_per_madd();
            for first in (0..8).step_by(n) {
                let mut pairs = _mm256_maddubs_epi16(prepared[first], word(x, first));
                for (j, &p) in prepared.iter().enumerate().take(first + n).skip(first + 1) {
                    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(p, word(x, j)));
                }
                let h = first / 4;
                sums[h] = _mm256_add_epi32(sums[h], _mm256_madd_epi16(pairs, ones));
            }
        }
        sums
    }
}

/// Activation word `j` (elements `4j..4j+4`) of the chunk at `x`, in every lane.
///
/// # Safety
/// `x` must point at 8 readable words and `j < 8`.
#[inline(always)]
unsafe fn word(x: *const i32, j: usize) -> __m256i {
    _mm256_set1_epi32(x.add(j).read_unaligned())
}

/// One 32-element chunk of eight rows in registers: element group `j` (elements `4j..4j+4`) of
/// row `r` at bytes `4r..4r+4` of `q[j]`; the rows' scales and offsets of each half (equal for
/// both halves unless the type `has_half_scales`).
struct LaneChunk {
    q: [__m256i; 8],
    scale: [__m256; 2],
    offset: [__m256; 2],
}

/// What the kernels need to know of a chunk's type, as constants once inlined.
#[derive(Clone, Copy)]
pub(crate) struct ChunkKind {
    /// Quants are signed bytes (never together with `split`: VNNI takes `128 · Σx` off the
    /// chunk's whole sum, see [`LaneDot`]).
    signed: bool,
    /// Each half has its own scale and offset (`decoded::has_half_scales`).
    split: bool,
    /// Chunks have offset terms.
    offsets: bool,
    /// `k` where every offset is `−k` scales (`decoded::offset_multiple`): the offset is then
    /// taken off the integer sums as `k · Σx`, with no float work. 0 for float offsets.
    offset_multiple: i32,
    /// The bits of the unsigned quants (`decoded::quant_bits`; 8 for signed ones).
    quant_bits: u32,
}

impl ChunkKind {
    /// Offsets of `−k` scales, taken off in integers.
    const fn int_offsets(self) -> bool {
        self.offsets && self.offset_multiple != 0
    }

    /// Offsets with a float term of their own.
    const fn float_offsets(self) -> bool {
        self.offsets && self.offset_multiple == 0
    }

    /// How many element groups' `maddubs` pairs of unsigned quants AVX2 adds in 16 bits before
    /// one `madd` widens them ([`Maddubs`]): a pair is at most `2 · (2^bits − 1) · 127`, so
    /// eight groups of 4-bit quants fit (30480 ≤ 32767), four of 5-bit ones and two of 6-bit
    /// ones; at most four where the halves have their own sums.
    const fn groups_per_madd(self) -> usize {
        let pair_max = 2 * ((1 << self.quant_bits) - 1) * 127;
        let fit = 32767 / pair_max;
        let most = if self.split { 4 } else { 8 };
        let mut n = 1;
        while n * 2 <= fit && n * 2 <= most {
            n *= 2;
        }
        n
    }
}

/// A type's [`ChunkKind`] as flags: `(is_signed, has_half_scales, has_offset,
/// offset_multiple, quant_bits)`.
pub(crate) type KindFlags = (bool, bool, bool, i32, u32);

/// A type's [`ChunkKind`] flags, as [`with_chunk_kind`] takes them.
pub(crate) fn chunk_kind_of(ty: GgmlType) -> KindFlags {
    (
        is_signed(ty),
        has_half_scales(ty),
        has_offset(ty),
        offset_multiple(ty),
        quant_bits(ty),
    )
}

/// Runs `$body` with `$kind` bound as a constant [`ChunkKind`] for a type's
/// `(is_signed, has_half_scales, has_offset, offset_multiple, quant_bits)`
/// ([`chunk_kind_of`]): one
/// instance per kind a type has, so that the kernels' tests of it fold away. Signed quants take
/// `128 · Σx` off the whole chunk's sum (VNNI), so they cannot have per-half scales; no type has
/// both, nor another combination than those below, and asking for one panics.
macro_rules! with_chunk_kind {
    ($flags:expr, |$kind:ident| $body:expr) => {{
        macro_rules! instance {
            ($signed:literal, $split:literal, $offsets:literal, $multiple:literal, $bits:literal) => {{
                const $kind: ChunkKind = ChunkKind {
                    signed: $signed,
                    split: $split,
                    offsets: $offsets,
                    offset_multiple: $multiple,
                    quant_bits: $bits,
                };
                $body
            }};
        }
        match $flags {
            // Q8_0, IQ4_NL, IQ4_XS.
            (true, false, false, 0, 8) => instance!(true, false, false, 0, 8),
            // Q4_1, Q4_K; Q5_1, Q5_K.
            (false, false, true, 0, 4) => instance!(false, false, true, 0, 4),
            (false, false, true, 0, 5) => instance!(false, false, true, 0, 5),
            // Q4_0, Q5_0.
            (false, false, true, 8, 4) => instance!(false, false, true, 8, 4),
            (false, false, true, 16, 5) => instance!(false, false, true, 16, 5),
            // Q2_K.
            (false, true, true, 0, 2) => instance!(false, true, true, 0, 2),
            // Q3_K, Q6_K.
            (false, true, true, 4, 3) => instance!(false, true, true, 4, 3),
            (false, true, true, 32, 6) => instance!(false, true, true, 32, 6),
            other => panic!("no quantized kernel for the chunk kind {other:?}"),
        }
    }};
}

/// Adds one chunk's products with `NT` tokens to their accumulators: token `t`'s chunk is
/// `at + t · nc` in `acts`. Per token and half (or whole chunk) `h`, as the scalar twin:
/// `acc[h] = fma(isum, scale[h] · dx, acc[h])`, then `acc[h] = fma(offset[h], x_sum, acc[h])`
/// for float offsets; `isum` already less `k · Σx` for offsets of `−k` scales.
///
/// # Safety
/// `acts` must hold chunk `at + t · nc` for every `t < NT` (the callers check).
#[inline(always)]
unsafe fn accumulate_chunk<D: LaneDot, const NT: usize>(
    kind: ChunkKind,
    chunk: &LaneChunk,
    acts: &QuantizedActivations,
    at: usize,
    nc: usize,
    acc: &mut [[__m256; 2]; NT],
) {
    let prepared = D::prepare(kind, &chunk.q);
    for (t, acc) in acc.iter_mut().enumerate() {
        let i = at + t * nc;
        // SAFETY: chunk i and its sums exist (the caller's contract); its words are 32 bytes.
        let x = acts.q.as_ptr().add(i).cast::<i32>();
        let neg128 = (
            acts.neg128_chunk_q_sums.as_ptr().add(i),
            acts.neg128_half_q_sums.as_ptr().add(i),
        );
        let sums = D::sums(kind, &prepared, &chunk.q, x, neg128);
        let xd = _mm256_broadcast_ss(&*acts.d.as_ptr().add(i));
        if kind.split {
            for h in 0..2 {
                let factor = _mm256_mul_ps(chunk.scale[h], xd);
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[h]), factor, acc[h]);
                if kind.float_offsets() {
                    let x_sum =
                        _mm256_broadcast_ss(&*acts.half_sums.as_ptr().add(i).cast::<f32>().add(h));
                    acc[h] = _mm256_fmadd_ps(chunk.offset[h], x_sum, acc[h]);
                }
            }
        } else {
            let factor = _mm256_mul_ps(chunk.scale[0], xd);
            let sum = _mm256_add_epi32(sums[0], sums[1]);
            acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), factor, acc[0]);
            if kind.float_offsets() {
                let x_sum = _mm256_broadcast_ss(&*acts.chunk_sums.as_ptr().add(i));
                acc[0] = _mm256_fmadd_ps(chunk.offset[0], x_sum, acc[0]);
            }
        }
    }
}

/// A token's eight row outputs from its accumulators (`acc[0] + acc[1]` where halves are
/// split, else `acc[0]`: adding a zero would turn −0 into +0).
#[inline(always)]
unsafe fn lane_outputs(kind: ChunkKind, acc: &[__m256; 2]) -> [f32; GROUP_ROWS] {
    let mut out = [0f32; GROUP_ROWS];
    // SAFETY: `out` is 8 writable f32.
    _mm256_storeu_ps(out.as_mut_ptr(), lane_sum(kind, acc));
    out
}

/// [`lane_outputs`] in a register.
#[inline(always)]
unsafe fn lane_sum(kind: ChunkKind, acc: &[__m256; 2]) -> __m256 {
    if kind.split {
        _mm256_add_ps(acc[0], acc[1])
    } else {
        acc[0]
    }
}

/// Panics unless `acts` holds tokens up to `tokens` with their chunk sums (a caller's bug).
fn check_chunk_sums(acts: &QuantizedActivations, tokens: usize) {
    let n = tokens * acts.n_chunks;
    assert!(
        acts.chunk_sums.len() >= n
            && acts.neg128_chunk_q_sums.len() >= n
            && acts.neg128_half_q_sums.len() >= n
    );
}

/// An interleaved type's records (see `super::interleaved`), unpacked chunk by chunk.
trait LaneRecord {
    /// Bytes per record (eight rows' blocks).
    const BYTES: usize;
    /// 32-element chunks per record: 1 for the legacy types, 8 for a K-quant super-block.
    const CHUNKS: usize;
    const KIND: ChunkKind;
    /// Where the mat-vec prefetches the records to (and so how far ahead).
    const PREFETCH: Prefetch;
    /// What a record's chunks share, unpacked once per record.
    type Shared;
    /// # Safety
    /// `record` must be a whole record.
    unsafe fn shared(record: *const u8) -> Self::Shared;
    /// Chunk `c` (< `CHUNKS`) of the record.
    ///
    /// # Safety
    /// `record` must be a whole record and `shared` its own.
    unsafe fn chunk(record: *const u8, shared: &Self::Shared, c: usize) -> LaneChunk;
}

/// A legacy (32-element block) type's records: one chunk each, one scale and offset per row.
struct Legacy<R>(std::marker::PhantomData<R>);

impl<R: Record> LaneRecord for Legacy<R> {
    const BYTES: usize = R::BYTES;
    const CHUNKS: usize = 1;
    const KIND: ChunkKind = ChunkKind {
        signed: R::SIGNED,
        split: false,
        offsets: R::OFFSET,
        offset_multiple: R::OFFSET_MULTIPLE,
        quant_bits: R::QUANT_BITS,
    };
    const PREFETCH: Prefetch = Prefetch::L1(PREFETCH_AHEAD);
    type Shared = ();
    #[inline(always)]
    unsafe fn shared(_: *const u8) {}
    #[inline(always)]
    unsafe fn chunk(record: *const u8, _: &(), _: usize) -> LaneChunk {
        let mut q = [_mm256_setzero_si256(); 8];
        for k in 0..4 {
            (q[k], q[k + 4]) = R::groups(record, k);
        }
        let scale = halves_at(record, 0);
        let offset = R::offsets(record);
        LaneChunk {
            q,
            scale: [scale; 2],
            offset: [offset; 2],
        }
    }
}

/// Bytes holding a 4-bit field in each nibble or a 2-bit field in each pair of bits: masks for
/// eight rows' packed scale bytes, one row per byte of a `u64`.
const LOW4: u64 = 0x0F0F_0F0F_0F0F_0F0F;
const LOW2: u64 = 0x0303_0303_0303_0303;

/// Bit `c` (< 8) of every byte of `v`, as 0 or 1 in that byte (Q5_K's fifth bits, Q3_K's
/// `hmask`): a 16-bit shift, then a byte mask that keeps exactly the bit from the same byte.
#[inline(always)]
unsafe fn bit_plane(v: __m256i, c: usize) -> __m256i {
    let moved = _mm256_srl_epi16(v, _mm_cvtsi32_si128(c as i32));
    _mm256_and_si256(moved, _mm256_set1_epi8(0x01))
}

/// The transposed bytes `8j..8j + 8` at `at` of a record, `j < N`: byte `j` of every row.
///
/// # Safety
/// The record must hold `8N` bytes at `at`.
#[inline(always)]
unsafe fn byte_rows<const N: usize>(record: *const u8, at: usize) -> [u64; N] {
    std::array::from_fn(|j| record.add(at + 8 * j).cast::<u64>().read_unaligned())
}

/// Q4_K records (`FIFTH` false) and Q5_K records (`FIFTH` true): one super-block of eight
/// chunks; per chunk the scale is `d · sc` and the offset `−(dmin · m)`, computed exactly as the
/// row-major decoder does. Q5_K's quant is the nibble plus 16 times its fifth bit.
struct KQuant<const FIFTH: bool>;
type Q4K = KQuant<false>;
type Q5K = KQuant<true>;

impl<const FIFTH: bool> LaneRecord for KQuant<FIFTH> {
    const BYTES: usize = 8 * if FIFTH { 176 } else { 144 };
    const CHUNKS: usize = 8;
    const KIND: ChunkKind = ChunkKind {
        signed: false,
        split: false,
        offsets: true,
        offset_multiple: 0,
        quant_bits: quant_bits(if FIFTH {
            GgmlType::Q5_K
        } else {
            GgmlType::Q4_K
        }),
    };
    const PREFETCH: Prefetch = Prefetch::L2;
    /// `d`, `dmin` and the transposed packed scale bytes.
    type Shared = (__m256, __m256, [u64; 12]);
    #[inline(always)]
    unsafe fn shared(record: *const u8) -> Self::Shared {
        // SAFETY: the record holds 96 scale bytes at Q4_K_SCALES.
        let packed = byte_rows::<12>(record, Q4_K_SCALES);
        (halves_at(record, 0), halves_at(record, Q4_K_DMIN), packed)
    }
    #[inline(always)]
    unsafe fn chunk(record: *const u8, shared: &Self::Shared, c: usize) -> LaneChunk {
        let (d, dmin, packed) = shared;
        let m4 = _mm256_set1_epi8(0x0F);
        let qs = if FIFTH { Q5_K_QS } else { Q4_K_QS };
        let mut q = [_mm256_setzero_si256(); 8];
        for (j, q) in q.iter_mut().enumerate() {
            // SAFETY: the record holds 1024 bytes of nibbles at `qs`; run c / 2 holds chunk
            // c's groups (low nibbles for even c, high for odd).
            let v = _mm256_loadu_si256(record.add(qs + 32 * (8 * (c / 2) + j)).cast());
            let v = if c.is_multiple_of(2) {
                v
            } else {
                _mm256_srli_epi16(v, 4)
            };
            *q = _mm256_and_si256(v, m4);
            if FIFTH {
                // SAFETY: a Q5_K record holds 8 words of fifth bits per row at Q5_K_QH. Bit c
                // of each byte is chunk c's; a 16-bit shift then a byte mask keeps exactly it.
                let qh = _mm256_loadu_si256(record.add(Q5_K_QH + 32 * j).cast());
                *q = _mm256_or_si256(*q, _mm256_slli_epi16(bit_plane(qh, c), 4));
            }
        }
        let (sc, m) = q4_k_scale_min(packed, c);
        let scale = _mm256_mul_ps(*d, byte_lanes(sc));
        // −(dmin·m), negated by the sign bit as `-x` is (not 0 − x, which turns −0 into +0).
        let offset = _mm256_xor_ps(_mm256_mul_ps(*dmin, byte_lanes(m)), _mm256_set1_ps(-0.0));
        LaneChunk {
            q,
            scale: [scale; 2],
            offset: [offset; 2],
        }
    }
}

/// Q6_K records: one super-block of eight chunks, each half with its own scale `d · sc` and
/// offset `−32` times that. Chunk `c` lies in half `c / 4` of the super-block: nibble
/// `(c % 4) / 2` of `ql` run `2·(c / 4) + c % 2`, and bits `2·(c % 4)` of `qh` run `c / 4`.
struct Q6K;

impl LaneRecord for Q6K {
    const BYTES: usize = 8 * 210;
    const CHUNKS: usize = 8;
    const KIND: ChunkKind = ChunkKind {
        signed: false,
        split: true,
        offsets: true,
        offset_multiple: offset_multiple(GgmlType::Q6_K),
        quant_bits: quant_bits(GgmlType::Q6_K),
    };
    const PREFETCH: Prefetch = Prefetch::L2;
    type Shared = __m256;
    #[inline(always)]
    unsafe fn shared(record: *const u8) -> __m256 {
        halves_at(record, 0)
    }
    #[inline(always)]
    unsafe fn chunk(record: *const u8, d: &__m256, c: usize) -> LaneChunk {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x03);
        let (half, k) = (c / 4, c % 4);
        let low_shift = _mm_cvtsi32_si128(4 * (k / 2) as i32);
        let high_shift = _mm_cvtsi32_si128(2 * k as i32);
        let mut q = [_mm256_setzero_si256(); 8];
        for (j, q) in q.iter_mut().enumerate() {
            // SAFETY: the record's ql holds 32 words and qh 16 words per row.
            let ql = _mm256_loadu_si256(
                record
                    .add(Q6_K_QL + 32 * (16 * half + 8 * (k % 2) + j))
                    .cast(),
            );
            let qh = _mm256_loadu_si256(record.add(Q6_K_QH + 32 * (8 * half + j)).cast());
            let low = _mm256_and_si256(_mm256_srl_epi16(ql, low_shift), m4);
            let high = _mm256_and_si256(_mm256_srl_epi16(qh, high_shift), m2);
            *q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
        }
        let mut scale = [_mm256_setzero_ps(); 2];
        let mut offset = [_mm256_setzero_ps(); 2];
        for i in 0..2 {
            // SAFETY: the record holds 16 × 8 scale bytes at Q6_K_SCALES.
            let sc = record.add(Q6_K_SCALES + 8 * (2 * c + i)).cast::<u64>();
            scale[i] = _mm256_mul_ps(*d, signed_byte_lanes(sc.read_unaligned()));
            offset[i] = _mm256_mul_ps(_mm256_set1_ps(-32.0), scale[i]);
        }
        LaneChunk { q, scale, offset }
    }
}

/// IQ4_XS records: one super-block of eight chunks, each an IQ4_NL record's nibbles (table
/// values, signed) with the scale `d · (ls − 32)`, `ls` the chunk's 6-bit scale (low four bits
/// from `scales_l`, high two from `scales_h`), computed exactly as the row-major decoder does.
struct Iq4Xs;

impl LaneRecord for Iq4Xs {
    const BYTES: usize = 8 * 136;
    const CHUNKS: usize = 8;
    const KIND: ChunkKind = ChunkKind {
        signed: true,
        split: false,
        offsets: false,
        offset_multiple: 0,
        quant_bits: quant_bits(GgmlType::IQ4_XS),
    };
    const PREFETCH: Prefetch = Prefetch::L1(2 * PREFETCH_AHEAD);
    /// `d`, the transposed `scales_h` and `scales_l` bytes.
    type Shared = (__m256, [u64; 2], [u64; 4]);
    #[inline(always)]
    unsafe fn shared(record: *const u8) -> Self::Shared {
        // SAFETY: the record holds 16 bytes of scales_h and 32 of scales_l at their offsets.
        let high = byte_rows::<2>(record, IQ4_XS_SCALES_H);
        let low = byte_rows::<4>(record, IQ4_XS_SCALES_L);
        (halves_at(record, 0), high, low)
    }
    #[inline(always)]
    unsafe fn chunk(record: *const u8, shared: &Self::Shared, c: usize) -> LaneChunk {
        use super::avx2_interleaved::{iq4_values, nibble_groups};
        let (d, high, low) = shared;
        let mut q = [_mm256_setzero_si256(); 8];
        for k in 0..4 {
            // SAFETY: chunk c's nibbles are the 128 bytes at IQ4_XS_QS + 128c.
            let (lo, hi) = nibble_groups(record, IQ4_XS_QS + 128 * c, k);
            (q[k], q[k + 4]) = (iq4_values(lo), iq4_values(hi));
        }
        let ls =
            ((low[c / 2] >> (4 * (c % 2))) & LOW4) | (((high[c / 4] >> (2 * (c % 4))) & LOW2) << 4);
        // `ls − 32` is exact in f32, so one rounding, as the decoder's `d · (ls − 32)`.
        let scale = _mm256_mul_ps(*d, _mm256_sub_ps(byte_lanes(ls), _mm256_set1_ps(32.0)));
        LaneChunk {
            q,
            scale: [scale; 2],
            offset: [_mm256_setzero_ps(); 2],
        }
    }
}

/// Chunk `c`'s element groups of Q2_K's or Q3_K's two-bit quants: bits `2·(c % 4)` of `qs`
/// words `8·(c / 4) + j` (a 16-bit shift, then a byte mask keeps exactly them).
///
/// # Safety
/// The record must hold 16 transposed `qs` words per row at `qs`.
#[inline(always)]
unsafe fn two_bit_groups(record: *const u8, qs: usize, c: usize) -> [__m256i; 8] {
    let shift = _mm_cvtsi32_si128(2 * (c % 4) as i32);
    let m2 = _mm256_set1_epi8(0x03);
    std::array::from_fn(|j| {
        let v = _mm256_loadu_si256(record.add(qs + 32 * (8 * (c / 4) + j)).cast());
        _mm256_and_si256(_mm256_srl_epi16(v, shift), m2)
    })
}

/// Q2_K records: one super-block of eight chunks, each half with its own scale `d · (s & 15)`
/// and offset `−(dmin · (s >> 4))`, `s` the half's scale byte, computed exactly as the
/// row-major decoder does.
struct Q2K;

impl LaneRecord for Q2K {
    const BYTES: usize = 8 * 84;
    const CHUNKS: usize = 8;
    const KIND: ChunkKind = ChunkKind {
        signed: false,
        split: true,
        offsets: true,
        offset_multiple: 0,
        quant_bits: quant_bits(GgmlType::Q2_K),
    };
    const PREFETCH: Prefetch = Prefetch::L1(2 * PREFETCH_AHEAD);
    /// `d`, `dmin` and the transposed scale bytes.
    type Shared = (__m256, __m256, [u64; 16]);
    #[inline(always)]
    unsafe fn shared(record: *const u8) -> Self::Shared {
        // SAFETY: the record holds 16 f16 at 0 and 128 scale bytes at Q2_K_SCALES.
        let scales = byte_rows::<16>(record, Q2_K_SCALES);
        (halves_at(record, 0), halves_at(record, Q2_K_DMIN), scales)
    }
    #[inline(always)]
    unsafe fn chunk(record: *const u8, shared: &Self::Shared, c: usize) -> LaneChunk {
        let (d, dmin, scales) = shared;
        // SAFETY: the record holds 16 qs words per row at Q2_K_QS.
        let q = two_bit_groups(record, Q2_K_QS, c);
        let mut scale = [_mm256_setzero_ps(); 2];
        let mut offset = [_mm256_setzero_ps(); 2];
        for h in 0..2 {
            let s = scales[2 * c + h];
            scale[h] = _mm256_mul_ps(*d, byte_lanes(s & LOW4));
            // −(dmin·m), negated by the sign bit as `-x` is.
            let m = _mm256_mul_ps(*dmin, byte_lanes((s >> 4) & LOW4));
            offset[h] = _mm256_xor_ps(m, _mm256_set1_ps(-0.0));
        }
        LaneChunk { q, scale, offset }
    }
}

/// Q3_K records: one super-block of eight chunks; a quant is its two low bits plus 4 times its
/// `hmask` bit (bit `c` of `hmask` word `j` for chunk `c`), each half with its own scale
/// `d · (ls − 32)` (`ls` its 6-bit scale) and offset `−4` times that, computed exactly as the
/// row-major decoder does.
struct Q3K;

impl LaneRecord for Q3K {
    const BYTES: usize = 8 * 110;
    const CHUNKS: usize = 8;
    const KIND: ChunkKind = ChunkKind {
        signed: false,
        split: true,
        offsets: true,
        offset_multiple: offset_multiple(GgmlType::Q3_K),
        quant_bits: quant_bits(GgmlType::Q3_K),
    };
    const PREFETCH: Prefetch = Prefetch::L1(2 * PREFETCH_AHEAD);
    /// `d` and the transposed packed scale bytes.
    type Shared = (__m256, [u64; 12]);
    #[inline(always)]
    unsafe fn shared(record: *const u8) -> Self::Shared {
        // SAFETY: the record holds 8 f16 at 0 and 96 scale bytes at Q3_K_SCALES.
        (halves_at(record, 0), byte_rows::<12>(record, Q3_K_SCALES))
    }
    #[inline(always)]
    unsafe fn chunk(record: *const u8, shared: &Self::Shared, c: usize) -> LaneChunk {
        let (d, packed) = shared;
        // SAFETY: the record holds 16 qs words and 8 hmask words per row at their offsets.
        let mut q = two_bit_groups(record, Q3_K_QS, c);
        for (j, q) in q.iter_mut().enumerate() {
            let mask = _mm256_loadu_si256(record.add(Q3_K_HMASK + 32 * j).cast());
            *q = _mm256_or_si256(*q, _mm256_slli_epi16(bit_plane(mask, c), 2));
        }
        let mut scale = [_mm256_setzero_ps(); 2];
        let mut offset = [_mm256_setzero_ps(); 2];
        for h in 0..2 {
            // `quant::q3_k_scales` for sub-block i = 2c + h, on eight rows at once.
            let i = 2 * c + h;
            let low = (packed[i % 8] >> (4 * (i / 8))) & LOW4;
            let high = (packed[8 + i % 4] >> (2 * (i / 4))) & LOW2;
            // `ls − 32` is exact in f32, so one rounding, as the decoder's `d · (ls − 32)`.
            let ls = _mm256_sub_ps(byte_lanes(low | (high << 4)), _mm256_set1_ps(32.0));
            scale[h] = _mm256_mul_ps(*d, ls);
            offset[h] = _mm256_mul_ps(_mm256_set1_ps(-4.0), scale[h]);
        }
        LaneChunk { q, scale, offset }
    }
}

/// Defines the decode entry points of one instruction set: `$matvec`, the interleaved decode
/// mat-vec, and `$rows`, the decode mat-vec over GGUF's layout, with the byte dot product
/// `$dot` and the `target_feature`s it needs. (The prefill tiles are [`tile_decoded_avx2`] and,
/// over packed pairs of groups, [`tile_pair_vnni`].)
macro_rules! lane_entries {
    ($isa:literal, $matvec:ident, $rows:ident, $dot:ty, $features:literal) => {
        /// `n_tokens` tokens (from `first_token` of `acts`) through the eight-row groups
        /// `groups` of the interleaved matrix `w`; calls `store(t, r, y)` for every output, `t`
        /// counted in `acts`. The decode mat-vec: records are unpacked in registers, once per
        /// sweep of tokens.
        ///
        /// # Safety
        #[doc = concat!("The CPU must support ", $isa, ".")]
        /// `w` must be interleaved (`super::Layout`) with consistent shape and a type
        /// `interleaved::has_interleaved_form` accepts, and `acts` must hold
        /// `first_token + n_tokens` tokens of `w.cols` values (checked; failing is a caller's
        /// bug and panics).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $matvec(
            w: &super::WeightMatrix,
            groups: std::ops::Range<usize>,
            acts: &QuantizedActivations,
            first_token: usize,
            n_tokens: usize,
            mut store: impl FnMut(usize, usize, f32),
        ) {
            use super::avx2_interleaved as records;
            let (g, a, t, n, s) = (groups, acts, first_token, n_tokens, &mut store);
            match w.ty {
                GgmlType::Q4_0 => matvec_records::<Legacy<records::Q4_0>, $dot>(w, g, a, t, n, s),
                GgmlType::Q4_1 => matvec_records::<Legacy<records::Q4_1>, $dot>(w, g, a, t, n, s),
                GgmlType::Q5_0 => matvec_records::<Legacy<records::Q5_0>, $dot>(w, g, a, t, n, s),
                GgmlType::Q5_1 => matvec_records::<Legacy<records::Q5_1>, $dot>(w, g, a, t, n, s),
                GgmlType::Q8_0 => matvec_records::<Legacy<records::Q8_0>, $dot>(w, g, a, t, n, s),
                GgmlType::IQ4_NL => {
                    matvec_records::<Legacy<records::Iq4Nl>, $dot>(w, g, a, t, n, s)
                }
                GgmlType::Q4_K => matvec_records::<Q4K, $dot>(w, g, a, t, n, s),
                GgmlType::Q5_K => matvec_records::<Q5K, $dot>(w, g, a, t, n, s),
                GgmlType::Q6_K => matvec_records::<Q6K, $dot>(w, g, a, t, n, s),
                GgmlType::IQ4_XS => matvec_records::<Iq4Xs, $dot>(w, g, a, t, n, s),
                GgmlType::Q2_K => matvec_records::<Q2K, $dot>(w, g, a, t, n, s),
                GgmlType::Q3_K => matvec_records::<Q3K, $dot>(w, g, a, t, n, s),
                other => panic!("no interleaved form for {other}"),
            }
        }

        /// `n_tokens` tokens (from `first_token` of `acts`) through the eight-row groups
        /// `groups` of `w` in GGUF's layout (a last group may be partial); calls
        /// `store(t, r, y)` for every output. The decode mat-vec for the types without an
        /// interleaved form: each block of the group's rows is decoded into a few kilobytes
        /// that stay in L1 and transposed into lanes in registers, so the weights are read once
        /// per sweep of tokens and never written back out.
        ///
        /// # Safety
        #[doc = concat!("The CPU must support ", $isa, ".")]
        /// `w` must be block-quantized in GGUF's layout with consistent shape, `groups` within
        /// its rows, and `acts` must hold `first_token + n_tokens` tokens of `w.cols` values
        /// (checked; failing is a caller's bug and panics).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $rows(
            w: &super::WeightMatrix,
            groups: std::ops::Range<usize>,
            acts: &QuantizedActivations,
            first_token: usize,
            n_tokens: usize,
            mut store: impl FnMut(usize, usize, f32),
        ) {
            matvec_rows::<$dot>(w, groups, acts, first_token, n_tokens, &mut store)
        }
    };
}

lane_entries!(
    "AVX2, FMA and F16C",
    matvec_avx2,
    matvec_rows_avx2,
    Maddubs,
    "avx2,fma,f16c"
);

lane_entries!(
    "AVX-512 F/BW/VL/VNNI besides AVX2 (`avx512::available`)",
    matvec_vnni,
    matvec_rows_vnni,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);

/// Eight decoded rows (in `avx2_interleaved::scatter_decoded_row`'s layout: `q` holds
/// [`DECODED_GROUP_BYTES`] per chunk, `scales` and `offsets` eight rows per half-chunk)
/// × the tokens `tokens` of `acts`: the prefill tile. With [`GroupOutputs::Buffer`],
/// `out[t - tokens.start]` gets token `t`'s eight rows; with [`GroupOutputs::Rows`] they go
/// straight to the matrix's output (see [`PairOutputs::Rows`] for why). Each chunk's eight
/// element groups are loaded once per sweep of tokens. `kind` is the type's [`chunk_kind_of`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
/// The group must hold `acts.n_chunks` chunks (`offsets` too when the type has
/// offsets), `acts` the tokens, and a buffer output at least `tokens.len()` entries (checked;
/// failing is a caller's bug and panics); for `GroupOutputs::Rows`, see
/// [`PairOutputs::Rows`]' contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_decoded_avx2(
    kind: KindFlags,
    group: DecodedGroup,
    acts: &QuantizedActivations,
    tokens: std::ops::Range<usize>,
    out: GroupOutputs<'_>,
) {
    tile_decoded::<Maddubs>(kind, group, acts, tokens, out)
}

/// Where [`tile_decoded_avx2`] puts each token's eight outputs.
pub(crate) enum GroupOutputs<'a> {
    /// A row per token: for a group whose rows run past the matrix's end.
    Buffer(&'a mut [[f32; GROUP_ROWS]]),
    /// Straight into the matrix's output, as [`PairOutputs::Rows`], eight values per token.
    Rows { first: *mut f32, stride: usize },
}

/// The mat-vec for one record type: per group, tokens in sweeps of up to
/// [`LaneDot::MATVEC_SWEEP`].
#[inline(always)]
unsafe fn matvec_records<K: LaneRecord, D: LaneDot>(
    w: &super::WeightMatrix,
    groups: std::ops::Range<usize>,
    acts: &QuantizedActivations,
    first_token: usize,
    n_tokens: usize,
    store: &mut impl FnMut(usize, usize, f32),
) {
    let nc = acts.n_chunks;
    let n_records = nc / K::CHUNKS;
    let end = first_token + n_tokens;
    check_inputs(w, &groups, acts, end, K::BYTES, K::CHUNKS);
    check_chunk_sums(acts, end);
    for g in groups {
        let group = w.data[g * n_records * K::BYTES..].as_ptr();
        let mut t = first_token;
        while t < end {
            let prefetch = t == first_token;
            // SAFETY: the group holds `n_records` records and `acts` tokens up to `end`
            // (checked above).
            let n = (end - t).min(D::MATVEC_SWEEP);
            match n {
                1 => matvec_sweep::<K, D, 1>(group, n_records, acts, t, prefetch, g, store),
                2 => matvec_sweep::<K, D, 2>(group, n_records, acts, t, prefetch, g, store),
                3 => matvec_sweep::<K, D, 3>(group, n_records, acts, t, prefetch, g, store),
                4 => matvec_sweep::<K, D, 4>(group, n_records, acts, t, prefetch, g, store),
                5 => matvec_sweep::<K, D, 5>(group, n_records, acts, t, prefetch, g, store),
                6 => matvec_sweep::<K, D, 6>(group, n_records, acts, t, prefetch, g, store),
                7 => matvec_sweep::<K, D, 7>(group, n_records, acts, t, prefetch, g, store),
                _ => matvec_sweep::<K, D, 8>(group, n_records, acts, t, prefetch, g, store),
            }
            t += n;
        }
    }
}

/// Tokens `t0..t0 + NT` through group `g`'s `n_records` records at `group`.
///
/// # Safety
/// As [`matvec_records`]' checks guarantee.
#[inline(always)]
unsafe fn matvec_sweep<K: LaneRecord, D: LaneDot, const NT: usize>(
    group: *const u8,
    n_records: usize,
    acts: &QuantizedActivations,
    t0: usize,
    prefetch: bool,
    g: usize,
    store: &mut impl FnMut(usize, usize, f32),
) {
    let nc = acts.n_chunks;
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    for i in 0..n_records {
        let record = group.add(i * K::BYTES);
        if prefetch {
            prefetch_record_to(K::PREFETCH, record, K::BYTES);
        }
        let shared = K::shared(record);
        for c in 0..K::CHUNKS {
            let chunk = K::chunk(record, &shared, c);
            let at = t0 * nc + i * K::CHUNKS + c;
            accumulate_chunk::<D, NT>(K::KIND, &chunk, acts, at, nc, &mut acc);
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (r, y) in lane_outputs(K::KIND, acc).into_iter().enumerate() {
            store(t0 + t, g * GROUP_ROWS + r, y);
        }
    }
}

/// Unpacks group `g` of the interleaved matrix `w` into [`tile_decoded`]'s layout (`q`: one
/// [`DECODED_GROUP_BYTES`] run per chunk; `scales`, `offsets`: eight rows per half-chunk),
/// straight from its records: the values `decoded::decode_row_scalar` gives each row, without
/// gathering rows back into GGUF form first.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `w` must be interleaved with a type
/// `interleaved::has_interleaved_form` accepts and `g` one of its groups; the buffers must hold
/// `w.cols / 32` chunks (checked; failing is a caller's bug and panics).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn unpack_group(
    w: &super::WeightMatrix,
    g: usize,
    (q, scales, offsets): (&mut [u8], &mut [Lanes8], &mut [Lanes8]),
) {
    use super::avx2_interleaved as records;
    let out = (q, scales, offsets);
    match w.ty {
        GgmlType::Q4_0 => unpack_records::<Legacy<records::Q4_0>>(w, g, out),
        GgmlType::Q4_1 => unpack_records::<Legacy<records::Q4_1>>(w, g, out),
        GgmlType::Q5_0 => unpack_records::<Legacy<records::Q5_0>>(w, g, out),
        GgmlType::Q5_1 => unpack_records::<Legacy<records::Q5_1>>(w, g, out),
        GgmlType::Q8_0 => unpack_records::<Legacy<records::Q8_0>>(w, g, out),
        GgmlType::Q4_K => unpack_records::<Q4K>(w, g, out),
        GgmlType::Q5_K => unpack_records::<Q5K>(w, g, out),
        GgmlType::Q6_K => unpack_records::<Q6K>(w, g, out),
        GgmlType::IQ4_NL => unpack_records::<Legacy<records::Iq4Nl>>(w, g, out),
        GgmlType::IQ4_XS => unpack_records::<Iq4Xs>(w, g, out),
        GgmlType::Q2_K => unpack_records::<Q2K>(w, g, out),
        GgmlType::Q3_K => unpack_records::<Q3K>(w, g, out),
        other => panic!("no interleaved form for {other}"),
    }
}

/// [`unpack_group`] for one record type.
#[inline(always)]
unsafe fn unpack_records<K: LaneRecord>(
    w: &super::WeightMatrix,
    g: usize,
    (q, scales, offsets): (&mut [u8], &mut [Lanes8], &mut [Lanes8]),
) {
    let nc = w.cols / super::decoded::CHUNK;
    let n_records = nc / K::CHUNKS;
    assert!(
        w.layout == super::Layout::Interleaved8
            && nc.is_multiple_of(K::CHUNKS)
            && w.data.len() >= (g + 1) * n_records * K::BYTES
            && q.len() >= nc * DECODED_GROUP_BYTES
            && scales.len() >= 2 * nc
            && offsets.len() >= 2 * nc
    );
    let group = w.data[g * n_records * K::BYTES..].as_ptr();
    let (qp, sp, op) = (q.as_mut_ptr(), scales.as_mut_ptr(), offsets.as_mut_ptr());
    for i in 0..n_records {
        // SAFETY: the group holds `n_records` records (checked).
        let record = group.add(i * K::BYTES);
        let shared = K::shared(record);
        for c in 0..K::CHUNKS {
            let chunk = K::chunk(record, &shared, c);
            let at = i * K::CHUNKS + c;
            for (j, &group) in chunk.q.iter().enumerate() {
                // SAFETY: chunk `at` < nc has its DECODED_GROUP_BYTES in `q` (checked).
                _mm256_storeu_si256(qp.add(at * DECODED_GROUP_BYTES + 32 * j).cast(), group);
            }
            for h in 0..2 {
                // SAFETY: half 2·at + h < 2·nc of both (checked); `Lanes8` is 32-byte aligned.
                _mm256_store_ps(sp.add(2 * at + h).cast(), chunk.scale[h]);
                let offset = if K::KIND.offsets {
                    chunk.offset[h]
                } else {
                    _mm256_setzero_ps()
                };
                _mm256_store_ps(op.add(2 * at + h).cast(), offset);
            }
        }
    }
}

/// One group's unpacked chunks as the prefill tile reads them: quants, and each half's scales
/// and offsets.
pub(crate) type DecodedGroup<'a> = (&'a [u8], &'a [Lanes8], &'a [Lanes8]);

/// The prefill tile (see `lane_entries!`) for one instruction set.
///
/// # Safety
/// As the entry points'.
#[inline(always)]
unsafe fn tile_decoded<D: LaneDot>(
    kind: KindFlags,
    group: DecodedGroup,
    acts: &QuantizedActivations,
    tokens: std::ops::Range<usize>,
    out: GroupOutputs<'_>,
) {
    match out {
        GroupOutputs::Buffer(out) => {
            check_tile_inputs(kind, group, acts, &tokens, out.len());
            with_chunk_kind!(kind, |KIND| {
                tile_sweeps::<D>(KIND, group, acts, tokens, &mut BufferSink(out))
            })
        }
        GroupOutputs::Rows { first, stride } => {
            check_tile_inputs(kind, group, acts, &tokens, tokens.len());
            with_chunk_kind!(kind, |KIND| {
                tile_sweeps::<D>(KIND, group, acts, tokens, &mut RowSink { first, stride })
            })
        }
    }
}

/// Panics unless `group` holds `acts.n_chunks` chunks (with offsets where the type has them),
/// `acts` holds the tokens `tokens` with their sums, and `out_len` outputs cover them: what
/// the tiles rely on (a failure is a caller's bug).
fn check_tile_inputs(
    kind: KindFlags,
    group: DecodedGroup,
    acts: &QuantizedActivations,
    tokens: &std::ops::Range<usize>,
    out_len: usize,
) {
    check_group(kind, group, acts.n_chunks);
    check_tile_tokens(acts, tokens, out_len);
}

/// Panics unless `group` holds `n_chunks` chunks, with offsets where the type has them.
fn check_group(kind: KindFlags, (q, scales, offsets): DecodedGroup, n_chunks: usize) {
    assert!(
        q.len() >= n_chunks * DECODED_GROUP_BYTES
            && scales.len() >= 2 * n_chunks
            && (!kind.2 || offsets.len() >= 2 * n_chunks)
    );
}

/// Panics unless `acts` holds the tokens `tokens` with their sums and `out_len` outputs cover
/// them.
fn check_tile_tokens(acts: &QuantizedActivations, tokens: &std::ops::Range<usize>, out_len: usize) {
    let nc = acts.n_chunks;
    assert!(
        acts.q.len() >= tokens.end * nc
            && acts.d.len() >= tokens.end * nc
            && acts.half_sums.len() >= tokens.end * nc
            && out_len >= tokens.len()
    );
    check_chunk_sums(acts, tokens.end);
}

/// The tile's sweeps for one kind of chunk.
///
/// # Safety
/// As the tile entry points', whose checks it relies on.
#[inline(always)]
unsafe fn tile_sweeps<D: LaneDot>(
    kind: ChunkKind,
    group: DecodedGroup,
    acts: &QuantizedActivations,
    tokens: std::ops::Range<usize>,
    sink: &mut impl TileSink<__m256>,
) {
    let mut t = tokens.start;
    while t < tokens.end {
        let at = t - tokens.start;
        let n = sweep_tokens(tokens.end - t);
        match n {
            1 => tile_sweep::<D, 1>(kind, group, acts, t, at, sink),
            2 => tile_sweep::<D, 2>(kind, group, acts, t, at, sink),
            3 => tile_sweep::<D, 3>(kind, group, acts, t, at, sink),
            _ => tile_sweep::<D, 4>(kind, group, acts, t, at, sink),
        }
        t += n;
    }
}

/// Tokens `t0..t0 + NT` through one decoded group, into `sink` as the call's tokens
/// `at..at + NT`.
///
/// # Safety
/// As the tile entry points', whose checks it relies on.
#[inline(always)]
unsafe fn tile_sweep<D: LaneDot, const NT: usize>(
    kind: ChunkKind,
    group: DecodedGroup,
    acts: &QuantizedActivations,
    t0: usize,
    at: usize,
    sink: &mut impl TileSink<__m256>,
) {
    let nc = acts.n_chunks;
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    for c in 0..nc {
        // SAFETY: the group holds chunk c (checked by the caller).
        let chunk = decoded_chunk(kind, group, c);
        accumulate_chunk::<D, NT>(kind, &chunk, acts, t0 * nc + c, nc, &mut acc);
    }
    for (t, acc) in acc.iter().enumerate() {
        sink.put(at + t, lane_sum(kind, acc));
    }
}

/// Two groups' chunk as the AVX-512 prefill tile reads it ([`tile_pair_vnni`]), packed once
/// per block of groups by [`pack_pair`]: group `a`'s rows in lanes 0..8 of every 64-byte row,
/// `b`'s in lanes 8..16; quants as [`Vnni::prepare`] makes them, then each half's scales and
/// (float) offsets.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct PairChunk {
    q: [[u8; 64]; 8],
    scale: [[f32; 16]; 2],
    offset: [[f32; 16]; 2],
}

impl PairChunk {
    pub(crate) const ZERO: Self = Self {
        q: [[0; 64]; 8],
        scale: [[0.0; 16]; 2],
        offset: [[0.0; 16]; 2],
    };
}

/// Packs two decoded groups (`b` may be a group of zeros standing in for a missing one) into
/// `out[..n_chunks]`, chunk by chunk, as [`tile_pair_vnni`] reads them: the joins and the
/// quants' `+ 128` that every sweep of tokens would otherwise redo.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI besides AVX2, FMA and F16C
/// (`avx512::available`). Both groups must hold `n_chunks` chunks (`offsets` too when the
/// type has offsets) and `out` `n_chunks` entries (checked; failing is a caller's bug and
/// panics).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn pack_pair(
    kind: KindFlags,
    groups: (DecodedGroup, DecodedGroup),
    n_chunks: usize,
    out: &mut [PairChunk],
) {
    check_group(kind, groups.0, n_chunks);
    check_group(kind, groups.1, n_chunks);
    assert!(out.len() >= n_chunks);
    with_chunk_kind!(kind, |KIND| {
        for (c, packed) in out[..n_chunks].iter_mut().enumerate() {
            // SAFETY: both groups hold chunk c (checked).
            let (a, b) = (
                decoded_chunk(KIND, groups.0, c),
                decoded_chunk(KIND, groups.1, c),
            );
            let regs = join_lane_chunks(KIND, &a, &b);
            for (row, w) in packed.q.iter_mut().zip(regs.w) {
                // SAFETY: a `PairChunk`'s rows are 64 bytes, 64-byte aligned.
                _mm512_store_si512(row.as_mut_ptr().cast(), w);
            }
            for h in 0..2 {
                _mm512_store_ps(packed.scale[h].as_mut_ptr(), regs.scale[h]);
                _mm512_store_ps(packed.offset[h].as_mut_ptr(), regs.offset[h]);
            }
        }
    })
}

/// Two groups' chunk in 512-bit registers, as [`PairChunk`] holds it in memory.
struct PairRegs {
    w: [__m512i; 8],
    scale: [__m512; 2],
    offset: [__m512; 2],
}

impl PairRegs {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Self {
            w: [_mm512_setzero_si512(); 8],
            scale: [_mm512_setzero_ps(); 2],
            offset: [_mm512_setzero_ps(); 2],
        }
    }

    /// # Safety
    /// The CPU must support AVX-512 F.
    #[inline(always)]
    unsafe fn load(chunk: &PairChunk) -> Self {
        // (Loops, not `array::from_fn`: a closure does not inherit the caller's target
        // features, so the intrinsics in it would not be inlined.)
        let mut regs = Self::zero();
        for (w, row) in regs.w.iter_mut().zip(&chunk.q) {
            // SAFETY: a `PairChunk`'s rows are 64 bytes, 64-byte aligned.
            *w = _mm512_load_si512(row.as_ptr().cast());
        }
        for h in 0..2 {
            regs.scale[h] = _mm512_load_ps(chunk.scale[h].as_ptr());
            regs.offset[h] = _mm512_load_ps(chunk.offset[h].as_ptr());
        }
        regs
    }
}

/// Two groups' chunks joined, `a`'s rows in lanes 0..8, with the quants as [`Vnni::prepare`]
/// makes them: `q + 128` for signed quants, `q − k + 128` for offsets of `−k` scales.
#[inline(always)]
unsafe fn join_lane_chunks(kind: ChunkKind, a: &LaneChunk, b: &LaneChunk) -> PairRegs {
    // (Loops, not `array::from_fn`: see `PairRegs::load`.)
    let mut regs = PairRegs::zero();
    for (j, w) in regs.w.iter_mut().enumerate() {
        *w = join_si(a.q[j], b.q[j]);
        if kind.signed {
            *w = _mm512_xor_si512(*w, _mm512_set1_epi8(i8::MIN));
        } else if kind.int_offsets() {
            *w = _mm512_add_epi8(
                *w,
                _mm512_set1_epi8((128 - kind.offset_multiple) as u8 as i8),
            );
        }
    }
    for h in 0..2 {
        regs.scale[h] = join_ps(a.scale[h], b.scale[h]);
        regs.offset[h] = join_ps(a.offset[h], b.offset[h]);
    }
    regs
}

/// Two groups (sixteen rows), packed by [`pack_pair`], × the tokens `tokens` of `acts`: the
/// AVX-512 prefill tile with 512-bit registers, the first group's rows in the low eight lanes
/// and the second's in the high eight. `out.0` and `out.1` get the groups' outputs, as
/// [`tile_decoded_avx2`]'s `out`, or (`PairOutputs::Rows`) all sixteen go straight to the
/// matrix's output.
///
/// Why: in rows-in-lanes every `vpdpbusd` takes one activation word broadcast from memory, so
/// on 256-bit registers the loads (eight weight groups, then one broadcast per dot product,
/// per token) bound the tile, not the multiplies (llvm-mca's Zen 4 model: 25 cycles of loads
/// per 32 dot products of 256 bits). A 512-bit register holds sixteen rows, so each broadcast
/// serves twice the multiply-adds. The pairs are packed once per block, not joined again in
/// every sweep of tokens: on an Intel core the joins and the `+ 128` took the vector ports the
/// dot products need. Every lane does the operations of the 256-bit tile (and of the scalar
/// twin), so the bits are the same.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI besides AVX2, FMA and F16C
/// (`avx512::available`). `pairs` must hold `acts.n_chunks` chunks, `acts` the tokens, and both
/// split outputs at least `tokens.len()` entries (checked; failing is a caller's bug and
/// panics); for `PairOutputs::Rows`, see its contract.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn tile_pair_vnni(
    kind: KindFlags,
    pairs: &[PairChunk],
    acts: &QuantizedActivations,
    tokens: std::ops::Range<usize>,
    out: PairOutputs<'_>,
) {
    assert!(pairs.len() >= acts.n_chunks);
    match out {
        PairOutputs::Split(a, b) => {
            check_tile_tokens(acts, &tokens, a.len().min(b.len()));
            pair_sweeps(kind, pairs, acts, tokens, &mut SplitSink(a, b));
        }
        PairOutputs::Rows { first, stride } => {
            check_tile_tokens(acts, &tokens, tokens.len());
            pair_sweeps(kind, pairs, acts, tokens, &mut RowSink { first, stride });
        }
    }
}

/// Where [`tile_pair_vnni`] puts each token's sixteen outputs.
pub(crate) enum PairOutputs<'a> {
    /// Each group's eight in its own buffer, a row per token: for a pair whose second group is
    /// padding or whose rows run past the matrix's end.
    Split(&'a mut [[f32; GROUP_ROWS]], &'a mut [[f32; GROUP_ROWS]]),
    /// Straight into the matrix's output, token `t`'s (the `t`-th of `tokens`) sixteen values
    /// at `first + t · stride`: one store per token from the accumulator, in the middle of the
    /// next sweep's work, where copying them out of a buffer afterwards missed the cache on
    /// every store (the rows of a prompt's output lie `stride` floats apart) and cost about 7%
    /// of a long prompt. The caller guarantees that those values are writable and that no one
    /// else reads or writes them during the call.
    Rows { first: *mut f32, stride: usize },
}

/// A token's outputs of a tile (eight rows in a 256-bit register, or a pair's sixteen in a
/// 512-bit one) on their way out.
trait TileSink<V> {
    /// Puts the outputs of the `t`-th token of the call.
    ///
    /// # Safety
    /// The register's instruction set must be available; `t` must be one of the call's tokens.
    unsafe fn put(&mut self, t: usize, outputs: V);
}

/// [`GroupOutputs::Buffer`]'s rows.
struct BufferSink<'a>(&'a mut [[f32; GROUP_ROWS]]);

impl TileSink<__m256> for BufferSink<'_> {
    #[inline(always)]
    unsafe fn put(&mut self, t: usize, outputs: __m256) {
        // SAFETY: `self.0[t]` is 8 writable f32 (bounds-checked).
        _mm256_storeu_ps(self.0[t].as_mut_ptr(), outputs);
    }
}

/// [`PairOutputs::Split`]'s buffers.
struct SplitSink<'a>(&'a mut [[f32; GROUP_ROWS]], &'a mut [[f32; GROUP_ROWS]]);

impl TileSink<__m512> for SplitSink<'_> {
    #[inline(always)]
    unsafe fn put(&mut self, t: usize, both: __m512) {
        // SAFETY: `self.0[t]` and `self.1[t]` are 8 writable f32 each (bounds-checked).
        _mm256_storeu_ps(self.0[t].as_mut_ptr(), _mm512_castps512_ps256(both));
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(both)));
        _mm256_storeu_ps(self.1[t].as_mut_ptr(), hi);
    }
}

/// [`PairOutputs::Rows`]' and [`GroupOutputs::Rows`]' destination.
struct RowSink {
    first: *mut f32,
    stride: usize,
}

impl TileSink<__m512> for RowSink {
    #[inline(always)]
    unsafe fn put(&mut self, t: usize, both: __m512) {
        // SAFETY: the sixteen values at first + t · stride are writable and this call's alone
        // (`PairOutputs::Rows`' contract).
        _mm512_storeu_ps(self.first.add(t * self.stride), both);
    }
}

impl TileSink<__m256> for RowSink {
    #[inline(always)]
    unsafe fn put(&mut self, t: usize, outputs: __m256) {
        // SAFETY: the eight values at first + t · stride are writable and this call's alone
        // (`GroupOutputs::Rows`' contract).
        _mm256_storeu_ps(self.first.add(t * self.stride), outputs);
    }
}

/// [`tile_pair_vnni`]'s sweeps of tokens, into `sink`.
///
/// # Safety
/// As [`tile_pair_vnni`]'s, whose checks it relies on.
#[inline(always)]
unsafe fn pair_sweeps(
    kind: KindFlags,
    pairs: &[PairChunk],
    acts: &QuantizedActivations,
    tokens: std::ops::Range<usize>,
    sink: &mut impl TileSink<__m512>,
) {
    with_chunk_kind!(kind, |KIND| {
        let mut t = tokens.start;
        while t < tokens.end {
            let at = t - tokens.start;
            let n = (tokens.end - t).min(pair_sweep(KIND));
            match n {
                1 => tile_pair_sweep::<1>(KIND, pairs, acts, t, at, sink),
                2 => tile_pair_sweep::<2>(KIND, pairs, acts, t, at, sink),
                3 => tile_pair_sweep::<3>(KIND, pairs, acts, t, at, sink),
                4 => tile_pair_sweep::<4>(KIND, pairs, acts, t, at, sink),
                5 => tile_pair_sweep::<5>(KIND, pairs, acts, t, at, sink),
                6 => tile_pair_sweep::<6>(KIND, pairs, acts, t, at, sink),
                7 => tile_pair_sweep::<7>(KIND, pairs, acts, t, at, sink),
                _ => tile_pair_sweep::<8>(KIND, pairs, acts, t, at, sink),
            }
            t += n;
        }
    })
}

/// Tokens per sweep of [`tile_pair_vnni`]: eight (each token's one accumulator beside the
/// chunk's eight weight registers), four where the halves have their own scales. With two
/// accumulators per token, eight tokens left the compiler too few registers: it kept the
/// accumulators on the stack, and Q6_K's prefill got no faster from the packed pairs, where
/// it did with four (an Intel Emerald Rapids VM, 1B-shaped models, `egpu_bench`).
const fn pair_sweep(kind: ChunkKind) -> usize {
    if kind.split {
        4
    } else {
        8
    }
}

/// Two 256-bit halves as one 512-bit register (`lo` in lanes 0..8).
#[inline(always)]
unsafe fn join_ps(lo: __m256, hi: __m256) -> __m512 {
    // (AVX-512 F's 64-bit insert: the 32-bit one needs DQ, which `avx512::available` does not
    // ask for.)
    let lo = _mm512_castps_pd(_mm512_castps256_ps512(lo));
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(lo, _mm256_castps_pd(hi)))
}

/// Two 256-bit halves as one 512-bit register (`lo` in lanes 0..8).
#[inline(always)]
unsafe fn join_si(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Tokens `t0..t0 + NT` through a packed pair of groups, into `sink` as the call's tokens
/// `at..at + NT`.
///
/// # Safety
/// As [`tile_pair_vnni`]'s, whose checks it relies on.
#[inline(always)]
unsafe fn tile_pair_sweep<const NT: usize>(
    kind: ChunkKind,
    pairs: &[PairChunk],
    acts: &QuantizedActivations,
    t0: usize,
    at: usize,
    sink: &mut impl TileSink<__m512>,
) {
    let nc = acts.n_chunks;
    let mut acc = [[_mm512_setzero_ps(); 2]; NT];
    for (c, pair) in pairs[..nc].iter().enumerate() {
        let regs = PairRegs::load(pair);
        accumulate_pair_chunk::<NT>(kind, &regs, acts, t0 * nc + c, nc, &mut acc);
    }
    for (t, acc) in acc.iter().enumerate() {
        sink.put(at + t, pair_sum(kind, acc));
    }
}

/// Chunk `c` of a decoded group, loaded into registers (offsets only for float offsets, which
/// are all the tiles read of them).
///
/// # Safety
/// The group must hold chunk `c`, with its offsets where the kind has float offsets.
#[inline(always)]
unsafe fn decoded_chunk(
    kind: ChunkKind,
    (q, scales, offsets): DecodedGroup,
    c: usize,
) -> LaneChunk {
    let halves = |g: &[Lanes8]| -> [__m256; 2] {
        // SAFETY: halves 2c and 2c + 1 exist (the caller's contract); `Lanes8` is aligned.
        std::array::from_fn(|h| _mm256_load_ps(g.as_ptr().add(2 * c + h).cast()))
    };
    LaneChunk {
        // SAFETY: chunk c's eight groups of 32 bytes exist (the caller's contract).
        q: std::array::from_fn(|j| {
            _mm256_loadu_si256(q.as_ptr().add(c * DECODED_GROUP_BYTES + 32 * j).cast())
        }),
        scale: halves(scales),
        offset: if kind.float_offsets() {
            halves(offsets)
        } else {
            [_mm256_setzero_ps(); 2]
        },
    }
}

/// [`accumulate_chunk`] for two groups' chunk: the same operations per lane, on sixteen rows.
///
/// # Safety
/// `acts` must hold chunk `at + t · nc` for every `t < NT` (the callers check).
#[inline(always)]
unsafe fn accumulate_pair_chunk<const NT: usize>(
    kind: ChunkKind,
    &PairRegs { w, scale, offset }: &PairRegs,
    acts: &QuantizedActivations,
    at: usize,
    nc: usize,
    acc: &mut [[__m512; 2]; NT],
) {
    for (t, acc) in acc.iter_mut().enumerate() {
        let i = at + t * nc;
        // SAFETY: chunk i and its sums exist (the caller's contract); its words are 32 bytes.
        let x = acts.q.as_ptr().add(i).cast::<i32>();
        // The sums start as `start_sums`': −128·Σx (per half where split) for signed quants and
        // offsets of −k scales.
        let mut isum = [_mm512_setzero_si512(); 2];
        if kind.signed || kind.int_offsets() {
            if kind.split {
                let halves = *acts.neg128_half_q_sums.as_ptr().add(i);
                isum = [_mm512_set1_epi32(halves[0]), _mm512_set1_epi32(halves[1])];
            } else {
                isum[0] = _mm512_set1_epi32(*acts.neg128_chunk_q_sums.as_ptr().add(i));
            }
        }
        for (j, &w) in w.iter().enumerate() {
            let xw = _mm512_set1_epi32(x.add(j).read_unaligned());
            isum[j / 4] = _mm512_dpbusd_epi32(isum[j / 4], w, xw);
        }
        let xd = _mm512_set1_ps(*acts.d.as_ptr().add(i));
        if kind.split {
            for h in 0..2 {
                let factor = _mm512_mul_ps(scale[h], xd);
                acc[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[h]), factor, acc[h]);
                if kind.float_offsets() {
                    let x_sum = acts.half_sums.as_ptr().add(i).cast::<f32>().add(h);
                    acc[h] = _mm512_fmadd_ps(offset[h], _mm512_set1_ps(*x_sum), acc[h]);
                }
            }
        } else {
            let factor = _mm512_mul_ps(scale[0], xd);
            let sum = _mm512_add_epi32(isum[0], isum[1]);
            acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), factor, acc[0]);
            if kind.float_offsets() {
                let x_sum = _mm512_set1_ps(*acts.chunk_sums.as_ptr().add(i));
                acc[0] = _mm512_fmadd_ps(offset[0], x_sum, acc[0]);
            }
        }
    }
}

/// A token's outputs of both groups from its accumulators, as [`lane_outputs`]: the halves'
/// sum where split (adding a zero would turn −0 into +0).
#[inline(always)]
unsafe fn pair_sum(kind: ChunkKind, acc: &[__m512; 2]) -> __m512 {
    if kind.split {
        _mm512_add_ps(acc[0], acc[1])
    } else {
        acc[0]
    }
}

/// How many of `left` tokens the next sweep of a decoded group takes: up to four on both
/// instruction sets. AVX-512's 32 registers hold four tokens' two accumulators beside a
/// chunk's eight weight registers. AVX2's 16 do not, and some values spill, yet four tokens
/// per loaded chunk still beat two on a Zen 4: 1.03-1.06x SmolLM2's and Gemma 3's 512-token
/// prefill, 1.06-1.13x LLaMA-1B Q4_0, Q4_K and Q6_K.
#[inline(always)]
fn sweep_tokens(left: usize) -> usize {
    left.min(4)
}

/// The rows-layout mat-vec (see `lane_entries!`) for one instruction set: per group and sweep
/// of tokens, block by block, the group's rows decoded (`avx2::decode_row`) into `decoded`
/// and transposed into lanes ([`transpose_rows`]).
///
/// # Safety
/// As the entry points'.
#[inline(always)]
unsafe fn matvec_rows<D: LaneDot>(
    w: &super::WeightMatrix,
    groups: std::ops::Range<usize>,
    acts: &QuantizedActivations,
    first_token: usize,
    n_tokens: usize,
    store: &mut impl FnMut(usize, usize, f32),
) {
    use super::decoded::is_block_quantized;
    let nc = acts.n_chunks;
    let end = first_token + n_tokens;
    let per_block = w.ty.block_size() / CHUNK;
    assert!(
        is_block_quantized(w.ty)
            && w.layout == super::Layout::Rows
            && w.cols == nc * CHUNK
            && w.cols.is_multiple_of(w.ty.block_size())
            && groups.end * GROUP_ROWS < w.rows + GROUP_ROWS
            && acts.q.len() >= end * nc
            && acts.d.len() >= end * nc
            && acts.half_sums.len() >= end * nc
    );
    check_chunk_sums(acts, end);
    with_chunk_kind!(chunk_kind_of(w.ty), |KIND| {
        rows_groups::<D>(KIND, w, groups, acts, first_token, end, per_block, store)
    })
}

/// [`matvec_rows`] for one kind of chunk.
///
/// # Safety
/// As [`matvec_rows`], whose checks it relies on.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_groups<D: LaneDot>(
    kind: ChunkKind,
    w: &super::WeightMatrix,
    groups: std::ops::Range<usize>,
    acts: &QuantizedActivations,
    first_token: usize,
    end: usize,
    per_block: usize,
    store: &mut impl FnMut(usize, usize, f32),
) {
    for g in groups {
        let rows = g * GROUP_ROWS..(g * GROUP_ROWS + GROUP_ROWS).min(w.rows);
        let mut t = first_token;
        while t < end {
            let n = sweep_tokens(end - t);
            match n {
                1 => rows_sweep::<D, 1>(
                    kind,
                    w,
                    rows.clone(),
                    acts,
                    (first_token, t),
                    per_block,
                    store,
                ),
                2 => rows_sweep::<D, 2>(
                    kind,
                    w,
                    rows.clone(),
                    acts,
                    (first_token, t),
                    per_block,
                    store,
                ),
                3 => rows_sweep::<D, 3>(
                    kind,
                    w,
                    rows.clone(),
                    acts,
                    (first_token, t),
                    per_block,
                    store,
                ),
                _ => rows_sweep::<D, 4>(
                    kind,
                    w,
                    rows.clone(),
                    acts,
                    (first_token, t),
                    per_block,
                    store,
                ),
            }
            t += n;
        }
    }
}

/// The most chunks in one block of any type (a K-quant super-block or IQ4_XS block), and the
/// chunks [`rows_sweep`] decodes per row at a time.
const MAX_BLOCK_CHUNKS: usize = 8;

/// Tokens `t0..t0 + NT` through the rows `rows` (at most eight) of `w`; the sweep that starts
/// at `first_token` prefetches.
///
/// # Safety
/// As [`matvec_rows`], whose checks it relies on.
#[inline(always)]
unsafe fn rows_sweep<D: LaneDot, const NT: usize>(
    kind: ChunkKind,
    w: &super::WeightMatrix,
    rows: std::ops::Range<usize>,
    acts: &QuantizedActivations,
    (first_token, t0): (usize, usize),
    per_block: usize,
    store: &mut impl FnMut(usize, usize, f32),
) {
    use super::decoded::DecodedChunk;
    let nc = acts.n_chunks;
    let type_size = w.ty.type_size();
    let n_rows = rows.len();
    // Row r's chunks of the block in use at `r * MAX_BLOCK_CHUNKS..`; rows past the matrix stay
    // zero (their outputs are not stored).
    let mut decoded = [DecodedChunk::ZERO; GROUP_ROWS * MAX_BLOCK_CHUNKS];
    let mut offsets = [[0f32; 2]; GROUP_ROWS * MAX_BLOCK_CHUNKS];
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    let row_data: [&[u8]; GROUP_ROWS] = std::array::from_fn(|k| {
        if k < n_rows {
            w.row(rows.start + k)
        } else {
            &[]
        }
    });
    // Spans of whole blocks, up to MAX_BLOCK_CHUNKS chunks: one K-quant block, or up to eight
    // 32-element blocks per decode call.
    let mut c0 = 0;
    while c0 < nc {
        let span = MAX_BLOCK_CHUNKS.min(nc - c0) / per_block * per_block;
        let bytes = c0 / per_block * type_size..(c0 + span) / per_block * type_size;
        for (k, row) in row_data.iter().enumerate().take(n_rows) {
            // Eight rows are eight streams, more than the hardware prefetcher follows well:
            // ask for this row's bytes a little ahead (the first sweep of tokens only).
            if t0 == first_token {
                prefetch_record::<_MM_HINT_T0>(
                    row.as_ptr().wrapping_add(bytes.start),
                    bytes.len(),
                    PREFETCH_AHEAD,
                );
            }
            let at = k * MAX_BLOCK_CHUNKS..k * MAX_BLOCK_CHUNKS + span;
            // SAFETY: AVX2, FMA and F16C are enabled in every caller; whole blocks, and a
            // chunk and an offset per 32 of their elements.
            super::avx2::decode_row(
                w.ty,
                &row[bytes.clone()],
                &mut decoded[at.clone()],
                &mut offsets[at],
            );
        }
        for c in 0..span {
            let chunk = transpose_rows(&decoded, &offsets, c, n_rows);
            accumulate_chunk::<D, NT>(kind, &chunk, acts, t0 * nc + c0 + c, nc, &mut acc);
        }
        c0 += span;
    }
    for (t, acc) in acc.iter().enumerate() {
        for (k, y) in lane_outputs(kind, acc).into_iter().take(n_rows).enumerate() {
            store(t0 + t, rows.start + k, y);
        }
    }
}

/// Chunk `c` of eight decoded rows (row `k` at `decoded[k * MAX_BLOCK_CHUNKS + c]`, rows from
/// `n_rows` on zero) as a [`LaneChunk`]: the rows' 32-byte quants transposed as an 8 × 8 matrix
/// of 32-bit words (word `j` of row `k` to lane `k` of group `j`), their half scales and
/// offsets gathered into lanes.
#[inline(always)]
unsafe fn transpose_rows(
    decoded: &[super::decoded::DecodedChunk; GROUP_ROWS * MAX_BLOCK_CHUNKS],
    offsets: &[[f32; 2]; GROUP_ROWS * MAX_BLOCK_CHUNKS],
    c: usize,
    n_rows: usize,
) -> LaneChunk {
    let at = |k: usize| k * MAX_BLOCK_CHUNKS + c;
    let mut a = [_mm256_setzero_si256(); GROUP_ROWS];
    for (k, a) in a.iter_mut().enumerate().take(n_rows) {
        // SAFETY: a decoded chunk's 32 quant bytes, 32-byte aligned by `DecodedChunk`'s repr.
        *a = _mm256_load_si256(decoded[at(k)].q.as_ptr().cast());
    }
    let t = [
        _mm256_unpacklo_epi32(a[0], a[1]),
        _mm256_unpackhi_epi32(a[0], a[1]),
        _mm256_unpacklo_epi32(a[2], a[3]),
        _mm256_unpackhi_epi32(a[2], a[3]),
        _mm256_unpacklo_epi32(a[4], a[5]),
        _mm256_unpackhi_epi32(a[4], a[5]),
        _mm256_unpacklo_epi32(a[6], a[7]),
        _mm256_unpackhi_epi32(a[6], a[7]),
    ];
    // u[i]: words i and i + 4 of rows 0..4 (low half: word i, high half: word i + 4), and of
    // rows 4..8 in u[4 + i].
    let u = [
        _mm256_unpacklo_epi64(t[0], t[2]),
        _mm256_unpackhi_epi64(t[0], t[2]),
        _mm256_unpacklo_epi64(t[1], t[3]),
        _mm256_unpackhi_epi64(t[1], t[3]),
        _mm256_unpacklo_epi64(t[4], t[6]),
        _mm256_unpackhi_epi64(t[4], t[6]),
        _mm256_unpacklo_epi64(t[5], t[7]),
        _mm256_unpackhi_epi64(t[5], t[7]),
    ];
    let q = [
        _mm256_permute2x128_si256::<0x20>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x20>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x20>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x20>(u[3], u[7]),
        _mm256_permute2x128_si256::<0x31>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x31>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x31>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x31>(u[3], u[7]),
    ];
    let mut scale = [Lanes8::default(); 2];
    let mut offset = [Lanes8::default(); 2];
    for k in 0..n_rows {
        for h in 0..2 {
            scale[h].0[k] = decoded[at(k)].scale[4 * h];
            offset[h].0[k] = offsets[at(k)][h];
        }
    }
    // SAFETY: `Lanes8` is eight f32, 32-byte aligned.
    let lanes = |l: &Lanes8| l.0.as_ptr();
    LaneChunk {
        q,
        scale: [
            _mm256_load_ps(lanes(&scale[0])),
            _mm256_load_ps(lanes(&scale[1])),
        ],
        offset: [
            _mm256_load_ps(lanes(&offset[0])),
            _mm256_load_ps(lanes(&offset[1])),
        ],
    }
}

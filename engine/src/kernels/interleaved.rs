//! Weight matrices re-laid out for decode: eight rows' blocks interleaved, so that one AVX2
//! register holds four consecutive quants of each of eight rows.
//!
//! # Why
//!
//! A decode step multiplies each weight matrix by one activation vector. In GGUF's row-major
//! layout every row is its own dot product: per 32-element block the kernel unpacks the quants,
//! runs one `maddubs`/`madd` pair, converts, scales, and at the end reduces eight lanes to one
//! value — about 25 instructions per 20-byte Q4_1 block, so a single core consumes ~9 GB/s of
//! weights even from cache and the mat-vec, not memory, sets the decode speed. With eight rows
//! interleaved, lane `r` of every register belongs to row `r`: the unpacking, the activation
//! broadcast and the scale multiply are shared by eight rows and no lane reduction is needed.
//! The same arithmetic then costs about a third of the instructions, and decode becomes bound
//! by memory bandwidth.
//!
//! The interleaved kernel (`avx2_interleaved`) keeps, per output, exactly the operation order
//! of the row-major kernels (the tiles of `super::run_quantized`): lane `j` of row `r`'s
//! accumulator in the row-major kernels is register `j`'s lane `r` here. Results are
//! bit-identical, so a sequence's logits still do not depend on the batch it is in.
//!
//! # Layout
//!
//! Rows are taken in groups of eight (only matrices whose row count is a multiple of eight are
//! interleaved). For group `g` and 32-element chunk `c` (one legacy block per row) there is one
//! record of `8 × type_size` bytes — so the matrix keeps exactly its GGUF size — at
//! `(g · n_chunks + c) · record_bytes`:
//!
//! ```text
//! Q4_0  d[8]            nibbles[128]
//! Q4_1  d[8]  m[8]      nibbles[128]
//! Q5_0  d[8]  high[32]  nibbles[128]
//! Q5_1  d[8]  m[8]  high[32]  nibbles[128]
//! Q8_0  d[8]            quants[256]
//! IQ4_NL d[8]           nibbles[128]                 (Q4_0's layout; nibbles index a table)
//! Q4_K  d[8]  dmin[8]  scales[96]  nibbles[1024]     (one record per 256-element super-block)
//! Q5_K  d[8]  dmin[8]  scales[96]  qh[256]  nibbles[1024]          (likewise)
//! Q6_K  d[8]  scales[128]  ql[1024]  qh[512]           (one record per 256-element super-block)
//! IQ4_XS d[8]  scales_h[16]  scales_l[32]  nibbles[1024]   (likewise)
//! Q2_K  d[8]  dmin[8]  scales[128]  qs[512]           (likewise)
//! Q3_K  d[8]  scales[96]  hmask[256]  qs[512]          (likewise)
//! ```
//!
//! `d` and `m` are the rows' f16 scale and minimum, row `r` at index `r`. The quants are a
//! transpose of 4-byte words: word `k` of row `r` goes to word `8k + r` (nibbles: `k < 4`, the
//! GGUF `qs` bytes, whose low nibbles are elements `4k..4k+4` and high nibbles elements
//! `16+4k..16+4k+4`; Q8_0: `k < 8`, elements `4k..4k+4`). So one 32-byte load gives element
//! group `k` (and `k + 4`, for nibbles) of all eight rows. `high` holds Q5's fifth bits the same
//! way: byte `4r + i`, bit `j` is the fifth bit of row `r`'s element `4j + i`.
//!
//! Q4_K's records cover a super-block (eight 32-element chunks). Its packed 6-bit scales are
//! transposed byte by byte (byte `j` of row `r` at `8j + r`), so that the kernel unpacks all
//! eight rows' scales of a chunk with a few 64-bit operations; its `qs` words are transposed as
//! above within each 32-byte run `k` (word `j` of run `k` of row `r` at word `64k + 8j + r`), so
//! one load gives element group `j` of chunk `2k` (low nibbles) and of chunk `2k + 1` (high).
//! Q5_K's records are Q4_K's with the fifth bits added: its `qh` words transposed as the
//! legacy quants (word `j` of row `r` at word `8j + r`), so one load gives, for element group
//! `j` of every chunk of all eight rows, the fifth bits (bit `c` of each byte for chunk `c`).
//! IQ4_XS's scale bytes are transposed the same way, and its `qs` words as the legacy quants',
//! so chunk `c` is a 128-byte run laid out as an IQ4_NL record's nibbles.
//! Q2_K's and Q3_K's scale bytes are transposed by bytes, and their `qs` and `hmask` words as
//! the legacy quants': chunk `c`'s element group `j` is bits `2·(c % 4)` of `qs` word
//! `8·(c / 4) + j` and (Q3_K) bit `c` of `hmask` word `j`.
//! Q6_K's sixteen i8 scales are transposed the same way (byte `i` of row `r` at `8i + r`), and
//! its `ql` (32 words) and `qh` (16 words) words as the legacy quants (word `w` of row `r` at
//! word `8w + r`).
//!
//! Everything else (the prefill tiles, the scalar and portable paths, embedding lookups, the
//! exact reference) reads a row back in GGUF form with [`row_blocks`], an
//! exact inverse, so every kernel gives the same results on either layout.
//!
//! Interleaved matrices live in the model's [`super::HugePageArena`] ([`super::ArenaWeights`]).

use std::ops::Range;

use crate::quant::GgmlType;

/// Rows per interleaved group: one per 32-bit lane of an AVX2 register.
pub(crate) const GROUP_ROWS: usize = 8;

/// Whether `ty` has an interleaved form.
pub(crate) fn has_interleaved_form(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::IQ4_NL
            | GgmlType::IQ4_XS
            | GgmlType::Q2_K
            | GgmlType::Q3_K
    )
}

/// Where each part of a legacy (32-element) block sits in the GGUF block and in the record
/// (byte offsets).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordShape {
    /// The minimum `m` (f16): in the block, in the record.
    pub min: Option<(usize, usize)>,
    /// The fifth bits (`qh`, 4 bytes): in the block, in the record.
    pub high: Option<(usize, usize)>,
    /// The quants: in the block, in the record, and 4-byte words per row (4 nibble words, or 8
    /// byte words).
    pub quants: (usize, usize, usize),
}

impl RecordShape {
    pub fn of(ty: GgmlType) -> Option<RecordShape> {
        let (min, high, quants) = match ty {
            GgmlType::Q4_0 => (None, None, (2, 16, 4)),
            GgmlType::Q4_1 => (Some((2, 16)), None, (4, 32, 4)),
            GgmlType::Q5_0 => (None, Some((2, 16)), (6, 48, 4)),
            GgmlType::Q5_1 => (Some((2, 16)), Some((4, 32)), (8, 64, 4)),
            GgmlType::Q8_0 => (None, None, (2, 16, 8)),
            GgmlType::IQ4_NL => (None, None, (2, 16, 4)),
            _ => return None,
        };
        Some(RecordShape { min, high, quants })
    }
}

/// Whether `w` has an interleaved form: its type has one, its row count is a multiple of eight
/// and it is in GGUF's row layout.
pub(crate) fn can_interleave(w: &super::WeightMatrix) -> bool {
    has_interleaved_form(w.ty)
        && w.layout == super::Layout::Rows
        && w.rows.is_multiple_of(GROUP_ROWS)
        && w.cols.is_multiple_of(w.ty.block_size())
        && w.data.len() == w.rows * w.row_bytes()
}

/// Writes `w` (which must pass [`can_interleave`]) in the interleaved layout into `out`, its
/// size. `consumed(bytes)` is called as the source is read, with a range of `w.data` that will
/// not be read again, so that the caller can release those pages while a large matrix is being
/// copied (the copy plus the source would otherwise both be resident).
pub(crate) fn interleave_into(
    w: &super::WeightMatrix,
    out: &mut [u8],
    mut consumed: impl FnMut(Range<usize>),
) {
    debug_assert!(can_interleave(w));
    let nc = w.cols / w.ty.block_size();
    let block_bytes = w.ty.type_size();
    let record_bytes = GROUP_ROWS * block_bytes;
    let group_bytes = nc * record_bytes;
    for (g, out) in out.chunks_exact_mut(group_bytes).enumerate() {
        let src = &w.data[g * group_bytes..(g + 1) * group_bytes];
        for (r, row) in src.chunks_exact(nc * block_bytes).enumerate() {
            for (block, record) in row
                .chunks_exact(block_bytes)
                .zip(out.chunks_exact_mut(record_bytes))
            {
                match (RecordShape::of(w.ty), w.ty) {
                    (Some(shape), _) => scatter_block(&shape, r, block, record),
                    (None, GgmlType::Q4_K) => scatter_k4(r, block, record, false),
                    (None, GgmlType::Q5_K) => scatter_k4(r, block, record, true),
                    (None, GgmlType::IQ4_XS) => scatter_parts(&IQ4_XS_PARTS, r, block, record),
                    (None, GgmlType::Q2_K) => scatter_parts(&Q2_K_PARTS, r, block, record),
                    (None, GgmlType::Q3_K) => scatter_parts(&Q3_K_PARTS, r, block, record),
                    _ => scatter_parts(&Q6_K_PARTS, r, block, record),
                }
            }
        }
        consumed(g * group_bytes..(g + 1) * group_bytes);
    }
}

/// Row `r` of an interleaved matrix `data` (`n_chunks` blocks a row) in GGUF block form, into
/// `out` (one row's bytes).
pub(crate) fn row_blocks(ty: GgmlType, data: &[u8], n_blocks: usize, r: usize, out: &mut [u8]) {
    if !has_interleaved_form(ty) {
        return;
    }
    let block_bytes = ty.type_size();
    let record_bytes = GROUP_ROWS * block_bytes;
    let (g, lane) = (r / GROUP_ROWS, r % GROUP_ROWS);
    let group = &data[g * n_blocks * record_bytes..][..n_blocks * record_bytes];
    for (record, block) in group
        .chunks_exact(record_bytes)
        .zip(out.chunks_exact_mut(block_bytes))
    {
        match (RecordShape::of(ty), ty) {
            (Some(shape), _) => gather_block(&shape, lane, record, block),
            (None, GgmlType::Q4_K) => gather_k4(lane, record, block, false),
            (None, GgmlType::Q5_K) => gather_k4(lane, record, block, true),
            (None, GgmlType::IQ4_XS) => gather_parts(&IQ4_XS_PARTS, lane, record, block),
            (None, GgmlType::Q2_K) => gather_parts(&Q2_K_PARTS, lane, record, block),
            (None, GgmlType::Q3_K) => gather_parts(&Q3_K_PARTS, lane, record, block),
            _ => gather_parts(&Q6_K_PARTS, lane, record, block),
        }
    }
}

/// Byte offsets in a Q4_K record: d, dmin, the transposed scale bytes, the transposed `qs`.
pub(crate) const Q4_K_DMIN: usize = 16;
pub(crate) const Q4_K_SCALES: usize = 32;
pub(crate) const Q4_K_QS: usize = 128;
/// Byte offsets in a Q5_K record, which is a Q4_K record with the transposed `qh` words
/// between the scales and the `qs` (d, dmin and the scales sit where Q4_K's do).
pub(crate) const Q5_K_QH: usize = 128;
pub(crate) const Q5_K_QS: usize = 384;

/// Where row `r`'s `qs` word `w` (bytes `4w..4w+4` of its 128) goes in a Q4_K (`high` false)
/// or Q5_K (`high` true) record.
fn k4_word(r: usize, w: usize, high: bool) -> usize {
    let (k, j) = (w / 8, w % 8);
    let qs = if high { Q5_K_QS } else { Q4_K_QS };
    qs + 4 * (64 * k + 8 * j + r)
}

/// Row `r`'s Q4_K block (d, dmin, scales[12], qs[128]) or, with `high`, Q5_K block (d, dmin,
/// scales[12], qh[32], qs[128]) into its places in `record`.
fn scatter_k4(r: usize, block: &[u8], record: &mut [u8], high: bool) {
    record[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
    record[Q4_K_DMIN + 2 * r..Q4_K_DMIN + 2 * r + 2].copy_from_slice(&block[2..4]);
    for j in 0..12 {
        record[Q4_K_SCALES + 8 * j + r] = block[4 + j];
    }
    let qs = if high {
        for w in 0..8 {
            let at = Q5_K_QH + 4 * (8 * w + r);
            record[at..at + 4].copy_from_slice(&block[16 + 4 * w..16 + 4 * w + 4]);
        }
        48
    } else {
        16
    };
    for w in 0..32 {
        let at = k4_word(r, w, high);
        record[at..at + 4].copy_from_slice(&block[qs + 4 * w..qs + 4 * w + 4]);
    }
}

/// The inverse of [`scatter_k4`].
fn gather_k4(r: usize, record: &[u8], block: &mut [u8], high: bool) {
    block[..2].copy_from_slice(&record[2 * r..2 * r + 2]);
    block[2..4].copy_from_slice(&record[Q4_K_DMIN + 2 * r..Q4_K_DMIN + 2 * r + 2]);
    for j in 0..12 {
        block[4 + j] = record[Q4_K_SCALES + 8 * j + r];
    }
    let qs = if high {
        for w in 0..8 {
            let at = Q5_K_QH + 4 * (8 * w + r);
            block[16 + 4 * w..16 + 4 * w + 4].copy_from_slice(&record[at..at + 4]);
        }
        48
    } else {
        16
    };
    for w in 0..32 {
        let at = k4_word(r, w, high);
        block[qs + 4 * w..qs + 4 * w + 4].copy_from_slice(&record[at..at + 4]);
    }
}

/// Moves row `r`'s block into its places in `record`.
fn scatter_block(shape: &RecordShape, r: usize, block: &[u8], record: &mut [u8]) {
    record[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
    if let Some((from, to)) = shape.min {
        record[to + 2 * r..to + 2 * r + 2].copy_from_slice(&block[from..from + 2]);
    }
    if let Some((from, to)) = shape.high {
        let qh = u32::from_le_bytes([
            block[from],
            block[from + 1],
            block[from + 2],
            block[from + 3],
        ]);
        for i in 0..4 {
            let mut byte = 0u8;
            for j in 0..8 {
                byte |= (((qh >> (4 * j + i)) & 1) as u8) << j;
            }
            record[to + 4 * r + i] = byte;
        }
    }
    let (from, to, words) = shape.quants;
    for k in 0..words {
        let dst = to + 4 * (GROUP_ROWS * k + r);
        record[dst..dst + 4].copy_from_slice(&block[from + 4 * k..from + 4 * k + 4]);
    }
}

/// The inverse of [`scatter_block`]: row `r`'s block out of `record`.
fn gather_block(shape: &RecordShape, r: usize, record: &[u8], block: &mut [u8]) {
    block[..2].copy_from_slice(&record[2 * r..2 * r + 2]);
    if let Some((from, to)) = shape.min {
        block[from..from + 2].copy_from_slice(&record[to + 2 * r..to + 2 * r + 2]);
    }
    if let Some((from, to)) = shape.high {
        let mut qh = 0u32;
        for i in 0..4 {
            let byte = record[to + 4 * r + i];
            for j in 0..8 {
                qh |= u32::from((byte >> j) & 1) << (4 * j + i);
            }
        }
        block[from..from + 4].copy_from_slice(&qh.to_le_bytes());
    }
    let (from, to, words) = shape.quants;
    for k in 0..words {
        let src = to + 4 * (GROUP_ROWS * k + r);
        block[from + 4 * k..from + 4 * k + 4].copy_from_slice(&record[src..src + 4]);
    }
}

/// Byte offsets in an IQ4_XS record: d, the transposed `scales_h` and `scales_l` bytes, the
/// transposed `qs` words.
pub(crate) const IQ4_XS_SCALES_H: usize = 16;
pub(crate) const IQ4_XS_SCALES_L: usize = 32;
pub(crate) const IQ4_XS_QS: usize = 64;

/// Byte offsets in a Q2_K record: d, dmin, the transposed scale bytes, the transposed `qs`
/// words.
pub(crate) const Q2_K_DMIN: usize = 16;
pub(crate) const Q2_K_SCALES: usize = 32;
pub(crate) const Q2_K_QS: usize = 160;
/// Byte offsets in a Q3_K record: d, the transposed scale bytes, the transposed `hmask` and
/// `qs` words.
pub(crate) const Q3_K_SCALES: usize = 16;
pub(crate) const Q3_K_HMASK: usize = 112;
pub(crate) const Q3_K_QS: usize = 368;

/// A part of a block as its record holds it: (offset in the block, offset in the record,
/// length in bytes, how the eight rows' copies are arranged).
type Part = (usize, usize, usize, Transpose);

/// How a record arranges its eight rows' copies of a part.
#[derive(Clone, Copy)]
enum Transpose {
    /// Side by side: row `r`'s at `len · r` (the f16 scales).
    Rows,
    /// By bytes: byte `i` of row `r` at `8i + r` (packed scales).
    Bytes,
    /// By 4-byte words: word `w` of row `r` at word `8w + r` (quants).
    Words,
}

/// IQ4_XS's block (d, scales_h[2], scales_l[4], qs[128]) in its record: chunk `c`'s four `qs`
/// words are one 128-byte run, laid out as an IQ4_NL record's nibbles.
const IQ4_XS_PARTS: [Part; 4] = [
    (0, 0, 2, Transpose::Rows),
    (2, IQ4_XS_SCALES_H, 2, Transpose::Bytes),
    (4, IQ4_XS_SCALES_L, 4, Transpose::Bytes),
    (8, IQ4_XS_QS, 128, Transpose::Words),
];
/// Q2_K's block (scales[16], qs[64], d, dmin) in its record.
const Q2_K_PARTS: [Part; 4] = [
    (80, 0, 2, Transpose::Rows),
    (82, Q2_K_DMIN, 2, Transpose::Rows),
    (0, Q2_K_SCALES, 16, Transpose::Bytes),
    (16, Q2_K_QS, 64, Transpose::Words),
];
/// Q3_K's block (hmask[32], qs[64], scales[12], d) in its record.
const Q3_K_PARTS: [Part; 4] = [
    (108, 0, 2, Transpose::Rows),
    (96, Q3_K_SCALES, 12, Transpose::Bytes),
    (0, Q3_K_HMASK, 32, Transpose::Words),
    (32, Q3_K_QS, 64, Transpose::Words),
];

/// Where row `r`'s bytes go: `(offset in the block, offset in the record, length)` runs.
fn part_moves(parts: &[Part], r: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    parts.iter().flat_map(move |&(from, to, len, how)| {
        let (runs, run) = match how {
            Transpose::Rows => (1, len),
            Transpose::Bytes => (len, 1),
            Transpose::Words => (len / 4, 4),
        };
        (0..runs).map(move |i| {
            let at = match how {
                Transpose::Rows => to + len * r,
                Transpose::Bytes => to + 8 * i + r,
                Transpose::Words => to + 4 * (8 * i + r),
            };
            (from + run * i, at, run)
        })
    })
}

/// Row `r`'s block into its places in `record`, as `parts` lays it out.
fn scatter_parts(parts: &[Part], r: usize, block: &[u8], record: &mut [u8]) {
    for (from, to, len) in part_moves(parts, r) {
        record[to..to + len].copy_from_slice(&block[from..from + len]);
    }
}

/// The inverse of [`scatter_parts`].
fn gather_parts(parts: &[Part], r: usize, record: &[u8], block: &mut [u8]) {
    for (from, to, len) in part_moves(parts, r) {
        block[from..from + len].copy_from_slice(&record[to..to + len]);
    }
}

/// Byte offsets in a Q6_K record: d, the transposed scales, `ql` and `qh` words.
pub(crate) const Q6_K_SCALES: usize = 16;
pub(crate) const Q6_K_QL: usize = 144;
pub(crate) const Q6_K_QH: usize = 1168;

/// Q6_K's block (ql[128], qh[64], scales[16], d) in its record.
const Q6_K_PARTS: [Part; 4] = [
    (208, 0, 2, Transpose::Rows),
    (192, Q6_K_SCALES, 16, Transpose::Bytes),
    (0, Q6_K_QL, 128, Transpose::Words),
    (128, Q6_K_QH, 64, Transpose::Words),
];

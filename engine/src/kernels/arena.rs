//! Memory that decode streams through: one anonymous mapping, aligned to 2 MiB and advised for
//! transparent huge pages, for a model's weight matrices (copied there at load) and for each
//! sequence's KV cache.
//!
//! # Why
//!
//! A decode step streams every weight byte once, so its speed is the speed of a long read. With
//! 4 KiB pages that read misses the TLB every 4 KiB, and in a virtual machine each miss walks two
//! page tables (guest and host); 2 MiB pages make the read markedly faster (figures in
//! `docs/engine-notes.md`). A `Vec` per matrix would not get huge pages at all: most of a small
//! model's matrices are smaller than 2 MiB. So the matrices of a model share one mapping.
//!
//! Where the kernel has no transparent huge pages (`never`, or another OS) the advice is
//! ignored and the arena is an ordinary zeroed mapping: only speed depends on it.
//! `EGPU_HUGE_PAGES=0` leaves the advice out.
#![allow(unsafe_code)]

use std::io;
use std::ops::Range;
use std::sync::Arc;

use half::f16;
use memmap2::MmapMut;

use super::interleaved::{can_interleave, interleave_into};
use super::{Layout, WeightMatrix};
use crate::quant::GgmlType;

/// The huge page size the mapping is aligned to (x86-64 and arm64 Linux with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// Whether to advise huge pages: yes, unless `EGPU_HUGE_PAGES=0` (to compare, or where
/// memory is so tight that rounding residency up to 2 MiB matters).
#[cfg(target_os = "linux")]
fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| std::env::var("EGPU_HUGE_PAGES").map_or(true, |v| v.trim() != "0"))
}

/// Whether a model should copy its weight matrices that stay in GGUF's layout into its arena
/// too: where the arena gets huge pages (Linux, unless `EGPU_HUGE_PAGES=0`). Elsewhere the copy
/// would gain nothing over reading the file mapping.
pub fn copy_to_arena_at_load() -> bool {
    #[cfg(target_os = "linux")]
    return huge_pages_wanted() && !huge_pages_disabled_by_kernel();
    #[cfg(not(target_os = "linux"))]
    return false;
}

/// Whether the kernel's transparent huge pages are off (`[never]`), where the advice does
/// nothing.
#[cfg(target_os = "linux")]
fn huge_pages_disabled_by_kernel() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|mode| mode.contains("[never]"))
}

/// Zeroed, writable memory: for weights, filled through [`HugePageArena::bytes_mut`] and then
/// shared (read-only) behind an `Arc`; for a KV cache, used as `f16` values.
#[derive(Debug)]
pub struct HugePageArena {
    map: MmapMut,
    /// Where the aligned region starts in `map`.
    start: usize,
    len: usize,
}

impl HugePageArena {
    /// `len` zeroed bytes, starting on a 2 MiB boundary. Nothing is resident until written.
    pub fn zeroed(len: usize) -> io::Result<HugePageArena> {
        // Over-map by one huge page so that an aligned start exists inside the mapping; the
        // unused head and tail are never touched, so they cost address space only.
        let map = MmapMut::map_anon(len + HUGE_PAGE)?;
        let start = map.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        #[cfg(target_os = "linux")]
        if huge_pages_wanted() {
            // Advice only: without transparent huge pages the mapping works the same.
            let _ = map.advise_range(memmap2::Advice::HugePage, start, len.max(1));
        }
        Ok(HugePageArena { map, start, len })
    }

    /// The whole arena.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    /// The whole arena, to fill it.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[self.start..self.start + self.len]
    }

    /// The whole arena as `f16` values (`len` must be even).
    pub fn f16s(&self) -> &[f16] {
        let bytes = self.bytes();
        // SAFETY: the mapping is page-aligned and `start` is a multiple of 2 MiB, so the
        // pointer is aligned for `f16`; `len / 2` values lie within the `len` bytes; every
        // bit pattern is a valid `f16`; the borrow of `self` keeps the memory alive and
        // unaliased by writers.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f16>(), bytes.len() / 2) }
    }

    /// The whole arena as `f16` values, to write (`len` must be even).
    pub fn f16s_mut(&mut self) -> &mut [f16] {
        let bytes = self.bytes_mut();
        // SAFETY: as in `f16s`, and the `&mut self` borrow makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f16>(), bytes.len() / 2) }
    }

    /// A part of the arena.
    pub fn slice(&self, range: Range<usize>) -> &[u8] {
        &self.bytes()[range]
    }

    /// Bytes in the arena.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the arena holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A weight matrix copied out of the file mapping into a [`HugePageArena`] that the other
/// matrices of its model share: in the interleaved layout (`super::interleaved`) where the
/// decode mat-vec wants it, else in GGUF's own layout, for the arena's huge pages alone.
#[derive(Debug)]
pub struct ArenaWeights {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    layout: Layout,
    arena: Arc<HugePageArena>,
    range: Range<usize>,
}

impl ArenaWeights {
    /// Interleaves a row-major matrix into an arena of its own, or None when it has no
    /// interleaved form. Models put all their matrices in one arena instead
    /// ([`ArenaWeights::in_arena`]).
    pub fn interleaved(
        w: &WeightMatrix,
        consumed: impl FnMut(Range<usize>),
    ) -> Option<ArenaWeights> {
        if !can_interleave(w) {
            return None;
        }
        let mut arena = HugePageArena::zeroed(w.data.len()).ok()?;
        interleave_into(w, arena.bytes_mut(), consumed);
        let range = 0..arena.len();
        Some(ArenaWeights::in_arena(
            w,
            Layout::Interleaved8,
            Arc::new(arena),
            range,
        ))
    }

    /// The matrix `w` describes, already written to `arena[range]` in `layout` (by
    /// [`interleave_into`] or [`copy_rows_into`]).
    pub(crate) fn in_arena(
        w: &WeightMatrix,
        layout: Layout,
        arena: Arc<HugePageArena>,
        range: Range<usize>,
    ) -> ArenaWeights {
        assert_eq!(range.len(), w.data.len(), "arena region of the wrong size");
        ArenaWeights {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            layout,
            arena,
            range,
        }
    }

    /// The matrix, for the kernels.
    pub fn matrix(&self) -> WeightMatrix<'_> {
        WeightMatrix {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data: self.arena.slice(self.range.clone()),
            layout: self.layout,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.range.len()
    }
}

/// Copies `w` as it is into `out` (its size), calling `consumed` as [`interleave_into`] does, in
/// steps of `step` bytes.
pub(crate) fn copy_rows_into(
    w: &WeightMatrix,
    out: &mut [u8],
    step: usize,
    mut consumed: impl FnMut(Range<usize>),
) {
    for (i, (src, dst)) in w.data.chunks(step).zip(out.chunks_mut(step)).enumerate() {
        dst.copy_from_slice(src);
        consumed(i * step..i * step + src.len());
    }
}

/// Lays out regions of the given sizes one after another, each starting on a 64-byte boundary
/// (a cache line, and the alignment the AVX2 loads prefer); returns each region's range and the
/// total.
pub fn arena_layout(sizes: impl IntoIterator<Item = usize>) -> (Vec<Range<usize>>, usize) {
    const ALIGN: usize = 64;
    let mut offset = 0;
    let ranges = sizes
        .into_iter()
        .map(|size| {
            let range = offset..offset + size;
            offset = (offset + size).div_ceil(ALIGN) * ALIGN;
            range
        })
        .collect();
    (ranges, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_is_aligned_zeroed_and_writable() {
        let mut arena = HugePageArena::zeroed(3 * 1000 + 17).unwrap();
        assert_eq!(arena.bytes().as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(arena.len(), 3017);
        assert!(arena.bytes().iter().all(|&b| b == 0));
        arena.bytes_mut()[3016] = 7;
        assert_eq!(arena.slice(3010..3017), &[0, 0, 0, 0, 0, 0, 7]);
        arena.f16s_mut()[2] = f16::ONE;
        assert_eq!(arena.slice(4..6), &f16::ONE.to_le_bytes());
        assert_eq!(arena.f16s().len(), 1508);
        assert_eq!(arena.f16s()[2], f16::ONE);
    }

    #[test]
    fn layout_aligns_each_region() {
        let (ranges, total) = arena_layout([10, 64, 0, 65]);
        assert_eq!(ranges, vec![0..10, 64..128, 128..128, 128..193]);
        assert_eq!(total, 256);
    }
}

//! The one place the GGUF reader touches `unsafe`: mapping a model file into memory.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::Mmap;

/// Maps `file` read-only.
///
/// # Safety
/// The mapping is only sound while no one truncates or writes the file: a shrunk file makes
/// reads of the lost pages fault (SIGBUS), and a written one changes bytes under `&[u8]`
/// borrows. Callers promise that the file is not modified while the map lives.
pub unsafe fn map_read_only(file: &File) -> io::Result<Mmap> {
    // No readahead advice here: opening must stay instant even for a multi-GB file; pages are
    // faulted in by whoever reads the tensors.
    // SAFETY: forwarded to the caller; see the function's `# Safety` section.
    unsafe { Mmap::map(file) }
}

/// Maps a model file. egpu treats model files as immutable while it has them open (the contract
/// llama.cpp and every other mmap-based loader make); replacing a model means writing a new file
/// and renaming it over the old one, which leaves this mapping on the old inode, intact.
pub(crate) fn map_model_file(file: &File) -> io::Result<Mmap> {
    // SAFETY: model files are not written in place or truncated while mapped (see above).
    unsafe { map_read_only(file) }
}

/// Drops this process's pages of `map[offset..offset + len]` (page-aligned inward) from its
/// resident set, for bytes that will not be read again (a matrix copied into another layout).
pub(crate) fn release_pages(map: &Mmap, offset: usize, len: usize) {
    const PAGE: usize = 4096;
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = (offset + len) / PAGE * PAGE;
    if end <= start {
        return;
    }
    // SAFETY: MADV_DONTNEED on a read-only shared file mapping only removes page-table entries:
    // the file is not written, and a later read of these bytes faults the same contents back in
    // from the page cache, so no `&[u8]` borrowing the mapping can observe a change. (The
    // "unchecked" advice is unsafe because on private writable mappings it discards writes;
    // this mapping has none.) A failure only means the pages stay resident.
    #[cfg(unix)]
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
    };
    #[cfg(not(unix))]
    let _ = map;
}

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

/// Surviving a model file that shrinks under its mapping.
///
/// egpu asks that model files be replaced by renaming a new file over the old one, but `cp
/// new.gguf loaded.gguf` truncates the loaded file in place, and the next read of a page past
/// its new end raises SIGBUS, which kills the whole daemon. So every model mapping is
/// registered here, and a SIGBUS handler checks the faulting address: inside a registered
/// mapping, it maps a page of zeros over the lost page (the read then completes, with zeros
/// where weights were), marks the mapping as faulted, and returns. The engine keeps running
/// on garbage for at most the rest of that pass; the daemon notices [`MappedModel::faulted`]
/// (and the file's changed size and time) within a second and unloads the model with an error.
/// A fault anywhere else goes to the handler that was installed before (Rust's own, which
/// reports stack overflows) or to the default action, exactly as without this module.
#[cfg(unix)]
pub(crate) mod faults {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Once;

    /// How many mappings can be registered at once (shards of resident models); a mapping
    /// past this is simply not protected.
    const SLOTS: usize = 256;

    struct Slot {
        start: AtomicUsize,
        len: AtomicUsize,
        faulted: AtomicBool,
    }

    #[allow(clippy::declare_interior_mutable_const)]
    const EMPTY: Slot = Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        faulted: AtomicBool::new(false),
    };
    static SLOTS_TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
    static INSTALL: Once = Once::new();
    /// The SIGBUS action before ours, as a `libc::sigaction` written once during install.
    static mut PREVIOUS: Option<libc::sigaction> = None;

    /// A registered mapping; unregistered on drop (before the mapping itself goes).
    #[derive(Debug)]
    pub(crate) struct Registration {
        slot: Option<usize>,
    }

    impl Registration {
        /// Whether a read of this mapping has faulted since it was registered.
        pub(crate) fn faulted(&self) -> bool {
            self.slot
                .is_some_and(|i| SLOTS_TABLE[i].faulted.load(Ordering::SeqCst))
        }
    }

    impl Drop for Registration {
        fn drop(&mut self) {
            if let Some(i) = self.slot {
                SLOTS_TABLE[i].len.store(0, Ordering::SeqCst);
                SLOTS_TABLE[i].faulted.store(false, Ordering::SeqCst);
                SLOTS_TABLE[i].start.store(0, Ordering::SeqCst);
            }
        }
    }

    /// Protects `len` bytes at `start` (a live mapping) until the registration drops.
    pub(crate) fn register(start: *const u8, len: usize) -> Registration {
        INSTALL.call_once(install);
        if len == 0 {
            return Registration { slot: None };
        }
        for (i, slot) in SLOTS_TABLE.iter().enumerate() {
            // Claimed by setting `start` from 0; `len` follows, and the handler reads both.
            if slot
                .start
                .compare_exchange(0, start as usize, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                slot.faulted.store(false, Ordering::SeqCst);
                slot.len.store(len, Ordering::SeqCst);
                return Registration { slot: Some(i) };
            }
        }
        Registration { slot: None }
    }

    fn install() {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value to fill in;
        // sigaction() with a null new action only reads the current one into `old`; PREVIOUS
        // is written here once, inside `Once`, before the handler that reads it is installed.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return;
            }
            PREVIOUS = Some(old);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    }

    /// The SIGBUS handler. Only atomics and `mmap`/`sigaction` system calls: nothing that
    /// allocates or locks.
    extern "C" fn on_sigbus(
        signal: libc::c_int,
        info: *mut libc::siginfo_t,
        context: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
        let address = unsafe { fault_address(info) };
        let page = page_size();
        for slot in &SLOTS_TABLE {
            let start = slot.start.load(Ordering::SeqCst);
            let len = slot.len.load(Ordering::SeqCst);
            if start == 0 || address < start || address >= start + len {
                continue;
            }
            let page_start = address / page * page;
            // SAFETY: the page lies inside a live read-only model mapping that this process
            // owns (registered, not yet unregistered); MAP_FIXED replaces just that page with
            // private zeros, which is what a read of a lost file page should have returned
            // instead of faulting. No Rust reference sees different bytes than "the file's".
            let mapped = unsafe {
                libc::mmap(
                    page_start as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::SeqCst);
                return;
            }
        }
        // Not ours: hand it on as if this handler did not exist.
        // SAFETY: PREVIOUS was set before this handler was installed and never changes after.
        let previous = unsafe { *std::ptr::addr_of!(PREVIOUS) };
        match previous {
            Some(old)
                if old.sa_flags & libc::SA_SIGINFO != 0
                    && old.sa_sigaction != libc::SIG_DFL
                    && old.sa_sigaction != libc::SIG_IGN =>
            {
                // SAFETY: an SA_SIGINFO handler has exactly this signature.
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                handler(signal, info, context);
            }
            _ => {
                // SAFETY: restoring the default action and returning re-raises the fault,
                // which then terminates the process as it would have without this handler.
                unsafe {
                    let mut default: libc::sigaction = std::mem::zeroed();
                    default.sa_sigaction = libc::SIG_DFL;
                    libc::sigemptyset(&mut default.sa_mask);
                    libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
                }
            }
        }
    }

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if size > 0 {
            size as usize
        } else {
            4096
        }
    }

    /// # Safety
    /// `info` must be the siginfo the kernel passed to an SA_SIGINFO handler.
    unsafe fn fault_address(info: *mut libc::siginfo_t) -> usize {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        // SAFETY: forwarded; si_addr is valid for SIGBUS.
        let address = unsafe { (*info).si_addr() as usize };
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        // SAFETY: forwarded; si_addr is valid for SIGBUS.
        let address = unsafe { (*info).si_addr as usize };
        address
    }
}

//! The binaries' allocator: mimalloc, told to keep the memory it frees for a
//! second, in pages of the ordinary size.
//!
//! A step frees and reallocates the same working buffers every step. By
//! default mimalloc hands freed pages back to the kernel after 10 ms, and the
//! next step faults them in again, zeroed. Keeping them for good took the
//! tiny benchmark from about 4,300 to 5,650 tokens/s when it was added
//! (PyTorch's caching allocator keeps freed memory for the same reason), but
//! it also kept what only the set-up used (a parameter's initial values, the
//! compiler's passes) for the whole run. Keeping freed memory one second
//! keeps a step's buffers from one step to the next on the bench models and
//! returns the rest: moe-tiny's peak RSS 689 → 649–663 MB (lower on a busy
//! machine, where more of it ages past the second), tiny's 250 → 244–248 MB,
//! at the same speed (`tessera bench FILE --steps 10`).

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2): milliseconds before
/// freed memory goes back to the OS (−1: never).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Call first thing in `main`.
pub fn keep_freed_memory() {
    // SAFETY: setting an option is a plain store in mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    no_transparent_huge_pages();
}

/// Turn transparent huge pages off for this process. mimalloc commits its
/// arenas whole and asks for huge pages on them, so the first touch of an
/// arena's page made 2 MiB resident: 23 MB of the tiny benchmark's peak RSS
/// went to pages that nothing used (272.8 → 249.6 MB without them, at the
/// same speed: 5,310–6,302 tokens/s with, 5,529–6,385 without, alternating
/// runs). The regions are touched page by page either way.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

//! Keeping the allocator's resident memory close to the live heap.
//!
//! The proxy runs on glibc's malloc. Two of its habits cost a sidecar more memory than the
//! proxy uses: every thread that allocates gets an arena of its own (up to 8 per core), each
//! holding on to what its thread freed; and freed pages below a live allocation stay resident
//! until `malloc_trim`. So the worker count bounds the arenas ([`limit_arenas`], called before
//! any thread starts), and the few places that free a burst of memory — the descriptor pool
//! after the bootstrap is read, admin JSON renderings — give the pages back
//! ([`release_free_heap`]).
//!
//! Why FFI: no safe crate exposes `mallopt`/`malloc_trim`, and a different global allocator
//! (mimalloc was measured) kept *more* resident under the benchmark's load. On other C
//! libraries both functions do nothing.
#![allow(unsafe_code)]

/// Caps glibc's malloc arenas at `arenas` (at least one). Call before starting threads.
pub fn limit_arenas(arenas: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let n = libc::c_int::try_from(arenas.max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt takes two integers and no pointers; glibc serializes it with the
        // allocator's own locks, and M_ARENA_MAX only bounds how many arenas it creates later.
        let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, n) };
        if ok != 1 {
            tracing::debug!(arenas, "mallopt(M_ARENA_MAX) was refused");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// Returns the free pages of every malloc arena to the kernel.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and touches only memory the allocator owns and
        // has already freed; glibc locks each arena while it walks it.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

//! Settings of the C library's allocator for the frame loop.
//!
//! glibc's malloc serves a large block with `mmap` when it is above a threshold, and by
//! default it moves that threshold as blocks are freed. tract allocates every node's
//! output afresh on each run, several of them megabytes in size. Depending on the order
//! of the frees, glibc settles either on keeping such blocks in its heap or on mapping
//! and unmapping them on every run, and then each frame faults in about 20 MB of fresh
//! pages. The same release binary measured 20.6 ms per backbone run in the first state
//! and 29.4 ms in the second, with 850 against 6,000 minor page faults per run.
//!
//! [`tune_allocator`] fixes the mmap threshold at glibc's maximum and the trim threshold
//! at 1 GiB, so that large blocks are reused from the heap. Freed memory then stays with
//! the process, so its resident size stays near its peak.
//!
//! It also keeps every thread on one arena. With `detector.threads` above 1 the plan runs
//! on whichever thread of tract's pool is free, and glibc gave each of those threads an
//! arena of its own, each of which kept a frame's worth of freed tensors. On 2 threads
//! the int8 detector then peaked at 636 MiB instead of 560 MiB and took 11.5 ms per frame
//! instead of 8.6 ms (`compare_frames`, 20 frames). The frame loop allocates a few
//! hundred blocks per frame, so the shared arena's lock costs nothing measurable.

/// Sets glibc's mmap and trim thresholds and its arena count as the module documentation
/// describes, once, at the start of a process that runs the detector, before it starts
/// threads. Returns whether all three settings took effect. It does nothing, and returns false, on other C libraries.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's largest mmap threshold: 32 MiB on 64-bit targets, 16 MiB on 32-bit ones.
        let mmap_threshold = (4 << 20) * std::mem::size_of::<libc::c_long>() as libc::c_int;
        // SAFETY: `mallopt` only changes allocator parameters, and glibc takes its own lock.
        let (mmap, trim, arenas) = unsafe {
            (
                libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_threshold),
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30),
                libc::mallopt(libc::M_ARENA_MAX, 1),
            )
        };
        mmap == 1 && trim == 1 && arenas == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn thresholds_are_accepted() {
        assert!(super::tune_allocator());
    }
}

//! The allocator, where the code must talk to it: mimalloc is the global allocator (see
//! `main.rs`), and after a phase that frees much at once (recovery's segment buffers) a shard
//! asks it to return the freed memory to the system at once.

/// Return this thread's freed memory to the system. Cheap when there is little to return.
pub fn collect() {
    // SAFETY: mi_collect has no preconditions; with `force` it frees what it can now. When
    // mimalloc is not the global allocator (some tests) it only tidies mimalloc's own heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

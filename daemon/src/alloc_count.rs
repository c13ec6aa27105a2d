//! Allocation counting for benchmarks (feature `alloc-count`; never in the default build).
//!
//! Wraps the system allocator in `stats_alloc`'s counting one and logs the totals so far (at
//! info, target `rxd::alloc_count`) on every `status` request, so a benchmark can difference
//! two snapshots around a run. It counts the daemon's Rust allocations only: ONNX Runtime
//! allocates through its own C++ allocators, which is what "outside ORT" wants.

use std::alloc::System;

use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Logs the allocations, reallocations and bytes allocated since the process started.
pub fn log_totals() {
    let s = GLOBAL.stats();
    tracing::info!(
        target: "rxd::alloc_count",
        allocations = s.allocations,
        reallocations = s.reallocations,
        deallocations = s.deallocations,
        bytes = s.bytes_allocated,
        "alloc totals"
    );
}

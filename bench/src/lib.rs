//! Shared input generators of the benchmarks.

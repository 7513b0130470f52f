//! Shared helpers for br2k benchmarks.

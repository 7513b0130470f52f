//! Shared helpers for br2k benchmarks.

pub mod supervisor;

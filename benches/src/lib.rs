//! Shared helpers for br2k benchmarks.

pub mod measure;
pub mod supervisor;

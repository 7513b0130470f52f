//! In-memory implementations of every trait, always compiled.

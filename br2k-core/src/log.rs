//! The replicated log trait.

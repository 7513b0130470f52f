//! Quickstart placeholder.
fn main() {}

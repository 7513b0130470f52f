//! Smoke tests of the local stack live in `tests/`.

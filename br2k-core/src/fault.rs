//! Fault injection around any implementation.

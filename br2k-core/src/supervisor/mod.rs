//! The generic recoverer: decision logic and the supervision loop.

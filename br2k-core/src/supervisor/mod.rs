//! The generic recoverer: decision logic and the supervision loop.
//!
//! - [`diagnose`] and [`plan`]: pure functions from a record, the live state and the
//!   image health in each registry to findings and recovery actions.

mod decide;

pub use decide::{ImageHealth, ImageStatus, diagnose, plan};

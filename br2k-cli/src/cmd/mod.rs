//! The commands of `br2k` other than `init` and `deploy`, one module per group.

mod change;
mod context;
mod image;
mod status;

pub(crate) use change::{change, roles, state_cmd};
pub(crate) use context::{context_cmd, contract_deploy};
pub(crate) use image::image_cmd;
pub(crate) use status::{diff, history, recover, status};

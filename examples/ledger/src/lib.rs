#![doc = include_str!("../README.md")]

pub mod config;
pub mod http;
pub mod settle;
pub mod startup;
pub mod state;

pub use http::{App, Status, router};
pub use settle::SettleEffect;
pub use state::{Command, Ledger, Output, Rejection};

//! br2k's fault matrix: runs the ledger (3 replicas under a client load) and the
//! operator (two supervised services) against the real stack, injects seeded faults,
//! and checks after every run that nothing acknowledged was lost or done twice.

pub mod failover;
pub mod history;
pub mod ledger;
pub mod matrix;
pub mod nemesis;
pub mod netfault;
pub mod operator;
pub mod procs;
pub mod proxy;
pub mod report;

//! The replica runtime: execution replication over a replicated log.

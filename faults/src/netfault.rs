//! Network partitions on loopback with iptables: every rule lives in a chain of our own
//! (`BR2KF-<pid>`), jumped to from `INPUT`; healing flushes the chain, dropping the
//! value removes the jump and the chain. Packets to a proxy port (`--dport`) are the
//! client's requests, packets from it (`--sport`) the answers: dropping one of them is
//! a one-way partition, both a full one.

use std::process::{Command, Stdio};

/// Which direction of a connection to a port is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server (`--dport`).
    ToServer,
    /// Server to client (`--sport`).
    ToClient,
    /// Both.
    Both,
}

/// Our iptables chain.
#[derive(Debug)]
pub struct Firewall {
    chain: String,
}

fn ipt(args: &[&str]) -> Result<(), String> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("iptables {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Firewall {
    /// Creates the chain and jumps to it from `INPUT`.
    pub fn new() -> Result<Self, String> {
        let chain = format!("BR2KF-{}", std::process::id());
        // A chain left by a crashed run of the same PID is reused, emptied.
        if ipt(&["-N", &chain]).is_err() {
            ipt(&["-F", &chain])?;
        }
        let fw = Self { chain };
        ipt(&["-I", "INPUT", "1", "-j", &fw.chain])?;
        Ok(fw)
    }

    /// The chain's name.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Drops TCP traffic of `port` on loopback in `dir`.
    pub fn drop_port(&self, port: u16, dir: Direction) -> Result<(), String> {
        let p = port.to_string();
        if matches!(dir, Direction::ToServer | Direction::Both) {
            ipt(&[
                "-A",
                &self.chain,
                "-i",
                "lo",
                "-p",
                "tcp",
                "--dport",
                &p,
                "-j",
                "DROP",
            ])?;
        }
        if matches!(dir, Direction::ToClient | Direction::Both) {
            ipt(&[
                "-A",
                &self.chain,
                "-i",
                "lo",
                "-p",
                "tcp",
                "--sport",
                &p,
                "-j",
                "DROP",
            ])?;
        }
        Ok(())
    }

    /// Removes every rule (the chain stays, empty).
    pub fn heal(&self) -> Result<(), String> {
        ipt(&["-F", &self.chain])
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = ipt(&["-F", &self.chain]);
        while ipt(&["-D", "INPUT", "-j", &self.chain]).is_ok() {}
        let _ = ipt(&["-X", &self.chain]);
    }
}

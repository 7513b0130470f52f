//! iptables DROP rules for loopback traffic of one port.

use super::*;

// ------------------------------------------------------------------ iptables

/// DROP rules in the INPUT chain for loopback traffic of one port; removed on
/// [`IptablesDrop::remove`] and on drop.
pub struct IptablesDrop {
    rules: Vec<Vec<String>>,
    /// The rules, one a line, written before they are inserted (see [`clean_stale`]).
    record: PathBuf,
}

impl IptablesDrop {
    /// Drops packets to `port` (`both`: also from it) on loopback; the rules are
    /// written to file `record` first.
    pub fn install(port: u16, both: bool, tag: &str, record: &Path) -> Result<Self, String> {
        let rule = |dir: &str| -> Vec<String> {
            [
                "-i",
                "lo",
                "-p",
                "tcp",
                dir,
                &port.to_string(),
                "-m",
                "comment",
                "--comment",
                tag,
                "-j",
                "DROP",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
        };
        let mut me = Self {
            rules: Vec::new(),
            record: record.to_owned(),
        };
        let dirs: &[&str] = if both {
            &["--dport", "--sport"]
        } else {
            &["--dport"]
        };
        let lines: Vec<String> = dirs.iter().map(|d| rule(d).join(" ")).collect();
        fs::write(record, lines.join("\n") + "\n")
            .map_err(|e| format!("{}: {e}", record.display()))?;
        for dir in dirs {
            let r = rule(dir);
            let mut args = vec!["-w", "-I", "INPUT"];
            args.extend(r.iter().map(String::as_str));
            run("iptables", &args)?; // `me` drops what was installed so far
            me.rules.push(r);
        }
        Ok(me)
    }

    /// Removes every rule this guard installed; the error names the ones left.
    pub fn remove(&mut self) -> Result<(), String> {
        let mut left = Vec::new();
        for r in self.rules.drain(..) {
            let mut args = vec!["-w", "-D", "INPUT"];
            args.extend(r.iter().map(String::as_str));
            if let Err(e) = run("iptables", &args) {
                left.push(e);
            }
        }
        if left.is_empty() {
            let _ = fs::remove_file(&self.record);
            Ok(())
        } else {
            Err(left.join("; "))
        }
    }
}

impl Drop for IptablesDrop {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("[faults/operator] iptables cleanup: {e}");
        }
    }
}

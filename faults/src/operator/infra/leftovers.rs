//! Processes left by an earlier run whose process was killed before its shutdown.

use super::*;

// ------------------------------------------------------------------ leftovers

/// Whether process `pid` runs a command line containing `needle`.
pub(super) fn runs(pid: u32, needle: &str) -> bool {
    alive(pid)
        && fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
}

/// Undoes what an earlier workload under `work_dir` left when its process was
/// killed without unwinding (SIGKILL, a second ^C) in its directory
/// `work_dir/operator-*`: its operator (maybe SIGSTOPped) and registry processes
/// (by the pid files they left, if the pid still runs that program), its iptables
/// rules and its tmpfs. The directory itself (logs) stays. Returns what it did and
/// the run ids of the directories (`operator-<run>`).
pub fn clean_stale(work_dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut did = Vec::new();
    let mut ids = Vec::new();
    let Ok(entries) = fs::read_dir(work_dir) else {
        return (did, ids);
    };
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    for e in entries.flatten() {
        let dir = e.path();
        let id = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("operator-"))
            .map(str::to_owned);
        let Some(id) = id.filter(|_| dir.is_dir()) else {
            continue;
        };
        ids.push(id);
        for (pid_file, needle) in [
            (dir.join("operator.pid"), "br2k-operator"),
            (dir.join("registry-primary/registry.pid"), "registry"),
            (dir.join("registry-mirror/registry.pid"), "registry"),
        ] {
            if let Ok(pid) = read_pid(&pid_file)
                && runs(pid, needle)
            {
                let _ = signal(pid, "CONT");
                let _ = signal(pid, "KILL");
                did.push(format!("killed {needle} {pid} ({})", pid_file.display()));
            }
            let _ = fs::remove_file(&pid_file);
        }
        let rule_files = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("iptables") && n.ends_with(".rules"))
            });
        for f in rule_files {
            for r in fs::read_to_string(f.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                let mut args = vec!["-w", "-D", "INPUT"];
                args.extend(r.split(' '));
                if run("iptables", &args).is_ok() {
                    did.push(format!("removed iptables rule {r}"));
                }
            }
            let _ = fs::remove_file(f.path());
        }
        let data = dir.join("registry-mirror/data");
        let data_s = data.to_string_lossy().into_owned();
        if mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(data_s.as_str()))
        {
            match run("umount", &["-l", &data_s]) {
                Ok(_) => did.push(format!("unmounted {data_s}")),
                Err(e) => did.push(format!("umount {data_s}: {e}")),
            }
        }
    }
    (did, ids)
}

#[cfg(test)]
mod tests {
    use std::process::Child;
    use std::time::Instant;

    use super::*;

    /// Waits up to 5 s for `c` to exit; whether it did.
    fn exits(c: &mut Child) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn clean_stale_kills_a_stopped_leftover_and_spares_a_reused_pid() {
        let work = tempfile::tempdir().expect("temp dir");
        let run_dir = work.path().join("operator-abc123");
        fs::create_dir_all(run_dir.join("registry-primary")).expect("dirs");
        // A registry a killed run left, SIGSTOPped.
        let mut left = Command::new("bash")
            .args(["-c", "exec -a registry sleep 60"])
            .spawn()
            .expect("spawn");
        fs::write(
            run_dir.join("registry-primary/registry.pid"),
            format!("{}\n", left.id()),
        )
        .expect("pid file");
        // Wait for the exec, then stop it.
        let t0 = Instant::now();
        while !runs(left.id(), "registry") && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        signal(left.id(), "STOP").expect("stop");
        // The operator's pid file names a pid now used by another program.
        let mut other = Command::new("sleep").arg("60").spawn().expect("spawn");
        fs::write(run_dir.join("operator.pid"), format!("{}\n", other.id())).expect("pid file");

        let (did, ids) = clean_stale(work.path());

        let left_killed = exits(&mut left);
        let other_alive = other.try_wait().expect("try_wait").is_none();
        // Nothing of the test outlives it, whatever failed.
        for c in [&mut left, &mut other] {
            let _ = signal(c.id(), "CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(ids, vec!["abc123".to_owned()]);
        assert!(left_killed, "the stopped leftover was killed: {did:?}");
        assert!(
            other_alive,
            "another program on a recorded pid is left alone: {did:?}"
        );
        assert!(
            !run_dir.join("operator.pid").exists(),
            "pid files are consumed"
        );
        assert!(run_dir.exists(), "the directory (logs) stays");
    }
}

//! The `br2k` binary as a process, without the stack: help, completions, contexts,
//! `init`, and input errors that must stop before any network call.

mod support;

use support::Br2k;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn every_command_has_help_with_the_exit_codes() {
    let dir = tmp();
    let cli = Br2k::new(dir.path());
    let commands: &[&[&str]] = &[
        &[],
        &["init"],
        &["context"],
        &["context", "set"],
        &["context", "list"],
        &["context", "use"],
        &["context", "show"],
        &["contract", "deploy"],
        &["image"],
        &["image", "build"],
        &["image", "push"],
        &["image", "ls"],
        &["image", "verify"],
        &["deploy"],
        &["diff"],
        &["status"],
        &["history"],
        &["scale"],
        &["pause"],
        &["resume"],
        &["stop"],
        &["rollback"],
        &["grant"],
        &["revoke"],
        &["recover"],
        &["completions"],
    ];
    for c in commands {
        let mut args = c.to_vec();
        args.push("--help");
        let out = cli.run(dir.path(), &args);
        assert_eq!(out.code, 0, "{c:?}: {}", out.stderr);
        assert!(out.stdout.contains("Usage: br2k"), "{c:?}: {}", out.stdout);
        if c.len() <= 1 || c[0] != "context" && c[0] != "image" && c[0] != "contract" {
            assert!(
                out.stdout.contains("Exit codes: 0 ok, 1 failure, 2"),
                "{c:?}: {}",
                out.stdout
            );
        }
    }
    // A usage error exits 2.
    assert_eq!(cli.run(dir.path(), &["scale"]).code, 2);
    assert_eq!(cli.run(dir.path(), &["no-such-command"]).code, 2);
}

#[test]
fn completions_are_printed_for_each_shell() {
    let dir = tmp();
    let cli = Br2k::new(dir.path());
    for shell in ["bash", "zsh", "fish"] {
        let out = cli.run(dir.path(), &["completions", shell]);
        out.ok();
        assert!(
            out.stdout.contains("deploy") && out.stdout.contains("rollback"),
            "{shell}"
        );
    }
}

#[test]
fn contexts_are_stored_with_key_references_only() {
    let dir = tmp();
    let key = support::KEY7;
    let cli = Br2k::new(dir.path()).with_env("MY_KEY", key);
    cli.run(
        dir.path(),
        &[
            "context",
            "set",
            "a",
            "--rpc",
            "http://127.0.0.1:1",
            "--oci",
            "127.0.0.1:2",
            "--oci",
            "127.0.0.1:3",
            "--key-env",
            "MY_KEY",
        ],
    )
    .ok();
    cli.run(
        dir.path(),
        &[
            "context",
            "set",
            "b",
            "--rpc",
            "http://127.0.0.1:4",
            "--namespace",
            "apps",
        ],
    )
    .ok();
    let list = cli
        .run(dir.path(), &["context", "list", "-o", "json"])
        .json();
    assert_eq!(list["current"], "a", "the first context becomes current");
    assert_eq!(list["contexts"]["b"]["namespace"], "apps");
    assert_eq!(list["contexts"]["a"]["oci_registries"][1], "127.0.0.1:3");
    cli.run(dir.path(), &["context", "use", "b"]).ok();
    let show = cli
        .run(dir.path(), &["context", "show", "-o", "json"])
        .json();
    assert_eq!(show["name"], "b");
    let show = cli
        .run(
            dir.path(),
            &["--context", "a", "context", "show", "-o", "json"],
        )
        .json();
    assert_eq!(show["key"], "env MY_KEY");
    // The account of account 7's key, derived, never the key itself.
    assert_eq!(
        show["account"],
        "0x14dc79964da2c08b23698b3d3cc7ca32193d9955"
    );
    let text = std::fs::read_to_string(cli.config_dir.join("config.toml")).expect("config");
    assert!(
        !text.contains(&key[2..]),
        "the key must not be stored: {text}"
    );
    let out = cli.run(dir.path(), &["context", "use", "nope"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.starts_with("error: no context named \"nope\"") && out.stderr.contains("hint:"),
        "{}",
        out.stderr
    );
    // A key passed where a variable name belongs is refused.
    let out = cli.run(dir.path(), &["context", "set", "a", "--key-env", key]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        !std::fs::read_to_string(cli.config_dir.join("config.toml"))
            .expect("config")
            .contains(&key[2..])
    );
}

#[test]
fn init_writes_a_commented_project_that_parses() {
    let dir = tmp();
    let cli = Br2k::new(dir.path());
    cli.run(dir.path(), &["init", "svc", "--service", "hello"])
        .ok();
    let text = std::fs::read_to_string(dir.path().join("svc/br2k.toml")).expect("toml");
    assert!(
        text.contains("service = \"hello\"")
            && text.lines().filter(|l| l.starts_with('#')).count() > 10
    );
    assert!(dir.path().join("svc/app/run.sh").is_file());
    // A second init refuses to overwrite.
    let out = cli.run(dir.path(), &["init", "svc"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("--force"), "{}", out.stderr);
    // `image build` of the template works without any service.
    let out = cli
        .run(&dir.path().join("svc"), &["image", "build", "-o", "json"])
        .json();
    let digest = out["digest"].as_str().expect("digest");
    assert!(digest.starts_with("sha256:"));
    assert!(dir.path().join("svc/.br2k/image/index.json").is_file());
    // Reproducible: the same source gives the same digest.
    let again = cli
        .run(&dir.path().join("svc"), &["image", "build", "-o", "json"])
        .json();
    assert_eq!(again["digest"], digest);
}

#[test]
fn a_malformed_project_names_line_and_column_and_touches_nothing() {
    let dir = tmp();
    let cli = Br2k::new(dir.path());
    // A context whose endpoints do not exist: any network call would fail differently.
    cli.run(
        dir.path(),
        &[
            "context",
            "set",
            "x",
            "--rpc",
            "http://127.0.0.1:9",
            "--oci",
            "127.0.0.1:9",
        ],
    )
    .ok();
    cli.run(dir.path(), &["init", "p", "--service", "hello"])
        .ok();
    let file = dir.path().join("p/br2k.toml");
    let good = std::fs::read_to_string(&file).expect("toml");
    std::fs::write(&file, good.replace("replicas = 3", "replicas = \"three\"")).expect("write");
    for cmd in [&["deploy"][..], &["diff"], &["deploy", "--dry-run"]] {
        let out = cli.run(&dir.path().join("p"), cmd);
        assert_eq!(out.code, 2, "{cmd:?}: {}", out.stderr);
        let line = good
            .lines()
            .position(|l| l.starts_with("replicas = 3"))
            .expect("line")
            + 1;
        assert!(
            out.stderr
                .starts_with(&format!("error: br2k.toml:{line}:12: ")),
            "{}",
            out.stderr
        );
        assert_eq!(
            out.stderr.trim_end().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
    }
    std::fs::write(
        &file,
        good.replace("LOG_LEVEL = \"info\"", "API_TOKEN = \"abc\""),
    )
    .expect("write");
    let out = cli.run(&dir.path().join("p"), &["deploy"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("env.API_TOKEN") && out.stderr.contains("secret"),
        "{}",
        out.stderr
    );
}

#[test]
fn an_image_over_the_limit_is_refused_before_any_push() {
    let dir = tmp();
    let cli = Br2k::new(dir.path());
    cli.run(
        dir.path(),
        &[
            "context",
            "set",
            "x",
            "--rpc",
            "http://127.0.0.1:9",
            "--oci",
            "127.0.0.1:9",
            "--registry-contract",
            "0x5fbdb2315678afecb367f032d93f642f64180aa3",
        ],
    )
    .ok();
    cli.run(dir.path(), &["init", "p", "--service", "big"]).ok();
    let file = dir.path().join("p/br2k.toml");
    let text = std::fs::read_to_string(&file).expect("toml");
    std::fs::write(
        &file,
        text.replace("max_size_mib = 1024", "max_size_mib = 1"),
    )
    .expect("write");
    std::fs::write(dir.path().join("p/app/blob.bin"), vec![7u8; 2 << 20]).expect("write");
    for cmd in [&["deploy"][..], &["image", "build"], &["image", "push"]] {
        let out = cli.run(&dir.path().join("p"), cmd);
        assert_eq!(out.code, 2, "{cmd:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("larger than the limit of 1 MiB"),
            "{}",
            out.stderr
        );
    }
}

//! `xe devnet --once`: the whole system in one command, with real OpenSSH.

mod common;

use std::process::Command;

use common::*;

fn devnet_once(backend: &str, cmd: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    Command::new(xe_bin())
        .args(["devnet", "--data"])
        .arg(dir.path())
        .args([
            "--vm-backend",
            backend,
            "--timeout",
            "60",
            "--once",
            "--",
            cmd,
        ])
        .output()
        .expect("run xe devnet")
}

#[test]
fn devnet_once_runs_a_command_in_the_dev_vm() {
    let out = devnet_once("dev", "echo hello from the vm; exit 3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the vm\n",
        "stderr:\n{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit status is the command's; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("lease accepted"),
        "progress shown:\n{stderr}"
    );
    assert!(stderr.contains("[devnet] stopped"), "clean stop:\n{stderr}");
}

#[test]
fn devnet_once_runs_a_command_in_an_sshd_vm() {
    if !openssh_available("devnet_once_runs_a_command_in_an_sshd_vm") {
        return;
    }
    let out = devnet_once("sshd", "echo via real sshd; test -n \"$SSH_CONNECTION\"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "via real sshd\n",
        "stderr:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    // No sshd outlives devnet: every per-lease sshd ran with a config under
    // the devnet's data dir, and none is left.
    let ps = Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .expect("ps");
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines()
            .any(|l| l.contains("sshd") && l.contains("xe-devnet")),
        "orphan sshd:\n{ps}"
    );
}

/// What `xe devnet` prints is pasted by people: run each printed command
/// as a shell would (`sh -c`), with only a command for the VM appended, and
/// check it reaches the VM.
#[test]
fn devnet_prints_commands_that_work_when_pasted() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut devnet = Command::new(xe_bin())
        .args(["devnet", "--data"])
        .arg(dir.path().join("net"))
        .args(["--vm-backend", "dev", "--timeout", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn xe devnet");
    let (tx, rx) = mpsc::channel();
    let stdout = devnet.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Every "# N. …" heading is followed by its command lines.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("devnet printed its commands within 120 s");
        if line.starts_with("Press Ctrl-C") {
            break;
        }
        if let Some(h) = line.strip_prefix("# ") {
            commands.push((h.to_string(), Vec::new()));
        } else if !line.trim().is_empty()
            && let Some((_, body)) = commands.last_mut()
        {
            body.push(line);
        }
    }
    let find = |prefix: &str| -> String {
        let (_, body) = commands
            .iter()
            .find(|(h, _)| h.starts_with(prefix))
            .unwrap_or_else(|| panic!("no \"# {prefix}\" section in {commands:#?}"));
        body.last().expect("a command line").clone()
    };
    let sh = |line: String, what: &str| -> String {
        let out = Command::new("sh")
            .args(["-c", &line])
            .env("HOME", dir.path())
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("sh");
        ok(&out, &format!("{what}: {line}"))
    };
    assert_eq!(sh(format!("{} -- echo one", find("1.")), "# 1"), "one\n");
    assert_eq!(sh(format!("{} echo two", find("2.")), "# 2"), "two\n");
    assert_eq!(sh(format!("{} -- echo four", find("4.")), "# 4"), "four\n");
    // The config block goes where the line says (~ is the test's HOME).
    std::fs::create_dir_all(dir.path().join(".ssh")).expect("mkdir");
    let cfg_line = find("5.");
    assert!(cfg_line.ends_with(">> ~/.ssh/config"), "{cfg_line}");
    sh(cfg_line, "# 5");
    let heading = &commands
        .iter()
        .find(|(h, _)| h.starts_with("5."))
        .expect("5")
        .0;
    let alias = heading
        .rsplit("ssh ")
        .next()
        .and_then(|a| a.strip_suffix("):"))
        .expect("the alias in the heading");
    let cfg = dir.path().join(".ssh/config");
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args([alias, "echo five"])
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .expect("ssh");
    assert_eq!(ok(&out, "ssh with the printed config block"), "five\n");

    // Stop the devnet we started, by its PID.
    let _ = Command::new("kill")
        .args(["-INT", &devnet.id().to_string()])
        .status();
    let st = devnet.wait().expect("wait");
    assert!(st.success(), "devnet exit {st}");
}

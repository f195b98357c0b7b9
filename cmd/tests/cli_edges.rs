//! The `xe` binary at its edges: flags refused before anything starts, a
//! closed stdout.

use std::process::Command;

const XE: &str = env!("CARGO_BIN_EXE_xe");

#[test]
fn node_flags_that_cannot_work_are_refused_with_their_range() {
    let dir = tempfile::tempdir().expect("tmp");
    for bad in ["0", "366", "two"] {
        let out = Command::new(XE)
            .args(["node", "--data"])
            .arg(dir.path())
            .args(["--ledger-retention-days", bad])
            .output()
            .expect("run xe");
        assert!(
            !out.status.success(),
            "--ledger-retention-days {bad} accepted"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--ledger-retention-days"), "{bad}: {err}");
        // Nothing was created: the flag is checked before the store opens.
        assert!(!dir.path().join("db").exists(), "{bad}: store created");
    }
}

/// `xe wallet show | head -1`: the reader is gone before xe prints. xe
/// stops quietly with a broken pipe's status, not a panic (rc 101).
#[test]
fn a_closed_stdout_ends_a_printing_command_quietly() {
    let dir = tempfile::tempdir().expect("tmp");
    let wallet = dir.path().join("w.seed");
    let created = Command::new(XE)
        .args(["wallet", "create", "--wallet"])
        .arg(&wallet)
        .output()
        .expect("run xe");
    assert!(created.status.success(), "{created:?}");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(XE)
        .args(["wallet", "show", "--wallet"])
        .arg(&wallet)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run xe");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}

/// `xe lease create --help` states the ranges the ledger enforces (read
/// from `xe_store::lease::limits`, so the text cannot drift from them).
#[test]
fn lease_create_help_shows_the_term_ranges() {
    use xe_store::lease::limits;
    let out = Command::new(XE)
        .args(["lease", "create", "--help"])
        .output()
        .expect("run xe");
    let help = String::from_utf8_lossy(&out.stdout);
    for range in [
        format!("{}-{}", limits::VCPUS.start(), limits::VCPUS.end()),
        format!("{}-{}", limits::MEMORY_MB.start(), limits::MEMORY_MB.end()),
        format!("{}-{}", limits::DISK_GB.start(), limits::DISK_GB.end()),
        format!(
            "{}-{}",
            limits::DURATION_SECS.start(),
            limits::DURATION_SECS.end()
        ),
    ] {
        assert!(help.contains(&range), "{range} not in:\n{help}");
    }
}

/// Logs written to a file or a pipe carry no ANSI colour codes (and a node
/// on a taken port says so and stops).
#[test]
fn logs_to_a_pipe_are_plain_text() {
    let dir = tempfile::tempdir().expect("tmp");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = Command::new(XE)
        .args(["node", "--data"])
        .arg(dir.path())
        .args(["--p2p-listen", &format!("/ip4/127.0.0.1/tcp/{port}")])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .expect("run xe");
    assert!(!out.status.success(), "a node started on a taken port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listens there"), "{err}");
    assert!(err.contains("INFO"), "no log lines to check: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in piped logs: {err:?}"
    );
}

/// `--node` pointing at a web server that is not an xe node: one line that
/// says so, not the server's HTML page.
#[test]
fn a_node_url_that_is_not_an_xe_node_is_named_as_such() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    // Serves exactly the two requests below, then ends.
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut c, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let page = "<!DOCTYPE html>\n<html><body><h1>Not Found</h1></body></html>\n";
            let _ = write!(
                c,
                "HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    for args in [
        vec!["providers", "--node", url.as_str()],
        vec!["lease", "show", "12345678", "--node", url.as_str()],
    ] {
        let out = Command::new(XE).args(&args).output().expect("run xe");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is not an xe node's") && !err.contains("<html"),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    }
    server.join().expect("server");
}

/// An error whose text already names its cause does not repeat it.
#[test]
fn a_refused_connection_is_reported_once() {
    // Port 1 on loopback: nothing listens there on a test machine.
    let out = Command::new(XE)
        .args(["providers", "--node", "http://127.0.0.1:1"])
        .output()
        .expect("run xe");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    assert!(err.contains("XE_NODE"), "says what to do: {err}");
}

//! Host processes a backend starts: finding their programs, and ending
//! them with everything they started, also when an earlier run of the node
//! left them behind.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

/// Resolve a program: an explicit path must exist; a bare name is looked up
/// in `extra` directories first, then `$PATH`.
pub(crate) fn find_program(given: Option<&Path>, name: &str, extra: &[&str]) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    match given {
        Some(p) if p.components().count() > 1 || p.is_absolute() => {
            let p = std::path::absolute(p).ok()?;
            is_exec(&p).then_some(p)
        }
        other => {
            let name = other
                .map(|p| p.as_os_str().to_owned())
                .unwrap_or_else(|| name.into());
            let path_dirs = std::env::var_os("PATH").unwrap_or_default();
            extra
                .iter()
                .map(PathBuf::from)
                .chain(std::env::split_paths(&path_dirs))
                .map(|d| d.join(&name))
                .find(|p| p.is_absolute() && is_exec(p))
        }
    }
}

/// `/proc/<pid>/cmdline` with NULs as spaces, if the process exists.
pub(crate) fn proc_cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// Every process whose parent chain leads to `root` (not `root` itself),
/// read from `/proc`. Used to end an sshd's sessions with it: the
/// per-connection sshd processes are its children, the users' shells theirs.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid …": comm may contain spaces and ')'.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = after
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u32>().ok())
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            // A pid cannot be its own ancestor, but guard the walk anyway.
            if c != root && !out.contains(&c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// Send `sig` to one pid, ignoring "no such process".
fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// How long a killed process that is not our child may take to die.
const DEATH_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
pub(crate) fn is_dead(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Kill what an earlier run of the node left running (crash, kill -9): the
/// pid recorded in `pid_file`, if `is_ours(pid)` says that process is still
/// the one we started (pids are reused). The record is removed either way.
pub(crate) async fn kill_recorded(pid_file: &Path, what: &str, is_ours: impl Fn(u32) -> bool) {
    let Some(pid) = fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    if is_ours(pid) {
        tracing::warn!(pid, file = %pid_file.display(), "killing {what} left by an earlier run");
        kill_tree_and_wait(pid).await;
    }
    let _ = fs::remove_file(pid_file);
}

/// [`kill_tree`], then wait (bounded) until `pid` is dead: SIGKILL is
/// delivered asynchronously, and a port is only free once the process is.
pub(crate) async fn kill_tree_and_wait(pid: u32) {
    kill_tree(pid);
    let deadline = Instant::now() + DEATH_TIMEOUT;
    while !is_dead(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kill `pid` and everything below it. The root is stopped first so that it
/// cannot fork new children while the tree is read (a fork racing with the
/// stop is restarted by the kernel, so no child escapes the walk).
pub(crate) fn kill_tree(pid: u32) {
    signal(pid, rustix::process::Signal::STOP);
    for child in descendants(pid) {
        signal(child, rustix::process::Signal::KILL);
    }
    signal(pid, rustix::process::Signal::KILL);
}

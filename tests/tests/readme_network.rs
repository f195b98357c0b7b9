//! README's "Running a real network", run as written: the fenced `sh`
//! blocks between `<!-- readme-network:begin -->` and `end` are read from
//! README.md itself and run in order with the built `xe`, one "host" per
//! block's `# on the HOST` line (its own `HOME` and its own 127.0.0.x). If
//! the README's commands stop working, this test fails.
//!
//! What is substituted, and nothing else:
//! - listen addresses: `0.0.0.0` → the host's 127.0.0.x, every port → 0
//!   (free, read back from the ready line); `--ssh-port N` / `--api-port N`
//!   → `--ssh-listen IP:0` / `--api-listen IP:0`; a node line without
//!   `--p2p-listen` (the default is all interfaces, port 4001) gets
//!   `--p2p-listen /ip4/IP/tcp/0`. The README's ports are checked against
//!   each other (the provider's bootstrap port is the gateway's listen port,
//!   `GW_IP:2222` is its SSH port, the consumer's API port is the CLI's
//!   default) and mapped to the real ones.
//! - `--data /var/lib/xe` → that host's own directory.
//! - the provider's `--vm-backend qemu --qemu-…` → `--vm-backend sshd`
//!   (OpenSSH's sshd per lease; `dev` when sshd is missing, unless
//!   `XE_REQUIRE_SSHD=1`): booting a TCG guest takes 30–130 s, and
//!   `tests/tests/qemu.rs` covers that backend.
//! - the placeholders, from earlier output as a person would fill them:
//!   `GW_IP` / `GW_PEER_ID` from the gateway's ready line (`p2p_addrs`),
//!   `PROVIDER_ADDRESS` from `xe providers`; `$LEASE` is the shell's.
//! - the consumer's API URL: the README relies on the default
//!   `http://127.0.0.1:8080`, which a parallel test suite cannot bind; the
//!   test checks that the default is what `--api-port` in the README says,
//!   then sets `XE_NODE` to the node's real API address.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const README: &str = include_str!("../../README.md");
const BEGIN: &str = "<!-- readme-network:begin -->";
const END: &str = "<!-- readme-network:end -->";
/// Bound on each command (`xe lease create --wait` included).
const COMMAND_LIMIT: Duration = Duration::from_secs(120);
/// How long `xe providers` may take to list the provider (its directory
/// entry travels provider → gateway → consumer by gossip and sync).
const PROVIDERS_LIMIT: Duration = Duration::from_secs(60);

/// One fenced `sh` block: the host it runs on and its commands.
#[derive(Debug)]
struct Block {
    host: String,
    commands: Vec<String>,
}

fn readme_blocks() -> Vec<Block> {
    let start = README
        .find(BEGIN)
        .expect("README has the readme-network:begin marker");
    let end = README
        .find(END)
        .expect("README has the readme-network:end marker");
    let section = &README[start + BEGIN.len()..end];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(l) = lines.next() {
        if l.trim() != "```sh" {
            continue;
        }
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        let first = body.first().map(|l| l.trim()).unwrap_or_default();
        let host = first
            .strip_prefix("# on the ")
            .and_then(|h| h.split(|c: char| !c.is_alphanumeric()).next())
            .unwrap_or_else(|| panic!("block must start with `# on the HOST`: {body:?}"))
            .to_string();
        let commands = body[1..]
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect();
        blocks.push(Block { host, commands });
    }
    blocks
}

/// The README's ports and what they became.
#[derive(Default)]
struct State {
    /// Placeholder → value (`GW_IP`, `GW_PEER_ID`, `PROVIDER_ADDRESS`).
    fill: HashMap<&'static str, String>,
    /// The gateway's libp2p port in the README, and its real one.
    gw_p2p: Option<(u16, u16)>,
    /// The gateway's SSH port in the README, and its real address.
    gw_ssh: Option<(u16, String)>,
    /// The provider's account, from its ready line (checked against `xe providers`).
    provider_account: Option<String>,
    /// Shell variables set by `NAME=$(…)` lines.
    vars: Vec<(String, String)>,
}

/// `s` with the placeholders filled and the README's gateway ports mapped
/// to the real ones. Panics on a placeholder it cannot fill yet.
fn fill(s: &str, st: &State) -> String {
    let mut out = s.to_string();
    if let Some(ip) = st.fill.get("GW_IP") {
        if let Some((readme, real)) = st.gw_p2p {
            out = out.replace(
                &format!("GW_IP/tcp/{readme}/"),
                &format!("{ip}/tcp/{real}/"),
            );
        }
        if let Some((readme, real)) = &st.gw_ssh {
            out = out.replace(&format!("GW_IP:{readme}"), real);
        }
        assert!(
            !out.contains("GW_IP/tcp/") && !out.contains("GW_IP:"),
            "{s:?}: a gateway port that is not the one the README's gateway listens on"
        );
        out = out.replace("GW_IP", ip);
    }
    for (k, v) in &st.fill {
        out = out.replace(k, v);
    }
    // Anything still looking like a placeholder (ALL_CAPS with `_`, not a
    // `$VAR`) is a README step the test cannot follow: fail, naming it.
    for word in out.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$')) {
        let caps = word
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        assert!(
            !(caps && word.contains('_') && word.len() >= 4),
            "README placeholder {word} in {s:?} is not filled by any earlier command's output"
        );
    }
    out
}

/// A port at the end of `addr` (`/ip4/…/tcp/N`) or `IP:N`.
fn port_of(s: &str) -> u16 {
    s.rsplit(['/', ':'])
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {s:?}"))
}

/// A host's `xe node` line, made loopback-only with free ports (see the
/// file's doc), as arguments after `xe node`.
fn localize_node(line: &str, ip: &str, home: &Path, backend: &str, st: &State) -> Vec<String> {
    let line = fill(line, st);
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&words[..2], ["xe", "node"], "{line}");
    let mut args = Vec::new();
    let mut has_listen = false;
    let mut it = words[2..].iter().copied();
    while let Some(w) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("{w} without a value in {line:?}"))
        };
        match w {
            "--data" => {
                let p = value();
                let rel = p.trim_start_matches("~/").trim_start_matches('/');
                args.extend(["--data".into(), home.join(rel).display().to_string()]);
            }
            "--p2p-listen" => {
                has_listen = true;
                let a = value().replace("/ip4/0.0.0.0/", &format!("/ip4/{ip}/"));
                // The component after tcp/udp is the port: any free one.
                let mut parts: Vec<&str> = a.split('/').collect();
                if let Some(i) = parts.iter().position(|p| *p == "tcp" || *p == "udp") {
                    parts[i + 1] = "0";
                }
                args.extend(["--p2p-listen".into(), parts.join("/")]);
            }
            "--ssh-port" => {
                value();
                args.extend(["--ssh-listen".into(), format!("{ip}:0")]);
            }
            "--api-port" => {
                value();
                args.extend(["--api-listen".into(), format!("{ip}:0")]);
            }
            "--vm-backend" => {
                value();
                args.extend(["--vm-backend".into(), backend.into()]);
            }
            w if w.starts_with("--qemu-") || w.starts_with("--lima-") => {
                value();
            }
            w => args.push(w.to_string()),
        }
    }
    if !has_listen {
        args.extend(["--p2p-listen".into(), format!("/ip4/{ip}/tcp/0")]);
    }
    args
}

/// The value after `flag` in a README line.
fn flag_value<'a>(line: &'a str, flag: &str) -> Option<&'a str> {
    let mut w = line.split_whitespace();
    w.by_ref().find(|x| *x == flag)?;
    w.next()
}

/// One simulated host.
struct Host {
    ip: String,
    home: PathBuf,
    env: Vec<(String, String)>,
}

impl Host {
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        let bin_dir = xe_bin().parent().expect("bin dir").to_path_buf();
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("HOME", &self.home)
            .env("PATH", format!("{}:{path}", bin_dir.display()))
            .env("NO_COLOR", "1");
        for k in [
            "XE_NODE",
            "XE_WALLET",
            "XE_GATEWAY",
            "XE_DATA",
            "XE_CONFIG",
            "SSH_AUTH_SOCK",
        ] {
            c.env_remove(k);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }
}

/// `bash -o pipefail -c CMD` on `host`, bounded by [`COMMAND_LIMIT`].
fn run(host: &Host, cmd: &str, vars: &[(String, String)]) -> Output {
    let mut c = host.command(Path::new("bash"));
    c.args(["-o", "pipefail", "-c", cmd])
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().expect("spawn bash");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_LIMIT) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            // Only the shell we started, by its PID.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("README command {cmd:?} did not finish within {COMMAND_LIMIT:?}");
        }
    }
}

fn vm_backend() -> &'static str {
    if Path::new("/usr/sbin/sshd").exists() {
        return "sshd";
    }
    assert!(
        std::env::var("XE_REQUIRE_SSHD").as_deref() != Ok("1"),
        "readme_network: XE_REQUIRE_SSHD=1 but /usr/sbin/sshd is missing"
    );
    eprintln!("readme_network: no /usr/sbin/sshd; the provider uses --vm-backend dev");
    "dev"
}

#[test]
fn readme_running_a_real_network_works_as_written() {
    let blocks = readme_blocks();
    let order: Vec<&str> = blocks.iter().map(|b| b.host.as_str()).collect();
    assert_eq!(
        order,
        ["gateway", "provider", "consumer", "consumer"],
        "README section's blocks (the test knows these hosts)"
    );
    let backend = vm_backend();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut hosts: HashMap<String, Host> = HashMap::new();
    let mut nodes: Vec<(String, NodeProc)> = Vec::new();
    let mut st = State::default();
    let mut last: Option<(String, String)> = None;

    for block in &blocks {
        let n = hosts.len() + 1;
        let host = hosts.entry(block.host.clone()).or_insert_with(|| {
            let home = dir.path().join(&block.host);
            std::fs::create_dir_all(&home).expect("home");
            // 127.0.0.x only: each host its own loopback address.
            Host {
                ip: format!("127.0.0.{n}"),
                home,
                env: Vec::new(),
            }
        });
        for line in &block.commands {
            if line.starts_with("xe node") {
                let args = localize_node(line, &host.ip, &host.home, backend, &st);
                let data = args
                    .iter()
                    .position(|a| a == "--data")
                    .map(|i| PathBuf::from(&args[i + 1]))
                    .unwrap_or_else(|| host.home.join(".xe/node"));
                let mut cmd = host.command(&xe_bin());
                cmd.arg("node").args(&args);
                let node = NodeProc::spawn(cmd, &data);
                let written = std::fs::read_to_string(data.join("node.json")).expect("node.json");
                let from_file: serde_json::Value =
                    serde_json::from_str(&written).expect("node.json is JSON");
                assert_eq!(from_file, node.ready, "node.json = the ready line");
                match block.host.as_str() {
                    "gateway" => {
                        let p2p = node.ready["p2p_addrs"][0].as_str().expect("p2p_addrs");
                        let parts: Vec<&str> = p2p.split('/').collect();
                        st.fill.insert("GW_IP", parts[2].to_string());
                        st.fill.insert("GW_PEER_ID", node.field("peer_id"));
                        let readme_p2p = flag_value(line, "--p2p-listen").expect("gw --p2p-listen");
                        st.gw_p2p = Some((port_of(readme_p2p), parts[4].parse().expect("port")));
                        let readme_ssh = flag_value(line, "--ssh-port").expect("gw --ssh-port");
                        st.gw_ssh = Some((port_of(readme_ssh), node.field("ssh_addr")));
                    }
                    "provider" => st.provider_account = Some(node.field("account")),
                    _ => {}
                }
                if let Some(port) = flag_value(line, "--api-port") {
                    let help = ok(&xe(&["providers", "--help"]), "xe providers --help");
                    assert!(
                        help.contains(&format!("http://127.0.0.1:{port}")),
                        "the README's --api-port {port} is not where xe's commands look by default:\n{help}"
                    );
                    host.env.push((
                        "XE_NODE".into(),
                        format!("http://{}", node.field("api_addr")),
                    ));
                }
                nodes.push((block.host.clone(), node));
                continue;
            }
            let (var, cmd) = match line.split_once("=$(") {
                Some((v, rest)) if v.chars().all(|c| c.is_ascii_uppercase() || c == '_') => (
                    Some(v.to_string()),
                    rest.strip_suffix(')')
                        .expect("NAME=$(…) ends in )")
                        .to_string(),
                ),
                _ => (None, line.clone()),
            };
            let cmd = fill(&cmd, &st);
            let out = if cmd == "xe providers" {
                // A person runs it again until the provider shows up: its
                // directory entry travels by gossip and sync.
                let deadline = Instant::now() + PROVIDERS_LIMIT;
                loop {
                    let out = run(host, &cmd, &st.vars);
                    let text = ok(&out, &cmd);
                    if let Some(row) = text.lines().nth(1) {
                        let addr = row.split_whitespace().next().expect("ADDRESS").to_string();
                        assert_eq!(
                            Some(&addr),
                            st.provider_account.as_ref(),
                            "xe providers lists the provider's account:\n{text}"
                        );
                        st.fill.insert("PROVIDER_ADDRESS", addr);
                        break out;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "xe providers listed no provider within {PROVIDERS_LIMIT:?}:\n{text}"
                    );
                    std::thread::sleep(Duration::from_millis(250));
                }
            } else {
                run(host, &cmd, &st.vars)
            };
            let stdout = ok(
                &out,
                &format!("README command {cmd:?} on the {}", block.host),
            );
            if let Some(v) = var {
                let value = stdout.trim().to_string();
                assert!(!value.is_empty(), "{cmd:?} printed nothing for ${v}");
                st.vars.push((v, value));
            }
            last = Some((cmd, stdout));
        }
    }

    let (cmd, stdout) = last.expect("the section ends in a command");
    assert!(
        cmd.starts_with("xe ssh ") && cmd.ends_with("-- uname -a"),
        "{cmd}"
    );
    // The sshd and dev backends run the VM's shell on this machine, so the
    // VM's `uname -a` is this machine's.
    let here = Command::new("uname").arg("-a").output().expect("uname");
    assert_eq!(
        stdout,
        String::from_utf8_lossy(&here.stdout),
        "uname -a came back through the gateway"
    );
    let (_, gw) = nodes.iter().find(|(h, _)| h == "gateway").expect("gateway");
    let lease = &st
        .vars
        .iter()
        .find(|(k, _)| k == "LEASE")
        .expect("$LEASE")
        .1;
    assert_eq!(
        lease.len(),
        64,
        "xe lease create printed the lease hash last: {lease}"
    );
    assert!(
        gw.log_text().contains("tunnel to the VM open"),
        "the session went through the gateway; its log:\n{}",
        gw.log_text()
    );
}

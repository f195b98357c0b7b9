//! Linux network namespaces made by a test: an "internet" namespace and
//! two sites, each a router doing MASQUERADE (no inbound forwarding, no
//! port mapping) with one host behind it. Addresses come from
//! 198.18.0.0/15 only. Everything is torn down on drop, even when the test
//! panics.
//!
//! ```text
//!            pub (the internet)                     198.18.1.1 / 198.18.2.1
//!           /                  \
//!  rp: 198.18.1.2 NAT        rg: 198.18.2.2 NAT     MASQUERADE --random-fully,
//!      198.18.11.1               198.18.12.1        FORWARD: out, or established back
//!       |                          |
//!  p: 198.18.11.2             g: 198.18.12.2        default routes via their router
//! ```
//!
//! `pub` forwards between the two sites' WAN links but has no route into
//! either site, so nothing can open a connection to `p` or `g`; both can
//! reach `pub` and (through `pub`) each other's router, which refuses.
//! `--random-fully` gives each outgoing connection a random port (a
//! symmetric NAT), so hole punching cannot predict a mapping.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Address of the `pub` side facing site p.
pub const PUB_TO_P: &str = "198.18.1.1";
/// Address of the `pub` side facing site g.
pub const PUB_TO_G: &str = "198.18.2.1";
/// Router p's public (WAN) address: what `pub` sees p's connections from.
pub const ROUTER_P_WAN: &str = "198.18.1.2";
/// Host p's (private) address.
pub const HOST_P: &str = "198.18.11.2";
/// Host g's (private) address.
pub const HOST_G: &str = "198.18.12.2";

/// The namespaces of one test; deleted on drop.
pub struct Topology {
    /// The "internet".
    pub public: String,
    /// Router of site p.
    pub router_p: String,
    /// Host behind router p (the provider).
    pub p: String,
    /// Router of site g.
    pub router_g: String,
    /// Host behind router g (the gateway the consumer uses).
    pub g: String,
}

fn run(argv: &[&str]) -> Result<(), String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this machine lets us make namespaces (root, iproute2,
/// iptables). If not, the test skips loudly — unless `XE_REQUIRE_SSHD=1`
/// (CI), where that is a failure.
pub fn available(test: &str) -> bool {
    let why = (|| {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            })
            .unwrap_or_default();
        if uid != "0" {
            return Err("not running as root".to_string());
        }
        for tool in ["ip", "iptables"] {
            let found = Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !found {
                return Err(format!(
                    "`{tool}` is not installed (apt-get install iproute2 iptables)"
                ));
            }
        }
        // Can we actually make one?
        let probe = format!("xe{}probe{}", std::process::id(), next_id());
        run(&["ip", "netns", "add", &probe])?;
        let _ = run(&["ip", "netns", "del", &probe]);
        Ok(())
    })();
    match why {
        Ok(()) => true,
        Err(why) => {
            if std::env::var("XE_REQUIRE_SSHD").as_deref() == Ok("1") {
                panic!("{test}: cannot create network namespaces ({why}) but XE_REQUIRE_SSHD=1");
            }
            eprintln!("\n!!! SKIPPING {test}: cannot create network namespaces: {why} !!!\n");
            false
        }
    }
}

fn next_id() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Topology {
    /// Make the namespaces, links, addresses, routes and NAT rules.
    /// Panics (after tearing down what exists) if any step fails.
    pub fn create() -> Topology {
        // Unique per test process and per call: parallel tests and
        // parallel test runs never share a namespace.
        let tag = format!("xe{}n{}", std::process::id(), next_id());
        let t = Topology {
            public: format!("{tag}-pub"),
            router_p: format!("{tag}-rp"),
            p: format!("{tag}-p"),
            router_g: format!("{tag}-rg"),
            g: format!("{tag}-g"),
        };
        if let Err(e) = t.build() {
            // `t` drops here and deletes whatever was made.
            panic!("building the test network: {e}");
        }
        t
    }

    fn all(&self) -> [&str; 5] {
        [
            &self.public,
            &self.router_p,
            &self.p,
            &self.router_g,
            &self.g,
        ]
    }

    fn build(&self) -> Result<(), String> {
        for ns in self.all() {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let (pb, rp, p, rg, g) = (
            self.public.as_str(),
            self.router_p.as_str(),
            self.p.as_str(),
            self.router_g.as_str(),
            self.g.as_str(),
        );
        // Links are made inside the namespaces, so no interface name ever
        // exists in (or clashes with) the host's namespace.
        run(&[
            "ip", "-n", pb, "link", "add", "rp", "type", "veth", "peer", "name", "wan", "netns", rp,
        ])?;
        run(&[
            "ip", "-n", pb, "link", "add", "rg", "type", "veth", "peer", "name", "wan", "netns", rg,
        ])?;
        run(&[
            "ip", "-n", rp, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns",
            p,
        ])?;
        run(&[
            "ip", "-n", rg, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns",
            g,
        ])?;
        for (dev, addr) in [("rp", "198.18.1.1/24"), ("rg", "198.18.2.1/24")] {
            run(&["ip", "-n", pb, "addr", "add", addr, "dev", dev])?;
            run(&["ip", "-n", pb, "link", "set", dev, "up"])?;
        }
        run(&[
            "ip",
            "netns",
            "exec",
            pb,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        for (r, wan, wan_gw, lan) in [
            (rp, "198.18.1.2/24", "198.18.1.1", "198.18.11.1/24"),
            (rg, "198.18.2.2/24", "198.18.2.1", "198.18.12.1/24"),
        ] {
            run(&["ip", "-n", r, "addr", "add", wan, "dev", "wan"])?;
            run(&["ip", "-n", r, "link", "set", "wan", "up"])?;
            run(&["ip", "-n", r, "addr", "add", lan, "dev", "lan"])?;
            run(&["ip", "-n", r, "link", "set", "lan", "up"])?;
            run(&["ip", "-n", r, "route", "add", "default", "via", wan_gw])?;
            run(&[
                "ip",
                "netns",
                "exec",
                r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
            let ipt = |rule: &[&str]| {
                let mut argv = vec!["ip", "netns", "exec", r, "iptables"];
                argv.extend_from_slice(rule);
                run(&argv)
            };
            ipt(&[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
                "--random-fully",
            ])?;
            ipt(&["-P", "FORWARD", "DROP"])?;
            ipt(&["-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT"])?;
            ipt(&[
                "-A",
                "FORWARD",
                "-i",
                "wan",
                "-o",
                "lan",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ])?;
        }
        for (h, addr, gw) in [
            (p, "198.18.11.2/24", "198.18.11.1"),
            (g, "198.18.12.2/24", "198.18.12.1"),
        ] {
            run(&["ip", "-n", h, "addr", "add", addr, "dev", "eth0"])?;
            run(&["ip", "-n", h, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", h, "route", "add", "default", "via", gw])?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends (and so their peers).
        for ns in self.all() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// Run `cmd` with a deadline; on expiry kill that child (only it) and
/// panic. `stdin` is a file fed to the child, if any.
pub fn output_within(mut cmd: Command, stdin: Option<&Path>, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    match stdin {
        Some(p) => cmd.stdin(std::fs::File::open(p).expect("stdin file")),
        None => cmd.stdin(Stdio::null()),
    };
    let child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    }
}

/// `ip netns exec NETNS PROGRAM ARGS…` as a command.
pub fn in_netns(netns: &str, program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).arg(program).args(args);
    c
}

/// Strip ANSI colour codes from a log, for substring checks.
pub fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut it = log.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

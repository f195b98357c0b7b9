//! Real VMs: the `qemu` backend boots a Debian 12 guest per lease (the
//! image `vm/images/build-debian.sh` writes; CI builds it once and points
//! `XE_QEMU_IMAGE_DIR` at it) and the consumer reaches it through the
//! gateway with real OpenSSH, the VM's host key pinned from the accept.
//!
//! Each boot is 30-130 s under TCG on these machines, so the scenarios
//! share VMs: two leases boot at once, one is settled, then the provider is
//! killed with SIGKILL and restarted and the other comes back.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Where the test image is, or `None` (skip, loudly) — unless
/// `XE_REQUIRE_QEMU=1` (CI), where a missing QEMU or image fails.
fn qemu_image(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("XE_QEMU_IMAGE_DIR").map(PathBuf::from);
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let missing = match &dir {
        _ if !qemu => Some(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".to_string(),
        ),
        None => Some(
            "XE_QEMU_IMAGE_DIR is not set (build an image: sudo vm/images/build-debian.sh DIR)"
                .to_string(),
        ),
        Some(d) => ["debian-12.qcow2", "vmlinuz", "initrd.img"]
            .iter()
            .find(|f| !d.join(f).exists())
            .map(|f| {
                format!(
                    "{} has no {f} (build it with sudo vm/images/build-debian.sh {})",
                    d.display(),
                    d.display()
                )
            }),
    };
    if let Some(why) = missing {
        if std::env::var("XE_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{test}: {why}, but XE_REQUIRE_QEMU=1");
        }
        eprintln!("\n!!! SKIPPING {test}: {why} !!!\n");
        return None;
    }
    dir
}

fn qemu_flags(img: &Path) -> Vec<String> {
    [
        "--provide",
        "--vm-backend",
        "qemu",
        "--qemu-image",
        &img.join("debian-12.qcow2").display().to_string(),
        "--qemu-kernel",
        &img.join("vmlinuz").display().to_string(),
        "--qemu-initrd",
        &img.join("initrd.img").display().to_string(),
        "--api-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A consumer wallet (and its lease key) in `dir`.
fn new_wallet(dir: &Path) -> PathBuf {
    let wallet = dir.join("me.seed");
    ok(
        &xe(&[
            "wallet",
            "create",
            "--wallet",
            wallet.to_str().expect("utf8"),
        ]),
        "wallet create",
    );
    wallet
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A process's pid recorded in `file`, if the file exists.
fn read_pid(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Poll (there is nothing to await in another process) until `cond`, or
/// panic after `limit`; returns the time it took.
fn within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t.elapsed()
}

struct Lease {
    hash: String,
    host_key: String,
}

/// `xe lease create --wait` on `api` for the provider `account`.
fn create_lease(
    api: &str,
    wallet: &Path,
    account: &str,
    vcpus: u32,
    mem: u32,
    disk: u32,
) -> std::process::Child {
    Command::new(xe_bin())
        .args(["lease", "create", "--wallet"])
        .arg(wallet)
        .args(["--node", &format!("http://{api}"), "--provider", account])
        .args([
            "--vcpus",
            &vcpus.to_string(),
            "--memory-mb",
            &mem.to_string(),
        ])
        .args(["--disk-gb", &disk.to_string(), "--duration", "3600"])
        .args(["--wait", "--timeout", "600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("xe lease create")
}

fn finish_lease(child: std::process::Child, api: &str) -> Lease {
    let out = child.wait_with_output().expect("lease create");
    let hash = ok(&out, "lease create --wait")
        .lines()
        .last()
        .expect("hash")
        .trim()
        .to_string();
    let (status, body) = http_get(api, &format!("/leases/{hash}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "accepted", "{body}");
    let host_key = body["vm_host_key"]
        .as_str()
        .expect("vm_host_key")
        .to_string();
    Lease { hash, host_key }
}

struct Ssh<'a> {
    dir: &'a Path,
    gw_port: u16,
    key: PathBuf,
}

impl Ssh<'_> {
    /// `ssh -W` through the gateway, the VM's key pinned under the lease
    /// hash in `known_hosts` (written from the accepts), strictly checked.
    fn run(&self, lease: &str, cmd: &str) -> Output {
        let proxy = format!(
            "ProxyCommand=ssh -F /dev/null -p {port} -i {key} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={gwkh} -o HostKeyAlias=xe-gateway \
             -W %h:%p {lease}@127.0.0.1",
            port = self.gw_port,
            key = self.key.display(),
            gwkh = self.dir.join("gw_known_hosts").display(),
        );
        Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                &proxy,
                "-o",
                &format!("HostKeyAlias={lease}"),
            ])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg("-i")
            .arg(&self.key)
            .args(["root@vm", cmd])
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("ssh")
    }

    fn ok(&self, lease: &str, cmd: &str) -> String {
        ok(&self.run(lease, cmd), &format!("ssh {cmd:?}"))
    }
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out}"))
}

#[test]
fn leased_vms_are_real_isolated_and_survive_a_provider_kill() {
    let Some(img) = qemu_image("leased_vms_are_real_isolated_and_survive_a_provider_kill") else {
        return;
    };
    if !openssh_available("leased_vms_are_real_isolated_and_survive_a_provider_kill") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let base = img.join("debian-12.qcow2");
    let base_before = std::fs::metadata(&base)
        .expect("image")
        .modified()
        .expect("mtime");
    let gw = NodeProc::start(
        &dir.path().join("gw"),
        &["--ssh-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
    );
    let mut pargs = qemu_flags(&img);
    pargs.extend(gw.bootstrap_args());
    let pdata = dir.path().join("provider");
    let mut provider = NodeProc::start(&pdata, &strs(&pargs));
    let api = gw.field("api_addr");
    let wallet = new_wallet(dir.path());
    let account = provider.field("account");

    // Two leases at once: two VMs boot side by side.
    let t = Instant::now();
    let big = create_lease(&api, &wallet, &account, 2, 1024, 4);
    let small = create_lease(&api, &wallet, &account, 1, 512, 2);
    let crash = create_lease(&api, &wallet, &account, 1, 256, 2);
    let (big, small, crash) = (
        finish_lease(big, &api),
        finish_lease(small, &api),
        finish_lease(crash, &api),
    );
    eprintln!("three VMs accepted {:?} after the creates", t.elapsed());
    let qemu_dir = pdata.join("vms/qemu");
    let papi = provider.field("api_addr");

    // A QEMU that dies on its own is reported, not left "running".
    let crash_pid = read_pid(&qemu_dir.join(&crash.hash).join("qemu.pid")).expect("pid");
    let _ = Command::new("kill")
        .args(["-KILL", &crash_pid.to_string()])
        .status();
    let mut last = serde_json::Value::Null;
    within(Duration::from_secs(10), "a dead QEMU is reported", || {
        last = http_get(&papi, &format!("/vms/{}", crash.hash)).1;
        last["status"] == "error"
    });
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("QEMU exited on its own")),
        "{last}"
    );
    std::fs::write(
        dir.path().join("known_hosts"),
        format!(
            "{} {}\n{} {}\n",
            big.hash, big.host_key, small.hash, small.host_key
        ),
    )
    .expect("known_hosts");
    let ssh = Ssh {
        dir: dir.path(),
        gw_port: gw
            .field("ssh_addr")
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port"),
        key: dir.path().join("me.lease_key"),
    };

    // Inside the big VM: its size, its own identity, its own disk, and no
    // way to the provider's loopback (a listener there sees nothing).
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe listener");
    probe.set_nonblocking(true).expect("nonblocking");
    let probe_port = probe.local_addr().expect("addr").port();
    let marker = format!("xe-qemu-test-{}", std::process::id());
    let out = ssh.ok(
        &big.hash,
        &format!(
            "echo nproc=$(nproc); echo mem=$(awk '/MemTotal/ {{print $2}}' /proc/meminfo); \
             echo host=$(hostname); echo mid=$(cat /etc/machine-id); \
             echo disk=$(df -k --output=size / | tail -1); \
             echo inside > /tmp/{marker}; echo inside > /root/{marker}; sync; \
             if timeout 5 bash -c 'echo x > /dev/tcp/10.0.2.2/{probe_port}' 2>/dev/null; then echo host=reached; else echo loopback=blocked; fi"
        ),
    );
    assert_eq!(field(&out, "nproc"), "2", "{out}");
    let mem_kib: u64 = field(&out, "mem").parse().expect("MemTotal");
    // The guest kernel keeps its image and reserved ranges: 85-100 % of -m.
    assert!(
        (1024 * 1024 * 85 / 100..=1024 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} KiB for 1024 MiB\n{out}"
    );
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_ne!(field(&out, "host"), host_name.trim(), "{out}");
    assert_eq!(field(&out, "host"), format!("xe-{}", &big.hash[..8]));
    let host_mid = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let vm_mid = field(&out, "mid");
    assert!(vm_mid.len() == 32 && vm_mid != host_mid.trim(), "{out}");
    let disk_kib: u64 = field(&out, "disk").trim().parse().expect("df");
    // A 4 GiB lease disk, grown from the 2 GiB image at boot.
    assert!(
        disk_kib > 3 * 1024 * 1024,
        "root filesystem {disk_kib} KiB for 4 GiB\n{out}"
    );
    assert_eq!(field(&out, "loopback"), "blocked", "{out}");
    assert!(
        probe.accept().is_err(),
        "the VM reached 127.0.0.1:{probe_port} on the provider"
    );
    assert!(
        !Path::new(&format!("/tmp/{marker}")).exists(),
        "a file written in the VM appeared on the host"
    );

    // The small VM: its own size and machine, none of the big one's files.
    let out = ssh.ok(&small.hash, &format!("echo nproc=$(nproc); echo mid=$(cat /etc/machine-id); ls /root/{marker} 2>/dev/null || echo own=yes"));
    assert_eq!(field(&out, "nproc"), "1", "{out}");
    assert_eq!(field(&out, "own"), "yes", "{out}");
    assert_ne!(field(&out, "mid"), vm_mid, "two VMs share a machine-id");

    // The pin is checked: the small VM's key under the big lease's name fails.
    std::fs::write(
        dir.path().join("known_hosts"),
        format!("{} {}\n", big.hash, small.host_key),
    )
    .expect("known_hosts");
    let out = ssh.run(&big.hash, "true");
    assert!(
        !out.status.success(),
        "ssh accepted a VM whose key differs from the pinned one"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        dir.path().join("known_hosts"),
        format!("{} {}\n", big.hash, big.host_key),
    )
    .expect("known_hosts");

    // Settle the small lease: its QEMU exits and its disk is deleted.
    let small_dir = qemu_dir.join(&small.hash);
    let small_pid = read_pid(&small_dir.join("qemu.pid")).expect("small VM's pid");
    assert!(small_dir.join("disk.qcow2").exists());
    ok(
        &xe(&[
            "lease",
            "settle",
            "--wallet",
            wallet.to_str().expect("utf8"),
            "--node",
            &format!("http://{api}"),
            &small.hash,
        ]),
        "settle",
    );
    let took = within(Duration::from_secs(30), "settled VM gone", || {
        !alive(small_pid) && !small_dir.exists()
    });
    eprintln!("settled VM's QEMU gone and overlay deleted {took:?} after the settle");

    // kill -9 the provider: the kernel ends its QEMU (pdeathsig).
    let big_dir = qemu_dir.join(&big.hash);
    let big_pid = read_pid(&big_dir.join("qemu.pid")).expect("big VM's pid");
    let _ = Command::new("kill")
        .args(["-KILL", &provider.child.id().to_string()])
        .status();
    let _ = provider.child.wait();
    let took = within(
        Duration::from_secs(10),
        "QEMU dies with its provider",
        || !alive(big_pid),
    );
    eprintln!("QEMU gone {took:?} after its provider was killed");

    // Restart: the lease's VM comes back with the same host key and disk
    // (what the guest had synced: a SIGKILL is a power cut to it).
    provider = NodeProc::start(&pdata, &strs(&pargs));
    let papi = provider.field("api_addr");
    // The crashed lease's VM is booted again as well (its disk and key are
    // kept); the test does not wait for it.
    let took = within(Duration::from_secs(400), "VM recovered", || {
        let (status, body) = http_get(&papi, &format!("/vms/{}", big.hash));
        assert!(body["status"] != "error", "recovery failed: {body}");
        status == 200 && body["status"] == "running"
    });
    eprintln!("VM back {took:?} after the provider restarted");
    let (_, body) = http_get(&papi, &format!("/vms/{}", big.hash));
    assert_eq!(body["host_key"].as_str(), Some(big.host_key.as_str()));
    assert!(
        body["accelerator"]
            .as_str()
            .is_some_and(|a| a.starts_with("kvm") || a.starts_with("tcg")),
        "{body}"
    );
    assert_eq!(
        ssh.ok(&big.hash, &format!("cat /root/{marker}")),
        "inside\n"
    );

    // SIGTERM: the node powers its VM down and exits 0; no QEMU is left.
    let pid = read_pid(&big_dir.join("qemu.pid")).expect("pid after restart");
    assert!(provider.stop().success(), "provider exit status");
    assert!(!alive(pid), "QEMU outlived its provider's clean stop");
    assert!(
        big_dir.join("disk.qcow2").exists(),
        "a clean stop keeps the lease's disk"
    );
    assert_eq!(
        std::fs::metadata(&base)
            .expect("image")
            .modified()
            .expect("mtime"),
        base_before,
        "base image modified"
    );
}

/// A VM that cannot boot ends in `error` with the reason (and the console's
/// last lines) in `GET /vms/{lease}`, its QEMU gone; missing QEMU and a bad
/// image stop `xe node` at start with what to do.
#[test]
fn boot_failures_are_reported_not_left_waiting() {
    let Some(img) = qemu_image("boot_failures_are_reported_not_left_waiting") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");

    let mut flags = qemu_flags(&img);
    flags.extend([
        "--qemu-binary".into(),
        "/nonexistent/qemu-system-x86_64".into(),
    ]);
    let out = Command::new(xe_bin())
        .arg("node")
        .arg("--data")
        .arg(dir.path().join("a"))
        .args(&flags)
        .output()
        .expect("xe node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("apt-get install qemu-system-x86"),
        "{err}"
    );

    let mut flags = qemu_flags(&img);
    flags[4] = "/nonexistent/image.qcow2".into();
    let out = Command::new(xe_bin())
        .arg("node")
        .arg("--data")
        .arg(dir.path().join("b"))
        .args(&flags)
        .output()
        .expect("xe node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("/nonexistent/image.qcow2")
            && err.contains("build-debian.sh"),
        "{err}"
    );

    // Two providers whose VMs cannot come up: a kernel QEMU cannot load
    // (QEMU exits at once), and a guest slower than its boot limit.
    let bad_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&bad_kernel, vec![0u8; 4096]).expect("write");
    let mut flags = qemu_flags(&img);
    flags[6] = bad_kernel.display().to_string();
    let broken = NodeProc::start(&dir.path().join("c"), &strs(&flags));
    let mut flags = qemu_flags(&img);
    flags.extend(["--qemu-boot-timeout".into(), "8".into()]);
    let slow = NodeProc::start(&dir.path().join("d"), &strs(&flags));

    let wallet = new_wallet(dir.path());
    for (node, expect) in [(&broken, "QEMU exited"), (&slow, "within 8s")] {
        let api = node.field("api_addr");
        let out = xe(&[
            "lease",
            "create",
            "--wallet",
            wallet.to_str().expect("utf8"),
            "--node",
            &format!("http://{api}"),
            "--provider",
            &node.field("account"),
            "--duration",
            "3600",
        ]);
        let hash = ok(&out, "lease create")
            .lines()
            .last()
            .expect("hash")
            .trim()
            .to_string();
        let mut last = serde_json::Value::Null;
        within(
            Duration::from_secs(120),
            "the VM's failure is reported",
            || {
                let (_, body) = http_get(&api, &format!("/vms/{hash}"));
                last = body;
                last["status"] == "error" || last["status"] == "declined"
            },
        );
        let error = last["error"].as_str().unwrap_or_default();
        assert!(error.contains(expect), "{expect:?} not in {last}");
        assert!(error.contains("console.log"), "no console tail in {last}");
        let lease_dir = node.data.join("vms/qemu").join(&hash);
        assert!(
            !lease_dir.join("disk.qcow2").exists(),
            "a failed VM's disk is kept"
        );
        // Not accepted, and the consumer is told at once through the
        // ledger (without the provider's paths and console).
        let (_, lease) = http_get(&api, &format!("/leases/{hash}"));
        assert_eq!(
            lease["state"], "declined",
            "a VM that never booted was accepted, or left waiting: {lease}"
        );
        let reason = lease["decline_reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("could not be started") && !reason.contains("console"),
            "{lease}"
        );
    }
    // No QEMU of these providers is left.
    let left = processes_under(dir.path());
    assert!(
        left.is_empty(),
        "processes left running in the providers' dirs: {left:?}"
    );
}

/// Processes whose working directory is below `root` (QEMU runs in its
/// lease's directory).
fn processes_under(root: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alive(*pid))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c.starts_with(root))
        })
        .collect()
}

//! Three `xe node` processes on loopback — a gateway, a provider (`sshd`
//! backend: a real OpenSSH server per lease) and a consumer node — and one
//! accepted lease, for the tests that reach the VM every way a user can.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use sha2::{Digest, Sha256};

use super::*;

pub struct Net {
    pub dir: tempfile::TempDir,
    pub gw: NodeProc,
    pub provider: NodeProc,
    pub consumer: NodeProc,
    pub wallet: PathBuf,
    pub key: PathBuf,
    pub lease: String,
    pub vm_host_key: String,
}

impl Net {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn start() -> Net {
        Net::start_with_duration(3600)
    }

    pub fn start_with_duration(duration: u64) -> Net {
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = NodeProc::start(
            &dir.path().join("gw"),
            &["--ssh-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
        );
        let boot = gw.bootstrap_args();
        let boot: Vec<&str> = boot.iter().map(String::as_str).collect();
        let mut pargs = vec![
            "--provide",
            "--vm-backend",
            "sshd",
            "--api-listen",
            "127.0.0.1:0",
        ];
        pargs.extend(&boot);
        let provider = NodeProc::start(&dir.path().join("provider"), &pargs);
        let mut cargs = vec!["--api-listen", "127.0.0.1:0"];
        cargs.extend(&boot);
        let consumer = NodeProc::start(&dir.path().join("consumer"), &cargs);

        let wallet = dir.path().join("me.seed");
        let w = wallet.to_str().expect("utf8");
        ok(&xe(&["wallet", "create", "--wallet", w]), "wallet create");
        let url = format!("http://{}", consumer.field("api_addr"));
        let duration = duration.to_string();
        let out = xe(&[
            "lease",
            "create",
            "--wallet",
            w,
            "--node",
            &url,
            "--provider",
            &provider.field("account"),
            "--duration",
            &duration,
            "--wait",
            "--timeout",
            "60",
        ]);
        let lease = ok(&out, "lease create --wait")
            .lines()
            .last()
            .expect("hash")
            .trim()
            .to_string();
        assert_eq!(lease.len(), 64, "lease hash on the last line");
        // The gateway learns the lease by gossip; long-poll until it is accepted there.
        let gw_api = gw.field("api_addr");
        let mut vm_host_key = String::new();
        for _ in 0..3 {
            let (status, body) =
                http_get(&gw_api, &format!("/leases/{lease}?wait=20&since=created"));
            if status == 200 && body["state"] == "accepted" {
                vm_host_key = body["vm_host_key"]
                    .as_str()
                    .expect("vm_host_key")
                    .to_string();
                break;
            }
        }
        assert!(
            vm_host_key.starts_with("ssh-ed25519 "),
            "gateway saw the accept: {vm_host_key:?}"
        );
        let known = dir.path().join("known_hosts");
        std::fs::write(&known, format!("{lease} {vm_host_key}\n")).expect("known_hosts");
        Net {
            key: dir.path().join("me.lease_key"),
            dir,
            gw,
            provider,
            consumer,
            wallet,
            lease,
            vm_host_key,
        }
    }

    pub fn gw_port(&self) -> u16 {
        self.gw
            .field("ssh_addr")
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    /// `ssh` options for reaching the VM through the gateway with -W.
    pub fn proxy_opts(&self, gw_port: u16) -> Vec<String> {
        self.proxy_opts_for(gw_port, "xe-gateway")
    }

    /// As `proxy_opts`, with the gateway's host key recorded under `alias`
    /// (one alias per gateway identity, whatever port it listens on).
    pub fn proxy_opts_for(&self, gw_port: u16, alias: &str) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-o".into(),
            format!(
                "ProxyCommand=ssh -F /dev/null -p {gw_port} -i {key} -o IdentitiesOnly=yes -o BatchMode=yes \
                 -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={gwkh} -o HostKeyAlias={alias} \
                 -W %h:%p {lease}@127.0.0.1",
                key = self.key.display(),
                gwkh = self.path("gw_known_hosts").display(),
                lease = self.lease
            ),
            "-o".into(),
            format!("HostKeyAlias={}", self.lease),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.path("known_hosts").display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-i".into(),
            self.key.display().to_string(),
        ]
    }

    /// `ssh` options for reaching the VM through the node's HTTP tunnel,
    /// with `xe tunnel --stdio` as the ProxyCommand (no gateway SSH port).
    pub fn http_proxy_opts(&self) -> Vec<String> {
        let mut opts = self.proxy_opts(0);
        opts[3] = format!(
            "ProxyCommand={xe} tunnel --stdio --node http://{api} --wallet {wallet} {lease}",
            xe = xe_bin().display(),
            api = self.gw.field("api_addr"),
            wallet = self.wallet.display(),
            lease = self.lease
        );
        opts
    }

    /// A session through the gateway that is up (it printed its marker)
    /// and then waits a long time.
    pub fn long_session(&self) -> Child {
        let mut session = Command::new("ssh")
            .args(self.proxy_opts(self.gw_port()))
            .args(["root@vm", "echo up; exec sleep 300"])
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh");
        let mut line = String::new();
        BufReader::new(session.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("marker");
        assert_eq!(line, "up\n");
        session
    }

    pub fn ssh_w(&self, cmd: &str) -> Output {
        Command::new("ssh")
            .args(self.proxy_opts(self.gw_port()))
            .arg("root@vm")
            .arg(cmd)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("ssh")
    }
}

/// The sha256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    let mut h = Sha256::new();
    h.update(std::fs::read(p).expect("read"));
    hex::encode(h.finalize())
}

/// `len` bytes of xorshift64 from `seed` written to `path`: incompressible,
/// so nothing on the path can shortcut it.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut data = vec![0u8; len];
    let mut x = seed;
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    std::fs::write(path, &data).expect("write");
}

//! What `xe ssh` hands to OpenSSH: the way to the VM ([`Via`]), the
//! ProxyCommand for it, the ssh arguments and the `~/.ssh/config` block.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use xe_store::LeaseHash;

/// How the session reaches the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// The SSH gateway at `host:port` (`ssh -W`).
    Gateway(String),
    /// The node's HTTP tunnel (`xe tunnel --stdio`, run as `xe`).
    Http {
        /// The `xe` binary to run.
        xe: PathBuf,
        /// The node's API URL.
        node: String,
        /// The wallet whose lease key signs the tunnel request.
        wallet: PathBuf,
    },
    /// Straight to the provider over the overlay (`xe tunnel --p2p
    /// --stdio`, run as `xe`): no gateway in the path.
    P2p {
        /// The `xe` binary to run.
        xe: PathBuf,
        /// Where the ProxyCommand looks the lease up: a node's API URL, or
        /// (when `bootstrap` is set) the overlay itself.
        node: Option<String>,
        /// Overlay peers to start from.
        bootstrap: Vec<xe_net::Multiaddr>,
        /// The provider, when already looked up (`xe ssh`, which runs ssh
        /// at once; not a config block, whose addresses would go stale).
        provider: Option<crate::p2p_tunnel::ProviderAt>,
        /// Log the ProxyCommand's steps on ssh's standard error.
        verbose: bool,
    },
}

/// Everything needed to reach one lease's VM.
#[derive(Debug, Clone)]
pub struct SshTarget {
    /// The lease (SSH username at the gateway, host key alias at the VM).
    pub lease: LeaseHash,
    /// The way in.
    pub via: Via,
    /// The wallet's lease key (`ssh -i`).
    pub key: PathBuf,
    /// xe-owned known_hosts file.
    pub known_hosts: PathBuf,
    /// User on the VM.
    pub user: String,
}

pub fn split_host_port(hp: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = hp
        .rsplit_once(':')
        .with_context(|| format!("gateway {hp:?}: expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("gateway {hp:?}: port {port:?} is not a number"))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// Ciphers for the client → gateway hop, cheapest for the gateway first;
/// every one is offered by the gateway.
const GATEWAY_HOP_CIPHERS: [&str; 5] = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
];

/// The `Ciphers` value for the gateway hop: our order, kept to the ciphers
/// the local ssh was built with (`supported` = `ssh -Q cipher`), because
/// OpenSSH rejects the whole option over one name it lacks (a build without
/// OpenSSL has no AES-GCM). `None` when it has none of them, so ssh's own
/// defaults apply; the whole list when ssh could not be asked.
fn gateway_hop_ciphers(supported: Option<&str>) -> Option<String> {
    let list: Vec<&str> = match supported {
        None => GATEWAY_HOP_CIPHERS.to_vec(),
        Some(out) => {
            let have: std::collections::HashSet<&str> = out.lines().map(str::trim).collect();
            GATEWAY_HOP_CIPHERS
                .into_iter()
                .filter(|c| have.contains(c))
                .collect()
        }
    };
    (!list.is_empty()).then(|| list.join(","))
}

/// `ssh -Q cipher`, if ssh runs.
fn local_ssh_ciphers() -> Option<String> {
    let out = Command::new("ssh")
        .args(["-Q", "cipher"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl SshTarget {
    /// The ProxyCommand that carries the session through the gateway.
    ///
    /// The gateway hop prefers AES-GCM to OpenSSH's default ChaCha20: with
    /// AES instructions it cost the gateway 2.2 instead of 2.9 CPU s/GiB
    /// (and 8-13 % more throughput, BENCHMARKS.md). An explicit list, not
    /// `^…`, so OpenSSH older than 8.x accepts it; see
    /// [`gateway_hop_ciphers`] for builds that lack some of it.
    pub fn proxy_command(&self) -> anyhow::Result<String> {
        let gateway = match &self.via {
            Via::Gateway(g) => g,
            Via::P2p {
                xe,
                node,
                bootstrap,
                provider,
                verbose,
            } => {
                let word = |s: String| proxy_word(Path::new(&s));
                let mut cmd = format!("{} tunnel --p2p --stdio", proxy_word(xe));
                if *verbose {
                    cmd.push_str(" -v");
                }
                if let Some(n) = node {
                    cmd.push_str(&format!(" --node {}", word(n.clone())));
                }
                for b in bootstrap {
                    cmd.push_str(&format!(" --bootstrap {}", word(b.to_string())));
                }
                if let Some(p) = provider {
                    cmd.push_str(&format!(" --provider-peer {}", p.peer));
                    for a in &p.addrs {
                        cmd.push_str(&format!(" --provider-addr {}", word(a.to_string())));
                    }
                }
                return Ok(format!("{cmd} {}", self.lease));
            }
            Via::Http { xe, node, wallet } => {
                return Ok(format!(
                    "{xe} tunnel --stdio --node {node} --wallet {wallet} {lease}",
                    xe = proxy_word(xe),
                    node = proxy_word(Path::new(node)),
                    wallet = proxy_word(wallet),
                    lease = self.lease,
                ));
            }
        };
        let (host, port) = split_host_port(gateway)?;
        let ciphers = gateway_hop_ciphers(local_ssh_ciphers().as_deref())
            .map(|c| format!("-o Ciphers={c} "))
            .unwrap_or_default();
        // LogLevel INFO, not ERROR: OpenSSH logs a refused channel open
        // ("open failed: … provider 1a2b3c4d is unreachable …") at INFO,
        // and without it a -W hop says only "stdio forwarding failed".
        Ok(format!(
            "ssh -F /dev/null -p {port} -i {key} -o IdentitiesOnly=yes -o BatchMode=yes \
             {ciphers}-o LogLevel=INFO -o UserKnownHostsFile={kh} -o StrictHostKeyChecking=accept-new -W %h:%p {lease}@{host}",
            key = proxy_word(&self.key),
            kh = proxy_word(&self.known_hosts),
            lease = self.lease,
        ))
    }

    /// Arguments for `ssh` (without the program name), then `extra`.
    pub fn ssh_args(&self, extra: &[String]) -> anyhow::Result<Vec<String>> {
        let mut a = vec![
            "-F".into(),
            "/dev/null".into(),
            "-o".into(),
            format!("ProxyCommand={}", self.proxy_command()?),
            "-o".into(),
            format!("HostKeyAlias={}", self.lease),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-i".into(),
            self.key.display().to_string(),
            format!("{}@vm", self.user),
        ];
        a.extend(extra.iter().cloned());
        Ok(a)
    }

    /// A `~/.ssh/config` block for scp/sftp/rsync/IDEs.
    pub fn config_block(&self, alias: &str) -> anyhow::Result<String> {
        Ok(format!(
            "Host {alias}\n    HostName vm\n    User {user}\n    ProxyCommand {proxy}\n    IdentityFile {key}\n    IdentitiesOnly yes\n    HostKeyAlias {lease}\n    UserKnownHostsFile {kh}\n    StrictHostKeyChecking yes\n",
            user = self.user,
            proxy = self.proxy_command()?,
            key = self.key.display(),
            lease = self.lease,
            kh = self.known_hosts.display(),
        ))
    }
}

/// `p` as one word of a ProxyCommand: shell-quoted, and `%` doubled
/// because ssh expands `%h`-style tokens there.
fn proxy_word(p: &Path) -> String {
    shell_quote(p).replace('%', "%%")
}

pub fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@,=".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_args_use_the_proxy_and_alias() {
        let t = SshTarget {
            lease: LeaseHash([0xab; 32]),
            via: Via::Gateway("127.0.0.1:2222".into()),
            key: PathBuf::from("/k/w.lease_key"),
            known_hosts: PathBuf::from("/k/known_hosts"),
            user: "root".into(),
        };
        let a = t.ssh_args(&["echo".into(), "hi".into()]).expect("args");
        let joined = a.join(" ");
        assert!(
            joined.contains(&format!("-W %h:%p {}@127.0.0.1", "ab".repeat(32))),
            "{joined}"
        );
        assert!(joined.contains(&format!("HostKeyAlias={}", "ab".repeat(32))));
        assert!(joined.ends_with("root@vm echo hi"));
        // This machine's OpenSSH (CI installs it) has every cipher on the list.
        assert!(
            joined.contains("-o Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20"),
            "{joined}"
        );
    }

    #[test]
    fn http_targets_proxy_through_xe_tunnel_on_stdio() {
        let t = SshTarget {
            lease: LeaseHash([0xcd; 32]),
            via: Via::Http {
                xe: PathBuf::from("/opt/my tools/100%/xe"),
                node: "http://127.0.0.1:8080".into(),
                wallet: PathBuf::from("/home/a/.xe/wallet.seed"),
            },
            key: PathBuf::from("/home/a/.xe/wallet.lease_key"),
            known_hosts: PathBuf::from("/home/a/.xe/known_hosts"),
            user: "root".into(),
        };
        let block = t.config_block("xe-cdcdcdcd").expect("block");
        assert!(
            block.contains(&format!(
                "ProxyCommand '/opt/my tools/100%%/xe' tunnel --stdio --node http://127.0.0.1:8080 \
                 --wallet /home/a/.xe/wallet.seed {}\n",
                "cd".repeat(32)
            )),
            "{block}"
        );
        assert!(!block.contains("-W"), "{block}");
        assert!(
            block.contains(&format!("HostKeyAlias {}", "cd".repeat(32))),
            "{block}"
        );
    }

    #[test]
    fn the_gateway_hop_asks_only_for_ciphers_the_local_ssh_has() {
        // OpenSSH 9.2 with OpenSSL, as `ssh -Q cipher` prints it.
        let full = "3des-cbc\naes128-cbc\naes192-cbc\naes256-cbc\naes128-ctr\naes192-ctr\n\
                    aes256-ctr\naes128-gcm@openssh.com\naes256-gcm@openssh.com\n\
                    chacha20-poly1305@openssh.com\n";
        assert_eq!(
            gateway_hop_ciphers(Some(full)).as_deref(),
            Some(
                "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr"
            )
        );
        // Built without OpenSSL: no AES-GCM, so asking for it would fail.
        let no_openssl = "aes128-ctr\naes192-ctr\naes256-ctr\nchacha20-poly1305@openssh.com\n";
        assert_eq!(
            gateway_hop_ciphers(Some(no_openssl)).as_deref(),
            Some("chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr")
        );
        // Nothing in common: leave the choice to ssh.
        assert_eq!(gateway_hop_ciphers(Some("3des-cbc\n")), None);
        // ssh could not be asked: the whole list.
        assert_eq!(
            gateway_hop_ciphers(None).as_deref(),
            Some(GATEWAY_HOP_CIPHERS.join(",").as_str())
        );
    }
}

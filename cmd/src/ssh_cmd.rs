//! `xe ssh` and `xe ssh-config`: plain OpenSSH through the gateway, the
//! way the seed describes — `ProxyCommand="ssh -W %h:%p LEASE@GATEWAY"` —
//! so the consumer's SSH runs end to end with the VM's sshd. With `--http`
//! the ProxyCommand is `xe tunnel --stdio` instead: the node's HTTP
//! tunnel, for networks that let only HTTP through.
//!
//! Host keys stay strictly checked without prompts: the VM's host key that
//! the provider signed into the lease's accept is pinned in an xe-owned
//! known_hosts under `HostKeyAlias=LEASE`, so a man in the middle is
//! detected and one lease's key never clashes with another's.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::Args;
use xe_store::{LeaseHash, LeaseKey, lease_key_path};

use crate::paths::WalletArg;

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

fn split_host_port(hp: &str) -> anyhow::Result<(String, u16)> {
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

fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@,=".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Pin `host_key` (an OpenSSH public key line) for `lease` in `known_hosts`,
/// replacing any older line for the same alias.
pub fn pin_host_key(known_hosts: &Path, lease: &LeaseHash, host_key: &str) -> anyhow::Result<()> {
    let key = host_key
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    if key.split_whitespace().count() != 2 || key.contains(['\n', '\r']) {
        bail!("the lease's VM host key is malformed: {host_key:?}");
    }
    let alias = lease.to_string();
    let existing = std::fs::read_to_string(known_hosts).unwrap_or_default();
    let mut out: Vec<String> = existing
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(alias.as_str()))
        .map(str::to_string)
        .collect();
    out.push(format!("{alias} {key}"));
    if let Some(dir) = known_hosts.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(known_hosts, out.join("\n") + "\n")
        .with_context(|| format!("writing {}", known_hosts.display()))?;
    Ok(())
}

fn has_pin(known_hosts: &Path, lease: &LeaseHash) -> bool {
    let alias = lease.to_string();
    std::fs::read_to_string(known_hosts)
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(alias.as_str()))
}

/// Flags shared by `xe ssh` and `xe ssh-config`.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// The lease hash (64 hex), or a unique prefix of at least 8 hex digits
    /// (the --node resolves it).
    pub lease: String,
    /// SSH gateway HOST:PORT [default: "gateway" in ~/.xe/config.json, else
    /// the --node's own SSH gateway].
    #[arg(long, env = "XE_GATEWAY", value_name = "HOST:PORT")]
    pub gateway: Option<String>,
    /// Go through the --node's HTTP tunnel (`xe tunnel --stdio`) instead of
    /// an SSH gateway: only the node's HTTP port needs to be reachable
    /// (--gateway is then not used).
    #[arg(long, conflicts_with = "p2p")]
    pub http: bool,
    #[command(flatten)]
    pub p2p: crate::p2p_tunnel::P2pArgs,
    /// User on the VM.
    #[arg(long, default_value = "root")]
    pub user: String,
    /// known_hosts file that pins VM host keys [default: ~/.xe/known_hosts].
    #[arg(long, value_name = "PATH")]
    pub known_hosts: Option<PathBuf>,
    /// The lease's VM host key (`ssh-ed25519 AAAA…`) to pin [default: read
    /// from the lease's signed accept through --node].
    #[arg(long, value_name = "KEY")]
    pub host_key: Option<String>,
    #[command(flatten)]
    pub node: crate::lease_cmd::NodeUrlArg,
    #[command(flatten)]
    pub wallet: WalletArg,
}

/// Ask the node's API.
fn ask_node<T>(
    node: &crate::lease_cmd::NodeUrlArg,
    what: &str,
    f: impl AsyncFnOnce(xe_api::client::ApiClient) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let url = node.url()?;
    let client = node.client()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(f(client)).map_err(|e| {
        // Only a node that could not be asked gets the --node hint; one
        // that answered has said what is wrong.
        if unreachable(&e) {
            e.context(format!(
                "{what} from the xe node at {url} (pass --node URL of a node with --api-port, or give it directly)"
            ))
        } else {
            e
        }
    })
}

/// The node could not be asked at all (as opposed to answering "no").
fn unreachable(e: &anyhow::Error) -> bool {
    use xe_api::client::ClientError as C;
    matches!(
        e.downcast_ref::<C>(),
        Some(C::Connect { .. } | C::Timeout(_) | C::Tls { .. } | C::Http { .. })
    )
}

impl TargetArgs {
    /// The gateway's `host:port`: the flag, the config file, else the
    /// --node's own SSH gateway.
    fn gateway(&self) -> anyhow::Result<String> {
        let gateway = match (self.gateway.clone(), crate::paths::Config::load()?.gateway) {
            (Some(g), _) | (None, Some(g)) => g,
            (None, None) => {
                let url = self.node.url()?;
                let host = url
                    .trim_start_matches("http://")
                    .rsplit_once(':')
                    .map(|(h, _)| h.to_string())
                    .unwrap_or_else(|| "127.0.0.1".into());
                let port = ask_node(&self.node, "reading the SSH gateway port", async |c| {
                    Ok(c.node().await?.ssh_port)
                })?;
                if port == 0 {
                    bail!(
                        "the node at {url} runs no SSH gateway; pass --gateway HOST:PORT or set XE_GATEWAY"
                    );
                }
                format!("{host}:{port}")
            }
        };
        split_host_port(&gateway)?;
        Ok(gateway)
    }

    /// `want_provider`: look the provider up now for `--p2p` (true when
    /// ssh runs at once; a config block must not hold addresses).
    fn target(&self, want_provider: bool) -> anyhow::Result<SshTarget> {
        let typed = crate::lease_cmd::lease_arg(&self.lease)?;
        let wallet = self.wallet.path();
        let key = LeaseKey::load(&lease_key_path(&wallet))
            .with_context(|| format!("the lease key of wallet {}", wallet.display()))?;
        let known_hosts = self
            .known_hosts
            .clone()
            .unwrap_or_else(crate::paths::default_known_hosts);
        let bootstrap = if self.p2p.p2p {
            self.p2p.overlay_bootstrap(&self.node)?
        } else {
            Vec::new()
        };
        if !bootstrap.is_empty() {
            // The overlay alone: no node is asked anything.
            let found = crate::p2p_tunnel::lookup_in_overlay(
                &typed,
                &key,
                &self.p2p,
                bootstrap.clone(),
                want_provider,
            )?;
            let via = Via::P2p {
                xe: std::env::current_exe().context("locating the xe binary")?,
                node: None,
                bootstrap,
                provider: found.provider,
                verbose: self.p2p.verbose,
            };
            return self.finish(found.lease, found.vm_host_key, via, key, known_hosts);
        }
        // The node resolves a prefix and says whether the lease lets this
        // key in now, before ssh turns any refusal into "Permission denied".
        let checked = ask_node(&self.node, "checking the lease", async |c| {
            crate::lease_check::usable_lease(&c, &typed, &key).await
        });
        let (lease, vm_host_key): (LeaseHash, Option<String>) = match checked {
            Ok(v) => (v.lease_hash, v.vm_host_key),
            // Everything ssh needs is at hand: a node that is down must not
            // keep the consumer from a VM the gateway would let them into.
            Err(e)
                if unreachable(&e)
                    && typed.len() == 64
                    && (self.host_key.is_some()
                        || typed.parse().is_ok_and(|l| has_pin(&known_hosts, &l))) =>
            {
                eprintln!(
                    "xe: could not check lease {} with the node ({}); trying anyway",
                    &typed[..8],
                    crate::error_text(&e)
                );
                (
                    typed.parse().with_context(|| format!("lease {typed:?}"))?,
                    None,
                )
            }
            Err(e) => return Err(e),
        };
        let via = if self.p2p.p2p {
            let provider = match want_provider {
                true => Some(ask_node(
                    &self.node,
                    "looking up the provider",
                    async |c| crate::p2p_tunnel::provider_from_node(&c, &lease).await,
                )?),
                false => None,
            };
            Via::P2p {
                xe: std::env::current_exe().context("locating the xe binary")?,
                node: Some(self.node.url()?),
                bootstrap: Vec::new(),
                provider,
                verbose: self.p2p.verbose,
            }
        } else if self.http {
            Via::Http {
                xe: std::env::current_exe().context("locating the xe binary")?,
                node: self.node.url()?,
                // A config block runs from wherever ssh is started.
                wallet: std::path::absolute(&wallet).context("making the wallet path absolute")?,
            }
        } else {
            Via::Gateway(self.gateway()?)
        };
        self.finish(lease, vm_host_key, via, key, known_hosts)
    }

    /// Pin the VM's host key (given, or the lease's) and assemble the target.
    fn finish(
        &self,
        lease: LeaseHash,
        vm_host_key: Option<String>,
        via: Via,
        key: LeaseKey,
        known_hosts: PathBuf,
    ) -> anyhow::Result<SshTarget> {
        if let Some(hk) = &self.host_key {
            pin_host_key(&known_hosts, &lease, hk)?;
        }
        if !has_pin(&known_hosts, &lease) {
            let hk = vm_host_key
                .with_context(|| format!("lease {} has no VM host key published", lease.short()))?;
            pin_host_key(&known_hosts, &lease, &hk)?;
        }
        Ok(SshTarget {
            lease,
            via,
            key: key.path().to_path_buf(),
            known_hosts,
            user: self.user.clone(),
        })
    }
}

/// `xe ssh`.
#[derive(Args, Debug)]
pub struct SshArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Print the ssh command instead of running it.
    #[arg(long)]
    pub print: bool,
    /// Arguments passed to ssh after the destination (a command, or flags).
    #[arg(last = true)]
    pub ssh_args: Vec<String>,
}

/// `xe ssh-config`.
#[derive(Args, Debug)]
pub struct SshConfigArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Host alias for the block [default: xe-<first 8 hex of the lease>].
    #[arg(long)]
    pub alias: Option<String>,
}

pub fn run_ssh(args: SshArgs) -> anyhow::Result<ExitCode> {
    let t = args.target.target(true)?;
    let argv = t.ssh_args(&args.ssh_args)?;
    if args.print {
        let quoted: Vec<String> = argv.iter().map(|a| shell_quote(Path::new(a))).collect();
        println!("ssh {}", quoted.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    let status = Command::new("ssh")
        .args(&argv)
        .status()
        .context("running ssh (is the OpenSSH client installed?)")?;
    Ok(ExitCode::from(
        status.code().unwrap_or(255).clamp(0, 255) as u8
    ))
}

pub fn run_config(args: SshConfigArgs) -> anyhow::Result<ExitCode> {
    let t = args.target.target(false)?;
    let alias = args
        .alias
        .unwrap_or_else(|| format!("xe-{}", t.lease.short()));
    print!("{}", t.config_block(&alias)?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_replaces_only_the_same_alias() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kh = dir.path().join("known_hosts");
        let a = LeaseHash([1; 32]);
        let b = LeaseHash([2; 32]);
        pin_host_key(&kh, &a, "ssh-ed25519 AAAA1 vm").expect("pin");
        pin_host_key(&kh, &b, "ssh-ed25519 AAAA2").expect("pin");
        pin_host_key(&kh, &a, "ssh-ed25519 AAAA3").expect("re-pin");
        let text = std::fs::read_to_string(&kh).expect("read");
        assert_eq!(
            text,
            format!("{b} ssh-ed25519 AAAA2\n{a} ssh-ed25519 AAAA3\n")
        );
        assert!(pin_host_key(&kh, &a, "garbage").is_err());
    }

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

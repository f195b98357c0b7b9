//! The `lima` backend (production): one QEMU VM per lease, driven by
//! `limactl` with `LIMA_HOME` set to [`LimaConfig::lima_home`].
//!
//! Provision: render [`template::render`] into `{lima_home}/_xe/{name}.yaml`
//! (Lima skips `_`-prefixed entries of `LIMA_HOME` when listing), then
//! `limactl create --name={name} --tty=false FILE` and
//! `limactl start --tty=false {name}` each under its timeout, read the SSH
//! port from `limactl list --json`, wait until it accepts, and read the VM's
//! host key.
//!
//! Host key: read from the instance with
//! `limactl shell --workdir / {name} cat /etc/ssh/ssh_host_ed25519_key.pub`
//! (Lima's own SSH session to the guest, over the same forwarded port), then
//! checked to be one ed25519 key.
//!
//! Teardown: `limactl stop -f` then `limactl delete -f`. On a failed
//! provision the tails of the instance's `ha.stderr.log` and `serial*.log`
//! go into the error and the instance is removed. A provider shutdown
//! leaves the VMs running (a consumer's machine should not reboot because
//! the provider daemon restarts); [`VmManager::recover`] re-adopts them
//! from `limactl list` and deletes every other `xe-` instance.
//!
//! Lima cannot be installed on the machines this is developed on; the tests
//! drive a stand-in `limactl` script (see `tests/lima.rs`).

pub mod template;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;
use tokio::time::Instant;
use tracing::{info, warn};
use xe_store::LeaseHash;

use crate::registry::{Begin, Registry};
use crate::util;
use crate::{ProvisionRequest, VmError, VmInfo, VmManager, VmStatus};
use template::instance_name;

/// Time limit of the quick `limactl` commands (list, shell, stop, delete).
const QUICK_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a started VM's SSH port may take to accept. `limactl start`
/// returns after the guest is ready, so this is only a safety margin.
const PORT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where rendered templates go, inside `LIMA_HOME`.
const TEMPLATE_DIR: &str = "_xe";

/// Configuration of the lima backend.
#[derive(Clone, Debug)]
pub struct LimaConfig {
    /// The `limactl` binary (a bare name is looked up in `$PATH`).
    pub limactl: PathBuf,
    /// `LIMA_HOME` for every `limactl` call, e.g. `{dataDir}/lima`.
    pub lima_home: PathBuf,
    /// Location of the guest cloud image (a local path or URL that Lima
    /// accepts; Alpine or Ubuntu). Downloaded, if at all, by Lima itself.
    pub image: String,
    /// Guest architecture in Lima's naming; `None` for the host's.
    pub arch: Option<String>,
    /// Limit for `limactl create` (copies/converts the image).
    pub create_timeout: Duration,
    /// Limit for `limactl start` (boot, provision script, readiness).
    pub start_timeout: Duration,
    /// Leases asking for less get this many vCPUs.
    pub min_cpus: u32,
    /// Leases asking for less get this much memory (MiB).
    pub min_memory_mb: u32,
    /// Leases asking for less get this much disk (GiB).
    pub min_disk_gb: u32,
}

impl LimaConfig {
    /// Defaults: 10 min create, 10 min start, at least 1 vCPU, 512 MiB,
    /// 10 GiB (what a minimal cloud image needs to boot and install sshd).
    pub fn new(
        limactl: impl Into<PathBuf>,
        lima_home: impl Into<PathBuf>,
        image: impl Into<String>,
    ) -> Self {
        LimaConfig {
            limactl: limactl.into(),
            lima_home: lima_home.into(),
            image: image.into(),
            arch: None,
            create_timeout: Duration::from_secs(600),
            start_timeout: Duration::from_secs(600),
            min_cpus: 1,
            min_memory_mb: 512,
            min_disk_gb: 10,
        }
    }
}

/// One line of `limactl list --json`.
#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct Listed {
    name: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    ssh_local_port: u16,
    #[serde(default)]
    dir: String,
}

/// The lima backend. See the module docs.
pub struct LimaManager {
    config: LimaConfig,
    limactl: PathBuf,
    registry: Registry<()>,
}

impl LimaManager {
    /// Check the configuration and find `limactl` ([`VmError::ToolMissing`]
    /// if absent). Runs no `limactl` command.
    pub fn new(mut config: LimaConfig) -> Result<Self, VmError> {
        let limactl =
            util::find_program(Some(&config.limactl), "limactl", &[]).ok_or_else(|| {
                VmError::ToolMissing {
                    tool: "limactl".into(),
                    hint: format!(
                        "{} not found; install Lima (≥ 1.0) and QEMU, or pass the path of limactl",
                        config.limactl.display()
                    ),
                }
            })?;
        if config.image.trim().is_empty() || config.image.chars().any(char::is_control) {
            return Err(VmError::InvalidConfig(format!(
                "image location {:?} must be one non-empty line",
                config.image
            )));
        }
        if let Some(arch) = &config.arch
            && !arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(VmError::InvalidConfig(format!(
                "arch {arch:?} is not a Lima architecture name"
            )));
        }
        if config.min_cpus == 0 || config.min_memory_mb == 0 || config.min_disk_gb == 0 {
            return Err(VmError::InvalidConfig(
                "minimum cpus, memory and disk must be above zero".into(),
            ));
        }
        util::create_private_dir(&config.lima_home)?;
        config.lima_home = fs::canonicalize(&config.lima_home).map_err(VmError::io(format!(
            "resolving {}",
            config.lima_home.display()
        )))?;
        Ok(LimaManager {
            config,
            limactl,
            registry: Registry::new("lima"),
        })
    }

    fn instance_dir(&self, name: &str) -> PathBuf {
        self.config.lima_home.join(name)
    }

    fn template_path(&self, name: &str) -> PathBuf {
        self.config
            .lima_home
            .join(TEMPLATE_DIR)
            .join(format!("{name}.yaml"))
    }

    /// Run `limactl ARGS` with `LIMA_HOME`, bounded by `limit`; stdout on
    /// success, the stderr tail in the error otherwise.
    async fn limactl(&self, args: &[&str], limit: Duration) -> Result<String, VmError> {
        let what = format!("limactl {}", args.join(" "));
        let child = Command::new(&self.limactl)
            .args(args)
            .env("LIMA_HOME", &self.config.lima_home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // On timeout the future is dropped: don't leave limactl running.
            .kill_on_drop(true)
            .spawn()
            .map_err(VmError::io(format!("running {}", self.limactl.display())))?;
        let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(r) => r.map_err(VmError::io(format!("waiting for {what}")))?,
            Err(_) => {
                return Err(VmError::Timeout {
                    what: format!("{what} did not finish within {limit:?}"),
                    detail: String::new(),
                });
            }
        };
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(VmError::Failed {
                what,
                detail: format!(
                    "{}: {}",
                    out.status,
                    tail_text(&String::from_utf8_lossy(&out.stderr))
                ),
            })
        }
    }

    async fn list_instances(&self) -> Result<Vec<Listed>, VmError> {
        let text = self.limactl(&["list", "--json"], QUICK_TIMEOUT).await?;
        parse_list(&text)
    }

    /// Tails of the instance's host-agent and serial logs.
    fn log_tails(&self, name: &str, dir: Option<&str>) -> String {
        let dir = dir
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.instance_dir(name));
        util::join_tails(&[
            util::log_tail(&dir.join("ha.stderr.log")),
            util::log_tail(&dir.join("serial.log")),
            util::log_tail(&dir.join("serialp.log")),
        ])
    }

    /// `stop -f` (allowed to fail: the VM may not run) then `delete -f`.
    async fn remove_instance(&self, name: &str) -> Result<(), VmError> {
        if let Err(e) = self.limactl(&["stop", "-f", name], QUICK_TIMEOUT).await {
            warn!(instance = name, error = %e, "limactl stop failed; deleting anyway");
        }
        self.limactl(&["delete", "-f", name], QUICK_TIMEOUT).await?;
        let _ = fs::remove_file(self.template_path(name));
        Ok(())
    }

    /// The VM's ed25519 host key, read inside the guest.
    async fn read_host_key(&self, name: &str) -> Result<String, VmError> {
        let out = self
            .limactl(
                &[
                    "shell",
                    "--workdir",
                    "/",
                    name,
                    "cat",
                    "/etc/ssh/ssh_host_ed25519_key.pub",
                ],
                QUICK_TIMEOUT,
            )
            .await?;
        util::normalize_host_key_line(&out)
    }

    /// From a listed, running instance to a `Running` VmInfo.
    async fn adopt(&self, lease: &LeaseHash, inst: &Listed) -> Result<VmInfo, VmError> {
        if inst.ssh_local_port == 0 {
            return Err(VmError::Failed {
                what: format!("reading the SSH port of {}", inst.name),
                detail: format!(
                    "limactl list reports no sshLocalPort (status {})",
                    inst.status
                ),
            });
        }
        let port = inst.ssh_local_port;
        util::wait_for_port(
            port,
            Instant::now() + PORT_TIMEOUT,
            &format!("SSH of {}", inst.name),
        )
        .await?;
        let host_key = self.read_host_key(&inst.name).await?;
        let mut info = VmInfo::new(*lease, "lima", VmStatus::Running);
        info.ssh_port = Some(port);
        info.host_key = Some(host_key);
        Ok(info)
    }

    async fn find(&self, name: &str) -> Result<Listed, VmError> {
        self.list_instances()
            .await?
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| VmError::Failed {
                what: format!("finding {name} in limactl list"),
                detail: "not listed".into(),
            })
    }

    /// create → start → list → port → host key. Leaves no instance behind
    /// on failure.
    async fn create_and_start(&self, req: &ProvisionRequest) -> Result<VmInfo, VmError> {
        let name = instance_name(&req.lease);
        // Render first: an invalid key stops here, before any command.
        let yaml = template::render(&self.config, req)?;
        if self.instance_dir(&name).exists() {
            // Left by an earlier failed attempt or a crash: start clean.
            self.remove_instance(&name).await?;
        }
        let path = self.template_path(&name);
        if let Some(parent) = path.parent() {
            util::create_private_dir(parent)?;
        }
        fs::write(&path, yaml).map_err(VmError::io(format!("writing {}", path.display())))?;
        let path_arg = path.to_string_lossy().into_owned();
        let name_arg = format!("--name={name}");
        let result = async {
            self.limactl(
                &["create", &name_arg, "--tty=false", &path_arg],
                self.config.create_timeout,
            )
            .await?;
            self.limactl(&["start", "--tty=false", &name], self.config.start_timeout)
                .await?;
            let inst = self.find(&name).await?;
            if inst.status != "Running" {
                return Err(VmError::Failed {
                    what: format!("starting {name}"),
                    detail: format!("limactl list says {}", inst.status),
                });
            }
            self.adopt(&req.lease, &inst).await
        }
        .await;
        match result {
            Ok(info) => Ok(info),
            Err(e) => {
                let tails = self.log_tails(&name, None);
                if let Err(clean) = self.remove_instance(&name).await {
                    warn!(instance = %name, error = %clean, "could not remove the failed instance");
                }
                Err(with_tails(e, tails))
            }
        }
    }
}

/// Put log tails into an error's detail.
fn with_tails(e: VmError, tails: String) -> VmError {
    if tails.is_empty() {
        return e;
    }
    match e {
        VmError::Failed { what, detail } => VmError::Failed {
            what,
            detail: util::join_tails(&[detail, tails]),
        },
        VmError::Timeout { what, detail } => VmError::Timeout {
            what,
            detail: util::join_tails(&[detail, tails]),
        },
        other => VmError::Failed {
            what: other.to_string(),
            detail: tails,
        },
    }
}

/// The last ~2 KiB of a command's stderr.
fn tail_text(s: &str) -> String {
    const MAX: usize = 2048;
    let s = s.trim();
    let start = s.len().saturating_sub(MAX);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// `limactl list --json` prints one JSON object per line (older versions:
/// one array).
fn parse_list(text: &str) -> Result<Vec<Listed>, VmError> {
    let bad = |e: serde_json::Error| VmError::Failed {
        what: "parsing limactl list --json".into(),
        detail: format!("{e}: {}", tail_text(text)),
    };
    let t = text.trim();
    if t.starts_with('[') {
        return serde_json::from_str(t).map_err(bad);
    }
    t.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(bad))
        .collect()
}

#[async_trait::async_trait]
impl VmManager for LimaManager {
    fn backend(&self) -> &'static str {
        "lima"
    }

    async fn provision(&self, req: &ProvisionRequest) -> Result<VmInfo, VmError> {
        // The key is checked before the registry, the template or limactl
        // see anything.
        util::validate_access_key(&req.access_pub_key)?;
        let (begin, _) = self.registry.begin(&req.lease)?;
        let generation = match begin {
            Begin::AlreadyRunning(info) => return Ok(info),
            Begin::Go(g) => g,
        };
        info!(lease = %req.lease.short(), instance = %instance_name(&req.lease), "creating lima VM");
        match self.create_and_start(req).await {
            Ok(info) => match self
                .registry
                .finish(&req.lease, generation, info.clone(), Some(()))
            {
                Ok(()) => {
                    info!(lease = %req.lease.short(), port = ?info.ssh_port, "lima VM running");
                    Ok(info)
                }
                Err(_) => {
                    let _ = self.remove_instance(&instance_name(&req.lease)).await;
                    Err(VmError::Failed {
                        what: "provisioning".into(),
                        detail: "the lease was torn down while its VM was starting".into(),
                    })
                }
            },
            Err(e) => {
                warn!(lease = %req.lease.short(), error = %e, "lima provisioning failed");
                let mut info = VmInfo::new(req.lease, "lima", VmStatus::Error);
                info.error = Some(e.to_string());
                let _ = self.registry.finish(&req.lease, generation, info, None);
                Err(e)
            }
        }
    }

    async fn teardown(&self, lease: &LeaseHash) -> Result<(), VmError> {
        self.registry.remove(lease);
        let name = instance_name(lease);
        if self.instance_dir(&name).exists() {
            self.remove_instance(&name).await?;
            info!(lease = %lease.short(), instance = %name, "lima VM torn down");
        }
        let _ = fs::remove_file(self.template_path(&name));
        Ok(())
    }

    async fn dial_ssh(&self, lease: &LeaseHash) -> Result<tokio::net::TcpStream, VmError> {
        let port = self.registry.running_port(lease)?;
        util::connect_local(port).await.map_err(VmError::io(format!(
            "connecting to the VM of lease {}",
            lease.short()
        )))
    }

    async fn get(&self, lease: &LeaseHash) -> Option<VmInfo> {
        self.registry.get(lease)
    }

    async fn list(&self) -> Vec<VmInfo> {
        self.registry.list()
    }

    async fn recover(&self, keep: &[ProvisionRequest]) -> Result<Vec<VmInfo>, VmError> {
        let wanted: HashMap<String, &ProvisionRequest> =
            keep.iter().map(|r| (instance_name(&r.lease), r)).collect();
        let kept_leases: HashSet<LeaseHash> = keep.iter().map(|r| r.lease).collect();
        for lease in self.registry.leases() {
            if !kept_leases.contains(&lease) {
                self.registry.remove(&lease);
            }
        }
        let listed = self.list_instances().await?;
        for inst in &listed {
            if inst.name.starts_with("xe-") && !wanted.contains_key(&inst.name) {
                info!(instance = %inst.name, "removing orphaned lima VM");
                self.remove_instance(&inst.name).await?;
            }
        }
        let mut out = Vec::with_capacity(keep.len());
        for req in keep {
            let name = instance_name(&req.lease);
            let found = listed.iter().find(|i| i.name == name);
            let result = match found {
                None => Err(VmError::Failed {
                    what: format!("recovering {name}"),
                    detail: "the instance no longer exists; not re-creating it with a new host key"
                        .into(),
                }),
                Some(inst) if inst.status == "Running" => self.adopt(&req.lease, inst).await,
                Some(inst) if inst.status == "Stopped" => {
                    let started = async {
                        self.limactl(&["start", "--tty=false", &name], self.config.start_timeout)
                            .await?;
                        let inst = self.find(&name).await?;
                        self.adopt(&req.lease, &inst).await
                    }
                    .await;
                    started.map_err(|e| with_tails(e, self.log_tails(&name, Some(&inst.dir))))
                }
                Some(inst) => Err(with_tails(
                    VmError::Failed {
                        what: format!("recovering {name}"),
                        detail: format!("limactl list says {}", inst.status),
                    },
                    self.log_tails(&name, Some(&inst.dir)),
                )),
            };
            let info = result.unwrap_or_else(|e| {
                warn!(lease = %req.lease.short(), error = %e, "could not recover lima VM");
                let mut info = VmInfo::new(req.lease, "lima", VmStatus::Error);
                info.error = Some(e.to_string());
                info
            });
            let runtime = (info.status == VmStatus::Running).then_some(());
            self.registry.set(info.clone(), runtime);
            out.push(info);
        }
        Ok(out)
    }

    async fn shutdown(&self) {
        // The VMs keep running (see the module docs); only forget them so
        // an in-flight provision does not install itself.
        let n = self.registry.stop_all().len();
        info!(
            vms = n,
            "lima manager stopped; VMs left running for recover"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn list_accepts_lines_and_arrays() {
        let lines = "{\"name\":\"xe-1\",\"status\":\"Running\",\"sshLocalPort\":60022,\"dir\":\"/l/xe-1\",\"cpus\":2}\n\
                     {\"name\":\"other\",\"status\":\"Stopped\"}\n";
        let v = parse_list(lines).expect("lines");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].ssh_local_port, 60022);
        assert_eq!(v[1].ssh_local_port, 0);
        let arr = parse_list("[{\"name\":\"a\",\"status\":\"Running\"}]").expect("array");
        assert_eq!(arr[0].name, "a");
        assert!(parse_list("").expect("empty").is_empty());
        assert!(parse_list("not json").is_err());
    }

    #[test]
    fn tail_text_keeps_the_end_on_a_char_boundary() {
        let s = format!("{}é{}", "a".repeat(3000), "b".repeat(2046));
        let t = tail_text(&s);
        assert!(t.ends_with('b') && t.len() <= 2048, "{}", t.len());
    }

    #[test]
    fn paths_stay_in_lima_home() {
        let m = LimaManager {
            config: LimaConfig::new("/bin/true", "/l", "img"),
            limactl: PathBuf::from("/bin/true"),
            registry: Registry::new("lima"),
        };
        assert_eq!(m.template_path("xe-1"), Path::new("/l/_xe/xe-1.yaml"));
        assert_eq!(m.instance_dir("xe-1"), Path::new("/l/xe-1"));
    }
}

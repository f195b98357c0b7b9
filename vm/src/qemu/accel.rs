//! Choosing QEMU's accelerator: KVM only where it really runs a stock guest.
//!
//! `/dev/kvm` opening is not enough. Some hosts (nested cloud VMs) expose a
//! paravirtual KVM (`kvm_pvm`) whose `KVM_CREATE_VM` succeeds but which
//! cannot run an unmodified guest kernel: the guest dies later with "KVM
//! internal error … emulation failure", long after QEMU chose KVM, so
//! QEMU's own `-accel kvm:tcg` fallback never triggers. We therefore decide
//! before starting QEMU, from what the host kernel says about itself.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

/// What the operator asked for (`--qemu-accel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM when it really works, TCG otherwise.
    #[default]
    Auto,
    /// KVM or fail.
    Kvm,
    /// Software emulation, always.
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!(
                "unknown QEMU accelerator {other:?}: expected auto, kvm or tcg"
            )),
        }
    }
}

/// The accelerator in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation: 20-50× slower.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The decision and the reason for it (logged, and shown in `GET /vms`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelDecision {
    /// What QEMU is started with.
    pub accel: Accel,
    /// Why, in one line.
    pub reason: String,
}

impl AccelDecision {
    /// `kvm (…)` / `tcg (…)`.
    pub fn summary(&self) -> String {
        format!("{} ({})", self.accel, self.reason)
    }

    /// QEMU's `-accel` and `-cpu` arguments; `tb_mib` is TCG's translation
    /// cache (QEMU's own default, 1 GiB, is most of a TCG VM's memory).
    pub(crate) fn qemu_args(&self, tb_mib: u32) -> [String; 4] {
        let (accel, cpu) = match self.accel {
            // `host` passes the real CPU's features through.
            Accel::Kvm => ("kvm".to_string(), "host"),
            // `max`: every feature TCG can emulate, so a stock distribution
            // kernel finds what it expects; one host thread per vCPU.
            Accel::Tcg => (format!("tcg,thread=multi,tb-size={tb_mib}"), "max"),
        };
        ["-accel".into(), accel, "-cpu".into(), cpu.into()]
    }
}

/// Decide for `choice` on this host, reading `/dev/kvm` and `/sys/module`.
pub fn decide(choice: AccelChoice) -> Result<AccelDecision, String> {
    decide_at(choice, Path::new("/dev/kvm"), Path::new("/sys/module"))
}

/// Why KVM cannot be used here, or `None` if it can.
fn kvm_unusable(dev: &Path, modules: &Path) -> Option<String> {
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev) {
        return Some(match e.kind() {
            std::io::ErrorKind::NotFound => format!("{} does not exist", dev.display()),
            _ => format!("{} cannot be opened: {e}", dev.display()),
        });
    }
    if modules.join("kvm_pvm").exists() {
        return Some(format!(
            "{} is present: this is a paravirtual KVM that cannot run a stock guest kernel",
            modules.join("kvm_pvm").display()
        ));
    }
    if !modules.join("kvm_intel").exists() && !modules.join("kvm_amd").exists() {
        return Some(format!(
            "neither kvm_intel nor kvm_amd is loaded (in {}): no hardware virtualisation",
            modules.display()
        ));
    }
    None
}

fn decide_at(choice: AccelChoice, dev: &Path, modules: &Path) -> Result<AccelDecision, String> {
    let unusable = kvm_unusable(dev, modules);
    match (choice, unusable) {
        (AccelChoice::Tcg, _) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: "--qemu-accel tcg".into(),
        }),
        (AccelChoice::Kvm, Some(why)) => Err(format!(
            "--qemu-accel kvm, but KVM is not usable: {why}; use --qemu-accel auto or tcg"
        )),
        (_, None) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: "hardware KVM available".into(),
        }),
        (AccelChoice::Auto, Some(why)) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: why,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(kvm_dev: bool, modules: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        if kvm_dev {
            std::fs::write(d.path().join("kvm"), b"").expect("dev");
        }
        std::fs::create_dir(d.path().join("module")).expect("dir");
        for m in modules {
            std::fs::create_dir(d.path().join("module").join(m)).expect("module");
        }
        d
    }

    fn run(choice: AccelChoice, d: &tempfile::TempDir) -> Result<AccelDecision, String> {
        decide_at(choice, &d.path().join("kvm"), &d.path().join("module"))
    }

    #[test]
    fn paravirtual_kvm_falls_back_to_tcg_and_says_why() {
        let d = host(true, &["kvm", "kvm_pvm"]);
        let got = run(AccelChoice::Auto, &d).expect("auto");
        assert_eq!(got.accel, Accel::Tcg);
        assert!(got.reason.contains("kvm_pvm"), "{}", got.reason);
        let forced = run(AccelChoice::Kvm, &d).expect_err("kvm refused");
        assert!(forced.contains("paravirtual"), "{forced}");
    }

    #[test]
    fn hardware_kvm_is_used_and_tcg_can_be_forced() {
        let d = host(true, &["kvm", "kvm_intel"]);
        assert_eq!(run(AccelChoice::Auto, &d).expect("auto").accel, Accel::Kvm);
        assert_eq!(run(AccelChoice::Tcg, &d).expect("tcg").accel, Accel::Tcg);
    }

    #[test]
    fn missing_device_or_module_means_tcg() {
        let d = host(false, &["kvm_amd"]);
        let got = run(AccelChoice::Auto, &d).expect("auto");
        assert!(
            got.accel == Accel::Tcg && got.reason.contains("does not exist"),
            "{got:?}"
        );
        let d = host(true, &["kvm"]);
        assert!(
            run(AccelChoice::Auto, &d)
                .expect("auto")
                .reason
                .contains("no hardware virtualisation")
        );
    }

    #[test]
    fn choice_parses_and_refuses_unknown_names() {
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!(
            "hvf"
                .parse::<AccelChoice>()
                .unwrap_err()
                .contains("auto, kvm or tcg")
        );
    }
}

//! The load tool end to end at a size CI can afford: a real gateway
//! process, one provider process, 600 SSH connections opened 64 at a time
//! (more than the 512 streams yamux allows a connection by default, all on
//! the one gateway → provider connection), and concurrent transfers whose
//! every byte is checked. Fails on any tunnel that does not open, any ping
//! that comes back wrong and any byte lost, duplicated or reordered.

use std::path::PathBuf;
use std::process::Command;

fn xe_bin() -> PathBuf {
    let load = PathBuf::from(env!("CARGO_BIN_EXE_xe-load"));
    let xe = load.with_file_name("xe");
    assert!(
        xe.exists(),
        "{} missing: build the workspace (cargo build -p xe) first",
        xe.display()
    );
    xe
}

#[test]
fn six_hundred_tunnels_to_one_provider_and_checked_transfers() {
    let out = Command::new(env!("CARGO_BIN_EXE_xe-load"))
        .arg("--xe")
        .arg(xe_bin())
        .args(["--tunnels", "600", "--providers", "1", "--transfers", "16"])
        .args(["--transfer-mib", "4", "--budget", "240", "--json"])
        .output()
        .expect("run xe-load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "xe-load failed: {stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("xe-load printed no JSON ({e}); stderr: {stderr}"));
    let idle = &r["idle"][0];
    assert_eq!(idle["tunnels"], 600);
    assert_eq!(idle["opened"], 600, "{r:#}");
    assert_eq!(idle["open_errors"], serde_json::json!({}), "{r:#}");
    assert_eq!(idle["ping_errors"], serde_json::json!({}), "{r:#}");
    assert!(
        idle["rss_holding_kib"].as_u64() > idle["rss_before_kib"].as_u64(),
        "holding 600 sessions should cost the gateway memory: {r:#}"
    );
    let active = &r["active"];
    assert_eq!(active["ok"], 16, "{r:#}");
    assert_eq!(active["errors"], serde_json::json!({}), "{r:#}");
    assert_eq!(active["bytes_each"], 4 << 20);
}

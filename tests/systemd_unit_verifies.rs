//! The shipped unit passes `systemd-analyze verify` (with ExecStart pointed at the built
//! binary) and keeps its promises: Type=notify, a watchdog, restart on failure, its own
//! user, a read-only system with the spool writable.

mod common;

use std::path::Path;

#[test]
fn unit_verifies_and_is_hardened() {
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/cras.service"))
            .unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=30",
        "Restart=on-failure",
        "User=cras",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/cras",
        "PrivateTmp=yes",
        "DevicePolicy=closed",
        "DeviceAllow=char-video4linux rw",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=16384",
        "TasksMax=1024",
        "MemoryMax=3G",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks `{line}`");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cras.service");
    std::fs::write(&path, unit.replace("/usr/bin/cras", common::cras_bin())).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze not installed (.ci/run installs systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Unknown keys and bad values only warn: any line about our unit is a defect.
    assert!(!err.contains("cras.service"), "{err}");
}

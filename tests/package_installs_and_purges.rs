//! The amd64 Debian package, made by cargo-deb from this build, installed by dpkg into a
//! scratch root (its maintainer scripts run with DPKG_ROOT, as `dpkg --root` runs them):
//! every file where it belongs, the `cras` user and its groups, the state folder, the
//! shipped config refused until a model is filled in and accepted then, the packaged
//! onnxruntime library loading, `systemd-analyze verify` of the installed unit, and
//! lintian. `dpkg -r` keeps the configuration and the state; `dpkg -P` deletes them.

mod common;

use common::daemon::require;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// lintian warnings the package keeps; docs/decisions.md says why for each.
const KEPT_WARNINGS: &[&str] = &["no-manual-page", "initial-upload-closes-no-bugs"];

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let (success, text) = run(cmd);
    assert!(success, "{shown} failed:\n{text}");
    text
}

/// Builds the package from the release binary beside the test; returns its path.
fn build_package(out: &Path) -> PathBuf {
    let release = Path::new(cras_bin()).parent().unwrap();
    ok(Command::new(cras_bin())
        .args(["setup", "--lib-dir"])
        .arg(release.join("onnxruntime")));
    let deb = out.join("cras_amd64.deb");
    ok(Command::new("cargo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "deb",
            "--no-build",
            "--strip",
            "--fast",
            "--quiet",
            "--output",
        ])
        .arg(&deb));
    deb
}

fn dpkg(root: &Path, args: &[&str]) -> String {
    ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
        ])
        .args(args))
}

/// (uid, home, shell) of `user` in the root's passwd.
fn passwd_entry(root: &Path, user: &str) -> Option<(u32, String, String)> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f[0] == user).then(|| (f[2].parse().unwrap(), f[5].to_string(), f[6].to_string()))
    })
}

fn group_members(root: &Path, group: &str) -> Option<String> {
    let groups = std::fs::read_to_string(root.join("etc/group")).ok()?;
    groups.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f[0] == group).then(|| f[3].to_string())
    })
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn the_package_installs_checks_removes_and_purges() {
    for tool in [
        "dpkg",
        "dpkg-deb",
        "lintian",
        "systemd-sysusers",
        "systemd-analyze",
    ] {
        require(tool);
    }
    let (has_deb, _) = run(Command::new("cargo").args(["deb", "--version"]));
    assert!(
        has_deb,
        "cargo-deb is missing: cargo install cargo-deb --locked"
    );
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let deb = build_package(dir);

    // What dpkg sees: name, architecture, dependencies, conffile, and the file list.
    let info = ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains("Package: cras") && info.contains("Architecture: amd64"));
    for dep in [
        "libgstreamer1.0-0 (>= 1.20",
        "libgstrtspserver-1.0-0 (>= 1.20",
        "systemd",
        "gstreamer1.0-plugins-good",
    ] {
        assert!(info.contains(dep), "Depends lacks {dep}:\n{info}");
    }
    assert!(info.contains("Recommends:") && info.contains("gstreamer1.0-plugins-ugly"));
    let control = dir.join("control");
    ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles"))
            .unwrap()
            .trim(),
        "/etc/cras/config.yaml"
    );
    let listing = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let mut files: Vec<String> = listing
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(|l| {
            l.split_whitespace()
                .last()
                .unwrap()
                .trim_start_matches('.')
                .to_string()
        })
        .collect();
    files.sort();
    let mut want: Vec<String> = [
        "/usr/bin/cras",
        "/usr/lib/cras/libonnxruntime.so.1.32.0",
        "/etc/cras/config.yaml",
        "/usr/lib/systemd/system/cras.service",
        "/usr/lib/sysusers.d/cras.conf",
        "/usr/lib/tmpfiles.d/cras.conf",
        "/usr/share/lintian/overrides/cras",
        "/usr/share/doc/cras/README.md",
        "/usr/share/doc/cras/README.systemd.md",
        "/usr/share/doc/cras/onnxruntime-LICENSE",
        "/usr/share/doc/cras/onnxruntime-ThirdPartyNotices.txt",
        "/usr/share/doc/cras/copyright",
        "/usr/share/doc/cras/changelog.Debian.gz",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (folder, ext, dest) in [
        ("pipelines", "pipeline", "/usr/share/cras/pipelines"),
        ("docs", "md", "/usr/share/doc/cras"),
        ("docs", "png", "/usr/share/doc/cras"),
    ] {
        for e in std::fs::read_dir(repo.join(folder)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == ext) {
                let name = p.file_name().unwrap().to_str().unwrap();
                want.push(format!("{dest}/{name}"));
            }
        }
    }
    want.sort();
    assert_eq!(files, want, "the package's files");

    // lintian: no errors; warnings only those kept on purpose.
    let (_, lint) = run(Command::new("lintian")
        .args(["--tag-display-limit", "0"])
        .arg(&deb));
    for line in lint.lines() {
        assert!(!line.starts_with("E:"), "lintian error: {line}\n{lint}");
        if line.starts_with("W:") {
            let tag = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(
                KEPT_WARNINGS.contains(&tag),
                "lintian warning: {line}\n{lint}"
            );
        }
    }

    // Install into a scratch root.
    let root = dir.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    dpkg(&root, &["--install", deb.to_str().unwrap()]);
    assert_eq!(mode(&root.join("usr/bin/cras")), 0o755);
    assert_eq!(mode(&root.join("etc/cras/config.yaml")), 0o644);
    for p in [
        "usr/share/cras/pipelines/test-pattern.pipeline",
        "usr/lib/cras/libonnxruntime.so.1.32.0",
    ] {
        assert!(root.join(p).is_file(), "{p}");
    }
    let (uid, home, shell) = passwd_entry(&root, "cras").expect("the cras user");
    assert!(uid < 1000, "a system user: uid {uid}");
    assert_eq!(
        (home.as_str(), shell.as_str()),
        ("/var/lib/cras", "/usr/sbin/nologin")
    );
    for g in ["video", "render"] {
        assert_eq!(
            group_members(&root, g).as_deref(),
            Some("cras"),
            "group {g}"
        );
    }
    let state = root.join("var/lib/cras");
    assert_eq!(mode(&state), 0o750);
    assert_eq!(std::fs::metadata(&state).unwrap().uid(), uid);
    assert!(state.join("engines").is_dir());
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/cras.service")
            .exists(),
        "installing must not enable the service"
    );

    // The unit as installed verifies against this machine's systemd, its binary being the
    // installed one (the scratch root has no systemd of its own).
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/cras.service")).unwrap();
    assert_eq!(
        unit,
        std::fs::read_to_string(repo.join("systemd/cras.service")).unwrap()
    );
    let probe = dir.join("cras.service");
    let bin = root.join("usr/bin/cras");
    std::fs::write(&probe, unit.replace("/usr/bin/cras", bin.to_str().unwrap())).unwrap();
    let (verified, why) = run(Command::new("systemd-analyze").arg("verify").arg(&probe));
    assert!(verified && !why.contains("cras.service:"), "{why}");

    // The shipped config: refused until a model is filled in, naming the key; then accepted.
    let installed = root.join("usr/bin/cras");
    let config = root.join("etc/cras/config.yaml");
    let check = || {
        run(Command::new(&installed)
            .args(["check-config"])
            .arg(&config)
            .env("CRAS_HOME", dir.join("no-home")))
    };
    let (passed, out) = check();
    assert!(!passed && out.contains("model.bundle"), "{out}");
    let model = lite0_bundle(dir, "model");
    let shipped = std::fs::read_to_string(&config).unwrap();
    let edited = shipped
        .replace("/var/lib/cras/engines/current", model.to_str().unwrap())
        .replace("/var/lib/cras/", &format!("{}/", state.display()))
        .replace(
            "thresholds: {}",
            "thresholds: {alpha: {image: 0.5}, beta: {image: 0.5}}",
        );
    std::fs::write(&config, &edited).unwrap();
    let (passed, out) = check();
    assert!(passed, "{out}");

    // The packaged onnxruntime library is the one found (no CRAS_HOME library, no
    // ORT_DYLIB_PATH): `cras infer` runs on it.
    let image = fixtures().join("lite0-d384/images/beta/test/blob/000.png");
    let (inferred, out) = run(Command::new(&installed)
        .args(["infer", "--model"])
        .arg(&model)
        .arg(&image)
        .env("CRAS_HOME", dir.join("no-home"))
        .env_remove("ORT_DYLIB_PATH"));
    assert!(inferred && out.contains("score"), "{out}");

    // Remove: the binary goes, the edited config and the state (an undelivered alarm) stay.
    std::fs::create_dir_all(state.join("spool")).unwrap();
    std::fs::write(state.join("spool/00000000000000000007.alarm"), "{}").unwrap();
    dpkg(&root, &["--remove", "cras"]);
    assert!(!installed.exists());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert!(state.join("spool/00000000000000000007.alarm").is_file());

    // Purge: the configuration and the state are gone; the user stays (Debian policy).
    dpkg(&root, &["--purge", "cras"]);
    assert!(!root.join("etc/cras").exists());
    assert!(!state.exists());
    assert!(passwd_entry(&root, "cras").is_some());
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(
        !status.contains("Package: cras\n") || status.contains("Status: purge ok not-installed")
    );
}

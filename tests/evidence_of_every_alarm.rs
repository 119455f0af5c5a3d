//! The evidence store and `latest.jpg` with the real daemon, model and broker: every
//! alarm gets its four files (the JSON equal to the MQTT payload, the overlay with a red
//! banner and the regions' boxes), the HTTP server serves them and nothing else,
//! retention keeps the store within its size and age, and a kill -9 leaves no torn set.

mod common;

use common::daemon::*;
use common::view::{banner, source_of, verdict_of};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn with_evidence(rig: &Rig, root: &Path, extra: &str) {
    let text = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        format!(
            "{text}evidence: {{enabled: true, dir: {}, jpeg_quality: 95{extra}}}\n",
            root.display()
        ),
    )
    .unwrap();
}

fn counter(http: u16, name: &str) -> f64 {
    http_get(http, "/metrics")
        .and_then(|(_, m)| metric(&m, name))
        .unwrap_or(-1.0)
}

#[test]
fn every_alarm_has_its_evidence_and_the_http_server_serves_only_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let rig = folder_rig(dir, 4, false, "");
    let root = dir.join("evidence");
    with_evidence(&rig, &root, "");
    let defects = rig.line.defective.iter().filter(|d| **d).count();
    let d = Daemon::start(&rig.config, &dir.join("cras.log"), &[]);
    wait_for(90.0, "every alarm", || {
        rig.sub.on("/alarm").len() >= defects
    });
    wait_for(30.0, "every evidence set", || {
        counter(rig.http, "cras_evidence_written_total") >= defects as f64
    });
    let alarms = rig.sub.on("/alarm");
    assert_eq!(alarms.len(), defects, "{}", d.log_text());
    let sources: Vec<RgbImage> = (0..8)
        .map(|i| {
            let f = rig.line.frames.join(format!("{i:05}.png"));
            image::open(f).unwrap().to_rgb8()
        })
        .collect();
    for a in &alarms {
        let payload = a.json();
        let rel = payload["evidence"].as_str().expect("evidence in the alarm");
        let file = |suffix: &str| root.join(format!("{rel}{suffix}"));
        // The JSON on disk is the payload the broker got.
        let stored: serde_json::Value =
            serde_json::from_slice(&std::fs::read(file(".json")).unwrap()).unwrap();
        assert_eq!(stored, payload);
        let seq = payload["sequence"].as_u64().unwrap();
        assert!(rel.ends_with(&format!("/cam1/{seq}")), "{rel}");
        // The JSON names its files, and they are there.
        let named: Vec<&str> = payload["evidence_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let suffixes = [".jpg", ".map.png", ".overlay.jpg", ".json"];
        assert_eq!(named, suffixes.map(|s| format!("{seq}{s}")));
        for s in suffixes {
            assert!(file(s).is_file(), "{rel}{s}");
        }
        // The frame as captured: one of the line's defective frames.
        let frame = image::open(file(".jpg")).unwrap().to_rgb8();
        let (i, dist) = source_of(&frame, &sources, 0);
        assert!(dist < 4.0, "frame {rel} matches no source ({dist})");
        assert!(rig.line.defective[i], "{rel} is frame {i}, a good one");
        // The map: 16 bits, reaching the pixel threshold (the alarm has regions).
        let map = image::open(file(".map.png")).unwrap().to_luma16();
        let peak = map.pixels().map(|p| p.0[0]).max().unwrap() as f32 / 65535.0;
        assert!(peak >= rig.line.pixel_threshold, "{peak}");
        assert!(!payload["regions"].as_array().unwrap().is_empty());
        // The overlay: red banner, and each region's box where the alarm says it is.
        let overlay = image::open(file(".overlay.jpg")).unwrap().to_rgb8();
        let band = banner(&file(".overlay.jpg"));
        assert_eq!(verdict_of(band), Some(true), "banner {band:?}");
        for r in payload["regions"].as_array().unwrap() {
            let at = |k: &str| r[k].as_u64().unwrap() as u32;
            // The box's left edge, below the banner band (20 rows) that covers its top.
            let (x, y, bottom) = (at("x"), at("y").max(20), at("y") + at("height"));
            if y < bottom && x < 128 {
                let p = overlay.get_pixel(x, y).0;
                assert!(
                    p[0] > 180 && p[1] < 100 && p[2] > 180,
                    "{rel}: box edge {p:?}"
                );
            }
        }
        // Served read-only over HTTP, the same bytes.
        let (status, kind, body) =
            http_get_bytes(rig.http, &format!("/evidence/{rel}.json")).unwrap();
        assert_eq!((status, kind.as_str()), (200, "application/json"));
        assert_eq!(body, std::fs::read(file(".json")).unwrap());
        let (status, kind, _) =
            http_get_bytes(rig.http, &format!("/evidence/{rel}.overlay.jpg")).unwrap();
        assert_eq!((status, kind.as_str()), (200, "image/jpeg"));
    }
    // Exactly one set per alarm.
    let (json, files) = sets(&root);
    assert_eq!((json.len(), files.len()), (defects, 4 * defects));
    let day = alarms[0].json()["evidence"].as_str().unwrap()[..10].to_string();
    std::fs::write(dir.join("secret.yaml"), "password: x").unwrap();
    for bad in [
        "/evidence/../config.yaml".to_string(),
        "/evidence/../../secret.yaml".into(),
        format!("/evidence/{day}/cam1/../../../config.yaml"),
        format!("/evidence/{day}/"),
        format!("/evidence/{day}/cam1/"),
        format!("/evidence/{day}/cam1/%2e%2e%2fconfig.yaml"),
        "/evidence/".into(),
    ] {
        let (status, _, body) = http_get_bytes(rig.http, &bad).unwrap();
        assert_eq!(status, 404, "{bad}");
        assert!(!String::from_utf8_lossy(&body).contains("password"));
    }
    // latest.jpg: the last judged frame, drawn; 404 for a camera that does not exist.
    let (status, kind, jpeg) = http_get_bytes(rig.http, "/cameras/cam1/latest.jpg").unwrap();
    assert_eq!((status, kind.as_str()), (200, "image/jpeg"));
    let latest = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    assert_eq!(latest.dimensions(), (128, 128));
    // The last frame of the line (it plays once) is a defective one: red banner.
    assert!(rig.line.defective[7]);
    std::fs::write(dir.join("latest.jpg"), &jpeg).unwrap();
    let band = banner(&dir.join("latest.jpg"));
    assert_eq!(verdict_of(band), Some(true), "latest banner {band:?}");
    assert_eq!(
        http_get_bytes(rig.http, "/cameras/cam9/latest.jpg")
            .unwrap()
            .0,
        404
    );
}

/// Complete sets (with their JSON) and the files of the store.
fn sets(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut json = Vec::new();
    let mut all = Vec::new();
    for day in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for cam in std::fs::read_dir(day.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(cam.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = f.path();
                if p.extension().is_some_and(|e| e == "json") {
                    json.push(p.clone());
                }
                all.push(p);
            }
        }
    }
    (json, all)
}

#[test]
fn retention_holds_the_size_and_age_and_a_kill_leaves_no_torn_set() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let rig = folder_rig(dir, 30, true, "");
    let root = dir.join("evidence");
    // A set from long ago: gone at start (age).
    let old = root.join("2001-01-01/cam1");
    std::fs::create_dir_all(&old).unwrap();
    for s in [".jpg", ".map.png", ".overlay.jpg", ".json"] {
        std::fs::write(old.join(format!("1{s}")), b"x").unwrap();
    }
    const MAX: u64 = 1 << 20;
    with_evidence(
        &rig,
        &root,
        &format!(", max_bytes: {MAX}, max_age_days: 30"),
    );
    let mut d = Daemon::start(&rig.config, &dir.join("cras.log"), &[]);
    wait_for(120.0, "retention by size", || {
        counter(rig.http, "cras_evidence_removed_total") >= 10.0
    });
    assert!(
        !root.join("2001-01-01").exists(),
        "the old day is still there"
    );
    let (_, files) = sets(&root);
    let bytes: u64 = files
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    // At most the limit, plus the set being written.
    assert!(bytes <= MAX + 256 * 1024, "{bytes} bytes on disk");
    let gauge = counter(rig.http, "cras_evidence_bytes");
    assert!(gauge > 0.0 && gauge <= MAX as f64, "{gauge}");

    // Killed while writing: every set with its JSON is whole and readable.
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    let (json, files) = sets(&root);
    assert!(!json.is_empty());
    for j in &json {
        let stem = j.to_str().unwrap().trim_end_matches(".json").to_string();
        for (suffix, check) in [(".jpg", true), (".overlay.jpg", true), (".map.png", true)] {
            let f = PathBuf::from(format!("{stem}{suffix}"));
            assert!(f.exists(), "{} missing", f.display());
            assert_eq!(image::open(&f).is_ok(), check, "{} torn", f.display());
        }
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(j).unwrap()).unwrap();
    }
    // What is not part of a complete set (at most the set being written, under its
    // temporary names or not) is swept at the next start.
    let complete = |f: &Path| {
        let name = f.file_name().unwrap().to_str().unwrap();
        let seq = name.trim_start_matches('.').split('.').next().unwrap();
        f.with_file_name(format!("{seq}.json")).exists()
    };
    let stray: Vec<&PathBuf> = files.iter().filter(|f| !complete(f)).collect();
    assert!(stray.len() <= 4, "{stray:?}");
    let d = Daemon::start(&rig.config, &dir.join("cras2.log"), &[]);
    wait_for(60.0, "the store opened", || {
        d.log_text().contains("evidence in")
    });
    for f in &stray {
        assert!(
            !f.exists() || complete(f),
            "{} left after the sweep",
            f.display()
        );
    }
}

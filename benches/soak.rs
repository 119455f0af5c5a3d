//! Soak: `cras run` for SOAK_SECS (default 600) under everything at once, then the books
//! are balanced.
//!
//! - a looping folder camera at 6 frames/s whose frames are the test line (half of them
//!   defective) plus hostile files: a 1x100000 PNG, a PNG header claiming 16384x16384,
//!   a truncated PNG, an empty file and random bytes;
//! - a broker that is up for 40 s and down for 50 s, over and over;
//! - the spool on a 128 KiB tmpfs (root only; a plain folder otherwise, said in the
//!   output), with `spool.max_bytes` above it, so the disk fills before the spool's own
//!   limit and the oldest alarms are evicted;
//! - a SIGHUP every 25 s, alternating a good configuration (another threshold) and a bad
//!   one (an unknown key).
//!
//! At the end the camera is reloaded to play once and stop, the broker stays up until the
//! spool is empty, and then: every sequence number the spool issued either reached the
//! subscriber (a persistent QoS 1 session) or is counted as evicted or failed; every
//! alarm raised got a number; the daemon never exited; resident memory per minute.
//!
//! Run: `cargo bench --bench soak` (SOAK_HUP_SECS=0: no reloads; needs `cras setup --backbone efficientnet_lite0`,
//! mosquitto and ../shared/fixtures). SOAK_SECS=60 for a short run.

#[path = "../tests/common/mod.rs"]
mod common;

use common::daemon::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

fn metrics(http: u16) -> String {
    http_get(http, "/metrics").map(|x| x.1).unwrap_or_default()
}

fn value(m: &str, name: &str) -> f64 {
    metric(m, name).unwrap_or(f64::NAN)
}

/// `cras_camera_up` of cam1, whatever its state label.
fn camera_up(m: &str) -> Option<f64> {
    m.lines()
        .find(|l| l.starts_with("cras_camera_up{camera=\"cam1\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Hostile frames after the line's own, as the next file numbers.
fn add_hostile_frames(frames: &Path, first: usize) -> usize {
    let name = |i: usize| frames.join(format!("{:05}.png", first + i));
    let tall = image::GrayImage::new(1, 100_000);
    tall.save(name(0)).unwrap();
    // A valid PNG signature and IHDR claiming 16384x16384, then nothing.
    let mut claim = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    claim.extend_from_slice(&16384u32.to_be_bytes());
    claim.extend_from_slice(&16384u32.to_be_bytes());
    claim.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    std::fs::write(name(1), claim).unwrap();
    let good = std::fs::read(frames.join("00000.png")).unwrap();
    std::fs::write(name(2), &good[..good.len() / 2]).unwrap();
    std::fs::write(name(3), b"").unwrap();
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(name(4), noise).unwrap();
    5
}

fn main() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    // Seconds between SIGHUPs; 0 for none (to tell reload memory from the rest).
    let hup_every: u64 = std::env::var("SOAK_HUP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let line = line(dir);
    let hostile = add_hostile_frames(&line.frames, line.defective.len());
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let tmpfs = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=128k", "tmpfs"])
        .arg(&spool)
        .status()
        .is_ok_and(|s| s.success());
    println!(
        "spool: {}",
        if tmpfs {
            "128 KiB tmpfs"
        } else {
            "plain folder (mount failed: not root?)"
        }
    );
    let mut broker = Broker::start(&dir.join("broker"));
    let sub = Subscriber::start(broker.port, "cras/#");
    let http = free_port();
    let params = folder_params(&line, 6, true);
    let cameras = [("cam1", "image-sequence", params.as_str())];
    let cfg = write_config(dir, &line, &broker.url(), http, &cameras, "");
    let base = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("spool:\n", "spool:\n  max_bytes: 1048576\n");
    std::fs::write(&cfg, &base).unwrap();
    let good_b = base.replace(
        &format!("alpha: {{image: {}", line.threshold),
        &format!("alpha: {{image: {}", line.threshold * 0.999),
    );
    let bad = base.replace(
        "  health_interval_s: 1\n",
        "  health_interval_s: 1\n  retain: yes\n",
    );
    let mut d = Daemon::start(&cfg, &dir.join("cras.log"), &[]);
    let pid = d.pid();
    wait_for(90.0, "the first frames", || {
        frames_processed(http, "cam1") >= 3.0
    });
    let t0 = Instant::now();
    let mut rss = Vec::new();
    let mut hups = 0u32;
    let (mut broker_up, mut flips) = (true, 0u32);
    let mut next_flip = t0 + Duration::from_secs(40);
    let mut next_hup = t0 + Duration::from_secs(25);
    let mut next_rss = t0;
    while t0.elapsed() < Duration::from_secs(secs) {
        let now = Instant::now();
        if now >= next_flip {
            if broker_up {
                broker.stop();
                next_flip = now + Duration::from_secs(50);
            } else {
                broker.restart();
                next_flip = now + Duration::from_secs(40);
            }
            broker_up = !broker_up;
            flips += 1;
        }
        if hup_every > 0 && now >= next_hup {
            hups += 1;
            let text = match hups % 4 {
                1 => &good_b,
                3 => &base,
                _ => &bad,
            };
            std::fs::write(&cfg, text).unwrap();
            signal(pid, "HUP");
            next_hup = now + Duration::from_secs(hup_every);
        }
        if now >= next_rss {
            rss.push(rss_kib(pid));
            next_rss = now + Duration::from_secs(10);
        }
        assert!(
            d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "cras run exited during the soak:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Wind down: broker up, the camera plays once more and ends, the spool drains.
    if !broker_up {
        broker.restart();
    }
    std::fs::write(&cfg, base.replace("loop: true", "loop: false")).unwrap();
    signal(pid, "HUP");
    wait_for(120.0, "the camera to end and the spool to drain", || {
        let m = metrics(http);
        camera_up(&m) == Some(0.0)
            && value(&m, "cras_alarms_spooled") == 0.0
            && value(&m, "cras_broker_connected") == 1.0
    });
    std::thread::sleep(Duration::from_secs(2));
    let m = metrics(http);
    let anomalous = value(&m, "cras_frames_anomalous_total{camera=\"cam1\"}") as u64;
    let stored = value(&m, "cras_alarms_total") as u64;
    let evicted = value(&m, "cras_alarms_evicted_total") as u64;
    let failed = value(&m, "cras_alarms_failed_total") as u64;
    let frames_in = value(&m, "cras_frames_processed_total{camera=\"cam1\"}") as u64;
    let frames_failed = value(&m, "cras_frames_failed_total{camera=\"cam1\"}") as u64;
    let reloads = value(&m, "cras_reloads_total") as u64;
    let rejected = value(&m, "cras_reloads_failed_total") as u64;
    let (code, _) = d.stop_with("TERM", 30.0);
    assert_eq!(code, Some(0), "{}", d.log_text());
    let issued: u64 = std::fs::read_to_string(spool.join("next-sequence"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let arrivals: Vec<u64> = sub
        .on("/alarm")
        .iter()
        .map(|m| m.json()["sequence"].as_u64().unwrap())
        .collect();
    let unique: BTreeSet<u64> = arrivals.iter().copied().collect();
    let missing = (0..issued).filter(|s| !unique.contains(s)).count() as u64;
    if tmpfs {
        let _ = std::process::Command::new("umount").arg(&spool).status();
    }
    let per_minute: Vec<String> = rss
        .chunks(6)
        .map(|c| format!("{}", c.iter().sum::<u64>() / c.len() as u64 / 1024))
        .collect();
    println!(
        "soak: {secs} s, {flips} broker flips, {hups} SIGHUPs ({reloads} applied, {rejected} rejected)"
    );
    println!(
        "frames: {frames_in} judged, {frames_failed} failed ({hostile} hostile files in a loop of {}), {anomalous} anomalous",
        line.defective.len() + hostile
    );
    println!(
        "alarms: {stored} stored, {issued} numbered, {} arrived ({} duplicates), {missing} numbers missing; lost: {evicted} evicted, {failed} failed",
        unique.len(),
        arrivals.len() - unique.len()
    );
    println!(
        "rss MiB per minute: {} (max {} MiB)",
        per_minute.join(" "),
        rss.iter().max().unwrap_or(&0) / 1024
    );
    // Every anomalous frame's alarm arrived or is counted lost (evicted after it was
    // stored, or failed to be stored); every number missing at the subscriber is one of
    // those, never a silent loss.
    assert_eq!(
        anomalous,
        unique.len() as u64 + evicted + failed,
        "every anomalous frame's alarm arrived or is counted as lost"
    );
    assert_eq!(
        stored,
        unique.len() as u64 + evicted,
        "stored alarms arrive or are evicted"
    );
    assert!(missing <= evicted + failed, "a gap nobody counted");
}

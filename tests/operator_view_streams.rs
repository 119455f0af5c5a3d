//! The operator view through real RTSP clients: ffprobe sees H.264 at the configured
//! size; ffmpeg's decoded frames carry a red banner on defective parts and a green one
//! on good parts; two viewers at once both get pictures; with no viewer nothing is drawn;
//! viewers must log in when credentials are set; a viewer that stalls or vanishes does
//! not stop the others or the daemon.

mod common;

use common::daemon::*;
use common::view::*;
use std::process::Command;
use std::time::Duration;

fn rtsp_config(rig: &Rig, port: u16, extra: &str) {
    let text = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        format!("{text}rtsp: {{enabled: true, port: {port}, width: 320, height: 240{extra}}}\n"),
    )
    .unwrap();
}

/// ffprobe's `codec,width,height` of `url`, or its error output. The first viewer makes
/// the server build its encoder, which under a full parallel test run on two cores can
/// take longer than one ffprobe attempt: a second attempt says whether the stream is
/// really missing or was only slow to start.
fn probe(url: &str) -> Result<String, String> {
    probe_once(url).or_else(|first| {
        probe_once(url).map_err(|second| format!("first try: {first}\nsecond try: {second}"))
    })
}

fn probe_once(url: &str) -> Result<String, String> {
    let out = Command::new("timeout")
        .args(["45", "ffprobe", "-v", "error", "-rtsp_transport", "tcp"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height",
            "-of",
            "csv=p=0",
            url,
        ])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}

fn overlay_frames(http: u16) -> f64 {
    http_get(http, "/metrics")
        .and_then(|(_, m)| metric(&m, "cras_overlay_frames_total"))
        .unwrap_or(-1.0)
}

#[test]
fn viewers_see_the_verdict_and_nothing_is_drawn_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let rig = folder_rig(dir, 6, true, "");
    let port = free_port();
    rtsp_config(&rig, port, "");
    let d = Daemon::start(&rig.config, &dir.join("cras.log"), &[]);
    wait_for(90.0, "frames flowing", || {
        frames_processed(rig.http, "cam1") >= 3.0
    });
    // Nobody watches yet: nothing is drawn.
    assert_eq!(overlay_frames(rig.http), 0.0);

    let url = format!("rtsp://127.0.0.1:{port}/cam1");
    assert_eq!(probe(&url), Ok("h264,320,240".to_string()));

    // Two viewers at once; 24 frames each span several good and defective parts.
    let (a, b) = (dir.join("a"), dir.join("b"));
    let other = {
        let (url, b) = (url.clone(), b.clone());
        std::thread::spawn(move || grab(&url, &b, 24))
    };
    assert!(grab(&url, &a, 24), "{}", d.log_text());
    assert!(other.join().unwrap(), "the second viewer got no frames");
    let (mut red, mut green) = (0, 0);
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&a).unwrap() {
        let [r, g, b] = banner(&e.unwrap().path());
        seen.push(format!("({r:.0},{g:.0},{b:.0})"));
        match verdict_of([r, g, b]) {
            Some(true) => red += 1,
            Some(false) => green += 1,
            None => {}
        }
    }
    assert!(
        red >= 2 && green >= 2,
        "banners: {red} red, {green} green of 24: {}",
        seen.join(" ")
    );
    assert_eq!(std::fs::read_dir(&b).unwrap().count(), 24);

    // Viewers gone: drawing stops.
    wait_for(20.0, "the media to close", || {
        d.log_text().contains("operator view: no viewer left")
    });
    let drawn = overlay_frames(rig.http);
    assert!(drawn >= 24.0, "{drawn}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(overlay_frames(rig.http), drawn, "drawing without a viewer");
}

#[test]
fn viewers_log_in_and_a_stalled_or_vanished_viewer_hurts_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Snow at 1280x720 and 20 Mbit/s: a viewer that stops reading fills its socket
    // buffers within seconds (without the cut-off this test fails: the third viewer
    // gets nothing).
    let rig = rig_with(
        dir,
        line(dir),
        &[
            (
                "cam1",
                "test-pattern",
                "{pattern: snow, width: 1280, height: 720, fps: 10}",
            ),
            // Judged, not streamed.
            (
                "cam2",
                "test-pattern",
                "{pattern: ball, width: 64, height: 48, fps: 2}\n    rtsp: false",
            ),
        ],
        "",
    );
    let (config, http) = (&rig.config, rig.http);
    std::fs::write(dir.join("viewers"), "operator:s3cret-Pass\n").unwrap();
    let port = free_port();
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        format!(
            "{text}rtsp: {{enabled: true, port: {port}, bitrate_kbps: 20000, credentials_file: viewers}}\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(config, &dir.join("cras.log"), &[]);
    wait_for(90.0, "frames flowing", || {
        frames_processed(http, "cam1") >= 3.0
    });
    let at = |who: &str| format!("rtsp://{who}127.0.0.1:{port}/cam1");
    for refused in [at(""), at("operator:wrong@"), at("nobody:s3cret-Pass@")] {
        let e = probe(&refused).expect_err(&refused);
        assert!(e.contains("401"), "{refused}: {e}");
    }
    let url = at("operator:s3cret-Pass@");
    assert_eq!(probe(&url), Ok("h264,1280,720".to_string()));
    let off = url.replace("/cam1", "/cam2");
    let e = probe(&off).expect_err("cam2 is not streamed");
    assert!(e.contains("404"), "{e}");
    assert!(frames_processed(http, "cam2") >= 1.0, "cam2 is judged");

    // One viewer stops reading (a stopped process: its TCP window closes), one is
    // killed mid-stream; a third still gets its frames, and judging goes on.
    let viewer = |url: &str| {
        Command::new("ffmpeg")
            .args(["-v", "quiet", "-rtsp_transport", "tcp", "-i", url])
            .args(["-f", "null", "-"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut stalled = viewer(&url);
    let mut vanished = viewer(&url);
    std::thread::sleep(Duration::from_secs(3));
    signal(stalled.id(), "STOP");
    signal(vanished.id(), "KILL");
    let _ = vanished.wait();
    // Long enough for the stalled viewer's buffers to fill.
    std::thread::sleep(Duration::from_secs(20));
    let before = frames_processed(http, "cam1");
    let grabbed = dir.join("grabbed");
    assert!(grab(&url, &grabbed, 24), "{}", d.log_text());
    assert_eq!(std::fs::read_dir(&grabbed).unwrap().count(), 24);
    let after = frames_processed(http, "cam1");
    assert!(after > before + 10.0, "judging slowed: {before} -> {after}");
    signal(stalled.id(), "KILL");
    let _ = stalled.wait();
}

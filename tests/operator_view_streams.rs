//! The operator view through real RTSP clients: ffprobe sees H.264 at the configured
//! size; ffmpeg's decoded frames carry a red banner on defective parts and a green one
//! on good parts; two viewers at once both get pictures; with no viewer nothing is drawn.

mod common;

use common::daemon::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn rtsp_config(rig: &Rig, port: u16) {
    let text = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        format!("{text}rtsp: {{enabled: true, port: {port}, width: 320, height: 240}}\n"),
    )
    .unwrap();
}

/// Grabs `n` frames from `url` into `dir` as PNG; true when ffmpeg succeeded.
fn grab(url: &str, dir: &Path, n: usize) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    Command::new("timeout")
        .args([
            "60",
            "ffmpeg",
            "-v",
            "error",
            "-rtsp_transport",
            "tcp",
            "-i",
            url,
        ])
        .args([
            "-fps_mode",
            "passthrough",
            "-frames:v",
            &n.to_string(),
            "-y",
        ])
        .arg(dir.join("%03d.png"))
        .status()
        .is_ok_and(|s| s.success())
}

/// The banner colour of a decoded frame: the mean of a patch at the right end of the
/// band (away from the text).
fn banner(path: &Path) -> [f64; 3] {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, _) = img.dimensions();
    let mut sum = [0f64; 3];
    let mut n = 0.0;
    for y in 3..14 {
        for x in w - 40..w - 4 {
            let p = img.get_pixel(x, y).0;
            for i in 0..3 {
                sum[i] += p[i] as f64;
            }
            n += 1.0;
        }
    }
    sum.map(|s| s / n)
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
    rtsp_config(&rig, port);
    let d = Daemon::start(&rig.config, &dir.join("cras.log"), &[]);
    wait_for(90.0, "frames flowing", || {
        frames_processed(rig.http, "cam1") >= 3.0
    });
    // Nobody watches yet: nothing is drawn.
    assert_eq!(overlay_frames(rig.http), 0.0);

    let url = format!("rtsp://127.0.0.1:{port}/cam1");
    let probe = Command::new("timeout")
        .args(["30", "ffprobe", "-v", "error", "-rtsp_transport", "tcp"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height",
            "-of",
            "csv=p=0",
            &url,
        ])
        .output()
        .unwrap();
    let probed = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    assert_eq!(
        probed,
        "h264,320,240",
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );

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
        if r > 140.0 && g < 90.0 && b < 90.0 {
            red += 1;
        } else if g > 100.0 && r < 70.0 && b < 110.0 {
            green += 1;
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

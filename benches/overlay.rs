//! What the operator view and the pictures of a judged frame cost, at 1280x720 and
//! 1920x1080:
//! - drawing one overlay (heat, boxes, band) on one core;
//! - one still (`latest.jpg`, the evidence overlay): textoverlay + jpegenc, and the
//!   `image` crate's encoder (no text) for comparison;
//! - the live view at 30 frames/s for `OVERLAY_SECS` (default 10) seconds, with no viewer
//!   and with one real viewer (ffmpeg over RTSP/TCP): this process's CPU time per frame
//!   (drawing, conversion, text, x264 encoding, RTP), and its share of one core's
//!   33.3 ms frame budget.
//!
//! `cargo bench --bench overlay`

use cras::daemon::operator::config::RtspConfig;
use cras::daemon::operator::still::StillEncoder;
use cras::daemon::operator::{OperatorView, Scene, Shot, ViewedCamera};
use cras::daemon::regions::{CropGeometry, Region, Verdict};
use cras::daemon::telemetry::Telemetry;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn shot(w: u32, h: u32) -> Arc<Shot> {
    let mut seed = 1u32;
    let frame = image::RgbImage::from_fn(w, h, |_, _| {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let v = (seed >> 24) as u8;
        image::Rgb([v, v / 2 + 60, 255 - v])
    });
    // A 288x288 map over the centre crop of a frame resized to 288 on its short side.
    let side = 288usize;
    let mut map = vec![0.1f32; side * side];
    for y in 100..160 {
        for x in 120..200 {
            map[y * side + x] = 0.9;
        }
    }
    let scale = h as f64 / side as f64;
    let resized_w = (w as f64 / scale).round();
    Arc::new(Shot {
        camera: "cam1".into(),
        frame_number: 1,
        captured_ms: 0,
        frame,
        map,
        map_hw: (side, side),
        geometry: CropGeometry {
            scale_x: scale,
            scale_y: scale,
            left: ((resized_w - side as f64) / 2.0).round(),
            top: 0.0,
        },
        pixel_threshold: 0.5,
        class: "stripes".into(),
        verdict: Verdict {
            anomalous: true,
            score: 0.93,
            threshold: 0.8,
            regions: vec![Region {
                x: w / 2,
                y: h / 3,
                width: w / 8,
                height: h / 6,
                area_px: 4800,
                peak: 0.9,
            }],
        },
    })
}

/// CPU seconds this process has used (user + system).
fn cpu_s() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage the call fills.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn median_ms(mut f: impl FnMut(), n: usize) -> f64 {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[n / 2]
}

/// CPU ms per frame of the live view fed at 30 frames/s for `secs`, with or without a
/// viewer; and how many frames the viewer's side saw drawn.
fn live(w: u32, h: u32, secs: f64, viewer: bool) -> (f64, u64) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18554);
    let cfg = RtspConfig {
        enabled: true,
        port,
        bitrate_kbps: 4000,
        ..Default::default()
    };
    let telemetry = Arc::new(Telemetry::new());
    let view = OperatorView::start(
        &cfg,
        &Default::default(),
        &[ViewedCamera {
            id: "cam1".into(),
            fps: 30.0,
            shown: true,
        }],
        telemetry.clone(),
    )
    .expect("the operator view starts");
    let feed = view.feed();
    let mut child = viewer.then(|| {
        std::process::Command::new("ffmpeg")
            .args(["-v", "quiet", "-rtsp_transport", "tcp", "-i"])
            .arg(format!("rtsp://127.0.0.1:{port}/cam1"))
            .args(["-f", "null", "-"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("ffmpeg")
    });
    if viewer {
        let until = Instant::now() + Duration::from_secs(20);
        while !feed.wants(0) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let s = shot(w, h);
    // Warm-up, then measure.
    let period = Duration::from_secs_f64(1.0 / 30.0);
    let mut frames = 0u64;
    let run = |secs: f64, count: &mut u64| {
        let start = Instant::now();
        let mut next = start;
        while start.elapsed().as_secs_f64() < secs {
            if feed.wants(0) {
                feed.offer(Scene {
                    camera: 0,
                    shot: s.clone(),
                });
            }
            *count += 1;
            next += period;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    };
    run(2.0, &mut 0);
    let drawn0 = telemetry
        .overlay_frames
        .load(std::sync::atomic::Ordering::Relaxed);
    let cpu0 = cpu_s();
    run(secs, &mut frames);
    let cpu = cpu_s() - cpu0;
    let drawn = telemetry
        .overlay_frames
        .load(std::sync::atomic::Ordering::Relaxed)
        - drawn0;
    if let Some(c) = child.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(view);
    (cpu * 1e3 / frames as f64, drawn)
}

fn main() {
    gstreamer::init().expect("GStreamer");
    let secs: f64 = std::env::var("OVERLAY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    println!(
        "size        draw ms  still ms (image crate, no text)  live, no viewer  live, one viewer (CPU ms/frame, share of 33.3 ms)"
    );
    for (w, h) in [(1280u32, 720u32), (1920, 1080)] {
        let s = shot(w, h);
        let draw = median_ms(
            || {
                std::hint::black_box(s.overlay());
            },
            21,
        );
        let mut enc = StillEncoder::default();
        let picture = s.overlay();
        let text = s.banner("2026-11-30T12:00:00.000Z");
        let still = median_ms(
            || {
                std::hint::black_box(enc.encode(&picture, &text, 90).expect("jpeg"));
            },
            21,
        );
        let plain = median_ms(
            || {
                let mut out = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
                    .encode_image(&picture)
                    .expect("jpeg");
                std::hint::black_box(out);
            },
            21,
        );
        let (idle, idle_drawn) = live(w, h, secs, false);
        let (watched, drawn) = live(w, h, secs, true);
        assert_eq!(idle_drawn, 0, "drawn without a viewer");
        println!(
            "{w}x{h}  {draw:8.1}  {still:8.1} ({plain:5.1})                 {idle:6.2} ({:4.1} %)   {watched:6.2} ({:4.1} %), {drawn} frames drawn in {secs} s",
            idle / 33.3 * 100.0,
            watched / 33.3 * 100.0
        );
    }
}

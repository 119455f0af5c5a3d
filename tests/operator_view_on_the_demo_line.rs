//! The demo line as an operator and a quality engineer see it: `cras demo` turns the
//! live view and the evidence store on; a real RTSP client's decoded frames and the
//! evidence overlays carry the heat colour where the synthetic defect is, with a red
//! banner; good parts show a green banner and no heat.

mod common;

use common::daemon::*;
use common::view::*;
use common::*;
use image::{GrayImage, RgbImage};
use std::path::Path;

/// The demo's frames in playing order, with the defect mask of each defective one
/// (found by content among the synthetic test images).
fn frames_and_masks(demo: &Path) -> Vec<(RgbImage, Option<GrayImage>)> {
    let data = demo.join("data");
    let mut sources = Vec::new();
    for class in std::fs::read_dir(&data).unwrap().flatten() {
        for kind in std::fs::read_dir(class.path().join("test"))
            .unwrap()
            .flatten()
        {
            for f in std::fs::read_dir(kind.path()).unwrap().flatten() {
                let mask = (kind.file_name() != "good").then(|| {
                    let stem = f.path().file_stem().unwrap().to_str().unwrap().to_string();
                    class
                        .path()
                        .join("ground_truth")
                        .join(kind.file_name())
                        .join(format!("{stem}_mask.png"))
                });
                sources.push((std::fs::read(f.path()).unwrap(), mask));
            }
        }
    }
    let mut frames: Vec<_> = std::fs::read_dir(demo.join("frames"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    frames.sort();
    frames
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).unwrap();
            let (_, mask) = sources.iter().find(|(b, _)| *b == bytes).unwrap();
            let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
            (
                img,
                mask.as_ref().map(|m| image::open(m).unwrap().to_luma8()),
            )
        })
        .collect()
}

/// Band height of the 128-pixel demo frames.
const BAND: u32 = 20;

#[test]
fn heat_marks_the_defect_on_the_stream_and_in_the_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let (http, rtsp) = (free_port(), free_port());
    let (code, out, err) = cras(&[
        "demo",
        "--dir",
        demo.to_str().unwrap(),
        "--fps",
        "8",
        "--http",
        &format!("127.0.0.1:{http}"),
        "--rtsp-port",
        &rtsp.to_string(),
        "--prepare-only",
    ]);
    assert_eq!(code, 0, "{err}");
    let config = std::path::PathBuf::from(out.trim());
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains(&format!("rtsp: {{enabled: true, port: {rtsp}}}")),
        "{text}"
    );
    assert!(text.contains("evidence: {enabled: true"), "{text}");
    let line = frames_and_masks(&demo);
    let d = Daemon::start(&config, &dir.path().join("cras.log"), &[]);
    wait_for(90.0, "frames flowing", || {
        frames_processed(http, "cam1") >= 3.0
    });

    // The stream: every decoded frame is one of the line's, its banner says the verdict,
    // heat on the defect of red ones, none on green ones.
    let grabbed = dir.path().join("grabbed");
    assert!(
        grab(&format!("rtsp://127.0.0.1:{rtsp}/cam1"), &grabbed, 30),
        "{}",
        d.log_text()
    );
    let sources: Vec<RgbImage> = line.iter().map(|(f, _)| f.clone()).collect();
    let (mut hits, mut clean_greens, mut seen) = (0, 0, Vec::new());
    let mut decoded: Vec<_> = std::fs::read_dir(&grabbed)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    decoded.sort();
    // The line's frames each decoded frame may be (a defective part and its good
    // original differ only at the defect), in decoding order.
    let mut candidates = Vec::new();
    for path in &decoded {
        let shown = image::open(path).unwrap().to_rgb8();
        assert_eq!(shown.dimensions(), (128, 128));
        let (i, dist) = source_of(&shown, &sources, BAND);
        assert!(dist < 12.0, "a decoded frame matches no source ({dist:.1})");
        let verdict = verdict_of(banner(path));
        // A defective part and the good one it was made from differ only at the
        // defect: either may be the frame shown, so heat is measured against each
        // source about as close as the best, and the least counts.
        let near: Vec<usize> = distances(&shown, &sources, BAND)
            .iter()
            .enumerate()
            .filter(|(_, d)| **d <= dist + 3.0)
            .map(|(j, _)| j)
            .collect();
        let heat = near
            .iter()
            .map(|&j| heat_share(&shown, &sources[j], BAND))
            .fold(f64::MAX, f64::min);
        candidates.push(near);
        match (verdict, &line[i].1) {
            (Some(true), Some(mask)) => {
                let shift = warm_shift(&shown, &sources[i], mask, BAND);
                seen.push(format!("frame {i}: NG, shift {shift:.0} on the defect"));
                hits += usize::from(shift > 20.0);
            }
            // A good part judged good. (A defective part the model misses can show heat
            // under a green banner: its map reaches the pixel threshold somewhere while
            // its image score stays below the image threshold.)
            (Some(false), None) => {
                seen.push(format!("frame {i}: OK, heat {heat:.4}"));
                assert!(heat < 0.002, "heat on a good verdict: frame {i}, {heat}");
                clean_greens += 1;
            }
            (v, _) => seen.push(format!("frame {i}: {v:?}")),
        }
    }
    assert!(hits >= 3 && clean_greens >= 3, "{}", seen.join("\n"));
    // The first viewer sees the line as it runs, frame after frame. (The stream once
    // declared 1 fps until its first viewer left: the encoder's latency, counted in
    // frames of that rate, held each frame 2 s while only two could queue, and this
    // viewer got bursts of 3 frames every 2 s.)
    let n = sources.len();
    let in_order = candidates
        .windows(2)
        .filter(|w| w[0].iter().any(|a| w[1].contains(&((a + 1) % n))))
        .count();
    assert!(
        in_order * 10 >= (candidates.len() - 1) * 9,
        "{in_order} of {} consecutive decoded frames are consecutive on the line:\n{}",
        candidates.len() - 1,
        seen.join("\n")
    );

    // The evidence: the same picture as the stream, kept, for each alarm.
    let root = demo.join("evidence");
    wait_for(30.0, "evidence", || {
        http_get(http, "/metrics")
            .and_then(|(_, m)| metric(&m, "cras_evidence_written_total"))
            .is_some_and(|n| n >= 4.0)
    });
    let mut on_defect = 0;
    for day in std::fs::read_dir(&root).unwrap().flatten() {
        for f in std::fs::read_dir(day.path().join("cam1"))
            .unwrap()
            .flatten()
        {
            let name = f.file_name().into_string().unwrap();
            let Some(seq) = name.strip_suffix(".overlay.jpg") else {
                continue;
            };
            let overlay = image::open(f.path()).unwrap().to_rgb8();
            let frame = image::open(f.path().with_file_name(format!("{seq}.jpg")))
                .unwrap()
                .to_rgb8();
            let (i, _) = source_of(&frame, &sources, 0);
            if let Some(mask) = &line[i].1 {
                on_defect += usize::from(warm_shift(&overlay, &frame, mask, BAND) > 20.0);
            }
        }
    }
    assert!(
        on_defect >= 2,
        "{on_defect} evidence overlays with heat on the defect"
    );
}

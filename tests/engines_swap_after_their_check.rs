//! Build, check, swap, with two real onnxruntime engines on the CPU (the lifecycle a
//! TensorRT engine goes through on a GPU): the serving engine runs the lite0 fixture
//! graph without graph optimisations, the new one with all of them. Batches keep being
//! served while the new engine builds; it is checked on batches just served, and takes
//! over between two batches with no frame lost. An engine that disagrees (the same
//! network with other centers) or does not load is never served.

mod common;

use common::*;
use cras::backbone::{Backbone, BackboneKind};
use cras::engine::upgrade::{Differences, Sample, SampleInput, Tolerance, Upgrade, UpgradeState};
use cras::engine::{CrasOutputs, Engine, EngineKind, EngineOptions, Optimization};
use cras::model::graph::{CrasModel, GraphOptions};
use cras::model::head::{Centers, CrasHead};
use cras::weights::StateDict;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn engine(onnx: &[u8], optimization: Optimization) -> Box<dyn Engine> {
    EngineKind::Onnxruntime
        .load(
            onnx,
            &EngineOptions {
                threads: Some(1),
                optimization,
                ..Default::default()
            },
        )
        .unwrap()
}

/// The six prepared fixture images, as three batches of two.
fn batches() -> Vec<Vec<f32>> {
    let set = fixtures().join("lite0-d384");
    (0..3)
        .map(|b| {
            let mut v = f32s(&set.join(format!("img{}_input.npy", 2 * b)));
            v.extend(f32s(&set.join(format!("img{}_input.npy", 2 * b + 1))));
            v
        })
        .collect()
}

const SHAPE: [usize; 4] = [2, 3, 288, 288];

type Recorded = Arc<Mutex<Option<(Differences, bool)>>>;

/// Serves batches in turn as the daemon's inference thread does, offering them to the
/// upgrade and swapping when it hands over; stops `after` batches past the upgrade's
/// end (handed over, refused or failed). Returns the engine serving at the end, the
/// batch the swap happened before, and the frames answered.
fn serve(
    mut serving: Box<dyn Engine>,
    up: Upgrade,
    after: usize,
) -> (Box<dyn Engine>, Option<usize>, usize, UpgradeState) {
    let inputs = batches();
    let (mut swapped_at, mut answered, mut past) = (None, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut n = 0;
    while past < after {
        assert!(Instant::now() < deadline, "no end: {:?}", up.state());
        if swapped_at.is_none()
            && let Some(new) = up.take()
        {
            serving = new;
            swapped_at = Some(n);
        }
        if swapped_at.is_some()
            || matches!(
                up.state(),
                UpgradeState::Refused(_) | UpgradeState::Failed(_)
            )
        {
            past += 1;
        }
        let input = &inputs[n % inputs.len()];
        let outs = CrasOutputs::for_batch(serving.run(input, SHAPE).unwrap(), 2).unwrap();
        answered += outs.batch;
        if up.wants_sample() {
            up.offer(Sample {
                input: SampleInput::Prepared {
                    data: input.clone(),
                    shape: SHAPE,
                },
                n: 2,
                outputs: outs,
            });
        }
        n += 1;
        // The daemon's batches come at camera pace, not back to back.
        std::thread::sleep(Duration::from_millis(20));
    }
    (serving, swapped_at, answered, up.state())
}

fn recorder() -> (
    Recorded,
    impl FnOnce(&Differences, Tolerance) + Send + 'static,
) {
    let seen: Recorded = Arc::new(Mutex::new(None));
    let s = seen.clone();
    (seen, move |d: &Differences, t: Tolerance| {
        *s.lock().unwrap() = Some((*d, d.within(t)))
    })
}

#[test]
fn a_checked_engine_takes_over_between_batches() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = std::fs::read(lite0_bundle(dir.path(), "model").join("model.onnx")).unwrap();
    let serving = engine(&onnx, Optimization::Disabled);
    let (seen, record) = recorder();
    let graph = onnx.clone();
    let up = Upgrade::start(
        "engine-build",
        move || Ok(engine(&graph, Optimization::All)),
        4,
        Tolerance::default(),
        record,
    )
    .unwrap();
    let (mut now, swapped_at, answered, state) = serve(serving, up, 3);

    let swapped_at = swapped_at.expect("the new engine never took over");
    // Every batch was answered in full, before, at and after the swap.
    assert_eq!(answered, 2 * (swapped_at + 3));
    let (d, passed) = seen.lock().unwrap().expect("the check was not recorded");
    eprintln!("checked before the swap, at batch {swapped_at}: {d:?}");
    assert!(passed);
    assert_eq!(state, UpgradeState::Ready(d));
    assert_eq!(d.images, 4);
    assert_eq!(d.class, 0);
    assert!(d.score <= 1e-3 && d.map <= 0.1, "{d:?}");

    // The recorded differences are the engines' own: the first two batches through a
    // fresh engine of each kind.
    let (mut plain, mut full) = (
        engine(&onnx, Optimization::Disabled),
        engine(&onnx, Optimization::All),
    );
    let mut direct = Differences::default();
    for input in &batches()[..2] {
        let a = CrasOutputs::for_batch(plain.run(input, SHAPE).unwrap(), 2).unwrap();
        let b = CrasOutputs::for_batch(full.run(input, SHAPE).unwrap(), 2).unwrap();
        direct.add(&a, &b, 2).unwrap();
    }
    assert_eq!(direct, d);

    // What serves now is the optimised engine: its answers, bit for bit.
    let input = &batches()[2];
    let a = CrasOutputs::for_batch(now.run(input, SHAPE).unwrap(), 2).unwrap();
    let b = CrasOutputs::for_batch(full.run(input, SHAPE).unwrap(), 2).unwrap();
    assert_eq!(a.image_scores, b.image_scores);
    assert_eq!(a.anomaly_maps, b.anomaly_maps);
}

/// The fixture's network with its centers moved: a real CRAS graph that answers
/// differently.
fn other_centers() -> Vec<u8> {
    let set = fixtures().join("lite0-d384");
    let backbone = Backbone::load(BackboneKind::EfficientnetLite0, &lite0_weights()).unwrap();
    let head =
        CrasHead::from_state_dict(&StateDict::load(&set.join("ckpt_best_0.pth")).unwrap()).unwrap();
    let mut centers = Centers::load(&set.join("center.pth")).unwrap();
    for v in centers.data.iter_mut() {
        *v *= 1.5;
    }
    CrasModel {
        backbone: &backbone,
        head: &head,
        centers: &centers,
        height: 288,
        width: 288,
        pre_dim: 384,
        image_score: cras::model::score::ImageScore::PatchMax,
        views: Default::default(),
    }
    .to_onnx(GraphOptions {
        debug_outputs: false,
    })
    .unwrap()
}

#[test]
fn an_engine_that_disagrees_or_fails_never_serves() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = std::fs::read(lite0_bundle(dir.path(), "model").join("model.onnx")).unwrap();

    let (seen, record) = recorder();
    let other = other_centers();
    let up = Upgrade::start(
        "engine-build",
        move || Ok(engine(&other, Optimization::All)),
        4,
        Tolerance::default(),
        record,
    )
    .unwrap();
    let (mut now, swapped_at, _, state) = serve(engine(&onnx, Optimization::All), up, 2);
    assert_eq!(swapped_at, None);
    let (d, passed) = seen.lock().unwrap().expect("the check was not recorded");
    eprintln!("refused: {d:?}");
    assert!(!passed);
    assert_eq!(state, UpgradeState::Refused(d));
    assert!(d.score > 1e-3, "{d:?}");
    assert!(
        state.describe().starts_with("refused (on 4 images"),
        "{}",
        state.describe()
    );
    // Still the first engine.
    let mut first = engine(&onnx, Optimization::All);
    let input = &batches()[0];
    assert_eq!(
        CrasOutputs::for_batch(now.run(input, SHAPE).unwrap(), 2)
            .unwrap()
            .image_scores,
        CrasOutputs::for_batch(first.run(input, SHAPE).unwrap(), 2)
            .unwrap()
            .image_scores
    );

    // A graph that does not load: the build fails, nothing is recorded or swapped.
    let (seen, record) = recorder();
    let up = Upgrade::start(
        "engine-build",
        || EngineKind::Onnxruntime.load(b"not a graph", &EngineOptions::default()),
        4,
        Tolerance::default(),
        record,
    )
    .unwrap();
    let (_, swapped_at, answered, state) = serve(engine(&onnx, Optimization::All), up, 2);
    assert_eq!(swapped_at, None);
    assert!(answered >= 4);
    assert!(seen.lock().unwrap().is_none());
    match state {
        UpgradeState::Failed(why) => assert!(why.contains("model graph"), "{why}"),
        s => panic!("{s:?}"),
    }
}

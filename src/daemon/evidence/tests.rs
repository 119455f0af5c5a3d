use super::*;

#[test]
fn the_map_keeps_sixteen_bits() {
    let png = map_png(&[0.0, 0.5, 1.0, 2.0, -1.0, 0.25], (2, 3)).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_luma16();
    assert_eq!(img.dimensions(), (3, 2));
    assert_eq!(img.as_raw(), &vec![0u16, 32768, 65535, 65535, 0, 16384],);
    assert_eq!(relative(0, "cam1", 42), "1970-01-01/cam1/42");
}

#[test]
fn the_alarm_names_its_evidence_only_when_the_writer_took_it() {
    let shot = Arc::new(Shot {
        frame_number: 3,
        captured_ms: 86_400_000,
        ..Shot::example(4, 4, true)
    });
    let alarm = AlarmPayload {
        schema: 1,
        device: "box1".into(),
        site: "plant1".into(),
        camera: "cam1".into(),
        sequence: 7,
        frame: 3,
        captured_at: rfc3339_utc(86_400_000),
        class: "stripes".into(),
        detected_class: "stripes".into(),
        score: 0.9,
        threshold: 0.5,
        regions: vec![],
        regions_total: 0,
        model_id: "m".into(),
        latency: Default::default(),
        evidence: None,
        evidence_files: vec![],
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let counters = Arc::new(EvidenceCounters::default());
    let pending = Pending {
        shot,
        sink: Sink {
            tx,
            counters: counters.clone(),
        },
    };
    let json = |b: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
    // Without the store: no evidence fields at all.
    let plain = json(encode_alarm(alarm.clone(), None).unwrap());
    assert!(plain.get("evidence").is_none() && plain.get("evidence_files").is_none());
    // Taken: the alarm names the set, and the queued payload is the same body.
    let taken = encode_alarm(alarm.clone(), Some(&pending)).unwrap();
    let v = json(taken.clone());
    assert_eq!(v["evidence"], "1970-01-02/cam1/7");
    assert_eq!(
        v["evidence_files"],
        serde_json::json!(["7.jpg", "7.map.png", "7.overlay.jpg", "7.json"])
    );
    let job = rx.try_recv().unwrap();
    assert_eq!(
        (job.relative.as_str(), job.payload),
        ("1970-01-02/cam1/7", taken)
    );
    // The queue is full: no evidence named, the drop counted.
    let _ = pending.sink.tx.try_send(Job {
        relative: String::new(),
        shot: pending.shot.clone(),
        payload: vec![],
    });
    let v = json(encode_alarm(alarm, Some(&pending)).unwrap());
    assert!(v.get("evidence").is_none() && v.get("evidence_files").is_none());
    assert_eq!(counters.dropped.load(Ordering::Relaxed), 1);
}

//! The spool without a broker: order, restarts, eviction, full disks, the counter.

use super::*;

fn drain(s: &mut AlarmSpool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some((seq, p)) = s.next_to_send().unwrap() {
        s.acknowledge(seq).unwrap();
        out.push(p);
    }
    out
}

#[test]
fn order_is_kept_across_requeue_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    for i in 0..5 {
        s.push(format!("a{i}").as_bytes()).unwrap();
    }
    let (s0, p0) = s.next_to_send().unwrap().unwrap();
    let (_s1, _) = s.next_to_send().unwrap().unwrap();
    assert_eq!(p0, b"a0");
    s.acknowledge(s0).unwrap();
    // Broker gone: a1 was in flight and comes back first.
    s.requeue_in_flight();
    assert_eq!(s.stats().queued, 4);
    drop(s);
    // Restart (as after kill -9): the unacknowledged alarms are all there, in order.
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    let rest: Vec<Vec<u8>> = drain(&mut s);
    assert_eq!(
        rest,
        vec![
            b"a1".to_vec(),
            b"a2".to_vec(),
            b"a3".to_vec(),
            b"a4".to_vec()
        ]
    );
    assert_eq!(s.stats().bytes, 0);
    // Sequence numbers continue after a restart, even with an empty spool.
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(
        s.push_with(|seq| Ok(format!("alarm {seq}").into_bytes()))
            .unwrap(),
        5
    );
    assert_eq!(s.next_to_send().unwrap().unwrap().1, b"alarm 5");
}

#[test]
fn in_flight_alarms_survive_a_crash_and_are_resent() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    s.push(b"first").unwrap();
    s.push(b"second").unwrap();
    let _ = s.next_to_send().unwrap();
    // Crash before the PUBACK arrived: no acknowledge, no requeue.
    drop(s);
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(drain(&mut s), vec![b"first".to_vec(), b"second".to_vec()]);
}

#[test]
fn full_spool_evicts_oldest_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = AlarmSpool::open(dir.path(), 10).unwrap();
    for p in ["aaaa", "bbbb", "cccc", "dddd"] {
        s.push(p.as_bytes()).unwrap();
    }
    let st = s.stats();
    assert_eq!((st.queued, st.bytes, st.evicted_total), (2, 8, 2));
    assert_eq!(drain(&mut s), vec![b"cccc".to_vec(), b"dddd".to_vec()]);
    assert!(matches!(
        s.push(&[0u8; 11]),
        Err(SpoolError::TooLarge { .. })
    ));
}

#[test]
fn interrupted_writes_are_discarded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(format!("{}.tmp", files::alarm_name(7))),
        b"half",
    )
    .unwrap();
    std::fs::write(dir.path().join(files::alarm_name(3)), b"whole").unwrap();
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(s.push(b"next").unwrap(), 4);
    assert_eq!(drain(&mut s), vec![b"whole".to_vec(), b"next".to_vec()]);
    assert!(
        !dir.path()
            .join(format!("{}.tmp", files::alarm_name(7)))
            .exists()
    );
}

#[test]
fn a_full_disk_evicts_the_oldest_to_store_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    for p in ["a0", "a1", "a2"] {
        s.push(p.as_bytes()).unwrap();
    }
    // The disk refuses the next two writes: two oldest alarms make room.
    s.full_disk_writes = 2;
    assert_eq!(s.push(b"a3").unwrap(), 3);
    assert_eq!(s.stats().evicted_total, 2);
    assert_eq!(drain(&mut s), vec![b"a2".to_vec(), b"a3".to_vec()]);
}

/// The counter is written first; a full disk there makes room the same way (it used to
/// lose every alarm while the disk stayed full).
#[test]
fn a_full_disk_at_the_counter_evicts_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    for p in ["a0", "a1"] {
        s.push(p.as_bytes()).unwrap();
    }
    // Exactly one refused write: the counter's.
    s.full_disk_writes = 1;
    assert_eq!(s.push(b"a2").unwrap(), 2);
    assert_eq!((s.stats().evicted_total, s.stats().lost_total), (1, 0));
    assert_eq!(drain(&mut s), vec![b"a1".to_vec(), b"a2".to_vec()]);
    assert_eq!(
        std::fs::read_to_string(files::counter_path(dir.path())).unwrap(),
        "3"
    );
}

#[test]
fn an_alarm_that_cannot_be_written_leaves_a_counted_gap() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    s.push(b"a0").unwrap();
    // Full even after evicting everything: the alarm is lost, visibly.
    s.full_disk_writes = 10;
    assert!(matches!(
        s.push(b"a1"),
        Err(SpoolError::Lost { sequence: 1, .. })
    ));
    assert_eq!((s.stats().lost_total, s.stats().evicted_total), (1, 1));
    s.full_disk_writes = 0;
    assert_eq!(
        s.push(b"a2").unwrap(),
        2,
        "sequence 1 is a gap, never reused"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")),
        "no temporary file stays behind"
    );
    drop(s);
    // Even after a restart with an empty spool.
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    drain(&mut s);
    assert_eq!(s.push(b"a3").unwrap(), 3);
}

#[test]
fn a_corrupt_counter_is_recovered_from_the_spool_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    for _ in 0..5 {
        s.push(b"x").unwrap();
    }
    let (seq, _) = s.next_to_send().unwrap().unwrap();
    s.acknowledge(seq).unwrap();
    drop(s);
    std::fs::write(files::counter_path(dir.path()), b"\0\0\0").unwrap();
    // Alarms 1-4 are still there: numbering continues after the highest.
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(s.push(b"y").unwrap(), 5);
    drain(&mut s);
    drop(s);
    std::fs::write(files::counter_path(dir.path()), b"garbage").unwrap();
    // Nothing tells where it was: an error, never a silent restart at 0.
    assert!(matches!(
        AlarmSpool::open(dir.path(), 1 << 20),
        Err(SpoolError::Counter { .. })
    ));
}

#[test]
fn the_spool_touches_only_its_own_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.tmp"), b"mine").unwrap();
    std::fs::write(dir.path().join("00001.alarm"), b"not the spool's").unwrap();
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(s.stats().queued, 0, "a misnamed file is not an alarm");
    s.push(b"a").unwrap();
    drain(&mut s);
    assert!(dir.path().join("notes.tmp").exists());
    assert!(dir.path().join("00001.alarm").exists());
}

#[test]
fn an_alarm_not_handed_over_goes_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
    for p in ["a0", "a1", "a2"] {
        s.push(p.as_bytes()).unwrap();
    }
    let (s0, _) = s.next_to_send().unwrap().unwrap();
    let (s1, _) = s.next_to_send().unwrap().unwrap();
    s.unsend(s1);
    assert_eq!((s.stats().queued, s.stats().in_flight), (2, 1));
    s.acknowledge(s0).unwrap();
    assert_eq!(drain(&mut s), vec![b"a1".to_vec(), b"a2".to_vec()]);
}

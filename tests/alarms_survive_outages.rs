//! Nothing accepted is lost: alarms wait in the spool while the broker is away and go
//! out in order when it is back; after `kill -9` the restarted daemon sends what was not
//! acknowledged, in order. Alarms are QoS 1 (at least once): an alarm the broker took
//! but whose PUBACK the outage or the crash cut off is sent again, so it may arrive
//! twice; the duplicate carries the same sequence number and content (a subscriber
//! drops it by sequence), comes only after the cut, and there are at most as many as
//! alarms may be in flight (16).

mod common;

use common::daemon::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Alarms' sequence numbers and payloads, in arrival order.
fn arrivals(sub: &Subscriber) -> Vec<(u64, String)> {
    sub.on("/alarm")
        .iter()
        .map(|m| (m.json()["sequence"].as_u64().unwrap(), m.payload.clone()))
        .collect()
}

/// Every sequence number the spool ever gave out (its counter file).
fn issued(spool: &Path) -> u64 {
    std::fs::read_to_string(spool.join("next-sequence"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn unique(a: &[(u64, String)]) -> u64 {
    a.iter()
        .map(|x| x.0)
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64
}

/// Every sequence 0..n arrived, in order of first arrival; duplicates are the same
/// alarm, arrive at or after index `cut` (the outage or the crash), and are at most a
/// send window's worth.
fn check_arrivals(got: &[(u64, String)], n: u64, cut: usize) {
    let mut first: BTreeMap<u64, &String> = BTreeMap::new();
    let mut order = Vec::new();
    let mut duplicates = 0;
    for (i, (seq, payload)) in got.iter().enumerate() {
        match first.get(seq) {
            None => {
                first.insert(*seq, payload);
                order.push(*seq);
            }
            Some(p) => {
                assert!(
                    i >= cut,
                    "alarm {seq} twice before the cut (index {i} < {cut})"
                );
                assert_eq!(*p, payload, "a duplicate must be the same alarm");
                duplicates += 1;
            }
        }
    }
    assert_eq!(
        order,
        (0..n).collect::<Vec<_>>(),
        "every alarm, in order of first arrival"
    );
    assert!(
        duplicates <= 16,
        "{duplicates} duplicates: more than were in flight"
    );
}

fn left_in_spool(spool: &Path) -> usize {
    std::fs::read_dir(spool)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".alarm")
        })
        .count()
}

fn metrics(http: u16) -> String {
    http_get(http, "/metrics").map(|x| x.1).unwrap_or_default()
}

#[test]
fn broker_outage_loses_nothing_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let Rig {
        mut broker,
        sub,
        http,
        config: cfg,
        ..
    } = folder_rig(dir, 6, true, "");
    let mut d = Daemon::start(&cfg, &dir.join("cras.log"), &[]);
    wait_for(90.0, "first alarms", || arrivals(&sub).len() >= 3);

    let outage_from = arrivals(&sub).len();
    broker.stop();
    // Defects keep coming while the broker is away: they wait in the spool.
    wait_for(30.0, "alarms to pile up in the spool", || {
        let m = metrics(http);
        metric(&m, "cras_broker_connected") == Some(0.0)
            && metric(&m, "cras_alarms_spooled").is_some_and(|n| n >= 4.0)
    });
    let during = arrivals(&sub).len();
    assert!(
        d.log_text().contains("alarms wait in the spool"),
        "{}",
        d.log_text()
    );
    broker.restart();
    wait_for(60.0, "the spool to drain", || {
        let m = metrics(http);
        metric(&m, "cras_broker_connected") == Some(1.0)
            && metric(&m, "cras_alarms_spooled") == Some(0.0)
            && arrivals(&sub).len() > during + 3
    });
    let (code, _) = d.stop_with("TERM", 30.0);
    assert_eq!(code, Some(0), "{}", d.log_text());

    let spool = dir.join("spool");
    let n = issued(&spool);
    assert_eq!(
        left_in_spool(&spool),
        0,
        "a clean stop with a broker flushes the spool"
    );
    wait_for(20.0, "every alarm at the subscriber", || {
        unique(&arrivals(&sub)) >= n
    });
    std::thread::sleep(Duration::from_millis(500));
    check_arrivals(&arrivals(&sub), n, outage_from);
}

#[test]
fn kill_9_loses_nothing_and_duplicates_only_keep_their_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let Rig {
        broker: _broker,
        sub,
        config: cfg,
        ..
    } = folder_rig(dir, 6, true, "");
    let log = dir.join("cras.log");
    let mut d = Daemon::start(&cfg, &log, &[]);
    wait_for(90.0, "first alarms", || arrivals(&sub).len() >= 3);
    d.kill9();
    let before = arrivals(&sub).len();
    // The broker publishes the last will.
    wait_for(30.0, "the last will", || {
        sub.on("/box1/status")
            .last()
            .is_some_and(|m| m.payload == "offline")
    });
    let mut d = Daemon::start(&cfg, &log, &[]);
    wait_for(90.0, "alarms after the restart", || {
        arrivals(&sub).len() >= before + 3
    });
    let (code, _) = d.stop_with("TERM", 30.0);
    assert_eq!(code, Some(0), "{}", d.log_text());
    let spool = dir.join("spool");
    let n = issued(&spool);
    assert_eq!(left_in_spool(&spool), 0);
    wait_for(20.0, "every alarm at the subscriber", || {
        unique(&arrivals(&sub)) >= n
    });
    std::thread::sleep(Duration::from_millis(500));
    check_arrivals(&arrivals(&sub), n, before);
}

/// The spool stores alarms, not topics: alarms spooled while the broker was unreachable
/// go out under the topic prefix configured when they are sent. The daemon starts with
/// a broker address where nothing listens; a reload gives it the real broker and a new
/// prefix; every spooled alarm then arrives, under the new prefix only.
#[test]
fn spooled_alarms_follow_a_prefix_change() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let line = line(dir);
    let broker = Broker::start(&dir.join("broker"));
    let sub = Subscriber::start(broker.port, "#");
    let http = free_port();
    let nowhere = format!("mqtt://127.0.0.1:{}", free_port());
    let cameras = [("cam1", "image-sequence", folder_params(&line, 6, true))];
    let cameras: Vec<(&str, &str, &str)> = cameras
        .iter()
        .map(|(a, b, c)| (*a, *b, c.as_str()))
        .collect();
    let cfg = write_config(dir, &line, &nowhere, http, &cameras, "");
    let mut d = Daemon::start(&cfg, &dir.join("cras.log"), &[]);
    wait_for(90.0, "alarms in the spool", || {
        metric(&metrics(http), "cras_alarms_spooled").is_some_and(|n| n >= 4.0)
    });
    write_config(
        dir,
        &line,
        &broker.url(),
        http,
        &cameras,
        "  topic_prefix: plant/line2\n",
    );
    signal(d.pid(), "HUP");
    wait_for(60.0, "the reload and the spool sent", || {
        let m = metrics(http);
        metric(&m, "cras_reloads_total") == Some(1.0)
            && metric(&m, "cras_broker_connected") == Some(1.0)
            && metric(&m, "cras_alarms_acknowledged_total").is_some_and(|n| n >= 4.0)
    });
    let (code, _) = d.stop_with("TERM", 30.0);
    assert_eq!(code, Some(0), "{}", d.log_text());
    let n = issued(&dir.join("spool"));
    wait_for(20.0, "every alarm at the subscriber", || {
        unique(&arrivals(&sub)) >= n
    });
    let alarms = sub.on("/alarm");
    for m in &alarms {
        assert!(
            m.topic.starts_with("plant/line2/plant1/box1/cam1/alarm"),
            "an alarm under the old prefix: {}",
            m.topic
        );
    }
    check_arrivals(&arrivals(&sub), n, 0);
}

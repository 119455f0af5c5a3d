//! A fleet with real mosquitto processes: two daemons with different device ids share an
//! edge broker (their own topics, client ids and last wills), and the edge broker is
//! bridged to a central one, the way a plant grows past one broker. Every alarm arrives
//! on the central broker exactly once, including those raised while the bridge was down.

mod common;

use common::daemon::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The config of device `id` on the edge broker: no `client_id`, so the default
/// (`cras-<site>-<device>`) is what keeps the two apart.
fn device_config(dir: &Path, line: &Line, broker_url: &str, id: &str) -> (PathBuf, u16) {
    let dev = dir.join(id);
    std::fs::create_dir_all(&dev).unwrap();
    let http = free_port();
    let params = folder_params(line, 4, false);
    let path = write_config(
        &dev,
        line,
        broker_url,
        http,
        &[("cam1", "image-sequence", &params)],
        "",
    );
    let yaml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("id: box1}", &format!("id: {id}}}"))
        .replace("  client_id: cras-test\n", "");
    assert!(yaml.contains(&format!("id: {id}}}")) && !yaml.contains("client_id"));
    std::fs::write(&path, yaml).unwrap();
    (path, http)
}

/// (device, sequence) -> how often it arrived, from the alarms a subscriber saw.
fn alarms_by_device(sub: &Subscriber) -> BTreeMap<(String, u64), usize> {
    let mut seen = BTreeMap::new();
    for m in sub.on("/cam1/alarm") {
        let a = m.json();
        let device = a["device"].as_str().unwrap().to_string();
        assert_eq!(
            m.topic,
            format!("cras/plant1/{device}/cam1/alarm"),
            "an alarm on another device's topic"
        );
        *seen
            .entry((device, a["sequence"].as_u64().unwrap()))
            .or_insert(0) += 1;
    }
    seen
}

fn retained_status(port: u16, device: &str) -> String {
    let out = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-t",
            &format!("cras/plant1/{device}/status"),
            "-C",
            "1",
            "-W",
            "3",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wait_judged(http: u16, n: usize) {
    wait_for(240.0, "every frame to be judged", || {
        frames_processed(http, "cam1") == n as f64
    });
}

#[test]
fn two_devices_share_an_edge_broker_bridged_to_a_central_one() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let line = line(dir);
    let n_frames = line.defective.len();
    let per_run = line.defective.iter().filter(|d| **d).count();
    assert!(per_run > 0);

    let mut central = Broker::start(&dir.join("central"));
    let bridge = format!(
        "allow_anonymous true\n\
         connection central\n\
         address 127.0.0.1:{}\n\
         topic cras/# out 1\n\
         cleansession false\n\
         remote_clientid edge1-bridge\n\
         restart_timeout 1\n\
         keepalive_interval 5\n",
        central.port
    );
    let edge = Broker::start_with(&dir.join("edge"), &bridge);
    let at_central = Subscriber::start(central.port, "cras/#");
    let at_edge = Subscriber::start(edge.port, "cras/#");

    // Both devices at once on the edge broker.
    let (cfg1, http1) = device_config(dir, &line, &edge.url(), "box1");
    let (cfg2, http2) = device_config(dir, &line, &edge.url(), "box2");
    let mut box1 = Daemon::start(&cfg1, &dir.join("box1.log"), &[]);
    let box2 = Daemon::start(&cfg2, &dir.join("box2.log"), &[]);
    wait_judged(http1, n_frames);
    wait_judged(http2, n_frames);
    let want: BTreeMap<(String, u64), usize> = ["box1", "box2"]
        .iter()
        .flat_map(|d| (0..per_run as u64).map(move |s| ((d.to_string(), s), 1)))
        .collect();
    wait_for(20.0, "both devices' alarms at the central broker", || {
        alarms_by_device(&at_central).len() >= want.len()
    });
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(alarms_by_device(&at_edge), want, "at the edge broker");
    assert_eq!(alarms_by_device(&at_central), want, "at the central broker");
    for l in [&box1.log_text(), &box2.log_text()] {
        // Two clients with one id throw each other off, over and over.
        assert!(
            l.matches("connected to the broker").count() == 1
                && !l.contains("no connection to the broker"),
            "a device lost its broker connection (a client-id collision?):\n{l}"
        );
    }
    assert_eq!(retained_status(edge.port, "box1"), "online");
    assert_eq!(retained_status(central.port, "box2"), "online");

    // One device dies: its last will marks it, and only it, offline, on both brokers.
    box1.kill9();
    wait_for(30.0, "box1's last will", || {
        retained_status(central.port, "box1") == "offline"
    });
    assert_eq!(retained_status(edge.port, "box1"), "offline");
    assert_eq!(retained_status(central.port, "box2"), "online");

    // The bridge goes down (the central broker stops); box1 comes back and raises its
    // alarms into the edge broker alone; the central broker returns and gets them once.
    central.stop();
    let mut box1 = Daemon::start(&cfg1, &dir.join("box1-again.log"), &[]);
    wait_judged(http1, n_frames);
    let mut want_later = want.clone();
    for s in per_run as u64..2 * per_run as u64 {
        want_later.insert(("box1".to_string(), s), 1);
    }
    wait_for(20.0, "the second run's alarms at the edge broker", || {
        alarms_by_device(&at_edge).len() >= want_later.len()
    });
    assert_eq!(
        alarms_by_device(&at_central),
        want,
        "nothing crosses a bridge that is down"
    );
    central.restart();
    wait_for(
        60.0,
        "the second run's alarms at the central broker",
        || alarms_by_device(&at_central).len() >= want_later.len(),
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(alarms_by_device(&at_edge), want_later, "at the edge broker");
    assert_eq!(
        alarms_by_device(&at_central),
        want_later,
        "at the central broker, after the bridge came back"
    );
    assert_eq!(retained_status(central.port, "box1"), "online");
    let (code, _) = box1.stop_with("TERM", 20.0);
    assert_eq!(code, Some(0));
    drop(box2);
    drop(edge);
}

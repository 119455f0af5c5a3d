//! SIGHUP reloads configuration and model atomically: a broken new configuration (bad
//! key, missing model) is rejected with the reason logged and published, the old one
//! keeps running; a good one is applied (new thresholds on the next alarms). sd_notify
//! sees RELOADING=1 and READY=1 again.

mod common;

use common::daemon::*;

#[test]
fn bad_reloads_are_rejected_and_good_ones_applied() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let Rig {
        line,
        broker: _broker,
        sub,
        http,
        config: cfg,
    } = folder_rig(dir, 6, true, "");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let (sock_path, notes) = notify_socket(dir);
    let mut d = Daemon::start(
        &cfg,
        &dir.join("cras.log"),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let processed = || frames_processed(http, "cam1");
    wait_for(90.0, "frames flowing", || processed() >= 3.0);
    // A looping folder camera is running and the model is loaded: healthy.
    let (code, body) = http_get(http, "/healthz").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    let bad_cases = [
        (
            good.replace(
                "  health_interval_s: 1\n",
                "  health_interval_s: 1\n  retain: yes\n",
            ),
            "retain",
        ),
        (
            good.replace(line.model.to_str().unwrap(), "/nonexistent/model"),
            "model.bundle",
        ),
    ];
    for (i, (yaml, needle)) in bad_cases.iter().enumerate() {
        std::fs::write(&cfg, yaml).unwrap();
        signal(d.pid(), "HUP");
        wait_for(20.0, "the reload to be rejected", || {
            http_get(http, "/metrics").and_then(|(_, m)| metric(&m, "cras_reloads_failed_total"))
                == Some(i as f64 + 1.0)
        });
        let log = d.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("reload rejected") && l.contains(needle)),
            "{log}"
        );
        // The reason is published in the health message too.
        wait_for(10.0, "the reason on MQTT", || {
            sub.on("/box1/health").last().is_some_and(|m| {
                m.json()["last_reload_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(needle))
            })
        });
        // And the old configuration keeps judging frames.
        let before = processed();
        wait_for(30.0, "frames still flowing", || processed() >= before + 3.0);
    }

    // A good new configuration: every frame alarms now (threshold 0).
    let zero = good.replace(
        &format!("alpha: {{image: {}", line.threshold),
        "alpha: {image: 0.0",
    );
    assert_ne!(zero, good);
    std::fs::write(&cfg, &zero).unwrap();
    signal(d.pid(), "HUP");
    wait_for(30.0, "the reload to apply", || {
        http_get(http, "/metrics").and_then(|(_, m)| metric(&m, "cras_reloads_total")) == Some(1.0)
    });
    wait_for(30.0, "alarms under the new threshold", || {
        sub.on("/cam1/alarm")
            .iter()
            .any(|m| m.json()["threshold"].as_f64() == Some(0.0))
    });
    let (code, _) = d.stop_with("TERM", 30.0);
    assert_eq!(code, Some(0), "{}", d.log_text());
    let notes = notes.lock().unwrap().join("\n");
    assert!(notes.contains("RELOADING=1"), "{notes}");
    assert!(notes.matches("READY=1").count() >= 4, "{notes}");
}

/// A new configuration that passes every check but cannot start (its spool holds a
/// corrupt counter and no alarm to recover it from) is rejected after the old stages
/// were stopped: the old configuration is started again and alarms keep arriving.
#[test]
fn a_reload_that_cannot_start_goes_back_to_the_old_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let rig = folder_rig(dir, 6, true, "");
    let good = std::fs::read_to_string(&rig.config).unwrap();
    let mut d = Daemon::start(&rig.config, &dir.join("cras.log"), &[]);
    let processed = || frames_processed(rig.http, "cam1");
    wait_for(90.0, "frames flowing", || processed() >= 3.0);

    let broken = dir.join("broken-spool");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("next-sequence"), "garbage").unwrap();
    let old_spool = dir.join("spool").display().to_string();
    let moved = good.replace(&old_spool, &broken.display().to_string());
    assert_ne!(moved, good);
    std::fs::write(&rig.config, &moved).unwrap();
    let pipelines = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines");
    let (code, out, err) = common::cras(&[
        "check-config",
        rig.config.to_str().unwrap(),
        "--pipelines",
        pipelines,
    ]);
    assert_eq!(code, 0, "check-config should pass: {out}{err}");

    signal(d.pid(), "HUP");
    wait_for(30.0, "the reload to be rejected", || {
        http_get(rig.http, "/metrics").and_then(|(_, m)| metric(&m, "cras_reloads_failed_total"))
            == Some(1.0)
    });
    let log = d.log_text();
    assert!(
        log.contains("reload rejected, starting the previous configuration again")
            && log.contains("next-sequence"),
        "{log}"
    );
    // The old configuration runs again: frames, health and alarms.
    let before = processed();
    wait_for(30.0, "frames flowing again", || processed() >= before + 3.0);
    wait_for(20.0, "healthy again", || {
        http_get(rig.http, "/healthz").map(|(c, _)| c) == Some(200)
    });
    let alarms = rig.sub.on("/cam1/alarm").len();
    wait_for(30.0, "alarms after the failed reload", || {
        rig.sub.on("/cam1/alarm").len() > alarms
    });
    let (code, _) = d.stop_with("TERM", 30.0);
    assert_eq!(code, Some(0), "{}", d.log_text());
}

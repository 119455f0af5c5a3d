//! A lost RTSP camera comes back by itself: `cras run` reads a real RTSP server
//! (gst-rtsp-server serving H.264 from a test source, in a separate process so that
//! killing it is a camera losing power); the camera goes `reconnecting` with a reason
//! while the server is gone and `running` again, with frames judged, once it is back.

mod common;

use common::daemon::*;
use common::*;
use std::process::{Child, Command, Stdio};

/// Not a test: the RTSP server, run in a child process by the test below.
#[test]
fn rtsp_server_process() {
    let Ok(port) = std::env::var("CRAS_TEST_RTSP_SERVE") else {
        return;
    };
    use gstreamer_rtsp_server::prelude::*;
    gstreamer::init().unwrap();
    let main_loop = gstreamer::glib::MainLoop::new(None, false);
    let server = gstreamer_rtsp_server::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&port);
    let mounts = server.mount_points().unwrap();
    let factory = gstreamer_rtsp_server::RTSPMediaFactory::new();
    factory.set_launch(
        "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=10/1 \
         ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 )",
    );
    factory.set_shared(true);
    mounts.add_factory("/cam", factory);
    let _id = server.attach(None).unwrap();
    main_loop.run();
}

fn serve(port: u16) -> Child {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rtsp_server_process", "--nocapture"])
        .env("CRAS_TEST_RTSP_SERVE", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(20.0, "the RTSP server", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    child
}

#[test]
fn lost_rtsp_camera_reconnects() {
    if std::env::var("CRAS_TEST_RTSP_SERVE").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let model = lite0_bundle(dir, "model");
    let port = free_port();
    let mut server = serve(port);
    let http = free_port();
    let yaml = format!(
        "device: {{site: plant1, id: box1}}\n\
         model: {{bundle: {}, threads: 1, thresholds: {{alpha: {{image: 0.99}}, beta: {{image: 0.99}}}}}}\n\
         cameras:\n  - id: door\n    pipeline: rtsp\n    params: {{url: \"rtsp://127.0.0.1:{port}/cam\", latency_ms: 100, protocols: tcp}}\n    max_fps: 5\n    stall_timeout_s: 3\n\
         mqtt: {{url: \"mqtt://127.0.0.1:{}\", client_id: c}}\n\
         spool: {{dir: {}}}\n\
         http: {{listen: \"127.0.0.1:{http}\"}}\n",
        model.display(),
        free_port(),
        dir.join("spool").display()
    );
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let mut d = Daemon::start(&cfg, &dir.join("cras.log"), &[]);
    let processed = || frames_processed(http, "door");
    wait_for(60.0, "frames from the RTSP camera", || processed() >= 5.0);
    assert_eq!(http_get(http, "/healthz").unwrap().0, 200);

    // The camera loses power.
    let _ = server.kill();
    let _ = server.wait();
    wait_for(30.0, "the camera to be reported lost", || {
        http_get(http, "/healthz")
            .is_some_and(|(code, body)| code == 503 && body.contains("camera door: reconnecting"))
    });
    let lost_at = processed();

    // It comes back on the same address.
    let mut server = serve(port);
    wait_for(90.0, "the camera to come back", || {
        processed() >= lost_at + 5.0
            && http_get(http, "/healthz").is_some_and(|(code, _)| code == 200)
    });
    let (code, _) = d.stop_with("TERM", 30.0);
    assert_eq!(code, Some(0), "{}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains("camera lost:") && log.contains("camera=door"),
        "{log}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

//! TLS to the broker, as a plant runs it: mosquitto with a certificate from a private CA
//! and a password file, `cras run` with `mqtts://`, `mqtt.tls.ca`, a username and the
//! password from a file. Alarms arrive; the password appears in no log line.

mod common;

use common::daemon::*;
use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl not installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alarms_arrive_over_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    openssl(
        &pki,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=cras test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        &pki,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        pki.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        &pki,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    let secret = "Pl4nt-s3cret";
    let passwd = dir.join("mosquitto.passwd");
    std::fs::write(&passwd, "").unwrap();
    let st = Command::new("mosquitto_passwd")
        .args(["-b", passwd.to_str().unwrap(), "cras", secret])
        .status()
        .unwrap();
    assert!(st.success());
    let broker = Broker::start_with(
        &dir.join("broker"),
        &format!(
            "allow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\n",
            passwd.display(),
            pki.join("ca.pem").display(),
            pki.join("server.pem").display(),
            pki.join("server.key").display()
        ),
    );
    let sub = Subscriber::start_with(
        broker.port,
        "cras/#",
        &[
            "-h",
            "localhost",
            "--cafile",
            pki.join("ca.pem").to_str().unwrap(),
            "-u",
            "cras",
            "-P",
            secret,
        ],
    );
    let line = line(dir);
    let pw_file = dir.join("mqtt-password");
    std::fs::write(&pw_file, format!("{secret}\n")).unwrap();
    let http = free_port();
    let cfg = write_config(
        dir,
        &line,
        &format!("mqtts://localhost:{}", broker.port),
        http,
        &[("cam1", "image-sequence", &folder_params(&line, 6, false))],
        &format!(
            "  tls: {{ca: {}}}\n  username: cras\n  password_file: {}\n",
            pki.join("ca.pem").display(),
            pw_file.display()
        ),
    );
    let mut d = Daemon::start(&cfg, &dir.join("cras.log"), &[]);
    let expected = line.defective.iter().filter(|d| **d).count();
    wait_for(90.0, "the alarms over TLS", || {
        sub.on("/cam1/alarm").len() >= expected
    });
    assert_eq!(
        sub.on("/box1/status").first().map(|m| m.payload.as_str()),
        Some("online")
    );
    let (code, _) = d.stop_with("TERM", 30.0);
    assert_eq!(code, Some(0), "{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("connected to the broker at mqtts://"), "{log}");
    assert!(!log.contains(secret), "the password leaked into the log");
    for m in sub.messages.lock().unwrap().iter() {
        assert!(
            !m.payload.contains(secret),
            "the password leaked into {}",
            m.topic
        );
    }
}

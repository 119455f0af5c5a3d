//! Real MQTT parts for the daemon tests: a mosquitto broker on a loopback port (with
//! persistence, so queued messages survive its restart) and a mosquitto_sub subscriber
//! with a persistent session; with the process helpers they share (free ports, tools on
//! the PATH, waiting, signals).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn require(tool: &str) {
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` is not installed; .ci/run lists what to install (apt-get install ...)"
    );
}

/// Waits until `f` holds, or panics with `what` after `secs`.
pub fn wait_for(secs: f64, what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < until {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {secs} s waiting for {what}");
}

pub struct Broker {
    pub port: u16,
    dir: PathBuf,
    /// Extra lines for the listener (TLS files, password file).
    extra: String,
    child: Option<Child>,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        Broker::start_with(dir, "allow_anonymous true\n")
    }

    /// A broker whose listener takes `extra` configuration lines.
    pub fn start_with(dir: &Path, extra: &str) -> Broker {
        require("mosquitto");
        std::fs::create_dir_all(dir).unwrap();
        let mut b = Broker {
            port: free_port(),
            dir: dir.to_path_buf(),
            extra: extra.to_string(),
            child: None,
        };
        b.restart();
        b
    }

    /// (Re)starts the broker on the same port with the same persistence file.
    pub fn restart(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                // `user root`: started as root (CI), mosquitto would switch to its own user,
                // which cannot read the test's private temporary folder. Ignored otherwise.
                "user root\nlistener {} 127.0.0.1\n{}persistence true\npersistence_location {}/\n",
                self.port,
                self.extra,
                self.dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        wait_for(10.0, "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Stops the broker (SIGTERM: it saves its queued messages).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// One message as mosquitto_sub printed it (`-v`: topic, space, payload).
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: String,
}

impl Message {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload)
            .unwrap_or_else(|e| panic!("not JSON on {}: {e}: {}", self.topic, self.payload))
    }
}

/// mosquitto_sub with a persistent QoS 1 session: it reconnects by itself, and the
/// broker keeps its messages while it is away.
pub struct Subscriber {
    child: Child,
    pub messages: Arc<Mutex<Vec<Message>>>,
}

impl Subscriber {
    pub fn start(port: u16, topic: &str) -> Subscriber {
        Subscriber::start_with(port, topic, &["-h", "127.0.0.1"])
    }

    /// With extra mosquitto_sub arguments (host, TLS, credentials).
    pub fn start_with(port: u16, topic: &str, args: &[&str]) -> Subscriber {
        require("mosquitto_sub");
        let mut child = std::process::Command::new("mosquitto_sub")
            .args(args)
            .args(["-p", &port.to_string(), "-t", topic])
            .args(["-q", "1", "-c", "-i", &format!("test-sub-{port}"), "-v"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some((topic, payload)) = line.split_once(' ') {
                    sink.lock().unwrap().push(Message {
                        topic: topic.to_string(),
                        payload: payload.to_string(),
                    });
                }
            }
        });
        // Let the subscription reach the broker before anything is published.
        std::thread::sleep(Duration::from_millis(500));
        Subscriber { child, messages }
    }

    pub fn on(&self, suffix: &str) -> Vec<Message> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.topic.ends_with(suffix))
            .cloned()
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

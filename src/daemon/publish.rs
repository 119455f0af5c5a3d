//! Publishing to SCADA over MQTT (rumqttc), with the alarm spool in front.
//!
//! Every alarm is written to the [`AlarmSpool`] (fsynced) before it is offered to the
//! broker, and leaves it only when the broker's PUBACK for it arrives. rumqttc keeps no
//! disk state and, with a clean session, forgets what it had in flight when the
//! connection drops; the spool is what survives.
//!
//! Two threads: the connection thread drives rumqttc's event loop, and the publisher
//! thread owns the spool and decides what to send. Each connection gets a fresh rumqttc
//! client (a "generation"), handed to the publisher on CONNACK: a publish request cannot
//! linger in an old client's queue and go out again after a reconnect, so a broker outage
//! delivers every alarm once, in order. At most [`WINDOW`] alarms are in flight; PUBACKs
//! are matched to alarms through the packet ids rumqttc reports as it sends (rumqttc
//! sends requests in order, and with fewer alarms in flight than its packet-id ring, ids
//! never collide).

use super::judging::Judged;
use super::telemetry::Telemetry;
use crate::alarm::{AlarmPayload, SCHEMA_VERSION, Topics, rfc3339_utc};
use crate::config::{MqttConfig, SpoolConfig};
use crate::spool::AlarmSpool;
use crossbeam_channel::{Receiver, Sender};
use rumqttc::{Client, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Alarms in flight (sent, not yet acknowledged) at most.
pub const WINDOW: usize = 16;
/// rumqttc's in-flight limit: larger than [`WINDOW`] so its packet ids never collide.
const RUMQTTC_INFLIGHT: u16 = 64;
/// Regions listed in one alarm at most (largest first); `regions_total` has the count.
pub const MAX_REGIONS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("mqtt.url `{0}`: {1}")]
    Url(String, String),
    #[error("mqtt.tls: {0}")]
    Tls(String),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
}

/// What the publisher needs from the configuration.
#[derive(Clone)]
pub struct PublisherSettings {
    pub mqtt: MqttConfig,
    pub password: Option<String>,
    pub spool: SpoolConfig,
    pub site: String,
    pub device: String,
}

impl PublisherSettings {
    /// Whether a change from `self` to `other` needs a new connection or spool.
    pub fn differs(&self, other: &PublisherSettings) -> bool {
        self.mqtt != other.mqtt
            || self.password != other.password
            || self.spool != other.spool
            || self.site != other.site
            || self.device != other.device
    }
}

/// Host and port of an `mqtt://` / `mqtts://` URL.
pub fn parse_url(url: &str) -> Result<(String, u16, bool), PublishError> {
    let bad = |why: &str| PublishError::Url(url.to_string(), why.to_string());
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(bad("use mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err(bad("no host"));
    }
    Ok((host.to_string(), port, tls))
}

fn tls_config(mqtt: &MqttConfig) -> Result<Transport, PublishError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = mqtt
        .tls
        .as_ref()
        .ok_or_else(|| PublishError::Tls("an mqtts:// URL needs tls.ca".into()))?;
    let mut roots = rustls::RootCertStore::empty();
    let cas: Vec<CertificateDer> = CertificateDer::pem_file_iter(&tls.ca)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| PublishError::Tls(format!("ca {}: {e}", tls.ca.display())))?;
    if cas.is_empty() {
        return Err(PublishError::Tls(format!(
            "ca {}: no certificate in the file",
            tls.ca.display()
        )));
    }
    for c in cas {
        roots
            .add(c)
            .map_err(|e| PublishError::Tls(format!("ca {}: {e}", tls.ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PublishError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| PublishError::Tls(format!("cert {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| PublishError::Tls(format!("key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| PublishError::Tls(format!("client certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ))
}

/// rumqttc options: clean session, last will "offline" (retained) on the status topic.
pub fn mqtt_options(s: &PublisherSettings, topics: &Topics) -> Result<MqttOptions, PublishError> {
    let (host, port, tls) = parse_url(&s.mqtt.url)?;
    let mut o = MqttOptions::new(&s.mqtt.client_id, host, port);
    o.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(true)
        .set_inflight(RUMQTTC_INFLIGHT)
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_last_will(LastWill::new(
            topics.status(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    if let (Some(user), Some(pass)) = (&s.mqtt.username, &s.password) {
        o.set_credentials(user, pass);
    } else if let Some(user) = &s.mqtt.username {
        o.set_credentials(user, "");
    }
    if tls {
        o.set_transport(tls_config(&s.mqtt)?);
    }
    Ok(o)
}

/// What the connection thread reports, tagged with its connection generation.
enum ConnEvent {
    Up(u64, Client),
    Down(u64, String),
    Sent(u64, u16),
    Acked(u64, u16),
}

fn drive_connection(options: MqttOptions, events: Sender<ConnEvent>, stop: Arc<AtomicBool>) {
    let mut generation = 0u64;
    let mut backoff = Duration::from_millis(500);
    while !stop.load(Ordering::Relaxed) {
        generation += 1;
        let (client, mut connection) = Client::new(options.clone(), 64);
        let mut client = Some(client);
        loop {
            match connection.recv() {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    backoff = Duration::from_millis(500);
                    if let Some(c) = client.take() {
                        let _ = events.send(ConnEvent::Up(generation, c));
                    }
                }
                Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                    let _ = events.send(ConnEvent::Acked(generation, a.pkid));
                }
                Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    let _ = events.send(ConnEvent::Sent(generation, pkid));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let _ = events.send(ConnEvent::Down(generation, e.to_string()));
                    break;
                }
                // Every client handle is gone: the publisher has finished.
                Err(_) => return,
            }
        }
        drop(connection);
        let until = Instant::now() + backoff;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The live connection of one generation.
struct Session {
    generation: u64,
    client: Client,
    /// One entry per publish request, in order: the alarm's spool sequence, if any.
    sent: VecDeque<Option<u64>>,
    /// Packet id -> spool sequence of alarms waiting for their PUBACK.
    awaiting: HashMap<u16, u64>,
}

/// The running publisher; [`Publisher::stop`] flushes and ends it.
pub struct Publisher {
    pub settings: PublisherSettings,
    input: Option<Sender<Judged>>,
    thread: Option<JoinHandle<()>>,
    flush_until: Arc<std::sync::Mutex<Option<Instant>>>,
    conn_stop: Arc<AtomicBool>,
    conn_thread: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Opens the spool and starts connecting; alarms are accepted at once, whether or
    /// not a broker is there.
    pub fn start(
        settings: PublisherSettings,
        telemetry: Arc<Telemetry>,
    ) -> Result<Publisher, PublishError> {
        let topics = Topics::new(
            &settings.mqtt.topic_prefix,
            &settings.site,
            &settings.device,
        );
        let options = mqtt_options(&settings, &topics)?;
        let spool = AlarmSpool::open(&settings.spool.dir, settings.spool.max_bytes)?;
        let waiting = spool.stats().queued;
        if waiting > 0 {
            tracing::info!(
                "{waiting} alarm(s) from before the restart wait in the spool {}; they go first",
                settings.spool.dir.display()
            );
        }
        let (tx, rx) = crossbeam_channel::bounded::<Judged>(256);
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
        let conn_stop = Arc::new(AtomicBool::new(false));
        let conn_thread = {
            let stop = conn_stop.clone();
            std::thread::Builder::new()
                .name("mqtt".into())
                .spawn(move || drive_connection(options, ev_tx, stop))
                .map_err(|e| PublishError::Thread("mqtt", e))?
        };
        let flush_until = Arc::new(std::sync::Mutex::new(None));
        let worker = PublisherLoop {
            topics,
            settings: settings.clone(),
            spool,
            telemetry,
            session: None,
            input: rx,
            events: ev_rx,
            flush_until: flush_until.clone(),
            last_result: BTreeMap::new(),
            outage_logged: false,
        };
        let thread = std::thread::Builder::new()
            .name("publish".into())
            .spawn(move || worker.run())
            .map_err(|e| PublishError::Thread("publish", e))?;
        Ok(Publisher {
            settings,
            input: Some(tx),
            thread: Some(thread),
            flush_until,
            conn_stop,
            conn_thread: Some(conn_thread),
        })
    }

    /// Where judged frames go.
    pub fn sender(&self) -> Sender<Judged> {
        self.input
            .clone()
            .unwrap_or_else(|| crossbeam_channel::bounded(0).0)
    }

    /// Stops after the stages feeding it are gone: delivers what the spool holds for up
    /// to `flush`, publishes "offline", disconnects. Undelivered alarms stay on disk.
    pub fn stop(mut self, flush: Duration) {
        if let Ok(mut f) = self.flush_until.lock() {
            *f = Some(Instant::now() + flush);
        }
        self.input = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.conn_stop.store(true, Ordering::Relaxed);
        // The connection thread ends once the client is gone or its connect attempt
        // times out; do not wait long for a broker that is not there.
        if let Some(t) = self.conn_thread.take() {
            let until = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

struct PublisherLoop {
    topics: Topics,
    settings: PublisherSettings,
    spool: AlarmSpool,
    telemetry: Arc<Telemetry>,
    session: Option<Session>,
    input: Receiver<Judged>,
    events: Receiver<ConnEvent>,
    flush_until: Arc<std::sync::Mutex<Option<Instant>>>,
    last_result: BTreeMap<String, Instant>,
    outage_logged: bool,
}

impl PublisherLoop {
    fn run(mut self) {
        let health_every = Duration::from_secs(self.settings.mqtt.health_interval_s);
        let mut next_health = Instant::now() + health_every;
        let mut input_open = true;
        let closed = crossbeam_channel::never();
        loop {
            self.telemetry.beat(2);
            crossbeam_channel::select! {
                recv(if input_open { &self.input } else { &closed }) -> msg => match msg {
                    Ok(j) => self.accept(j),
                    Err(_) => input_open = false,
                },
                recv(self.events) -> ev => {
                    if let Ok(ev) = ev {
                        self.handle(ev);
                    }
                }
                default(Duration::from_millis(100)) => {}
            }
            // Take everything else already waiting before sending.
            while let Ok(j) = self.input.try_recv() {
                self.accept(j);
            }
            while let Ok(ev) = self.events.try_recv() {
                self.handle(ev);
            }
            self.send_spooled();
            let changed = self.telemetry.changed.swap(false, Ordering::Relaxed);
            if changed || Instant::now() >= next_health {
                next_health = Instant::now() + health_every;
                self.publish_health();
            }
            self.update_stats();
            let flush_until = self.flush_until.lock().ok().and_then(|f| *f);
            if let Some(until) = flush_until
                && !input_open
            {
                let st = self.spool.stats();
                let delivered = st.queued == 0 && st.in_flight == 0;
                if delivered || self.session.is_none() || Instant::now() >= until {
                    if !delivered {
                        tracing::warn!(
                            "stopping with {} alarm(s) undelivered; they stay in the spool {} for the next start",
                            st.queued + st.in_flight,
                            self.settings.spool.dir.display()
                        );
                    }
                    break;
                }
            }
        }
        if let Some(s) = self.session.take() {
            let _ = s
                .client
                .publish(self.topics.status(), QoS::AtLeastOnce, true, "offline");
            let _ = s.client.disconnect();
        }
        self.telemetry
            .broker_connected
            .store(false, Ordering::Relaxed);
    }

    /// Stores an anomalous frame's alarm durably; publishes the rate-limited result.
    fn accept(&mut self, j: Judged) {
        if j.verdict.anomalous {
            let topic = self.topics.alarm(&j.camera);
            let s = &self.settings;
            let regions_total = j.verdict.regions.len();
            let mut regions = j.verdict.regions.clone();
            regions.truncate(MAX_REGIONS);
            let r = self.spool.push_with(|sequence| {
                let payload = AlarmPayload {
                    schema: SCHEMA_VERSION,
                    device: s.device.clone(),
                    site: s.site.clone(),
                    camera: j.camera.clone(),
                    sequence,
                    frame: j.frame,
                    captured_at: rfc3339_utc(j.captured_ms),
                    class: j.class.clone(),
                    detected_class: j.detected_class.clone(),
                    score: j.verdict.score,
                    threshold: j.verdict.threshold,
                    regions,
                    regions_total,
                    model_id: j.model_id.clone(),
                    latency: j.latency.clone(),
                };
                let mut bytes = topic.into_bytes();
                bytes.push(b'\n');
                bytes.extend(serde_json::to_vec(&payload).unwrap_or_default());
                bytes
            });
            match r {
                Ok(_) => {
                    self.telemetry.alarms_total.fetch_add(1, Ordering::Relaxed);
                    let evicted = self.spool.stats().evicted_total;
                    if evicted > self.telemetry.alarms_evicted.load(Ordering::Relaxed) {
                        tracing::warn!(
                            "the alarm spool {} is full ({} bytes): {evicted} oldest alarm(s) evicted so far",
                            self.settings.spool.dir.display(),
                            self.settings.spool.max_bytes
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(camera = %j.camera, frame = j.frame, "alarm not stored: {e}")
                }
            }
        }
        let rate = self.settings.mqtt.result_rate_hz;
        if rate > 0.0
            && let Some(session) = &mut self.session
        {
            let due = self
                .last_result
                .get(&j.camera)
                .is_none_or(|t| t.elapsed().as_secs_f64() >= 1.0 / rate);
            if due {
                self.last_result.insert(j.camera.clone(), Instant::now());
                let payload = serde_json::json!({
                    "schema": SCHEMA_VERSION,
                    "device": self.settings.device,
                    "camera": j.camera,
                    "frame": j.frame,
                    "captured_at": rfc3339_utc(j.captured_ms),
                    "class": j.class,
                    "score": j.verdict.score,
                    "threshold": j.verdict.threshold,
                    "anomalous": j.verdict.anomalous,
                    "model_id": j.model_id,
                    "latency": j.latency,
                });
                if session
                    .client
                    .try_publish(
                        self.topics.result(&j.camera),
                        QoS::AtMostOnce,
                        false,
                        payload.to_string(),
                    )
                    .is_ok()
                {
                    session.sent.push_back(None);
                    self.telemetry
                        .results_published
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn handle(&mut self, ev: ConnEvent) {
        let current = self.session.as_ref().map(|s| s.generation);
        match ev {
            ConnEvent::Up(generation, client) => {
                tracing::info!("connected to the broker at {}", self.settings.mqtt.url);
                self.outage_logged = false;
                self.spool.requeue_in_flight();
                let mut session = Session {
                    generation,
                    client,
                    sent: VecDeque::new(),
                    awaiting: HashMap::new(),
                };
                if session
                    .client
                    .publish(self.topics.status(), QoS::AtLeastOnce, true, "online")
                    .is_ok()
                {
                    session.sent.push_back(None);
                }
                self.session = Some(session);
                self.telemetry
                    .broker_connected
                    .store(true, Ordering::Relaxed);
                self.telemetry.changed.store(true, Ordering::Relaxed);
            }
            ConnEvent::Down(generation, reason) => {
                if current == Some(generation) {
                    self.session = None;
                    self.spool.requeue_in_flight();
                    self.telemetry
                        .broker_connected
                        .store(false, Ordering::Relaxed);
                }
                if !self.outage_logged {
                    self.outage_logged = true;
                    tracing::warn!(
                        "no connection to the broker at {}: {reason}; alarms wait in the spool {} and go out in order once it is back",
                        self.settings.mqtt.url,
                        self.settings.spool.dir.display()
                    );
                } else {
                    tracing::debug!("broker still unreachable: {reason}");
                }
            }
            ConnEvent::Sent(generation, pkid) => {
                if let Some(s) = self.session.as_mut().filter(|s| s.generation == generation)
                    && let Some(Some(seq)) = s.sent.pop_front()
                {
                    s.awaiting.insert(pkid, seq);
                }
            }
            ConnEvent::Acked(generation, pkid) => {
                if let Some(s) = self.session.as_mut().filter(|s| s.generation == generation)
                    && let Some(seq) = s.awaiting.remove(&pkid)
                {
                    match self.spool.acknowledge(seq) {
                        Ok(()) => {
                            self.telemetry
                                .alarms_acknowledged
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tracing::error!("alarm spool: {e}"),
                    }
                }
            }
        }
    }

    /// Offers spooled alarms, oldest first, while the window allows.
    fn send_spooled(&mut self) {
        let Some(session) = &mut self.session else {
            return;
        };
        while self.spool.stats().in_flight < WINDOW {
            let (seq, bytes) = match self.spool.next_to_send() {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("alarm spool: {e}");
                    break;
                }
            };
            let Some(nl) = bytes.iter().position(|b| *b == b'\n') else {
                tracing::error!("spooled alarm {seq} has no topic line; dropped");
                let _ = self.spool.acknowledge(seq);
                continue;
            };
            let topic = String::from_utf8_lossy(&bytes[..nl]).into_owned();
            let payload = bytes[nl + 1..].to_vec();
            if session
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                // The connection is going away; its Down event requeues the alarm.
                break;
            }
            session.sent.push_back(Some(seq));
        }
    }

    fn publish_health(&mut self) {
        let Some(session) = &mut self.session else {
            return;
        };
        let st = self.spool.stats();
        let payload = self.telemetry.health_json(
            &self.settings.device,
            &self.settings.site,
            st.queued + st.in_flight,
        );
        if session
            .client
            .try_publish(
                self.topics.health(),
                QoS::AtMostOnce,
                false,
                payload.to_string(),
            )
            .is_ok()
        {
            session.sent.push_back(None);
        }
    }

    fn update_stats(&self) {
        let st = self.spool.stats();
        let t = &self.telemetry;
        t.alarms_spooled
            .store((st.queued + st.in_flight) as u64, Ordering::Relaxed);
        t.spool_bytes.store(st.bytes, Ordering::Relaxed);
        t.alarms_evicted.store(st.evicted_total, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_port_and_tls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_url("mqtts://broker.plant").unwrap(),
            ("broker.plant".into(), 8883, true)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1883").unwrap(),
            ("::1".into(), 1883, false)
        );
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
        assert!(parse_url("mqtt://host:port").is_err());
    }
}

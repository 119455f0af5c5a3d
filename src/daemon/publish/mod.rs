//! Publishing to SCADA over MQTT (rumqttc), with the alarm spool in front.
//!
//! Every alarm is written to the [`AlarmSpool`] (fsynced) before it is offered to the
//! broker, and leaves it only when the broker's PUBACK for it arrives. rumqttc keeps no
//! disk state and, with a clean session, forgets what it had in flight when the
//! connection drops; the spool is what survives.
//!
//! Two threads: the connection thread ([`connection`]) drives rumqttc's event loop, and
//! the publisher thread owns the spool and its [`delivery`] bookkeeping and decides what
//! to send. A broker outage delivers every alarm once, in order; at most
//! [`delivery::WINDOW`] alarms are in flight. The payloads are in [`payload`].

pub mod connection;
pub mod delivery;
pub mod payload;
mod rate;
pub mod spool;

use super::judging::Judged;
use super::telemetry::{Stage, Telemetry};
use crate::daemon::config::redact_credentials;
use connection::ConnEvent;
use connection::MqttConfig;
use crossbeam_channel::{Receiver, Sender};
use delivery::Delivery;
use payload::{AlarmPayload, Topics};
use rumqttc::{Client, QoS};
use spool::{AlarmSpool, SpoolConfig, SpoolError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("mqtt.url `{0}`: {1}")]
    Url(String, String),
    #[error("{key}: {reason}")]
    Tls { key: &'static str, reason: String },
    #[error(transparent)]
    Spool(#[from] SpoolError),
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
        let options = connection::mqtt_options(&settings, &topics)?;
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
                .spawn(move || connection::drive_connection(options, ev_tx, stop))
                .map_err(|e| PublishError::Thread("mqtt", e))?
        };
        let flush_until = Arc::new(std::sync::Mutex::new(None));
        let worker = PublisherLoop {
            topics,
            settings: settings.clone(),
            delivery: Delivery::new(spool),
            telemetry,
            link: None,
            input: rx,
            events: ev_rx,
            flush_until: flush_until.clone(),
            results: rate::ResultRate::new(settings.mqtt.result_rate_hz),
            outage_logged: false,
            unstored: 0,
            refusal_logged: false,
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

    /// Whether the publisher thread ended (it only ends on [`Publisher::stop`], unless it
    /// panicked).
    pub fn has_stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Where judged frames go.
    pub fn sender(&self) -> Sender<Judged> {
        self.input
            .clone()
            .unwrap_or_else(|| crossbeam_channel::bounded(0).0)
    }

    /// Stops after the stages feeding it are gone: delivers what the spool holds for up
    /// to `flush`, publishes "offline", disconnects. Undelivered alarms stay on disk.
    pub fn stop(&mut self, flush: Duration) {
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
    delivery: Delivery,
    telemetry: Arc<Telemetry>,
    /// The live connection's client and its generation.
    link: Option<(u64, Client)>,
    input: Receiver<Judged>,
    events: Receiver<ConnEvent>,
    flush_until: Arc<std::sync::Mutex<Option<Instant>>>,
    results: rate::ResultRate,
    outage_logged: bool,
    /// Alarms lost before the spool numbered them (not encodable, counter not writable).
    unstored: u64,
    /// A refused publish was logged for this connection.
    refusal_logged: bool,
}

impl PublisherLoop {
    fn run(mut self) {
        let health_every = Duration::from_secs(self.settings.mqtt.health_interval_s);
        let mut next_health = Instant::now() + health_every;
        let mut input_open = true;
        let closed = crossbeam_channel::never();
        loop {
            self.telemetry.beat(Stage::Publish);
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
                let st = self.delivery.stats();
                let delivered = st.queued == 0 && st.in_flight == 0;
                if delivered || self.link.is_none() || Instant::now() >= until {
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
        if let Some((_, client)) = self.link.take() {
            let _ = client.publish(self.topics.status(), QoS::AtLeastOnce, true, "offline");
            let _ = client.disconnect();
        }
        self.telemetry
            .broker_connected
            .store(false, Ordering::Relaxed);
    }

    /// Stores an anomalous frame's alarm durably; publishes the rate-limited result.
    fn accept(&mut self, j: Judged) {
        if j.verdict.anomalous {
            self.store_alarm(&j);
        }
        if let Some((_, client)) = &self.link
            && self.results.admit(&j.camera, Instant::now())
        {
            let body = payload::result_json(&j, &self.settings.device).to_string();
            if client
                .try_publish(self.topics.result(&j.camera), QoS::AtMostOnce, false, body)
                .is_ok()
            {
                self.delivery.requested(None);
                self.telemetry
                    .results_published
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Spools the alarm of an anomalous frame. One that cannot be stored (or encoded) is
    /// logged and counted in `cras_alarms_failed_total`; nothing half-made is spooled.
    fn store_alarm(&mut self, j: &Judged) {
        let (site, device) = (&self.settings.site, &self.settings.device);
        let r = self.delivery.store(|sequence| {
            let alarm = AlarmPayload::new(j, sequence, site, device);
            crate::daemon::evidence::encode_alarm(alarm, j.evidence.as_ref()).map_err(|e| {
                SpoolError::Encode {
                    sequence,
                    reason: e.to_string(),
                }
            })
        });
        match r {
            Ok(_) => {
                self.telemetry.alarms_total.fetch_add(1, Ordering::Relaxed);
                let evicted = self.delivery.stats().evicted_total;
                if evicted > self.telemetry.alarms_evicted.load(Ordering::Relaxed) {
                    tracing::warn!(
                        "the alarm spool {} is full ({} bytes): {evicted} oldest alarm(s) evicted so far",
                        self.settings.spool.dir.display(),
                        self.settings.spool.max_bytes
                    );
                }
            }
            Err(e) => {
                // Lost and TooLarge used a sequence number (a gap) and the spool counts
                // them; the others never got one.
                if !matches!(e, SpoolError::Lost { .. } | SpoolError::TooLarge { .. }) {
                    self.unstored += 1;
                }
                self.update_stats();
                tracing::error!(camera = %j.camera, frame = j.frame, "alarm not stored: {e}")
            }
        }
    }

    fn handle(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Up(generation, client) => {
                tracing::info!(
                    "connected to the broker at {}",
                    redact_credentials(&self.settings.mqtt.url)
                );
                self.outage_logged = false;
                self.refusal_logged = false;
                self.delivery.connected(generation);
                if client
                    .publish(self.topics.status(), QoS::AtLeastOnce, true, "online")
                    .is_ok()
                {
                    self.delivery.requested(None);
                }
                self.link = Some((generation, client));
                self.telemetry
                    .broker_connected
                    .store(true, Ordering::Relaxed);
                self.telemetry.changed.store(true, Ordering::Relaxed);
            }
            ConnEvent::Down(generation, reason) => {
                if self.delivery.disconnected(generation) {
                    self.link = None;
                    self.telemetry
                        .broker_connected
                        .store(false, Ordering::Relaxed);
                }
                if !self.outage_logged {
                    self.outage_logged = true;
                    tracing::warn!(
                        "no connection to the broker at {}: {reason}; alarms wait in the spool {} and go out in order once it is back",
                        redact_credentials(&self.settings.mqtt.url),
                        self.settings.spool.dir.display()
                    );
                } else {
                    tracing::debug!("broker still unreachable: {reason}");
                }
            }
            ConnEvent::Sent(generation, pkid) => self.delivery.sent(generation, pkid),
            ConnEvent::Acked(generation, pkid) => {
                match self.delivery.acknowledged(generation, pkid) {
                    Ok(Some(_)) => {
                        self.telemetry
                            .alarms_acknowledged
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!("alarm spool: {e}"),
                }
            }
        }
    }

    /// Offers spooled alarms, oldest first, while the window allows.
    fn send_spooled(&mut self) {
        let Some((_, client)) = &self.link else {
            return;
        };
        loop {
            let alarm = match self.delivery.next_to_send() {
                Ok(Some(a)) => a,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("alarm spool: {e}");
                    break;
                }
            };
            let topic = self.topics.alarm(&alarm.camera);
            if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, alarm.payload) {
                // Back to the queue, so the window never fills with alarms that were not
                // sent; they go out when the client takes them (or on the next
                // connection).
                self.delivery.not_sent(alarm.sequence);
                if !self.refusal_logged {
                    self.refusal_logged = true;
                    tracing::warn!(
                        "the MQTT client refused alarm {}: {e}; it stays in the spool",
                        alarm.sequence
                    );
                }
                break;
            }
            self.delivery.requested(Some(alarm.sequence));
        }
    }

    fn publish_health(&mut self) {
        let Some((_, client)) = &self.link else {
            return;
        };
        let st = self.delivery.stats();
        let body = payload::health_json(
            &self.telemetry,
            &self.settings.device,
            &self.settings.site,
            st.queued + st.in_flight,
        );
        if client
            .try_publish(
                self.topics.health(),
                QoS::AtMostOnce,
                false,
                body.to_string(),
            )
            .is_ok()
        {
            self.delivery.requested(None);
        }
    }

    fn update_stats(&self) {
        let st = self.delivery.stats();
        let t = &self.telemetry;
        t.alarms_spooled
            .store((st.queued + st.in_flight) as u64, Ordering::Relaxed);
        t.spool_bytes.store(st.bytes, Ordering::Relaxed);
        t.alarms_evicted.store(st.evicted_total, Ordering::Relaxed);
        t.alarms_failed
            .store(self.unstored + st.lost_total, Ordering::Relaxed);
    }
}

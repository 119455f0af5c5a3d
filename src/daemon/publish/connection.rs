//! The connection to the broker: the `mqtt://` / `mqtts://` URL, TLS from the
//! configured files, rumqttc's options (clean session, last will) and the thread that
//! drives rumqttc's event loop, reconnecting with a capped backoff. Each connection is a
//! fresh rumqttc client (a "generation"), reported to the publisher on CONNACK, so that a
//! request queued in an old client never goes out again after a reconnect.

use super::PublishError;
use super::PublisherSettings;
use super::payload::Topics;
use crate::daemon::config::{Invalid, redact_credentials, resolve, within};
use crossbeam_channel::Sender;
use rumqttc::{Client, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// rumqttc's in-flight limit: larger than [`super::delivery::WINDOW`] so its packet ids
/// never collide.
const RUMQTTC_INFLIGHT: u16 = 64;

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// Default `cras-<site>-<device>`: unique per device, so a fleet on one broker never
    /// shares one (a broker disconnects the older of two clients with the same id).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topics are `<topic_prefix>/<site>/<device>/...`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// QoS of alarms (1: at least once; 2 is not offered).
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (preferred), or...
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// ...the name of an environment variable holding it.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Per-frame `result` messages per second and camera; 0 turns them off.
    #[serde(default)]
    pub result_rate_hz: f64,
    /// Seconds between `health` messages.
    #[serde(default = "default_health")]
    pub health_interval_s: u64,
}

fn default_prefix() -> String {
    "cras".into()
}
fn default_qos() -> u8 {
    1
}
fn default_health() -> u64 {
    30
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl MqttConfig {
    /// Every check the publisher's start would make, made now: the URL as the connection
    /// parses it, the TLS files loaded as the connection loads them, the password read.
    /// Returns the password. Relative paths are taken from `base`.
    pub fn validate(&mut self, base: &Path) -> Result<Option<String>, Invalid> {
        parse_url(&self.url).map_err(|e| match e {
            PublishError::Url(url, why) => Invalid::new("mqtt.url", format!("`{url}`: {why}")),
            other => Invalid::new("mqtt.url", other.to_string()),
        })?;
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 256 || id.chars().any(char::is_control))
        {
            return Err(Invalid::new(
                "mqtt.client_id",
                "must be 1 to 256 printable characters",
            ));
        }
        check_topic_prefix(&self.topic_prefix)?;
        if self.qos != 1 {
            return Err(Invalid::new(
                "mqtt.qos",
                "alarms are sent with QoS 1 (at least once); set 1",
            ));
        }
        self.validate_tls(base)?;
        let password = self.password(base)?;
        if password.is_some() && self.username.is_none() {
            return Err(Invalid::new("mqtt.username", "a password needs a username"));
        }
        within(
            "mqtt.result_rate_hz",
            self.result_rate_hz,
            0.0,
            100.0,
            " messages per second and camera (0: off)",
        )?;
        within(
            "mqtt.health_interval_s",
            self.health_interval_s,
            1,
            86_400,
            " seconds",
        )?;
        Ok(password)
    }

    fn validate_tls(&mut self, base: &Path) -> Result<(), Invalid> {
        if self.url.starts_with("mqtts://") && self.tls.is_none() {
            return Err(Invalid::new("mqtt.tls", "an mqtts:// URL needs tls.ca"));
        }
        let Some(tls) = &mut self.tls else {
            return Ok(());
        };
        tls.ca = resolve(base, &tls.ca);
        match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => {
                tls.cert = Some(resolve(base, c));
                tls.key = Some(resolve(base, k));
            }
            (None, None) => {}
            _ => return Err(Invalid::new("mqtt.tls", "cert and key go together")),
        }
        tls_config(self).map_err(|e| match e {
            PublishError::Tls { key, reason } => Invalid::new(key, reason),
            other => Invalid::new("mqtt.tls", other.to_string()),
        })?;
        Ok(())
    }

    /// The broker password from `password_file` or `password_env`.
    fn password(&self, base: &Path) -> Result<Option<String>, Invalid> {
        match (&self.password_file, &self.password_env) {
            (Some(_), Some(_)) => Err(Invalid::new(
                "mqtt.password_file",
                "give password_file or password_env, not both",
            )),
            (Some(f), None) => {
                let f = resolve(base, f);
                let p = crate::path_error::read_text_limited(&f, crate::path_error::limits::SECRET)
                    .map_err(|e| {
                        Invalid::new(
                            "mqtt.password_file",
                            format!("cannot read {}: {e}", f.display()),
                        )
                    })?;
                Ok(Some(p.trim_end_matches(['\n', '\r']).to_string()))
            }
            (None, Some(var)) => std::env::var(var).map(Some).map_err(|_| {
                Invalid::new(
                    "mqtt.password_env",
                    format!("environment variable `{var}` is not set"),
                )
            }),
            (None, None) => Ok(None),
        }
    }
}

/// The topic prefix by the MQTT rules for a topic that is published to: no wildcards
/// (`+`, `#`), no NUL, not starting with `$` (brokers keep `$` topics for themselves and
/// deliver them to nobody), no empty level; one trailing `/` is allowed and dropped.
pub fn check_topic_prefix(prefix: &str) -> Result<(), Invalid> {
    let bad = |why: &str| Err(Invalid::new("mqtt.topic_prefix", why));
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() || trimmed.len() > 1024 {
        return bad("must be 1 to 1024 characters");
    }
    if trimmed.contains(['+', '#', '\0']) {
        return bad("must not contain the wildcards `+` or `#`, or NUL");
    }
    if trimmed.starts_with('$') {
        return bad("must not start with `$` (the broker's own topics; nobody receives them)");
    }
    if trimmed.split('/').any(str::is_empty) {
        return bad("must not have an empty level (`//`, or a leading `/`)");
    }
    Ok(())
}

/// Host and port of an `mqtt://` / `mqtts://` URL.
pub fn parse_url(url: &str) -> Result<(String, u16, bool), PublishError> {
    let bad = |why: &str| PublishError::Url(redact_credentials(url), why.to_string());
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
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err(bad("no host"));
    }
    Ok((host.to_string(), port, tls))
}

pub fn tls_config(mqtt: &MqttConfig) -> Result<Transport, PublishError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |key: &'static str, reason: String| PublishError::Tls { key, reason };
    let tls = mqtt
        .tls
        .as_ref()
        .ok_or_else(|| bad("mqtt.tls", "an mqtts:// URL needs tls.ca".into()))?;
    let mut roots = rustls::RootCertStore::empty();
    let pem = |key: &'static str, path: &std::path::Path| {
        crate::path_error::read_limited(path, crate::path_error::limits::PEM)
            .map_err(|e| bad(key, format!("{}: {e}", path.display())))
    };
    let cas: Vec<CertificateDer> = CertificateDer::pem_slice_iter(&pem("mqtt.tls.ca", &tls.ca)?)
        .collect::<Result<_, _>>()
        .map_err(|e| bad("mqtt.tls.ca", format!("{}: {e}", tls.ca.display())))?;
    if cas.is_empty() {
        return Err(bad(
            "mqtt.tls.ca",
            format!("{}: no certificate in the file", tls.ca.display()),
        ));
    }
    for c in cas {
        roots
            .add(c)
            .map_err(|e| bad("mqtt.tls.ca", format!("{}: {e}", tls.ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("mqtt.tls", e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer> =
                CertificateDer::pem_slice_iter(&pem("mqtt.tls.cert", cert)?)
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad("mqtt.tls.cert", format!("{}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_slice(&pem("mqtt.tls.key", key)?)
                .map_err(|e| bad("mqtt.tls.key", format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad("mqtt.tls.cert", format!("client certificate: {e}")))?
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
    let id = s
        .mqtt
        .client_id
        .clone()
        .unwrap_or_else(|| format!("cras-{}-{}", s.site, s.device));
    let mut o = MqttOptions::new(id, host, port);
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
pub enum ConnEvent {
    Up(u64, Client),
    Down(u64, String),
    Sent(u64, u16),
    Acked(u64, u16),
}

pub fn drive_connection(options: MqttOptions, events: Sender<ConnEvent>, stop: Arc<AtomicBool>) {
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

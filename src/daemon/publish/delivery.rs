//! Delivery bookkeeping: which spooled alarm is in flight under which packet id, how many
//! may be in flight, and what goes back to the queue when a connection drops. Plain
//! state over the [`AlarmSpool`], driven by the publisher with the connection's events
//! and tested here without a broker.
//!
//! PUBACKs are matched to alarms through the packet ids rumqttc reports as it sends:
//! rumqttc sends requests in order, so the n-th `Sent` event belongs to the n-th publish
//! request of that connection (alarms, and the `result` / `health` / status messages,
//! which carry no sequence). With fewer alarms in flight than rumqttc's packet-id ring,
//! ids never collide. Events of an older connection (generation) are ignored.

use super::spool::{AlarmSpool, SpoolError, SpoolStats};
use std::collections::{HashMap, VecDeque};

/// Alarms in flight (sent, not yet acknowledged) at most.
pub const WINDOW: usize = 16;

/// A spooled alarm ready to publish; its topic is the current configuration's alarm
/// topic of `camera`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingAlarm {
    pub sequence: u64,
    pub camera: String,
    pub payload: Vec<u8>,
}

/// What a spool record must say to be sent.
#[derive(serde::Deserialize)]
struct AlarmHead {
    camera: String,
}

/// The camera and payload of a spool record: the alarm's JSON. Records written before
/// the spool stopped storing topics start with a topic line, which is skipped (the
/// topic is made afresh). None when the record is not an alarm of a valid camera id.
pub fn decode_record(bytes: &[u8]) -> Option<(String, Vec<u8>)> {
    let payload = if bytes.first() == Some(&b'{') {
        bytes
    } else {
        let nl = bytes.iter().position(|b| *b == b'\n')?;
        &bytes[nl + 1..]
    };
    let head: AlarmHead = serde_json::from_slice(payload).ok()?;
    crate::daemon::config::topic_safe(&head.camera).then(|| (head.camera, payload.to_vec()))
}

/// The requests of one connection.
#[derive(Debug)]
struct Session {
    generation: u64,
    /// One entry per publish request not yet reported sent, in order: the alarm's
    /// sequence, or None for a message that is not an alarm.
    requested: VecDeque<Option<u64>>,
    /// Packet id -> sequence of alarms waiting for their PUBACK.
    awaiting: HashMap<u16, u64>,
}

/// The spool and the live connection's bookkeeping.
pub struct Delivery {
    spool: AlarmSpool,
    session: Option<Session>,
}

impl Delivery {
    pub fn new(spool: AlarmSpool) -> Delivery {
        Delivery {
            spool,
            session: None,
        }
    }

    pub fn stats(&self) -> SpoolStats {
        self.spool.stats()
    }

    /// Stores an alarm durably; `build` makes its payload from the sequence number it
    /// gets. Returns the sequence.
    pub fn store(
        &mut self,
        build: impl FnOnce(u64) -> Result<Vec<u8>, SpoolError>,
    ) -> Result<u64, SpoolError> {
        self.spool.push_with(build)
    }

    /// The alarm last taken by [`Delivery::next_to_send`] could not be handed to the
    /// client: it goes back to the queue, in order, and the window keeps its room.
    pub fn not_sent(&mut self, sequence: u64) {
        self.spool.unsend(sequence);
    }

    /// The generation of the live connection, if any.
    pub fn connection(&self) -> Option<u64> {
        self.session.as_ref().map(|s| s.generation)
    }

    /// A connection came up: what an older one had in flight is sent again, first.
    pub fn connected(&mut self, generation: u64) {
        self.spool.requeue_in_flight();
        self.session = Some(Session {
            generation,
            requested: VecDeque::new(),
            awaiting: HashMap::new(),
        });
    }

    /// A connection went down; true if it was the live one (its alarms are requeued).
    pub fn disconnected(&mut self, generation: u64) -> bool {
        if self.connection() != Some(generation) {
            return false;
        }
        self.session = None;
        self.spool.requeue_in_flight();
        true
    }

    /// The oldest queued alarm, if connected and the window has room; it counts as in
    /// flight from now on. Call [`Delivery::requested`] once it is handed to the client.
    /// A record that is not an alarm is set aside (renamed, counted as lost, logged).
    pub fn next_to_send(&mut self) -> Result<Option<OutgoingAlarm>, SpoolError> {
        if self.session.is_none() {
            return Ok(None);
        }
        while self.spool.stats().in_flight < WINDOW {
            let Some((sequence, bytes)) = self.spool.next_to_send()? else {
                return Ok(None);
            };
            match decode_record(&bytes) {
                Some((camera, payload)) => {
                    return Ok(Some(OutgoingAlarm {
                        sequence,
                        camera,
                        payload,
                    }));
                }
                None => {
                    tracing::error!(
                        "spooled alarm {sequence} is not an alarm of a camera; set aside (renamed *.unreadable) and counted as lost"
                    );
                    self.spool.set_aside(sequence)?;
                }
            }
        }
        Ok(None)
    }

    /// A publish request went to the live connection's client: `sequence` for an alarm,
    /// None for any other message.
    pub fn requested(&mut self, sequence: Option<u64>) {
        if let Some(s) = &mut self.session {
            s.requested.push_back(sequence);
        }
    }

    /// rumqttc sent the next request of connection `generation` under `pkid`.
    pub fn sent(&mut self, generation: u64, pkid: u16) {
        if let Some(s) = self.session.as_mut().filter(|s| s.generation == generation)
            && let Some(Some(sequence)) = s.requested.pop_front()
        {
            s.awaiting.insert(pkid, sequence);
        }
    }

    /// The broker acknowledged `pkid` of connection `generation`: its alarm leaves the
    /// spool. Returns the alarm's sequence, if it was one.
    pub fn acknowledged(&mut self, generation: u64, pkid: u16) -> Result<Option<u64>, SpoolError> {
        let Some(sequence) = self
            .session
            .as_mut()
            .filter(|s| s.generation == generation)
            .and_then(|s| s.awaiting.remove(&pkid))
        else {
            return Ok(None);
        };
        self.spool.acknowledge(sequence)?;
        Ok(Some(sequence))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(dir: &std::path::Path) -> Delivery {
        Delivery::new(AlarmSpool::open(dir, 1 << 20).unwrap())
    }

    /// A delivery over a fresh spool holding `n` alarms, connected as generation 1.
    fn connected_with(n: usize) -> (tempfile::TempDir, Delivery, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let mut d = delivery(dir.path());
        let seqs = store(&mut d, n);
        d.connected(1);
        (dir, d, seqs)
    }

    fn alarm(seq: u64) -> Vec<u8> {
        format!("{{\"camera\":\"cam1\",\"sequence\":{seq}}}").into_bytes()
    }

    fn store(d: &mut Delivery, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| d.store(|seq| Ok(alarm(seq))).unwrap())
            .collect()
    }

    /// Hands every alarm the window allows to the "client"; returns their sequences.
    fn send_all(d: &mut Delivery) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(a) = d.next_to_send().unwrap() {
            d.requested(Some(a.sequence));
            out.push(a.sequence);
        }
        out
    }

    #[test]
    fn records_are_alarms_and_the_topic_is_not_stored() {
        let json = br#"{"camera":"cam2","x":"1\n2"}"#;
        assert_eq!(decode_record(json), Some(("cam2".into(), json.to_vec())));
        // A record from before: its stored topic line is dropped, not published.
        let mut legacy = b"$SYS/old/topic\n".to_vec();
        legacy.extend_from_slice(json);
        assert_eq!(decode_record(&legacy), Some(("cam2".into(), json.to_vec())));
        assert_eq!(decode_record(b"no alarm here"), None);
        assert_eq!(
            decode_record(br#"{"camera":"a/#"}"#),
            None,
            "not a camera id"
        );
        assert_eq!(decode_record(br#"{"sequence":1}"#), None);
    }

    #[test]
    fn a_publish_the_client_refuses_goes_back_and_keeps_the_window_open() {
        let (_dir, mut d, seqs) = connected_with(WINDOW + 2);
        // Every publish fails (a client that refuses): nothing may stay in flight.
        for _ in 0..3 * WINDOW {
            let a = d.next_to_send().unwrap().unwrap();
            assert_eq!(a.sequence, seqs[0], "the oldest is offered again");
            d.not_sent(a.sequence);
        }
        assert_eq!((d.stats().queued, d.stats().in_flight), (WINDOW + 2, 0));
        // Once the client takes them, they go in order.
        assert_eq!(send_all(&mut d), seqs[..WINDOW].to_vec());
    }

    #[test]
    fn an_unreadable_record_is_set_aside_and_counted() {
        let (dir, mut d, seqs) = connected_with(2);
        let first = dir.path().join(format!("{:020}.alarm", seqs[0]));
        std::fs::write(&first, b"garbage").unwrap();
        let a = d.next_to_send().unwrap().unwrap();
        assert_eq!(a.sequence, seqs[1]);
        assert_eq!(d.stats().lost_total, 1);
        assert!(!first.exists());
        assert!(
            dir.path()
                .join(format!("{:020}.alarm.unreadable", seqs[0]))
                .exists()
        );
    }

    #[test]
    fn nothing_goes_out_while_disconnected() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = delivery(dir.path());
        store(&mut d, 2);
        assert_eq!(d.next_to_send().unwrap(), None);
        assert_eq!(d.stats().queued, 2);
    }

    #[test]
    fn acks_out_of_order_release_the_right_alarms() {
        let (_dir, mut d, seqs) = connected_with(3);
        // The status message goes first, then the three alarms, a result in between.
        d.requested(None);
        let a = d.next_to_send().unwrap().unwrap();
        assert_eq!(a.camera, "cam1");
        assert_eq!(a.payload, alarm(seqs[0]));
        d.requested(Some(a.sequence));
        d.requested(None);
        assert_eq!(send_all(&mut d), seqs[1..].to_vec());
        for pkid in 1..=5 {
            d.sent(1, pkid);
        }
        // pkid 1 was the status, 2 alarm 0, 3 the result, 4 alarm 1, 5 alarm 2.
        assert_eq!(d.acknowledged(1, 5).unwrap(), Some(seqs[2]));
        assert_eq!(d.acknowledged(1, 2).unwrap(), Some(seqs[0]));
        assert_eq!(d.acknowledged(1, 3).unwrap(), None, "not an alarm");
        assert_eq!(d.acknowledged(1, 2).unwrap(), None, "a duplicate PUBACK");
        let st = d.stats();
        assert_eq!((st.queued, st.in_flight, st.acknowledged_total), (0, 1, 2));
        assert_eq!(d.acknowledged(1, 4).unwrap(), Some(seqs[1]));
        assert_eq!(d.stats().bytes, 0);
    }

    #[test]
    fn a_disconnect_with_three_in_flight_sends_them_again_in_order() {
        let (_dir, mut d, seqs) = connected_with(4);
        assert_eq!(send_all(&mut d), seqs);
        for pkid in 1..=4 {
            d.sent(1, pkid);
        }
        assert_eq!(d.acknowledged(1, 1).unwrap(), Some(seqs[0]));
        assert_eq!(d.stats().in_flight, 3);
        assert!(!d.disconnected(7), "not the live connection");
        assert!(d.disconnected(1));
        let st = d.stats();
        assert_eq!((st.queued, st.in_flight), (3, 0));
        // A late PUBACK of the dead connection releases nothing.
        assert_eq!(d.acknowledged(1, 2).unwrap(), None);
        d.connected(2);
        assert_eq!(send_all(&mut d), seqs[1..].to_vec());
        // The new connection numbers its packets afresh.
        for pkid in 1..=3 {
            d.sent(2, pkid);
        }
        for pkid in 1..=3 {
            assert_eq!(d.acknowledged(2, pkid).unwrap(), Some(seqs[pkid as usize]));
        }
        assert_eq!(d.stats().queued + d.stats().in_flight, 0);
    }

    #[test]
    fn a_restart_keeps_unacknowledged_alarms_and_never_reuses_a_sequence() {
        let (dir, mut d, seqs) = connected_with(3);
        send_all(&mut d);
        d.sent(1, 1);
        d.sent(1, 2);
        assert_eq!(d.acknowledged(1, 1).unwrap(), Some(seqs[0]));
        // The process dies with alarm 1 in flight (sent) and alarm 2 requested.
        drop(d);
        let mut d = delivery(dir.path());
        assert_eq!(d.stats().queued, 2);
        d.connected(1);
        assert_eq!(send_all(&mut d), seqs[1..].to_vec());
        assert_eq!(store(&mut d, 1), vec![seqs[2] + 1]);
    }

    #[test]
    fn the_window_bounds_alarms_in_flight() {
        let (_dir, mut d, _) = connected_with(WINDOW + 4);
        assert_eq!(send_all(&mut d).len(), WINDOW);
        assert_eq!(d.stats().queued, 4);
        for pkid in 1..=2 {
            d.sent(1, pkid);
            d.acknowledged(1, pkid).unwrap();
        }
        assert_eq!(send_all(&mut d).len(), 2);
    }

    #[test]
    fn a_failed_encoding_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = delivery(dir.path());
        let r = d.store(|sequence| {
            Err(SpoolError::Encode {
                sequence,
                reason: "test".into(),
            })
        });
        assert!(matches!(r, Err(SpoolError::Encode { sequence: 0, .. })));
        assert_eq!(d.stats().queued, 0);
        assert_eq!(store(&mut d, 1), vec![0]);
    }
}

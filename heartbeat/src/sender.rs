//! The sending side of heartbeats, without the socket: one incarnation's
//! numbered, MACed datagrams.

use crate::message::{Challenge, Heartbeat, HeartbeatKey, Incarnation, PairId, Progress, Role, DATAGRAM_LEN};

/// Makes this process's heartbeats: sequence numbers 1, 2, 3 … under one
/// incarnation, each datagram MACed with the heartbeat key.
#[derive(Debug)]
pub struct Sender {
    key: HeartbeatKey,
    role: Role,
    pair: PairId,
    incarnation: Incarnation,
    last_seq: u64,
}

impl Sender {
    /// A sender for `role` in pair `pair`, as incarnation `incarnation`
    /// (normally [`Incarnation::random`], once per process).
    pub fn new(key: HeartbeatKey, role: Role, pair: PairId, incarnation: Incarnation) -> Sender {
        Sender { key, role, pair, incarnation, last_seq: 0 }
    }

    /// This sender's incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// The next heartbeat's datagram, carrying `progress`, this side's
    /// receiver's `challenge` ([`crate::Receiver::challenge`]) and `echo`,
    /// the peer's challenge to prove this heartbeat fresh to it
    /// ([`crate::Receiver::echo`], or the challenge of an unproven heartbeat
    /// being answered).
    pub fn next(&mut self, progress: Progress, challenge: Challenge, echo: Challenge) -> [u8; DATAGRAM_LEN] {
        // Saturating: 2^64 heartbeats at one a millisecond take 584 million
        // years. Were it reached, the receiver would refuse the repeats and
        // declare this side dead, which fails safe.
        self.last_seq = self.last_seq.saturating_add(1);
        Heartbeat {
            role: self.role,
            pair: self.pair,
            incarnation: self.incarnation,
            seq: self.last_seq,
            progress,
            challenge,
            echo,
        }
        .encode(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::{Receiver, Verdict};

    #[test]
    fn a_receiver_accepts_every_heartbeat_of_a_sender_once() {
        let key = HeartbeatKey::derive(&[3u8; 40]).unwrap();
        let pair = PairId::for_vm_name("x");
        let mut sender = Sender::new(key.clone(), Role::Secondary, pair, Incarnation(9));
        let mut receiver = Receiver::new(key, pair, Role::Secondary, Challenge([4; 16]));
        let mut sent = Vec::new();
        for i in 1..=10u64 {
            let progress = Progress { exit_index: i * 100, log_position: i };
            // Echoes the challenge it was proven with, then the next one.
            let echo = if i < 5 { Challenge([4; 16]) } else { receiver.challenge() };
            let datagram = sender.next(progress, Challenge([7; 16]), echo);
            match receiver.receive(&datagram) {
                Verdict::Accepted(heartbeat) => {
                    assert_eq!((heartbeat.seq, heartbeat.incarnation), (i, Incarnation(9)));
                    assert_eq!(heartbeat.progress, Progress { exit_index: i * 100, log_position: i });
                    assert_eq!(receiver.echo(), Challenge([7; 16]));
                }
                other => panic!("heartbeat {i}: {other:?}"),
            }
            sent.push(datagram);
        }
        for datagram in sent {
            assert!(matches!(receiver.receive(&datagram), Verdict::Replayed { .. }));
        }
        assert_eq!(receiver.counters().accepted, 10);
        assert_eq!(receiver.counters().replayed, 10);
    }
}

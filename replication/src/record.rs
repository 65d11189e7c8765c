//! Every log record type, and nothing else.
//!
//! A record is one entry of the log: an input the primary took from the
//! world, tagged with the exit index at which the guest consumed it, or a
//! control record (a digest, the guest's shutdown). Records have no encoding
//! here: `frame.rs` owns the wire format, so that what a record *is* reads in
//! one screen.

use std::fmt;

use bytes::Bytes;
use vmm::hook::ExitIndex;

/// The sequence number of a record in the log. The first record is at
/// position 1; position 0 means "nothing" (no record acknowledged, released,
/// received yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition(pub u64);

impl LogPosition {
    /// No record: what is acknowledged before the first ack.
    pub const NONE: LogPosition = LogPosition(0);
    /// The first record of a log.
    pub const FIRST: LogPosition = LogPosition(1);

    /// The position `n` records after this one, or `None` past `u64::MAX`.
    pub fn checked_add(self, n: u64) -> Option<LogPosition> {
        self.0.checked_add(n).map(LogPosition)
    }
}

impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The most random bytes one `Entropy` record carries. The entropy device
/// asks for at most 8 per read today; the cap leaves room for a bulk read
/// while keeping what a peer can make the secondary hold per record small.
pub const MAX_ENTROPY_LEN: usize = 4096;

/// The largest received frame a `Frame` record carries: the largest frame
/// the guest's NIC delivers (virtio-net's receive-buffer size, 65550 bytes).
pub const MAX_FRAME_LEN: usize = vmm::devices::virtio_net::MAX_FRAME_LEN;

/// The kind byte that introduces each record on the wire. The values are part
/// of the protocol: never renumber one, only add new ones. A decoder refuses a
/// kind it does not know, so a newer primary cannot slip a record past an
/// older secondary that would not replay it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum RecordKind {
    /// [`Record::Clock`].
    Clock = 1,
    /// [`Record::Entropy`].
    Entropy = 2,
    /// [`Record::Frame`].
    Frame = 3,
    /// [`Record::Digest`].
    Digest = 4,
    /// [`Record::Shutdown`].
    Shutdown = 5,
    /// [`Record::Barrier`].
    Barrier = 6,
    /// [`Record::Fault`].
    Fault = 7,
    /// [`Record::Switchover`].
    Switchover = 8,
}

impl RecordKind {
    /// The byte that stands for this kind on the wire.
    pub fn byte(self) -> u8 {
        self as u8
    }

    /// The kind a wire byte stands for, or `None` for a kind this version
    /// does not know.
    pub fn from_byte(byte: u8) -> Option<RecordKind> {
        Some(match byte {
            1 => RecordKind::Clock,
            2 => RecordKind::Entropy,
            3 => RecordKind::Frame,
            4 => RecordKind::Digest,
            5 => RecordKind::Shutdown,
            6 => RecordKind::Barrier,
            7 => RecordKind::Fault,
            8 => RecordKind::Switchover,
            _ => return None,
        })
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordKind::Clock => "clock",
            RecordKind::Entropy => "entropy",
            RecordKind::Frame => "frame",
            RecordKind::Digest => "digest",
            RecordKind::Shutdown => "shutdown",
            RecordKind::Barrier => "barrier",
            RecordKind::Fault => "fault",
            RecordKind::Switchover => "switchover",
        })
    }
}

/// One log record. Every record names the exit index at which the guest
/// consumed the input (or at which the control record applies); the
/// secondary supplies the input at that same exit.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// A reading of the guest's monotonic clock, in nanoseconds since boot.
    Clock { exit: ExitIndex, ns: u64 },
    /// Random bytes the entropy device handed the guest, at most
    /// [`MAX_ENTROPY_LEN`].
    Entropy { exit: ExitIndex, bytes: Bytes },
    /// An Ethernet frame received for the guest's NIC (no virtio header), at
    /// most [`MAX_FRAME_LEN`] bytes.
    Frame { exit: ExitIndex, frame: Bytes },
    /// Hashes of the vCPU registers, the device state and the guest memory
    /// dirtied since the previous digest, as the primary computed them at
    /// this exit; the secondary compares its own.
    Digest { exit: ExitIndex, vcpu: u64, devices: u64, memory: u64 },
    /// The primary's guest stopped cleanly at this exit: the log ends here.
    Shutdown { exit: ExitIndex },
    /// The guest and its application were healthy at this exit (every
    /// configured health source agreed): a point the secondary may go live
    /// from after a guest fault.
    Barrier { exit: ExitIndex },
    /// The primary saw a guest fault at this exit: the secondary must not
    /// replay past the last barrier before it.
    Fault { exit: ExitIndex, fault: FaultKind },
    /// A planned switchover: the primary's guest stands still before this
    /// exit, every output before it was released, and the secondary replays
    /// the log to here and goes live (`ftvm switchover`). The log ends here.
    Switchover { exit: ExitIndex },
}

/// What went wrong inside the guest, as a health source saw it. The byte
/// values are part of the protocol (the [`Record::Fault`] payload): never
/// renumber one, only add new ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
#[non_exhaustive]
pub enum FaultKind {
    /// The guest reported a panic through pvpanic.
    Panic = 1,
    /// The guest crashed: a triple fault, or an access no device serves.
    Crash = 2,
    /// The guest halted with no wake-up deadline (what `halt` does to an OS).
    Halt = 3,
    /// The guest powered off with a non-zero status.
    PowerOff = 4,
    /// The guest stopped exiting for longer than the hang deadline.
    Hang = 5,
    /// The application missed its health-report deadline.
    Unhealthy = 6,
    /// The host-side probe of the service failed its threshold.
    Probe = 7,
    /// The primary's LAN side lost carrier or its gateway.
    Lan = 8,
}

impl FaultKind {
    /// Every kind, in byte order.
    pub const ALL: [FaultKind; 8] = [
        FaultKind::Panic,
        FaultKind::Crash,
        FaultKind::Halt,
        FaultKind::PowerOff,
        FaultKind::Hang,
        FaultKind::Unhealthy,
        FaultKind::Probe,
        FaultKind::Lan,
    ];

    /// The byte that stands for this kind on the wire.
    pub fn byte(self) -> u8 {
        self as u8
    }

    /// The kind a wire byte stands for, or `None` for one this version does
    /// not know.
    pub fn from_byte(byte: u8) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|kind| kind.byte() == byte)
    }

    /// The kind's name in status output and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Panic => "panic",
            FaultKind::Crash => "crash",
            FaultKind::Halt => "halt",
            FaultKind::PowerOff => "power_off",
            FaultKind::Hang => "hang",
            FaultKind::Unhealthy => "unhealthy",
            FaultKind::Probe => "probe",
            FaultKind::Lan => "lan",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Record {
    /// The exit index the record belongs to.
    pub fn exit(&self) -> ExitIndex {
        match self {
            Record::Clock { exit, .. }
            | Record::Entropy { exit, .. }
            | Record::Frame { exit, .. }
            | Record::Digest { exit, .. }
            | Record::Shutdown { exit }
            | Record::Barrier { exit }
            | Record::Fault { exit, .. }
            | Record::Switchover { exit } => *exit,
        }
    }

    /// The record's kind, as its wire byte names it.
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Clock { .. } => RecordKind::Clock,
            Record::Entropy { .. } => RecordKind::Entropy,
            Record::Frame { .. } => RecordKind::Frame,
            Record::Digest { .. } => RecordKind::Digest,
            Record::Shutdown { .. } => RecordKind::Shutdown,
            Record::Barrier { .. } => RecordKind::Barrier,
            Record::Fault { .. } => RecordKind::Fault,
            Record::Switchover { .. } => RecordKind::Switchover,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_bytes_round_trip_and_unknown_kinds_are_refused() {
        for kind in [
            RecordKind::Clock,
            RecordKind::Entropy,
            RecordKind::Frame,
            RecordKind::Digest,
            RecordKind::Shutdown,
            RecordKind::Barrier,
            RecordKind::Fault,
            RecordKind::Switchover,
        ] {
            assert_eq!(RecordKind::from_byte(kind.byte()), Some(kind));
        }
        assert_eq!(RecordKind::from_byte(0), None);
        assert_eq!(RecordKind::from_byte(9), None);
        assert_eq!(RecordKind::from_byte(0xff), None);
    }

    #[test]
    fn exit_and_kind_of_each_record() {
        let exit = ExitIndex(7);
        let records = [
            (Record::Clock { exit, ns: 1 }, RecordKind::Clock),
            (Record::Entropy { exit, bytes: Bytes::from_static(b"r") }, RecordKind::Entropy),
            (Record::Frame { exit, frame: Bytes::from_static(b"f") }, RecordKind::Frame),
            (Record::Digest { exit, vcpu: 1, devices: 2, memory: 3 }, RecordKind::Digest),
            (Record::Shutdown { exit }, RecordKind::Shutdown),
            (Record::Barrier { exit }, RecordKind::Barrier),
            (Record::Fault { exit, fault: FaultKind::Halt }, RecordKind::Fault),
            (Record::Switchover { exit }, RecordKind::Switchover),
        ];
        for (record, kind) in records {
            assert_eq!(record.exit(), exit);
            assert_eq!(record.kind(), kind);
        }
    }

    #[test]
    fn fault_kind_bytes_round_trip() {
        for kind in FaultKind::ALL {
            assert_eq!(FaultKind::from_byte(kind.byte()), Some(kind));
        }
        assert_eq!(FaultKind::from_byte(0), None);
        assert_eq!(FaultKind::from_byte(9), None);
    }

    #[test]
    fn positions() {
        assert_eq!(LogPosition::default(), LogPosition::NONE);
        assert_eq!(LogPosition::NONE.checked_add(1), Some(LogPosition::FIRST));
        assert_eq!(LogPosition(u64::MAX).checked_add(1), None);
    }
}

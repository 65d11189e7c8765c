//! Repair, the pair's side: a primary that runs alone re-protects itself
//! onto a spare (`--standby`), and a spare (`ftvm secondary` with no guest
//! settings) takes the guest's state from a live transfer.
//!
//! The primary's *repair* thread waits until the session runs alone (its
//! secondary was lost and it won the arbiter), then, for each standby in
//! turn until one succeeds:
//!
//! 1. dials it and runs [`transfer::send_marked`]: memory pre-copy while
//!    the guest runs, then a live checkpoint at an exit boundary, whose mark
//!    reads the log position there (`m`) on the vCPU thread and from then on
//!    keeps the log after `m` instead of dropping it;
//! 2. opens a new logging channel to it (the identity travelled in the
//!    transfer's authenticated `Begin`);
//! 3. switches back to protected: outputs wait for acks again from here
//!    (positions up to `m` count as acknowledged: the copy holds them), the
//!    shipper sends the kept log from `m + 1` on the new channel, and the
//!    position `p` the log had at the switch is noted;
//! 4. once the new secondary acknowledged `p` (it holds every input behind
//!    every output released while alone), the pair counts as protected:
//!    `repair_ms` (failure → now) goes on the failure event, the arbiter
//!    generation held since the go-live is released and a new failover
//!    (heartbeats with the new peer, the arbiter's new generation) starts.
//!
//! A failure anywhere before 4 (the standby gone, the link cut, a frame
//! refused, no ack in time) switches back to running alone (every held
//! output may go; the arbiter is still held, so there are never two live
//! copies) and the next standby is tried after a backoff. The guest is never
//! stopped for a repair but for the transfer's final pause.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use replication::channel::{ChannelConfig, PrimaryChannel};
use replication::frame::GuestIdentity;
use replication::log::LogShared;
use replication::record::LogPosition;
use replication::transfer::{self, TransferOptions};
use vmm::checkpoint::Checkpointer;

use crate::failover::{Failover, FailoverConfig};
use crate::primary::{Links, Phase, PrimaryShared, SharedReleaser};
use crate::shipper::Shipper;
use crate::status::{Board, Role};

/// How long dialling a standby may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the new secondary may take to open the logging channel after
/// the transfer, and then to acknowledge the log up to the switch.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the repair thread looks whether the primary runs alone.
const POLL: Duration = Duration::from_millis(10);
/// Backoff after a failed repair, doubling up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Bytes of [`encode_identity`].
const IDENTITY_LEN: usize = 72;

/// The guest identity as the transfer's `Begin` carries it: image digest,
/// memory bytes (little-endian), settings digest, then the VM's name (the
/// pair's heartbeats are keyed by it).
pub fn encode_identity(id: &GuestIdentity, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDENTITY_LEN + name.len());
    out.extend_from_slice(&id.image);
    out.extend_from_slice(&id.memory_bytes.to_le_bytes());
    out.extend_from_slice(&id.config);
    out.extend_from_slice(name.as_bytes());
    out
}

/// [`encode_identity`]'s inverse: the identity and the name.
pub fn decode_identity(blob: &[u8]) -> Result<(GuestIdentity, String)> {
    if blob.len() < IDENTITY_LEN {
        bail!("the transfer carries a guest identity of {} bytes, not at least {IDENTITY_LEN}", blob.len());
    }
    let name = std::str::from_utf8(blob.get(IDENTITY_LEN..).unwrap_or_default())
        .context("the transfer's VM name is not UTF-8")?
        .to_string();
    let mut image = [0u8; 32];
    let mut memory = [0u8; 8];
    let mut config = [0u8; 32];
    image.copy_from_slice(blob.get(..32).unwrap_or_default());
    memory.copy_from_slice(blob.get(32..40).unwrap_or_default());
    config.copy_from_slice(blob.get(40..IDENTITY_LEN).unwrap_or_default());
    Ok((GuestIdentity { image, memory_bytes: u64::from_le_bytes(memory), config }, name))
}

fn resolve(standby: &str) -> Result<std::net::SocketAddr> {
    standby
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --standby {standby}"))?
        .next()
        .ok_or_else(|| anyhow!("--standby {standby} resolves to no address"))
}

/// What a primary needs to re-protect itself.
#[derive(Clone)]
pub(crate) struct RepairConfig {
    pub(crate) name: String,
    pub(crate) standby: Vec<String>,
    pub(crate) channel: ChannelConfig,
    pub(crate) failover: Option<FailoverConfig>,
    /// This copy went live by a planned switchover: first join the old
    /// primary, which holds the state at the switch, with no transfer.
    pub(crate) rejoin: bool,
}

/// The repair thread's share of the primary session.
pub(crate) struct Repairer {
    pub(crate) config: RepairConfig,
    pub(crate) checkpointer: Checkpointer,
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) links: Arc<Links>,
    pub(crate) shipper: Arc<Shipper>,
    pub(crate) log: Arc<LogShared>,
    pub(crate) shared: Arc<PrimaryShared>,
    pub(crate) board: Arc<Board>,
    pub(crate) releaser: SharedReleaser,
}

/// Start the repair thread; it ends with the session's shipping.
pub(crate) fn spawn(repairer: Repairer) -> Result<()> {
    std::thread::Builder::new().name("repair".into()).spawn(move || repairer.run())?;
    Ok(())
}

impl Repairer {
    fn ended(&self) -> bool {
        self.shared.guest_has_ended() || !self.shared.shipping()
    }

    fn run(self) {
        if self.config.rejoin {
            self.rejoin_switched();
        }
        let mut backoff = MIN_BACKOFF;
        let mut next = 0usize;
        let count = self.config.standby.len().max(1);
        loop {
            if self.ended() {
                return;
            }
            if self.shared.phase() != Phase::Alone {
                std::thread::sleep(POLL);
                continue;
            }
            let Some(standby) = self.config.standby.get(next % count).cloned() else { return };
            next = next.wrapping_add(1);
            self.board.set_state(format!("running: live, unprotected; re-protecting onto {standby}"));
            match self.once(&standby) {
                Ok(()) => backoff = MIN_BACKOFF,
                Err(e) => {
                    eprintln!("ftvm: primary {}: re-protection onto {standby} failed: {e:#}; still running UNPROTECTED, retrying", self.config.name);
                    self.board.set_state("running: live, unprotected");
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !self.ended() {
                        std::thread::sleep(POLL);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Back to running alone after a repair that failed midway: every held
    /// output may go, the log is dropped again. The arbiter is still held.
    fn back_alone(&self) {
        self.shared.set_phase(Phase::Alone);
        self.shared.keep_after(None);
        self.log.set_unprotected();
        let _ = self.releaser.release_ready();
        self.board.set_peer(false);
    }

    /// After a planned switchover: the old primary, whose stopped guest is
    /// at the switch's exit, waits as a secondary on one of the standby
    /// addresses (its `--switch-listen`) for the log from this copy's
    /// go-live on, which was kept. No transfer: repair's steps 2 to 4 with
    /// the mark at position 0. Tried for [`SYNC_TIMEOUT`]; then the log is
    /// dropped again and repair goes on as after a failure (a transfer).
    fn rejoin_switched(&self) {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline && !self.ended() && self.shared.phase() == Phase::Alone {
            for standby in &self.config.standby {
                self.board.set_state(format!("running: live, unprotected; rejoining the old primary at {standby}"));
                let chan = resolve(standby).and_then(|addr| {
                    let connect = PrimaryChannel::connect(addr, self.config.channel.clone());
                    match self.handle.block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, connect).await }) {
                        Ok(Ok(chan)) => Ok((addr, Arc::new(chan))),
                        Ok(Err(e)) => Err(anyhow!(e).context("no logging channel")),
                        Err(_) => bail!("no logging channel in {} s", CONNECT_TIMEOUT.as_secs()),
                    }
                });
                match chan {
                    Ok((addr, chan)) => {
                        // The kept log goes to this channel: whatever happens,
                        // there is no second try without a transfer.
                        if let Err(e) = self.join(addr, standby, chan, 0, None) {
                            eprintln!(
                                "ftvm: primary {}: the old primary at {standby} did not rejoin: {e:#}; re-protecting by transfer",
                                self.config.name
                            );
                        }
                        return;
                    }
                    Err(e) => last = Some(format!("{standby}: {e:#}")),
                }
                if self.shared.phase() != Phase::Alone {
                    return;
                }
            }
            std::thread::sleep(POLL);
        }
        if self.shared.phase() == Phase::Alone {
            eprintln!(
                "ftvm: primary {}: the old primary did not rejoin after the switchover ({}); re-protecting by transfer",
                self.config.name,
                last.unwrap_or_else(|| "no --standby".into())
            );
            self.shared.keep_after(None);
            self.board.set_state("running: live, unprotected");
        }
    }

    fn once(&self, standby: &str) -> Result<()> {
        let addr = resolve(standby)?;
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).context("cannot reach the standby")?;
        let (log, shared) = (self.log.clone(), self.shared.clone());
        let mark: vmm::checkpoint::Mark = Box::new(move || {
            // On the vCPU thread, the guest standing still: the new copy
            // replays the log from the next record on.
            let at = log.appended().0;
            shared.keep_after(Some(at));
            at
        });
        let options = TransferOptions {
            identity: encode_identity(&self.config.channel.identity, &self.config.name),
            ..Default::default()
        };
        let key = self.config.channel.key.as_bytes();
        let report = match transfer::send_marked(stream, key, &self.checkpointer, &options, mark) {
            Ok(r) => r,
            Err(e) => {
                self.shared.keep_after(None);
                return Err(anyhow!(e).context("the state transfer failed"));
            }
        };
        let connect = PrimaryChannel::connect(addr, self.config.channel.clone());
        let chan = match self.handle.block_on(async { tokio::time::timeout(SYNC_TIMEOUT, connect).await }) {
            Ok(Ok(chan)) => Arc::new(chan),
            Ok(Err(e)) => {
                self.shared.keep_after(None);
                return Err(anyhow!(e).context("the standby took the state but not the logging channel"));
            }
            Err(_) => {
                self.shared.keep_after(None);
                bail!("the standby took the state but opened no logging channel in {} s", SYNC_TIMEOUT.as_secs());
            }
        };
        if self.ended() || self.shared.phase() != Phase::Alone {
            self.shared.keep_after(None);
            bail!("the guest stopped during the transfer");
        }
        self.join(addr, standby, chan, report.mark, Some(&report))
    }

    /// Repair's steps 3 and 4: protected again from `mark` on over `chan`,
    /// in sync once the new secondary acknowledged the log, then a new
    /// failover. `transfer`: the transfer that brought the state, if any.
    fn join(
        &self,
        addr: std::net::SocketAddr,
        standby: &str,
        chan: Arc<PrimaryChannel>,
        mark: u64,
        transfer: Option<&transfer::TransferReport>,
    ) -> Result<()> {
        // Protected again from here: outputs wait for the new secondary's
        // acks (the checkpoint covers everything up to its mark).
        self.log.set_protected(LogPosition(mark));
        let upto = self.log.appended();
        self.shipper.rejoin(chan.clone());
        self.links.set_chan(chan.clone());
        crate::primary::spawn_ack_task(&self.handle, &chan, &self.log, &self.board, &self.releaser, None);
        self.log.request_flush();
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while !self.log.is_acked(upto) {
            if let Some(e) = chan.error() {
                self.back_alone();
                return Err(anyhow!(e).context("the new secondary was lost before it acknowledged the log"));
            }
            if self.ended() {
                self.back_alone();
                bail!("the guest stopped before the new secondary was in sync");
            }
            if Instant::now() > deadline {
                self.back_alone();
                bail!("the new secondary did not acknowledge the log in {} s", SYNC_TIMEOUT.as_secs());
            }
            self.log.wait_changed(Duration::from_millis(5));
        }
        // In sync: the pair is protected again.
        let repair_ms = self.board.repaired();
        self.board.set_peer(true);
        self.board.set_peer_address(standby.to_string());
        self.board.set_role(Role::Primary);
        self.board.set_state("running");
        let how = match transfer {
            Some(report) => format!(
                "transfer {} ms, final pause {:.2} ms, from guest exit #{}",
                report.total.as_millis(),
                report.pause.as_secs_f64() * 1e3,
                report.exit_index
            ),
            None => "no transfer: it holds the state at the switchover".to_string(),
        };
        eprintln!(
            "ftvm: primary {}: re-protected onto {standby} ({how}{}): protected",
            self.config.name,
            repair_ms.map_or_else(String::new, |ms| format!("; redundancy restored {ms:.0} ms after the failure")),
        );
        match &self.config.failover {
            Some(fc) => self.new_failover(fc, addr, &chan),
            None => {
                crate::primary::spawn_channel_watch(&self.handle, &chan, &self.board, &self.shared, &self.log, None)
            }
        }
        Ok(())
    }

    /// The new pair's failover: the arbiter generation held since the
    /// go-live is released (the new secondary holds the whole log, so either
    /// copy may now win the next one), then heartbeats with the new peer.
    fn new_failover(&self, fc: &FailoverConfig, peer: std::net::SocketAddr, chan: &Arc<PrimaryChannel>) {
        if let Some(old) = self.links.failover() {
            old.release();
        }
        self.links.release_ownership();
        let key = self.config.channel.key.as_bytes();
        let local = std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0);
        let role = heartbeat::Role::Primary;
        let started =
            self.handle.block_on(Failover::start(fc, &self.board, &self.config.name, role, key, local, Some(peer)));
        match started {
            Ok(f) => {
                let f = Arc::new(f);
                self.links.set_failover(Some(f.clone()));
                crate::primary::spawn_channel_watch(
                    &self.handle,
                    chan,
                    &self.board,
                    &self.shared,
                    &self.log,
                    Some(f.clone()),
                );
                crate::lag::spawn_primary_watch(
                    &self.handle,
                    self.log.clone(),
                    self.board.clone(),
                    f.clone(),
                    self.shared.clone(),
                    fc.max_lag,
                );
                crate::primary::spawn_decide(&self.handle, f, &self.shared, &self.board, &self.log, &self.releaser);
            }
            Err(e) => {
                // Without failover nothing may carry on alone: as a pair
                // without an arbiter, a lost secondary stops the guest.
                tracing::error!(error = %e, "cannot start the new pair's failover");
                eprintln!("ftvm: primary {}: cannot start failover with the new secondary: {e:#}", self.config.name);
                self.links.set_failover(None);
                crate::primary::spawn_channel_watch(&self.handle, chan, &self.board, &self.shared, &self.log, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_refuses_a_wrong_length() {
        let id = GuestIdentity { image: [7; 32], memory_bytes: 64 << 20, config: [9; 32] };
        let blob = encode_identity(&id, "kv-1");
        let (back, name) = decode_identity(&blob).unwrap();
        assert_eq!((back.image, back.memory_bytes, back.config), (id.image, id.memory_bytes, id.config));
        assert_eq!(name, "kv-1");
        assert!(decode_identity(&blob[..71]).is_err());
        assert!(decode_identity(&[&blob[..72], &[0xff][..]].concat()).is_err());
        assert!(decode_identity(&[]).is_err());
    }
}

//! A planned switchover (`ftvm switchover`), the primary's side: the roles
//! of a healthy pair swap at an exit boundary, with no state transfer.
//!
//! The request arrives on the control socket ([`handler`]), which first
//! binds the address this copy will wait on as the new secondary
//! (`--switch-listen`), then asks the VM for a live checkpoint whose mark
//! carries the switchover out on the vCPU thread, the guest standing still
//! right after an exit `E` was handled (at a digest point when the VM
//! computes digests, so that both copies' page hashes agree from there):
//!
//! 1. the secondary acknowledges everything logged, and every held output
//!    is released (nothing the world may see stays behind);
//! 2. a `Switchover` record at `E` is logged and acknowledged: the
//!    secondary replays the log to its end, claims the arbiter at once (no
//!    timeout, no head start) and goes live at its first input past `E`;
//! 3. this side, which yielded its claim in 1 (it never claims while the
//!    secondary may), waits until the arbiter names the other copy; then it
//!    stops its vCPU (which never enters the guest again) and the caller
//!    turns the stopped VM, whose state is the one at `E`, into the new
//!    primary's secondary: a replayer built from the same memory, which
//!    waits on the bound address for the new primary's logging channel.
//!
//! A refusal before 2 changes nothing: the guest goes on as before. When
//! the secondary is lost during 2 or 3 this side claims the arbiter as for
//! a lost peer: won, it carries on alone (and re-protects onto
//! `--standby`); lost, the other copy is live (a switchover all the same).

use std::net::TcpListener;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use replication::log::LogShared;
use replication::record::{LogPosition, Record};
use vmm::hook::ExitIndex;
use vmm::vcpu::StopHandle;

use crate::failover::{Failover, Verdict};
use crate::primary::{Links, Phase, PrimaryShared, SharedReleaser};
use crate::status::{Board, Role, SwitchHandler, SwitchoverEvent};

/// How long each step may wait for the secondary (its acks, its claim).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the request waits for the guest to reach the stop point.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The request's stop point: not reached yet, reached (the switchover
/// runs), given up (the mark does nothing).
const WAITING: u8 = 0;
const STARTED: u8 = 1;
const GAVE_UP: u8 = 2;

/// How long the request waits for the switchover, once started.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished switchover hands the caller: the event, and the
/// listener this copy waits on as the new primary's secondary.
pub struct Switched {
    pub event: SwitchoverEvent,
    pub listener: Option<TcpListener>,
    /// The guest's identity, for the new logging channel.
    pub identity: replication::frame::GuestIdentity,
    /// The process's status board, which its next role goes on with (its
    /// control socket, its metrics, its switchover count).
    pub board: Arc<Board>,
}

impl std::fmt::Debug for Switched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switched").field("event", &self.event).field("listener", &self.listener).finish_non_exhaustive()
    }
}

/// What answers `ftvm switchover` for a primary session. `switch_listen`:
/// where this process waits as the new primary's secondary afterwards
/// (`--switch-listen`); `None` refuses.
pub(crate) fn handler(switcher: Arc<Switcher>, switch_listen: Option<String>) -> SwitchHandler {
    Arc::new(move || {
        let shared = &switcher.shared;
        let Some(listen) = &switch_listen else {
            return Err("this primary has no --switch-listen: after a switchover it could not become the \
                        secondary (start it with --switch-listen HOST:PORT)"
                .to_string());
        };
        if shared.guest_has_ended() {
            return Err("the guest has stopped".to_string());
        }
        if shared.phase() != Phase::Protected {
            return Err("this primary runs unprotected (no secondary in sync): nothing to switch over to".to_string());
        }
        let Some(checkpointer) = shared.checkpointer() else {
            return Err("the guest is not running yet".to_string());
        };
        if shared.switching.swap(true, Ordering::SeqCst) {
            return Err("a switchover is already under way".to_string());
        }
        let answer = (|| {
            // Bound before the secondary is told: the new primary's channel
            // waits in the backlog until this copy accepts it.
            let listener = TcpListener::bind(listen.as_str())
                .map_err(|e| format!("cannot listen on --switch-listen {listen}: {e}"))?;
            *shared.switch_listener.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(listener);
            let (tx, rx) = std::sync::mpsc::channel();
            // Either the vCPU starts the switchover or the request gives up
            // waiting, never both.
            let state = Arc::new(AtomicU8::new(WAITING));
            let started = || state.load(Ordering::SeqCst) == STARTED;
            let mark = {
                let (switcher, state) = (switcher.clone(), state.clone());
                Box::new(move || {
                    if state.compare_exchange(WAITING, STARTED, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                        let _ = tx.send(switcher.at_stop_point());
                    }
                    0
                })
            };
            let _checkpoint = checkpointer.request_marked(mark);
            // Wake a guest asleep in a HLT until the vCPU reaches the stop
            // point (a spurious wake-up, which every guest tolerates).
            let asked = Instant::now();
            while !started() {
                let late = asked.elapsed() > EXIT_TIMEOUT || shared.guest_has_ended();
                if late && state.compare_exchange(WAITING, GAVE_UP, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                    checkpointer.cancel();
                    return Err(format!(
                        "the guest reached no stop point in {} s: switchover not started",
                        EXIT_TIMEOUT.as_secs()
                    ));
                }
                checkpointer.nudge();
                if let Ok(answer) = rx.recv_timeout(Duration::from_millis(1)) {
                    return answer;
                }
            }
            rx.recv_timeout(SWITCH_TIMEOUT)
                .unwrap_or_else(|_| Err(format!("no answer from the switchover in {} s", SWITCH_TIMEOUT.as_secs())))
        })();
        if answer.is_err() {
            // Refused or failed: the port is let go.
            drop(shared.switch_listener.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
        }
        shared.switching.store(false, Ordering::SeqCst);
        answer
    })
}

/// How the attempt ended.
enum Outcome {
    /// The other copy is live: this guest must never run again.
    Done(serde_json::Value),
    /// Nothing changed: the guest goes on as the protected primary.
    Refused(String),
    /// The secondary was lost midway and this side won the arbiter: the
    /// guest goes on alone.
    Alone(String),
    /// The arbiter cannot be reached: nobody may be sure who is live, so
    /// this guest stops.
    Fenced(String),
}

/// The vCPU thread's share of the switchover.
pub(crate) struct Switcher {
    pub(crate) name: String,
    pub(crate) log: Arc<LogShared>,
    pub(crate) links: Arc<Links>,
    pub(crate) releaser: SharedReleaser,
    pub(crate) board: Arc<Board>,
    pub(crate) shared: Arc<PrimaryShared>,
    pub(crate) stop: StopHandle,
}

impl Switcher {
    /// At the stop point (the vCPU thread, the guest standing still right
    /// after the exit the board shows was handled): carry the switchover
    /// out.
    fn at_stop_point(&self) -> Result<serde_json::Value, String> {
        let exit = ExitIndex(self.board.exit_index.load(Ordering::SeqCst));
        let (stopped, stopped_at) = (Instant::now(), SystemTime::now());
        match self.switch(exit, stopped, stopped_at) {
            Outcome::Done(v) => {
                self.stop.stop();
                Ok(v)
            }
            Outcome::Refused(e) | Outcome::Alone(e) => Err(e),
            Outcome::Fenced(e) => {
                self.shared.set_phase(Phase::Fenced);
                self.stop.stop();
                Err(e)
            }
        }
    }

    fn switch(&self, exit: ExitIndex, stopped: Instant, stopped_at: SystemTime) -> Outcome {
        if self.shared.phase() != Phase::Protected {
            return Outcome::Refused(
                "this primary runs unprotected (no secondary in sync): nothing to switch over to".into(),
            );
        }
        let Some(f) = self.links.failover() else {
            return Outcome::Refused("no --arbiter: a switchover hands the guest over through the arbiter".into());
        };
        let Some(chan) = self.links.chan() else {
            return Outcome::Refused("no secondary: nothing to switch over to".into());
        };
        if chan.error().is_some() {
            return Outcome::Refused("the logging channel to the secondary is down".into());
        }
        if f.yield_claim() {
            return Outcome::Refused(
                "the secondary is not in sync yet (a re-protection is under way): try again once protected".into(),
            );
        }
        // 1. Everything logged acknowledged, every output released.
        let upto = self.log.appended();
        if !self.wait_acked(upto, &chan) {
            if chan.error().is_some() {
                return self.lost_midway(&f, "the secondary was lost before it acknowledged the log");
            }
            f.unyield();
            return Outcome::Refused(format!(
                "the secondary did not acknowledge the log in {} s: switchover not started",
                STEP_TIMEOUT.as_secs()
            ));
        }
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.releaser.held() > 0 && Instant::now() < deadline {
            if let Err(e) = self.releaser.release_ready() {
                tracing::warn!(error = %e, "releasing held outputs failed");
            }
            if self.releaser.held() > 0 {
                self.log.wait_changed(Duration::from_millis(1));
            }
        }
        if self.releaser.held() > 0 {
            f.unyield();
            return Outcome::Refused("held outputs could not be released: switchover not started".into());
        }
        // 2. Tell the secondary: it replays to here and goes live.
        let at = self.log.append(Record::Switchover { exit });
        self.log.request_flush();
        let told = self.wait_acked(at, &chan);
        // 3. The secondary claims the arbiter at once.
        let taken = told && matches!(f.taken_by_peer(STEP_TIMEOUT), Ok(true));
        if !taken {
            match f.claim_after_handover() {
                Verdict::Won => {
                    return self.alone(&f, "the secondary did not take the guest over; this copy carries on alone")
                }
                Verdict::Lost => {}
                Verdict::Unreachable(e) => {
                    return Outcome::Fenced(format!(
                        "the arbiter cannot be reached ({e}) while handing over: this copy stopped its guest"
                    ))
                }
            }
        }
        // The other copy is live: this guest never runs again.
        f.stop_heartbeats();
        let pause = stopped.elapsed();
        let event = SwitchoverEvent::now("secondary", exit.0, pause, stopped_at);
        self.board.switched(event.clone());
        self.board.set_state("switched over: the other copy is live; becoming its standby");
        self.board.set_peer(false);
        *self.shared.switched.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(event.clone());
        eprintln!(
            "ftvm: primary {}: switched over at guest exit #{exit}: the other copy is live ({:.2} ms after this guest stopped)",
            self.name,
            pause.as_secs_f64() * 1e3
        );
        Outcome::Done(serde_json::json!({
            "name": self.name,
            "exit": exit.0,
            "pause_ms": event.pause_ms,
            "stopped_unix_ms": event.at_unix_ms,
            "log_position": at.0,
        }))
    }

    /// Wait (at most [`STEP_TIMEOUT`]) until `upto` is acknowledged; `false`
    /// when it is not, or the channel failed.
    fn wait_acked(&self, upto: LogPosition, chan: &replication::channel::PrimaryChannel) -> bool {
        self.log.request_flush();
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !self.log.is_acked(upto) {
            if chan.error().is_some() || Instant::now() >= deadline {
                return false;
            }
            self.log.wait_changed(Duration::from_millis(2));
        }
        true
    }

    /// The secondary was lost midway: claim as for a lost peer.
    fn lost_midway(&self, f: &Arc<Failover>, why: &str) -> Outcome {
        match f.claim_after_handover() {
            Verdict::Won => self.alone(f, why),
            Verdict::Lost => Outcome::Fenced(format!("{why}; it went live (won the arbiter): this copy stopped")),
            Verdict::Unreachable(e) => Outcome::Fenced(format!("{why}; the arbiter cannot be reached ({e})")),
        }
    }

    /// Won the arbiter: carry on alone, as after a lost secondary.
    fn alone(&self, f: &Arc<Failover>, why: &str) -> Outcome {
        self.shared.set_phase(Phase::Alone);
        self.log.set_unprotected();
        let _ = self.releaser.release_ready();
        self.board.set_role(Role::Standalone);
        self.board.set_peer(false);
        self.board.set_state("running: live, unprotected");
        f.stop_heartbeats();
        eprintln!("ftvm: primary {}: switchover failed: {why}; running UNPROTECTED", self.name);
        Outcome::Alone(format!("switchover failed: {why}"))
    }
}

//! Fault injection: makes a guest fail on purpose, the way an application
//! or its OS fails, so that ftvm's health sources and containment can be
//! exercised (the thesis' halt experiment and its variants).
//!
//! Parameters (`--param KEY=VALUE`), read by [`Injector::from_boot`]:
//!
//! - `fault=halt|panic|crash|hang|unhealthy`: what the fault does.
//!   - `halt`: the timer is disarmed and the guest halts forever, as an OS
//!     that executed HLT with nothing left to wake it (the thesis' fault;
//!     ftvm treats a halt with no wake-up deadline as a fault).
//!   - `panic`: reports a panic through pvpanic, then halts forever.
//!   - `crash`: `ud2` with no IDT: a triple fault (the vCPU shuts down).
//!   - `hang`: spins forever without one exit (a livelocked kernel).
//!   - `unhealthy`: keeps serving but never reports health again
//!     ([`Injector::report_health`] does nothing from then on).
//! - exactly one trigger with it:
//!   - `fault_mtbf_ms=N` (N ≥ 1), a *transient* fault: at each tick the
//!     guest draws 32 bits from the entropy device and faults now with
//!     probability `dt / N` (`dt`: guest time since the previous tick;
//!     certain once `dt ≥ N`), so that the expected time to the fault is
//!     about N ms whatever the tick rate. The draw is an input taken after
//!     the last healthy point, so a copy that resumes from that point draws
//!     afresh and usually does not fault at the same moment (a Heisenbug).
//!   - `fault_after_ms=N`, a *persistent* fault: the first tick at or after
//!     N ms of guest clock from boot faults. The trigger is the guest's own
//!     clock and state, so a copy resumed from before it faults again when
//!     it gets there (a Bohrbug).
//!
//! Guests tick the injector once per turn of their main loop, after the
//! turn's outputs went out and before the turn's health report: a fault then
//! strikes after outputs that the last healthy point does not cover, the
//! stretch that `--output-mode fast` may have released and has to roll back.
//!
//! Without `fault` the injector does nothing and costs nothing (no exit). A
//! bad value is a [`ParamError`]: the guest prints it as one line and powers
//! off with its bad-parameter status ([`BAD_PARAM_STATUS`]).
//!
//! Just before it faults the injector prints `fault: injecting KIND at T ms`
//! on the serial console (a diagnostic: under protection that output may be
//! rolled back with the rest of the faulty stretch).

use core::fmt;

use ftvm_abi::BootParams;

use crate::{health, pvpanic, random_u32, set_timer};

/// The power-off status a guest uses for a bad `--param`, the fault's
/// included.
pub const BAD_PARAM_STATUS: u32 = 2;

/// The longest a guest that reports health may go between two turns of its
/// main loop when idle: the network guests sleep at most this long, so a
/// healthy idle guest reports about every 10 ms and a health deadline of
/// 30 ms is never missed.
pub const MAX_IDLE_TURN_NS: u64 = 10_000_000;

const NS_PER_MS: u64 = 1_000_000;

/// What an injected fault does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// Halt with the timer disarmed, forever.
    Halt,
    /// pvpanic, then halt forever.
    Panic,
    /// Triple fault.
    Crash,
    /// Spin without exits.
    Hang,
    /// Serve on, report health no more.
    Unhealthy,
}

impl Fault {
    fn parse(text: &str) -> Option<Fault> {
        Some(match text {
            "halt" => Fault::Halt,
            "panic" => Fault::Panic,
            "crash" => Fault::Crash,
            "hang" => Fault::Hang,
            "unhealthy" => Fault::Unhealthy,
            _ => return None,
        })
    }

    /// The parameter's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Halt => "halt",
            Fault::Panic => "panic",
            Fault::Crash => "crash",
            Fault::Hang => "hang",
            Fault::Unhealthy => "unhealthy",
        }
    }
}

/// When the fault strikes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trigger {
    /// Transient: a draw at each tick, mean time to fault this many ns.
    Mtbf { mean_ns: u64 },
    /// Persistent: the first tick at or after this guest-clock time.
    After { at_ns: u64 },
}

/// A `--param` of the injector that cannot be used.
#[derive(Debug)]
pub enum ParamError {
    /// `fault=` names no fault.
    BadFault(&'static str),
    /// `fault_mtbf_ms=` is not a number ≥ 1.
    BadMtbf(&'static str),
    /// `fault_after_ms=` is not a number.
    BadAfter(&'static str),
    /// `fault=` without a trigger.
    NoTrigger,
    /// Both triggers.
    TwoTriggers,
    /// A trigger without `fault=`.
    NoFault,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamError::BadFault(text) => {
                write!(f, "--param fault={text:?} is not one of halt, panic, crash, hang, unhealthy")
            }
            ParamError::BadMtbf(text) => {
                write!(f, "--param fault_mtbf_ms={text:?} is not a number of milliseconds >= 1")
            }
            ParamError::BadAfter(text) => {
                write!(f, "--param fault_after_ms={text:?} is not a number of milliseconds")
            }
            ParamError::NoTrigger => {
                f.write_str("--param fault needs --param fault_mtbf_ms=N (transient) or fault_after_ms=N (persistent)")
            }
            ParamError::TwoTriggers => f.write_str("--param fault_mtbf_ms and fault_after_ms exclude each other"),
            ParamError::NoFault => {
                f.write_str("--param fault_mtbf_ms / fault_after_ms need --param fault=halt|panic|crash|hang|unhealthy")
            }
        }
    }
}

/// The fault injector a guest ticks once per turn of its main loop.
pub struct Injector {
    armed: Option<(Fault, Trigger)>,
    /// The previous tick's clock reading (transient trigger).
    last_tick_ns: Option<u64>,
    /// The `unhealthy` fault struck: no more health reports.
    unhealthy: bool,
}

impl Injector {
    /// An injector that never faults.
    pub const fn none() -> Injector {
        Injector { armed: None, last_tick_ns: None, unhealthy: false }
    }

    /// Reads `fault`, `fault_mtbf_ms` and `fault_after_ms` (see the module
    /// documentation).
    pub fn from_boot(boot: &'static BootParams) -> Result<Injector, ParamError> {
        let fault = match boot.param("fault") {
            None => None,
            Some(text) => Some(Fault::parse(text).ok_or(ParamError::BadFault(text))?),
        };
        let mtbf = match boot.param("fault_mtbf_ms") {
            None => None,
            Some(text) => Some(
                text.parse::<u64>()
                    .ok()
                    .filter(|ms| *ms >= 1)
                    .and_then(|ms| ms.checked_mul(NS_PER_MS))
                    .ok_or(ParamError::BadMtbf(text))?,
            ),
        };
        let after = match boot.param("fault_after_ms") {
            None => None,
            Some(text) => Some(
                text.parse::<u64>().ok().and_then(|ms| ms.checked_mul(NS_PER_MS)).ok_or(ParamError::BadAfter(text))?,
            ),
        };
        let trigger = match (mtbf, after) {
            (Some(_), Some(_)) => return Err(ParamError::TwoTriggers),
            (Some(mean_ns), None) => Some(Trigger::Mtbf { mean_ns }),
            (None, Some(at_ns)) => Some(Trigger::After { at_ns }),
            (None, None) => None,
        };
        match (fault, trigger) {
            (None, None) => Ok(Injector::none()),
            (Some(fault), Some(trigger)) => {
                Ok(Injector { armed: Some((fault, trigger)), last_tick_ns: None, unhealthy: false })
            }
            (Some(_), None) => Err(ParamError::NoTrigger),
            (None, Some(_)) => Err(ParamError::NoFault),
        }
    }

    /// The fault this injector is set up for, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.armed.map(|(fault, _)| fault)
    }

    /// When the guest should wake at the latest for the next tick to fault
    /// on time (a persistent fault's moment); `None` when no tick is due.
    pub fn wake_at(&self) -> Option<u64> {
        match self.armed {
            Some((_, Trigger::After { at_ns })) => Some(at_ns),
            _ => None,
        }
    }

    /// One tick, at clock reading `now_ns` (the turn's): faults if the
    /// trigger says so. `halt`, `panic`, `crash` and `hang` never return;
    /// `unhealthy` returns and silences [`Injector::report_health`].
    pub fn tick(&mut self, now_ns: u64) {
        let Some((fault, trigger)) = self.armed else {
            return;
        };
        let strike = match trigger {
            Trigger::After { at_ns } => now_ns >= at_ns,
            Trigger::Mtbf { mean_ns } => {
                let last = self.last_tick_ns.replace(now_ns);
                match last {
                    // The first tick only starts the clock.
                    None => false,
                    Some(last) => {
                        let dt = now_ns.saturating_sub(last);
                        // P(fault) = dt / mean, as a fraction of 2^32;
                        // certain once dt >= mean (no draw then).
                        let threshold = (u128::from(dt) << 32) / u128::from(mean_ns);
                        threshold > u128::from(u32::MAX) || u128::from(random_u32()) < threshold
                    }
                }
            }
        };
        if strike {
            self.strike(fault, now_ns);
        }
    }

    /// Reports `value` to the health device unless the `unhealthy` fault
    /// struck. Call it once per turn, when the application's invariants
    /// hold.
    pub fn report_health(&self, value: u32) {
        if !self.unhealthy {
            health(value);
        }
    }

    fn strike(&mut self, fault: Fault, now_ns: u64) {
        crate::println!("fault: injecting {} at {} ms", fault.name(), now_ns / NS_PER_MS);
        match fault {
            Fault::Unhealthy => {
                self.unhealthy = true;
                // Struck once: the guest serves on, silent.
                self.armed = None;
            }
            Fault::Halt => halt_forever(),
            Fault::Panic => {
                pvpanic();
                halt_forever()
            }
            Fault::Crash => triple_fault(),
            Fault::Hang => hang(),
        }
    }
}

/// Halts with no wake-up deadline, forever (a halt may still return when a
/// frame arrives; it halts again).
fn halt_forever() -> ! {
    set_timer(0);
    loop {
        crate::halt();
    }
}

/// `ud2` with the IDT the VMM boots with (none): the exception cannot be
/// delivered and the vCPU shuts down.
fn triple_fault() -> ! {
    // SAFETY: `ud2` raises #UD, which the boot IDT (limit 0) cannot deliver:
    // the vCPU triple-faults and never returns here. It touches no memory.
    unsafe { core::arch::asm!("ud2", options(noreturn, nostack, nomem)) }
}

/// Spins without a single exit, forever.
fn hang() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

//! `ftvm-bench`: the benchmarks, each a program that prints a table (or
//! JSON) with its baseline measured in the same run. Kept out of the `ftvm`
//! binary: production VMs carry no benchmark code. Needs the `ftvm` binary
//! beside it (`cargo build --release` builds both).
#![forbid(unsafe_code)]

mod exits;
mod failover;
mod health;
mod held;
mod lockstep;
mod net;
mod repair;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ftvm_demo::Failure;

/// `ftvm-bench`: ftvm's benchmarks.
#[derive(Debug, Parser)]
#[command(name = "ftvm-bench", version, about = "ftvm's benchmarks: tables beside a baseline measured in the same run")]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

/// One variant per benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Guest exits per second: a test guest that does nothing but exit, on
    /// real KVM (needs /dev/kvm).
    Exits(ExitsArgs),
    /// The kvstore guest under redis-benchmark (-t set,get) in a lab of
    /// network namespaces, beside a real redis-server (needs root, KVM,
    /// redis-tools; redis-server for the reference).
    Kvstore(KvstoreBenchArgs),
    /// The streamer guest's highest rate with no gap, in a lab of network
    /// namespaces (needs root and KVM).
    Streamer(StreamerBenchArgs),
    /// SIGKILL of the primary VMM, and the loss of its whole host, repeated
    /// under streamer and kvstore: reaction, recovery and client-seen outage
    /// as min / median / p95 (needs root and KVM).
    Failover(FailoverBenchArgs),
    /// What protection costs: kvstore unprotected / protected over loopback
    /// / protected across a veth link, log bandwidth, replay lag, and a
    /// CPU-bound guest (needs root, KVM, redis-tools).
    Lockstep(KvstoreBenchArgs),
    /// What a stalled (SIGSTOPped) secondary costs the primary's memory:
    /// streamer at a high rate, the primary's RSS each second (needs root
    /// and KVM).
    Held(HeldBenchArgs),
    /// Live state transfer to an empty host (repair time and the guest's
    /// pause) for 64/256/1024 MiB guests, idle, written and writing, beside
    /// QEMU's live migration of the same size on loopback (needs KVM and
    /// qemu-system-x86 for the baseline).
    Repair(RepairBenchArgs),
    /// Application failures: the client-seen outage per health source,
    /// `fast` and `strict`, median and p95; the thesis' halt experiment with
    /// and without containment; what `strict` adds to a kvstore request's
    /// p50 (needs root and KVM).
    Health(HealthBenchArgs),
}

/// `ftvm-bench repair`.
#[derive(Debug, Args)]
pub struct RepairBenchArgs {
    /// Guest sizes in MiB (repeatable); 64, 256 and 1024 by default.
    #[arg(long = "size", value_name = "MIB", value_parser = clap::value_parser!(u64).range(16..=4096))]
    pub sizes: Vec<u64>,
    /// Leave out QEMU's migration.
    #[arg(long)]
    pub no_qemu: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `ftvm-bench health`.
#[derive(Debug, Args)]
pub struct HealthBenchArgs {
    /// Runs per row (each source and mode; each halt experiment).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `ftvm-bench held`.
#[derive(Debug, Args)]
pub struct HeldBenchArgs {
    /// Seconds the secondary stays stopped.
    #[arg(long, value_name = "N", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub seconds: u64,
    /// Datagrams per second.
    #[arg(long, value_name = "N", default_value_t = 20000)]
    pub rate: u32,
    /// Another `ftvm` binary (an older build) to measure first, side by side.
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<std::path::PathBuf>,
}

/// `ftvm-bench kvstore`.
#[derive(Debug, Args)]
pub struct KvstoreBenchArgs {
    /// Requests per test (redis-benchmark -n).
    #[arg(long, value_name = "N", default_value_t = 20000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,
    /// Parallel connections (redis-benchmark -c).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub clients: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `ftvm-bench failover`.
#[derive(Debug, Args)]
pub struct FailoverBenchArgs {
    /// Repetitions per guest and failure.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub reps: u32,
    /// The failures to measure (repeatable); both by default.
    #[arg(long, value_enum, value_name = "process|host")]
    pub failure: Vec<Failure>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `ftvm-bench streamer`.
#[derive(Debug, Args)]
pub struct StreamerBenchArgs {
    /// Seconds measured at each rate.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub seconds: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `ftvm-bench exits`.
#[derive(Debug, Args)]
pub struct ExitsArgs {
    // clap appends "[default: 5]" itself, from default_value_t.
    /// How long to measure, in whole seconds (at least 1).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub seconds: u64,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let result = match cli.command {
        BenchCommand::Exits(a) => exits::exits(a.seconds, 3, a.json),
        BenchCommand::Kvstore(a) => net::kvstore(a.requests, a.clients, a.json),
        BenchCommand::Streamer(a) => net::streamer(a.seconds, a.json),
        BenchCommand::Lockstep(a) => lockstep::lockstep(a.requests, a.clients, a.json),
        BenchCommand::Held(a) => held::held(a.seconds, a.rate, a.baseline),
        BenchCommand::Repair(a) => {
            let sizes = if a.sizes.is_empty() { vec![64, 256, 1024] } else { a.sizes };
            repair::repair(&sizes, !a.no_qemu, a.json)
        }
        BenchCommand::Health(a) => health::bench(a.runs, a.json),
        BenchCommand::Failover(a) => {
            let failures = if a.failure.is_empty() { vec![Failure::Process, Failure::Host] } else { a.failure };
            failover::bench(a.reps, &failures, a.json)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftvm-bench: {e:#}");
            match e.downcast_ref::<ftvm_demo::Interrupted>() {
                Some(i) => ExitCode::from(u8::try_from(i.exit_code()).unwrap_or(1)),
                None => ExitCode::FAILURE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exits_seconds_and_json() {
        let BenchCommand::Exits(e) = Cli::try_parse_from(["ftvm-bench", "exits", "--seconds", "1"]).unwrap().command
        else {
            panic!("`exits` parsed as another benchmark");
        };
        assert_eq!((e.seconds, e.json), (1, false));
        let BenchCommand::Exits(e) = Cli::try_parse_from(["ftvm-bench", "exits", "--json"]).unwrap().command else {
            panic!("`exits --json` parsed as another benchmark");
        };
        assert_eq!((e.seconds, e.json), (5, true));
    }

    #[test]
    fn bad_numbers_and_no_benchmark_are_usage_errors() {
        for bad in ["0", "-1", "five", ""] {
            let err = Cli::try_parse_from(["ftvm-bench", "exits", "--seconds", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "--seconds {bad:?}");
        }
        assert_eq!(Cli::try_parse_from(["ftvm-bench"]).unwrap_err().exit_code(), 2);
    }
}

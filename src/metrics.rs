//! `--metrics ADDR`: a Prometheus endpoint (GET /metrics, OpenMetrics text
//! from the `prometheus-client` crate) over a VMM process's status board.
//!
//! Nothing is counted twice: every scrape takes a [`pair::Status`] snapshot
//! (the same one `ftvm status --json` prints) and the ack round-trip
//! histogram from the [`Board`], and encodes them. A scraper that accepts
//! OpenMetrics (Prometheus does) gets it; any other client (`curl`,
//! `promtool check metrics`, older scrapers) gets the same families in the
//! classic text format 0.0.4 ([`to_classic`]). The responder is one
//! thread that answers one connection at a time with a short read timeout:
//! a scraper is a handful of requests a minute, and a client that stalls
//! costs others at most [`READ_TIMEOUT`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use pair::status::{Board, Role};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// How long a scraper may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The most bytes of a request read (request line and headers).
const MAX_REQUEST: usize = 8192;

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of the classic Prometheus text format.
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes the board on each scrape.
struct BoardCollector(Arc<Board>);

impl std::fmt::Debug for BoardCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoardCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, unit, c.metric_type())?)
}

fn gauge_f(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, unit, g.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for BoardCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.snapshot();
        let seconds = Unit::Seconds;
        let bytes = Unit::Bytes;
        {
            let mut role = e.encode_descriptor(
                "ftvm_role",
                "The process's role: 1 for the current one (primary, secondary or standalone)",
                None,
                MetricType::Gauge,
            )?;
            for r in [Role::Primary, Role::Secondary, Role::Standalone] {
                let name = match r {
                    Role::Primary => "primary",
                    Role::Secondary => "secondary",
                    Role::Standalone => "standalone",
                };
                let labels = [("role", name)];
                ConstGauge::new(i64::from(r == s.role)).encode(role.encode_family(&labels)?)?;
            }
        }
        gauge_f(&mut e, "ftvm_uptime", "Time since the process started", Some(&seconds), s.uptime_s)?;
        counter(&mut e, "ftvm_guest_exits", "Guest exits so far (the exit index)", None, s.exit_index)?;
        counter(
            &mut e,
            "ftvm_log_records",
            "Primary: log records appended; secondary: records replayed",
            None,
            s.log_position,
        )?;
        counter(&mut e, "ftvm_log", "Primary: encoded bytes of the log records shipped", Some(&bytes), s.log_bytes)?;
        if let Some(acked) = s.acked_position {
            gauge(
                &mut e,
                "ftvm_log_acked_position",
                "Primary: acknowledged by the secondary; secondary: received",
                acked,
            )?;
        }
        gauge(
            &mut e,
            "ftvm_released_position",
            "Log position whose outputs have all been released",
            s.released_position,
        )?;
        if let Some(lag) = s.replay_lag_records {
            gauge(
                &mut e,
                "ftvm_replay_lag_records",
                "Primary: records not yet acknowledged; secondary: received, not yet replayed",
                lag,
            )?;
        }
        if let Some(ms) = s.replay_lag_ms {
            gauge_f(
                &mut e,
                "ftvm_replay_lag",
                "Primary with failover: how far the secondary's replay is behind, in the primary's execution time",
                Some(&seconds),
                ms / 1e3,
            )?;
        }
        gauge(
            &mut e,
            "ftvm_outputs_held",
            "Outputs waiting for an ack (primary) or kept for re-emission (secondary)",
            s.outputs_held,
        )?;
        gauge(
            &mut e,
            "ftvm_outputs_held_bytes",
            "Primary: bytes of the outputs waiting for an ack",
            s.outputs_held_bytes,
        )?;
        counter(&mut e, "ftvm_divergences", "Replay divergences detected", None, s.divergences)?;
        counter(
            &mut e,
            "ftvm_switchovers",
            "Planned switchovers (ftvm switchover) this process took part in",
            None,
            s.switchovers,
        )?;
        gauge(
            &mut e,
            "ftvm_peer_up",
            "1 while the peer is heard from",
            u64::from(s.peer == pair::status::PeerState::Up),
        )?;
        {
            let rtt = self.0.ack_rtt.snapshot();
            let mut h = e.encode_descriptor(
                "ftvm_ack_round_trip",
                "Primary: log records handed to the channel until the secondary's ack covered them",
                Some(&seconds),
                MetricType::Histogram,
            )?;
            h.encode_histogram::<prometheus_client::encoding::NoLabelSet>(rtt.sum_s, rtt.count, &rtt.buckets, None)?;
        }
        if let Some(hb) = s.heartbeats {
            let mut fam = e.encode_descriptor(
                "ftvm_heartbeats",
                "Heartbeats on the dedicated link: sent, and received by verdict",
                None,
                MetricType::Counter,
            )?;
            for (kind, v) in [
                ("sent", hb.sent),
                ("accepted", hb.accepted),
                ("forged", hb.forged),
                ("replayed", hb.replayed),
                ("foreign", hb.foreign),
                ("malformed", hb.malformed),
                ("unproven", hb.unproven),
                ("answered", hb.answered),
            ] {
                let labels = [("kind", kind)];
                ConstCounter::new(v).encode(fam.encode_family(&labels)?)?;
            }
        }
        {
            let mut fam = e.encode_descriptor(
                "ftvm_failures",
                "Peer failures handled by this process, by kind",
                None,
                MetricType::Counter,
            )?;
            for kind in ["primary lost", "secondary lost"] {
                let n = u64::from(s.last_failure.as_ref().is_some_and(|f| f.kind == kind));
                let labels = [("kind", kind)];
                ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
            }
        }
        if let Some(f) = &s.last_failure {
            for (name, help, ms) in [
                ("ftvm_last_failure_reaction", "Last failure: last sign of life until declared lost", f.reaction_ms),
                ("ftvm_last_failure_recovery", "Last failure: declared lost until service resumed", f.recovery_ms),
                ("ftvm_last_failure_outage", "Last failure: reaction plus recovery", f.outage_ms),
            ] {
                gauge_f(&mut e, name, help, Some(&seconds), ms / 1e3)?;
            }
        }
        Ok(())
    }
}

/// The OpenMetrics text for `board` now.
pub fn render(board: &Arc<Board>) -> Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(BoardCollector(board.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).context("cannot encode the metrics")?;
    Ok(out)
}

/// OpenMetrics text as the classic text format 0.0.4: a counter's HELP
/// and TYPE lines name its `_total` sample (OpenMetrics names the family
/// without the suffix), and the `# UNIT` and `# EOF` lines, which 0.0.4 does
/// not have, are left out.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A bound metrics endpoint.
pub struct Endpoint {
    listener: TcpListener,
}

impl Endpoint {
    /// Bind `addr` now, so that a taken port is an error at start.
    pub fn bind(addr: SocketAddr) -> Result<Endpoint> {
        let listener = TcpListener::bind(addr).with_context(|| format!("--metrics {addr}: cannot listen"))?;
        Ok(Endpoint { listener })
    }

    /// Serve `board` on a thread of its own for the rest of the process.
    pub fn serve(self, board: Arc<Board>) -> Result<()> {
        let listener = self.listener;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if let Err(e) = answer(conn, &board) {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                }
            })
            .context("cannot start the metrics thread")?;
        Ok(())
    }
}

/// Read one request and answer it: GET (or HEAD) /metrics → 200, another
/// path → 404, another method → 405, a request that is not HTTP → 400.
fn answer(mut conn: TcpStream, board: &Arc<Board>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    conn.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let openmetrics = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .any(|(k, v)| k.eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text"));
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (status, body) = match (method, target, version) {
        (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/") => {
            let path = t.split('?').next().unwrap_or(t);
            match (m, path) {
                ("GET" | "HEAD", "/metrics") => match render(board) {
                    Ok(text) if openmetrics => ("200 OK", text),
                    Ok(text) => ("200 OK", to_classic(&text)),
                    Err(e) => ("500 Internal Server Error", format!("{e}\n")),
                },
                ("GET" | "HEAD", _) => ("404 Not Found", "metrics are at /metrics\n".to_string()),
                _ => ("405 Method Not Allowed", "only GET and HEAD\n".to_string()),
            }
        }
        _ => ("400 Bad Request", "not an HTTP request\n".to_string()),
    };
    let content_type = match (status.starts_with("200"), openmetrics) {
        (true, true) => OPENMETRICS,
        (true, false) => CLASSIC,
        (false, _) => "text/plain; charset=utf-8",
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    if method != Some("HEAD") {
        conn.write_all(body.as_bytes())?;
    }
    conn.flush()
}

/// The input source of `ftvm run` with `--metrics`: publishes the exit
/// index on the board as the guest runs.
pub struct CountExits<I> {
    pub inner: I,
    pub board: Arc<Board>,
}

impl<I: vmm::hook::InputSource> vmm::hook::InputSource for CountExits<I> {
    fn on_exit(&mut self, exit: vmm::hook::ExitIndex, kind: &vmm::hook::ExitKind) -> Result<(), vmm::hook::HookError> {
        self.board.note_exit(exit.0);
        self.inner.on_exit(exit, kind)
    }
    fn clock_ns(&mut self, exit: vmm::hook::ExitIndex) -> Result<u64, vmm::hook::HookError> {
        self.inner.clock_ns(exit)
    }
    fn entropy(&mut self, exit: vmm::hook::ExitIndex, buf: &mut [u8]) -> Result<(), vmm::hook::HookError> {
        self.inner.entropy(exit, buf)
    }
    fn halt(
        &mut self,
        exit: vmm::hook::ExitIndex,
        deadline: Option<u64>,
    ) -> Result<vmm::hook::Wake, vmm::hook::HookError> {
        self.inner.halt(exit, deadline)
    }
    fn receive_frame(&mut self, exit: vmm::hook::ExitIndex) -> Result<Option<Vec<u8>>, vmm::hook::HookError> {
        self.inner.receive_frame(exit)
    }
    fn digest(
        &mut self,
        exit: vmm::hook::ExitIndex,
        digest: &vmm::digest::StateDigest,
    ) -> Result<(), vmm::hook::HookError> {
        self.inner.digest(exit, digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_board_encodes_every_family_once() {
        let board = Arc::new(Board::new("kv", Role::Primary));
        board.note_exit(42);
        let text = render(&board).unwrap();
        for needle in [
            "# TYPE ftvm_role gauge",
            "ftvm_role{role=\"primary\"} 1",
            "ftvm_role{role=\"secondary\"} 0",
            "ftvm_guest_exits_total 42",
            "# TYPE ftvm_ack_round_trip_seconds histogram",
            "ftvm_ack_round_trip_seconds_bucket{le=\"+Inf\"} 0",
            "ftvm_failures_total{kind=\"primary lost\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        assert!(!text.contains("ftvm_heartbeats"), "no heartbeats without failover:\n{text}");
        let classic = to_classic(&text);
        for needle in
            ["# TYPE ftvm_guest_exits_total counter\nftvm_guest_exits_total 42", "# HELP ftvm_divergences_total "]
        {
            assert!(classic.contains(needle), "{needle:?} missing from:\n{classic}");
        }
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"), "{classic}");
        assert!(classic.contains("# TYPE ftvm_ack_round_trip_seconds histogram"), "{classic}");
    }
}

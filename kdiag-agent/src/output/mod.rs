//! Writes records to stdout as JSON Lines (the default) or text columns.

pub(crate) mod clock;
pub(crate) mod metrics;
pub(crate) mod record;
pub(crate) mod stats;
pub(crate) mod writer;

use std::{
    collections::HashSet,
    io::{self, Write},
    time::Duration,
};

use crate::{
    output::clock::{RFC3339_LEN, WallClock},
    output::record::{BudgetMark, Marked, Record},
    output::writer::{Sink, Writer},
};

/// Records are handed to the writer thread in chunks of about this size
/// (and at every flush).
const CHUNK_BYTES: usize = 64 * 1024;

/// Writes a diagnostic to stderr. A closed or full stderr is no reason to
/// stop tracing (and `eprintln!` would panic on it), so a failed write is
/// ignored.
pub(crate) fn diagnose(message: impl std::fmt::Display) {
    let _ = writeln!(io::stderr(), "kdiag-agent: {message}");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// JSON Lines, schema v1 (docs/SCHEMA.md).
    Json,
    /// Aligned columns for people.
    Text,
}

pub(crate) struct Output {
    /// Records not yet handed to the writer: whole lines.
    out: Vec<u8>,
    writer: Writer,
    format: Format,
    /// The host name, already JSON-escaped and quoted.
    host_json: String,
    clock: WallClock,
    /// Reused for every record: no allocation per record once warm.
    body: Vec<u8>,
    headers_written: HashSet<&'static str>,
    /// Added to every summary written while set (see [`Output::set_mark`]).
    mark: Option<BudgetMark>,
}

impl Output {
    pub(crate) fn new(
        sink: Box<dyn Sink>,
        format: Format,
        host: &str,
        clock: WallClock,
    ) -> io::Result<Self> {
        Ok(Self {
            out: Vec::with_capacity(CHUNK_BYTES),
            writer: Writer::new(sink)?,
            format,
            host_json: serde_json::to_string(host).unwrap_or_else(|_| "\"\"".to_owned()),
            clock,
            body: Vec::with_capacity(512),
            headers_written: HashSet::new(),
            mark: None,
        })
    }

    pub(crate) fn clock_mut(&mut self) -> &mut WallClock {
        &mut self.clock
    }

    /// Marks the summaries written from now on as produced under a reduced
    /// budget step (`None`: full detail, no mark).
    pub(crate) fn set_mark(&mut self, mark: Option<BudgetMark>) {
        self.mark = mark;
    }

    /// The mark summaries written now carry.
    pub(crate) fn mark(&self) -> Option<BudgetMark> {
        self.mark
    }

    /// The mark `R` carries now, as JSON members (`,"budget_step":..`).
    fn mark_members<R: Record>(&self) -> Option<String> {
        let mark = self.mark.filter(|_| R::MARKED != Marked::No)?;
        let mut members = format!(",\"budget_step\":{}", mark.step);
        if R::MARKED == Marked::StepAndFraction {
            members.push_str(&format!(",\"sampled_fraction\":{}", mark.sampled_fraction));
        }
        Some(members)
    }

    /// Writes one record stamped with the monotonic time `mono_ns`.
    pub(crate) fn write<R: Record>(&mut self, mono_ns: u64, record: &R) -> io::Result<()> {
        self.format_into_out(mono_ns, record)?;
        if self.out.len() >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn format_into_out<R: Record>(&mut self, mono_ns: u64, record: &R) -> io::Result<()> {
        match self.format {
            Format::Json => {
                let mark = self.mark_members::<R>();
                self.body.clear();
                serde_json::to_writer(&mut self.body, record)?;
                // The body is a JSON object: its members are spliced in after
                // the envelope's, straight into the output buffer.
                let members = self.body.strip_prefix(b"{").unwrap_or(&self.body);
                let out = &mut self.out;
                out.write_all(b"{\"v\":1,\"type\":\"")?;
                out.write_all(R::TYPE.as_bytes())?;
                out.write_all(b"\",\"ts\":\"")?;
                out.write_all(&self.clock.format(mono_ns))?;
                out.write_all(b"\",\"host\":")?;
                out.write_all(self.host_json.as_bytes())?;
                if members != b"}" {
                    out.write_all(b",")?;
                }
                match mark {
                    // Records are JSON objects with members: the mark goes
                    // before the closing brace.
                    Some(mark) if members.len() > 1 => {
                        out.write_all(&members[..members.len() - 1])?;
                        out.write_all(mark.as_bytes())?;
                        out.write_all(b"}")?;
                    }
                    _ => out.write_all(members)?,
                }
            }
            Format::Text => {
                if !R::TEXT_HEADER.is_empty() && self.headers_written.insert(R::TYPE) {
                    self.out.write_all(R::TEXT_HEADER.as_bytes())?;
                    self.out.write_all(b"\n")?;
                }
                let mut ts = String::with_capacity(RFC3339_LEN);
                self.clock.format_into(mono_ns, &mut ts);
                self.out.write_all(record.text_row(&ts).as_bytes())?;
                if let Some(mark) = self.mark.filter(|_| R::MARKED != Marked::No) {
                    let sampled = if R::MARKED == Marked::StepAndFraction {
                        format!(", sampled {:.0}%", mark.sampled_fraction * 100.0)
                    } else {
                        String::new()
                    };
                    write!(self.out, "  [budget step {}{sampled}]", mark.step)?;
                }
            }
        }
        self.out.write_all(b"\n")
    }

    /// Hands what was written to the writer thread; an error only when
    /// nobody reads stdout any more.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.out, Vec::with_capacity(CHUNK_BYTES));
        self.writer.submit(chunk)
    }

    /// Records that never reached stdout since the last call: the writer's
    /// queue was full, or they were still queued when the agent stopped.
    pub(crate) fn take_dropped(&mut self) -> u64 {
        self.writer.take_dropped()
    }

    /// The end of the output: gives the writer thread until `within` from
    /// now to write what is queued (the rest is counted by
    /// [`Output::take_dropped`]). Call before building the last record,
    /// which [`Output::write_last`] then writes.
    pub(crate) fn finish(&mut self, within: Duration) -> io::Result<()> {
        let flushed = self.flush();
        self.writer.finish(within);
        flushed
    }

    /// Writes `record` after everything else, straight to stdout: into the
    /// room the writer kept free on a pipe, so that it is there once a
    /// stopped reader reads again. Nothing is written when the writer
    /// thread is stuck in a blocking write or stdout is closed.
    pub(crate) fn write_last<R: Record>(&mut self, mono_ns: u64, record: &R) -> io::Result<()> {
        self.format_into_out(mono_ns, record)?;
        let last = std::mem::take(&mut self.out);
        match self.writer.finish(Duration::ZERO) {
            Some(sink) => sink.write_all(&last).and_then(|()| sink.flush()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{
        output::record::{Cgroup, ResolvedOwner},
        output::record::{Endpoints, Retrans, SenderState},
    };

    /// A writer the test can read back after the Output is done with it.
    #[derive(Clone, Default)]
    pub(super) struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Sink for SharedBuf {
        fn room(&self) -> Option<usize> {
            None
        }
    }

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl SharedBuf {
        pub(super) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn retrans() -> Retrans {
        Retrans {
            owner: ResolvedOwner {
                pid: Some(4242),
                comm: Some("cu\"rl\n".into()),
                cgroup: Cgroup::default(),
            },
            conn: Endpoints {
                family: "ipv4",
                saddr: [10, 0, 0, 2].into(),
                sport: 50000,
                daddr: [10, 0, 0, 1].into(),
                dport: 9001,
            },
            state: "SYN_SENT",
            kind: "syn",
            conn_retrans: 2,
            sender: SenderState {
                srtt_us: Some(20_500),
                cwnd: Some(1),
                ..SenderState::default()
            },
        }
    }

    #[test]
    fn json_line_has_envelope_and_exact_fields() {
        let buf = SharedBuf::default();
        let clock = WallClock::with_offset(1_795_300_567_000_000_000);
        let mut out = Output::new(Box::new(buf.clone()), Format::Json, "web-1", clock).unwrap();
        out.write(5, &retrans()).unwrap();
        out.finish(Duration::from_secs(5)).unwrap();
        let text = buf.text();
        assert_eq!(
            text,
            "{\"v\":1,\"type\":\"retrans\",\"ts\":\"2026-11-21T22:36:07.000000005Z\",\"host\":\"web-1\",\
             \"pid\":4242,\"comm\":\"cu\\\"rl\\n\",\"cgroup\":null,\"container_id\":null,\"pod_uid\":null,\"family\":\"ipv4\",\
             \"saddr\":\"10.0.0.2\",\"sport\":50000,\"daddr\":\"10.0.0.1\",\"dport\":9001,\
             \"state\":\"SYN_SENT\",\"kind\":\"syn\",\"conn_retrans\":2,\
             \"srtt_us\":20500,\"rttvar_us\":null,\"cwnd\":1,\"ssthresh\":null,\
             \"packets_out\":null,\"lost_out\":null,\"retrans_out\":null,\"total_retrans\":null}\n"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["comm"], "cu\"rl\n");
    }

    #[test]
    fn summaries_carry_the_budget_mark() {
        let buf = SharedBuf::default();
        let clock = WallClock::with_offset(0);
        let mut out = Output::new(Box::new(buf.clone()), Format::Json, "h", clock).unwrap();
        let summary = crate::output::record::SoftirqSummary {
            cpu: 0,
            vec: "NET_RX",
            count: 1,
            service_total_ns: 5,
            service_max_ns: 5,
            service_p99_ns: 5,
            delay_max_ns: None,
            delay_p99_ns: None,
            interval_ns: 10,
        };
        out.set_mark(Some(BudgetMark {
            step: 3,
            sampled_fraction: 0.25,
            delay_shed: true,
        }));
        out.write(0, &summary).unwrap();
        // Per-event records are not summaries: no mark.
        out.write(0, &retrans()).unwrap();
        out.set_mark(None);
        out.write(0, &summary).unwrap();
        out.finish(Duration::from_secs(5)).unwrap();
        let lines: Vec<serde_json::Value> = buf
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["budget_step"], 3);
        assert_eq!(lines[0]["sampled_fraction"], 0.25);
        assert_eq!(lines[0]["interval_ns"], 10);
        assert!(lines[1].get("budget_step").is_none());
        assert!(lines[2].get("budget_step").is_none());
        assert!(lines[2].get("sampled_fraction").is_none());
    }

    #[test]
    fn text_has_header_once() {
        let buf = SharedBuf::default();
        let mut out = Output::new(
            Box::new(buf.clone()),
            Format::Text,
            "h",
            WallClock::with_offset(0),
        )
        .unwrap();
        out.write(0, &retrans()).unwrap();
        out.write(0, &retrans()).unwrap();
        out.finish(Duration::from_secs(5)).unwrap();
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TIME"));
        assert!(lines[1].contains("10.0.0.2:50000") && lines[1].contains("SYN_SENT"));
        // The sender's state: SRTT in ms, CWND, and `-` for the unknown
        // ssthresh.
        assert!(
            lines[0].ends_with("SRTT_MS  CWND  SSTHRESH"),
            "{}",
            lines[0]
        );
        assert!(lines[1].ends_with(" 20.500   1     -"), "{}", lines[1]);
    }
}

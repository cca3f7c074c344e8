//! Loads the kernel programs: reads the tracepoints' layouts, writes offsets
//! and filters into the programs' configuration, loads the object, attaches
//! each program, and reports what could not attach.

use std::collections::HashMap;

use aya::{Ebpf, EbpfError, EbpfLoader, programs::TracePoint, util::KernelVersion};
use kdiag_common::{
    Transport,
    tcp::{FIELD_ABSENT, MAX_PORTS, TcpConfig, TcpTpOffsets, TupleOffsets},
};

use crate::{
    btf,
    class::Tracepoint,
    record::Degraded,
    tracefs::{Format, Tracefs, TracefsError},
    transport::TransportKind,
};

/// The kernel programs, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kdiag"));

/// Size of the shared ring buffer: about 8000 retransmit events.
const RING_BYTES: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("cannot attach {what}, which this class needs: {why}")]
    Required { what: String, why: String },
    #[error("loading the kernel programs failed: {0}")]
    Load(#[from] EbpfError),
    #[error("at most {MAX_PORTS} ports can be filtered on, got {0}")]
    TooManyPorts(usize),
}

/// What to load: the tracepoints of every class asked for, the filters the
/// kernel applies, the transport.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    pub tracepoints: Vec<Tracepoint>,
    pub transport: TransportKind,
    /// 0 = both, else AF_INET or AF_INET6.
    pub family: u16,
    pub ports: Vec<u16>,
}

pub struct Loaded {
    pub ebpf: Ebpf,
    /// Ring buffer or perf, never `Auto`.
    pub transport: TransportKind,
    pub attached: Vec<Tracepoint>,
    pub degraded: Vec<Degraded>,
}

pub fn load(req: &LoadRequest) -> Result<Loaded, LoadError> {
    if req.ports.len() > MAX_PORTS {
        return Err(LoadError::TooManyPorts(req.ports.len()));
    }
    let tracefs = Tracefs::open()?;
    let mut degraded = Vec::new();
    let mut formats: HashMap<&'static str, Format> = HashMap::new();
    for tp in &req.tracepoints {
        match tracefs.format(tp.group, tp.name) {
            Ok(f) => {
                formats.insert(tp.program, f);
            }
            Err(e) => give_up_or_degrade(tp, e.to_string(), &mut degraded)?,
        }
    }

    let mut tcp = TcpConfig::DEFAULT;
    tcp.retransmit_skb = tcp_offsets(formats.get("retransmit_skb"));
    tcp.retransmit_synack = tcp_offsets(formats.get("retransmit_synack"));
    tcp.set_state = tcp_offsets(formats.get("inet_sock_set_state"));
    if formats.contains_key("inet_sock_set_state") {
        match btf::sk_net_offset() {
            Ok(offset) => tcp.sk_net_offset = offset,
            Err(e) => degraded.push(Degraded {
                what: "btf/sock_common.skc_net".to_owned(),
                why: format!(
                    "listeners on one port in different network namespaces share an owner: {e}"
                ),
            }),
        }
    }
    tcp.family = req.family;
    tcp.nports = req.ports.len() as u16;
    tcp.ports[..req.ports.len()].copy_from_slice(&req.ports);

    let transport = resolve_transport(req.transport);
    let wire_transport = match transport {
        TransportKind::Perf => Transport::Perf,
        _ => Transport::RingBuf,
    };
    // The unused transport's buffer shrinks to one page.
    let ring_bytes = if transport == TransportKind::Perf {
        page_size()
    } else {
        RING_BYTES
    };
    let mut ebpf = EbpfLoader::new()
        // No CO-RE relocations in these programs: skip parsing the kernel's
        // BTF (tens of MiB of peak memory).
        .btf(None)
        .override_global("TRANSPORT", &(wire_transport as u32), true)
        .override_global("TCP_CONFIG", &tcp, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(OBJECT)?;

    let mut attached = Vec::new();
    for tp in &req.tracepoints {
        if !formats.contains_key(tp.program) {
            continue;
        }
        match attach(&mut ebpf, tp) {
            Ok(()) => attached.push(*tp),
            Err(why) => give_up_or_degrade(tp, why, &mut degraded)?,
        }
    }
    Ok(Loaded {
        ebpf,
        transport,
        attached,
        degraded,
    })
}

fn give_up_or_degrade(
    tp: &Tracepoint,
    why: String,
    degraded: &mut Vec<Degraded>,
) -> Result<(), LoadError> {
    if tp.required {
        return Err(LoadError::Required {
            what: tp.path(),
            why,
        });
    }
    degraded.push(Degraded {
        what: tp.path(),
        why,
    });
    Ok(())
}

fn attach(ebpf: &mut Ebpf, tp: &Tracepoint) -> Result<(), String> {
    let program: &mut TracePoint = ebpf
        .program_mut(tp.program)
        .ok_or_else(|| format!("program {} missing from the object", tp.program))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program.load().map_err(|e| format!("verifier: {e}"))?;
    program
        .attach(tp.group, tp.name)
        .map_err(|e| format!("attach: {e}"))?;
    Ok(())
}

/// The BPF ring buffer exists since 5.8.
fn resolve_transport(asked: TransportKind) -> TransportKind {
    match asked {
        TransportKind::Auto => {
            let has_ringbuf =
                KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 8, 0));
            if has_ringbuf {
                TransportKind::Ringbuf
            } else {
                TransportKind::Perf
            }
        }
        other => other,
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// Offsets of the TCP fields in a tracepoint's format; absent ones (and all
/// of them, when the tracepoint is missing) are `FIELD_ABSENT`.
pub fn tcp_offsets(format: Option<&Format>) -> TcpTpOffsets {
    let Some(f) = format else {
        return TcpTpOffsets::ABSENT;
    };
    let at = |name: &str| f.field(name).map_or(FIELD_ABSENT, |f| f.offset);
    TcpTpOffsets {
        tuple: TupleOffsets {
            sport: at("sport"),
            dport: at("dport"),
            family: at("family"),
            saddr: at("saddr"),
            daddr: at("daddr"),
            saddr_v6: at("saddr_v6"),
            daddr_v6: at("daddr_v6"),
            _pad: 0,
        },
        skaddr: at("skaddr"),
        req: at("req"),
        // tcp_retransmit_skb calls it `state`, inet_sock_set_state `newstate`.
        state: f
            .field("state")
            .or_else(|| f.field("newstate"))
            .map_or(FIELD_ABSENT, |f| f.offset),
        oldstate: at("oldstate"),
        protocol: at("protocol"),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracefs::parse_format;

    #[test]
    fn offsets_from_set_state_format() {
        let text = "format:
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
";
        let o = tcp_offsets(Some(&parse_format(text).unwrap()));
        assert_eq!((o.skaddr, o.oldstate, o.state, o.protocol), (8, 16, 20, 30));
        assert_eq!(o.tuple.sport, 24);
        assert_eq!(o.tuple.daddr_v6, FIELD_ABSENT);
        assert_eq!(o.req, FIELD_ABSENT);
        assert_eq!(tcp_offsets(None), TcpTpOffsets::ABSENT);
    }
}

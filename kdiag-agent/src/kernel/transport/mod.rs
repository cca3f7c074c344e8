//! Reading events from the kernel: one BPF ring buffer shared by every CPU,
//! or one perf buffer per CPU. Both are drained in batches: one wakeup, then
//! everything that is there, for at most a slice of time (see
//! [`Reader::drain`]).
//!
//! Events reach the agent in the order the kernel produced them, which the
//! per-connection and per-thread state relies on: a connection's state
//! changes happen one after the other under its socket lock, but not always
//! on one CPU. The ring buffer keeps its single order; the perf buffers'
//! batch is put back in time order (see [`PerfBatch`]).

pub(crate) mod perf;
pub(crate) mod sizing;

use std::{future::poll_fn, io, os::fd::AsFd as _, task::Poll, time::Instant};

use aya::maps::{Map, MapData, MapError, RingBuf};
use kdiag_common::WAKEUP_FRACTION_SHIFT;
use tokio::io::unix::AsyncFd;

use crate::sys::{
    self, SyscallError,
    fd::{OwnedFdHolder, register_readable},
};
use perf::{PerfBatch, PerfBuffer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TransportKind {
    /// The BPF ring buffer where the kernel has it (5.8+), else perf.
    Auto,
    /// One BPF ring buffer shared by all CPUs, events in order.
    Ringbuf,
    /// One perf buffer per CPU (kernels before 5.8).
    Perf,
}

impl TransportKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Auto | Self::Ringbuf => "ringbuf",
            Self::Perf => "perf",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("cannot use the {name} map")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the PERF_EVENTS map is not a perf event array")]
    NotPerfEventArray,
    #[error("cannot open the perf buffer of cpu {cpu}")]
    PerfBuffer {
        cpu: u32,
        #[source]
        source: SyscallError,
    },
    #[error("cannot list online cpus")]
    Cpus(#[source] io::Error),
    #[error("cannot register the buffer with the event loop")]
    Register(#[source] io::Error),
}

pub(crate) enum Reader {
    Ring(AsyncFd<RingBuf<MapData>>),
    Perf {
        buffers: Vec<AsyncFd<PerfBuffer>>,
        batch: PerfBatch,
        /// The perf event array the programs write through, holding the
        /// buffers' descriptors.
        _array: MapData,
    },
}

impl Reader {
    pub(crate) fn ring(map: Map) -> Result<Self, TransportError> {
        let ring = RingBuf::try_from(map).map_err(|source| TransportError::Map {
            name: "EVENTS",
            source,
        })?;
        Ok(Self::Ring(register(ring)?))
    }

    /// `buffer_bytes` is shared out among the CPUs' buffers, each waking
    /// the reader when the same fraction of it is queued as the ring
    /// buffer does (`kdiag_common::WAKEUP_FRACTION_SHIFT`).
    pub(crate) fn perf(map: Map, buffer_bytes: u32) -> Result<Self, TransportError> {
        let Map::PerfEventArray(array) = map else {
            return Err(TransportError::NotPerfEventArray);
        };
        let cpus = aya::util::online_cpus().map_err(|(_, e)| TransportError::Cpus(e))?;
        let page_size = sys::process::page_size();
        let pages = perf_pages(buffer_bytes as usize, cpus.len(), page_size);
        let watermark =
            u32::try_from((pages * page_size) >> WAKEUP_FRACTION_SHIFT).unwrap_or(u32::MAX);
        let mut buffers = Vec::with_capacity(cpus.len());
        for cpu in cpus {
            let buf = PerfBuffer::open(cpu, pages, page_size, watermark)
                .and_then(|buf| buf.attach_to(array.fd().as_fd(), cpu).map(|()| buf))
                .map_err(|source| TransportError::PerfBuffer { cpu, source })?;
            buffers.push(register(buf)?);
        }
        Ok(Self::Perf {
            buffers,
            batch: PerfBatch::default(),
            _array: array,
        })
    }

    /// Waits until some buffer has data.
    pub(crate) async fn readable(&mut self) -> io::Result<()> {
        let fds: Vec<&AsyncFd<_>> = match self {
            Self::Ring(fd) => {
                let mut guard = fd.readable_mut().await?;
                guard.clear_ready();
                return Ok(());
            }
            Self::Perf { buffers, .. } => buffers.iter().collect(),
        };
        poll_fn(|cx| {
            let mut any = false;
            for fd in &fds {
                match fd.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut guard)) => {
                        guard.clear_ready();
                        any = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if any {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Malformed perf records met since the last call (the ring buffer's
    /// records are checked by the kernel).
    pub(crate) fn take_malformed(&mut self) -> u64 {
        match self {
            Self::Ring(_) => 0,
            Self::Perf { batch, .. } => batch.take_malformed(),
        }
    }

    /// Hands queued samples to `on_sample` until `until` (all of them if
    /// `None`); returns whether the ring buffer still had samples then.
    /// When the programs write faster than the agent handles their events
    /// (a host busier than the agent's share of a CPU can follow), the ring
    /// never empties: a drain to its end would never let the event loop see
    /// its timers and signals (no interval, no exit on SIGTERM). The perf
    /// buffers are read as far as they were filled when the drain began,
    /// which bounds it.
    pub(crate) fn drain(
        &mut self,
        until: Option<Instant>,
        mut on_sample: impl FnMut(&[u8]),
    ) -> bool {
        /// The clock is read once per this many samples: a sample takes a
        /// microsecond or two, a clock read tens of nanoseconds.
        const CHECK_EVERY: u32 = 64;
        match self {
            Self::Ring(fd) => {
                let ring = fd.get_mut();
                let mut handled = 0u32;
                while let Some(item) = ring.next() {
                    on_sample(&item);
                    handled = handled.wrapping_add(1);
                    if handled.is_multiple_of(CHECK_EVERY)
                        && until.is_some_and(|until| Instant::now() >= until)
                    {
                        return true;
                    }
                }
                false
            }
            Self::Perf { buffers, batch, .. } => {
                // What was stamped before now is in the buffers, or on its
                // way to them ahead of anything stamped later (PerfBatch).
                // After the programs are detached, that is everything.
                let began = sys::process::monotonic_ns() as u64;
                for fd in buffers.iter_mut() {
                    batch.read_from(fd.get_mut());
                }
                batch.drain_in_time_order(began, on_sample);
                false
            }
        }
    }
}

fn register<T: OwnedFdHolder>(inner: T) -> Result<AsyncFd<T>, TransportError> {
    register_readable(inner).map_err(TransportError::Register)
}

/// Pages per CPU for perf buffers: `buffer_bytes` shared out among `cpus`,
/// rounded down to a power of two (the kernel requires one), at least one.
fn perf_pages(buffer_bytes: usize, cpus: usize, page_size: usize) -> usize {
    let per_cpu = buffer_bytes / cpus.max(1) / page_size.max(1);
    match per_cpu {
        0 => 1,
        n => 1 << n.ilog2(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_buffer_shared_out_in_powers_of_two() {
        let mib = 1 << 20;
        assert_eq!(perf_pages(4 * mib, 2, 4096), 512);
        assert_eq!(perf_pages(4 * mib, 3, 4096), 256);
        assert_eq!(perf_pages(4 * mib, 64, 4096), 16);
        assert_eq!(perf_pages(mib, 1024, 4096), 1);
        assert_eq!(perf_pages(mib, 0, 4096), 256);
    }
}

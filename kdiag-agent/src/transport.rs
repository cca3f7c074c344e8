//! Reading events from the kernel: one BPF ring buffer shared by every CPU,
//! or one perf buffer per CPU. Both are drained in batches: one wakeup, then
//! everything that is there.

use std::{future::poll_fn, io, os::fd::AsRawFd, task::Poll};

use aya::maps::{
    Map, MapData, MapError, PerfEventArray, RingBuf,
    perf::{PerfBufferError, PerfEvent, PerfEventArrayBuffer},
};
use tokio::io::{Interest, unix::AsyncFd};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// The BPF ring buffer where the kernel has it (5.8+), else perf.
    Auto,
    /// One BPF ring buffer shared by all CPUs, events in order.
    Ringbuf,
    /// One perf buffer per CPU (kernels before 5.8).
    Perf,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto | Self::Ringbuf => "ringbuf",
            Self::Perf => "perf",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot use the {name} map: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("cannot open the perf buffer of cpu {cpu}: {source}")]
    PerfBuffer { cpu: u32, source: PerfBufferError },
    #[error("cannot list online cpus: {0}")]
    Cpus(io::Error),
    #[error("cannot register the buffer with the event loop: {0}")]
    Register(io::Error),
}

pub enum Reader {
    Ring(AsyncFd<RingBuf<MapData>>),
    Perf {
        buffers: Vec<AsyncFd<PerfEventArrayBuffer<MapData>>>,
        /// A sample that wrapped around its ring, made contiguous.
        scratch: Vec<u8>,
    },
}

impl Reader {
    pub fn ring(map: Map) -> Result<Self, TransportError> {
        let ring = RingBuf::try_from(map).map_err(|source| TransportError::Map {
            name: "EVENTS",
            source,
        })?;
        Ok(Self::Ring(register(ring)?))
    }

    /// `buffer_bytes` is shared out among the CPUs' buffers.
    pub fn perf(map: Map, buffer_bytes: u32) -> Result<Self, TransportError> {
        let mut array = PerfEventArray::try_from(map).map_err(|source| TransportError::Map {
            name: "PERF_EVENTS",
            source,
        })?;
        let cpus = aya::util::online_cpus().map_err(|(_, e)| TransportError::Cpus(e))?;
        let pages = perf_pages(buffer_bytes as usize, cpus.len(), page_size());
        let mut buffers = Vec::with_capacity(cpus.len());
        for cpu in cpus {
            let buf = array
                .open(cpu, Some(pages))
                .map_err(|source| TransportError::PerfBuffer { cpu, source })?;
            buffers.push(register(buf)?);
        }
        Ok(Self::Perf {
            buffers,
            scratch: Vec::new(),
        })
    }

    /// Waits until some buffer has data.
    pub async fn readable(&mut self) -> io::Result<()> {
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

    /// Hands every queued sample to `on_sample`.
    pub fn drain(&mut self, mut on_sample: impl FnMut(&[u8])) {
        match self {
            Self::Ring(fd) => {
                let ring = fd.get_mut();
                while let Some(item) = ring.next() {
                    on_sample(&item);
                }
            }
            Self::Perf { buffers, scratch } => {
                for fd in buffers.iter_mut() {
                    fd.get_mut().for_each(|event| match event {
                        PerfEvent::Sample { head, tail: [] } => on_sample(head),
                        PerfEvent::Sample { head, tail } => {
                            scratch.clear();
                            scratch.extend_from_slice(head);
                            scratch.extend_from_slice(tail);
                            on_sample(scratch);
                        }
                        // The programs count each failed output per class
                        // (kdiag_common::LOSS_LOST); the kernel's own count
                        // is the same samples, without the class.
                        PerfEvent::Lost { .. } => {}
                    });
                }
            }
        }
    }
}

fn register<T: AsRawFd>(inner: T) -> Result<AsyncFd<T>, TransportError> {
    // SAFETY: aya's ring and perf buffers own their descriptors and keep them
    // open, unchanged, until they are dropped, which the AsyncFd does.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| TransportError::Register(e.into_parts().1))
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
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

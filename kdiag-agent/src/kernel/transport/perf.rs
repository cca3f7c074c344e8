//! One CPU's perf buffer for the perf transport, opened by the agent itself
//! rather than through aya's `PerfEventArray::open`: aya 0.14 asks the
//! kernel to wake the reader after every sample (`wakeup_events = 1`), and
//! each wakeup is an irq_work, an interrupt the CPU sends itself (in a VM, an
//! exit to the hypervisor), which made inet_sock_set_state several times
//! dearer under connection churn (docs/BENCHMARKS.md, "Perf transport").
//! These buffers wake the reader only when the bytes queued cross a
//! watermark, like the ring buffer's programs do; the agent's drain timer
//! reads whatever stays below it.
//!
//! The layouts and constants are the kernel's stable ABI
//! (include/uapi/linux/perf_event.h and bpf.h), which libc does not carry.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    ptr::{self, NonNull},
    sync::atomic::{Ordering, fence},
};

use kdiag_common::EventHeader;

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER0` (64 bytes), which
/// every kernel accepts and which holds every field used here.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// The attribute bit field: `disabled` is bit 0, `watermark` bit 14.
    flags: u64,
    /// `wakeup_watermark` when the `watermark` bit is set.
    wakeup_watermark: u32,
    bp_type: u32,
    config1: u64,
}
const _: () = assert!(size_of::<PerfEventAttr>() == 64);

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_BPF_OUTPUT: u64 = 10;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const ATTR_FLAG_WATERMARK: u64 = 1 << 14;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_SAMPLE: u32 = 9;
/// `data_head` and `data_tail` in `struct perf_event_mmap_page`.
const DATA_HEAD_OFFSET: usize = 1024;
const DATA_TAIL_OFFSET: usize = 1032;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// `struct perf_event_header`, the start of every record: u32 type, u16
/// misc, u16 size (of the whole record).
const HEADER_LEN: usize = 8;

pub struct PerfBuffer {
    /// The mapping: one metadata page, then `data_len` bytes of ring.
    map: NonNull<u8>,
    map_len: usize,
    data_len: usize,
    page_size: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is owned by this value alone and only read or written
// through `&mut self` (the kernel's side is synchronised by data_head and
// data_tail, as the perf ABI specifies).
unsafe impl Send for PerfBuffer {}

impl PerfBuffer {
    /// Opens the BPF output event of `cpu` with a ring of `pages` pages (a
    /// power of two) that wakes its reader when `watermark` bytes are
    /// queued, maps it and enables it.
    pub fn open(cpu: u32, pages: usize, page_size: usize, watermark: u32) -> io::Result<Self> {
        let attr = PerfEventAttr {
            type_: PERF_TYPE_SOFTWARE,
            size: size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_BPF_OUTPUT,
            sample_period: 1,
            sample_type: PERF_SAMPLE_RAW,
            flags: ATTR_FLAG_WATERMARK,
            wakeup_watermark: watermark.max(1),
            ..PerfEventAttr::default()
        };
        // SAFETY: `attr` is a valid perf_event_attr of the size it states;
        // pid -1 with a cpu is "every process on that CPU".
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &raw const attr,
                -1 as libc::pid_t,
                cpu as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let data_len = pages * page_size;
        let map_len = data_len + page_size;
        // SAFETY: a fresh shared mapping of the event's buffer; checked below.
        let map = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let buffer = Self {
            map: NonNull::new(map.cast()).ok_or_else(io::Error::last_os_error)?,
            map_len,
            data_len,
            page_size,
            fd,
        };
        // SAFETY: an ioctl without argument on our perf event descriptor.
        if unsafe { libc::ioctl(buffer.fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(buffer)
    }

    /// Makes this buffer the one the programs write to on `cpu`: its
    /// descriptor into the perf event array `map` at index `cpu`.
    pub fn attach_to(&self, map: BorrowedFd<'_>, cpu: u32) -> io::Result<()> {
        let value = self.fd.as_raw_fd() as u32;
        // `union bpf_attr` for BPF_MAP_UPDATE_ELEM: map_fd, padding, key and
        // value pointers, flags (BPF_ANY = 0).
        let attr: [u64; 4] = [
            u64::from(map.as_raw_fd() as u32),
            ptr::from_ref(&cpu) as u64,
            ptr::from_ref(&value) as u64,
            0,
        ];
        // SAFETY: `attr` is a valid bpf_attr of the size given; the key and
        // value it points to live until the call returns.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                attr.as_ptr(),
                size_of_val(&attr) as libc::c_uint,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Copies every sample queued into `batch` and frees their room.
    pub fn drain_into(&mut self, batch: &mut PerfBatch) {
        let meta = self.map.as_ptr();
        // SAFETY: both fields lie in the mapping's first page. data_head is
        // written by the kernel: read it once, then fence (acquire) so the
        // records before it are read after it, as perf_event.h prescribes.
        let head = unsafe { ptr::read_volatile(meta.add(DATA_HEAD_OFFSET).cast::<u64>()) };
        fence(Ordering::Acquire);
        // SAFETY: as above; only this reader writes data_tail.
        let tail = unsafe { ptr::read_volatile(meta.add(DATA_TAIL_OFFSET).cast::<u64>()) };
        if head == tail {
            return;
        }
        // SAFETY: the data area follows the first page, `data_len` bytes,
        // and the kernel leaves [tail, head) alone until data_tail moves.
        unsafe {
            walk(
                meta.add(self.page_size),
                self.data_len,
                tail,
                head,
                |h, t| batch.push(h, t),
            );
        }
        // Every read above completes before the kernel may reuse the room.
        fence(Ordering::SeqCst);
        // SAFETY: data_tail, in the first page; this reader is its only writer.
        unsafe { ptr::write_volatile(meta.add(DATA_TAIL_OFFSET).cast::<u64>(), head) };
    }
}

impl AsRawFd for PerfBuffer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for PerfBuffer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for PerfBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once; the descriptor
        // closes after it.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

/// Hands each sample recorded in [tail, head) of the ring at `data` (`len`
/// bytes, a power of two) to `on_sample` as the up to two pieces it wraps
/// into; other records (lost-sample reports) are skipped: the programs count
/// each failed output per class (kdiag_common::LOSS_LOST), and the kernel's
/// own count is the same samples without the class.
///
/// # Safety
/// `data` must be valid for reads of `len` bytes, and [tail, head) must hold
/// complete perf records that nothing writes while this runs.
unsafe fn walk(
    data: *const u8,
    len: usize,
    mut tail: u64,
    head: u64,
    mut on_sample: impl FnMut(&[u8], &[u8]),
) {
    // Pieces of the ring from logical position `at`, `n` bytes, split where
    // it wraps.
    let pieces = |at: u64, n: usize| -> (&[u8], &[u8]) {
        let start = (at % len as u64) as usize;
        let first = n.min(len - start);
        // SAFETY: both ranges are inside the ring (per the caller).
        unsafe {
            (
                std::slice::from_raw_parts(data.add(start), first),
                std::slice::from_raw_parts(data, n - first),
            )
        }
    };
    // The 8 bytes from logical position `at`, made contiguous.
    let bytes = |at: u64| -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        let (a, b) = pieces(at, HEADER_LEN);
        out[..a.len()].copy_from_slice(a);
        out[a.len()..].copy_from_slice(b);
        out
    };
    while tail < head {
        let header = bytes(tail);
        let type_ = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
        let size = usize::from(u16::from_ne_bytes([header[6], header[7]]));
        if size < HEADER_LEN || tail + size as u64 > head {
            // Not a record: stop here rather than read past what the
            // kernel published (cannot happen with a well-formed ring).
            return;
        }
        // A sample: the header, a u32 length, then that many bytes (padded
        // to 8, which is why the length is its own).
        if type_ == PERF_RECORD_SAMPLE && size >= HEADER_LEN + 4 {
            let after = bytes(tail + HEADER_LEN as u64);
            let n = u32::from_ne_bytes([after[0], after[1], after[2], after[3]]) as usize;
            let (a, b) = pieces(tail + HEADER_LEN as u64 + 4, n.min(size - HEADER_LEN - 4));
            on_sample(a, b);
        } else {
            debug_assert_eq!(type_, PERF_RECORD_LOST);
        }
        tail += size as u64;
    }
}

/// The samples of one drain of every CPU's perf buffer, copied out and
/// handed on in the order of their timestamps.
///
/// Sorting each drain is enough. A connection's next state change starts
/// only after the program that reported the previous one has written it
/// (both run under the socket lock), so a drain that finds the later event
/// in one CPU's buffer finds the earlier one in its CPU's buffer too, read
/// after it or before. Without this, state changes of one connection came
/// out of order under loopback churn (docs/BENCHMARKS.md has how often),
/// and the connection table took a connection's close before its
/// establishment.
#[derive(Debug, Default)]
pub struct PerfBatch {
    bytes: Vec<u8>,
    /// (timestamp, start in `bytes`, length) per sample.
    samples: Vec<(u64, usize, usize)>,
}

impl PerfBatch {
    /// Adds a sample, given as the up to two pieces of a perf ring.
    pub fn push(&mut self, head: &[u8], tail: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(head);
        self.bytes.extend_from_slice(tail);
        let sample = &self.bytes[start..];
        // A sample too short for a header sorts first; decoding reports it.
        let ts = sample
            .get(TS_OFFSET..TS_OFFSET + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_ne_bytes);
        self.samples.push((ts, start, sample.len()));
    }

    /// Hands every sample to `on_sample`, oldest first (ties in the order
    /// they were read), and empties the batch, keeping its memory.
    pub fn drain_in_time_order(&mut self, mut on_sample: impl FnMut(&[u8])) {
        self.samples.sort_by_key(|&(ts, _, _)| ts);
        for &(_, start, len) in &self.samples {
            on_sample(&self.bytes[start..start + len]);
        }
        self.samples.clear();
        self.bytes.clear();
    }
}

const TS_OFFSET: usize = std::mem::offset_of!(EventHeader, ts_ns);

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample: a header with `ts`, then `payload`.
    fn timed_sample(ts: u64, payload: &[u8]) -> Vec<u8> {
        let mut s = vec![0; TS_OFFSET];
        s.extend_from_slice(&ts.to_ne_bytes());
        s.extend_from_slice(payload);
        s
    }

    #[test]
    fn perf_batch_comes_out_in_time_order() {
        let mut batch = PerfBatch::default();
        // CPU 0's buffer, then CPU 1's; one sample wrapped around its ring.
        let (a, b, c, d) = (
            timed_sample(30, b"a"),
            timed_sample(10, b"b"),
            timed_sample(20, b"c"),
            timed_sample(30, b"d"),
        );
        batch.push(&a, &[]);
        batch.push(&b[..5], &b[5..]);
        batch.push(&c, &[]);
        batch.push(&d, &[]);
        batch.push(b"short", &[]);
        let mut out = Vec::new();
        batch.drain_in_time_order(|s| out.push(s.to_vec()));
        assert_eq!(out, [b"short".to_vec(), b, c, a, d]);
        let mut again = 0;
        batch.drain_in_time_order(|_| again += 1);
        assert_eq!(again, 0, "drained batch is empty");
    }

    /// A ring of `len` bytes holding `records` from logical position
    /// `start`; returns it and the head.
    fn ring(len: usize, start: u64, records: &[Vec<u8>]) -> (Vec<u8>, u64) {
        let mut data = vec![0xAA; len];
        let mut at = start;
        for r in records {
            for &byte in r {
                data[(at % len as u64) as usize] = byte;
                at += 1;
            }
        }
        (data, at)
    }

    fn header(type_: u32, size: usize) -> Vec<u8> {
        let mut h = type_.to_ne_bytes().to_vec();
        h.extend_from_slice(&0u16.to_ne_bytes());
        h.extend_from_slice(&(size as u16).to_ne_bytes());
        h
    }

    /// A sample record as the kernel writes it: padded to 8 bytes.
    fn sample(payload: &[u8]) -> Vec<u8> {
        let size = (HEADER_LEN + 4 + payload.len()).next_multiple_of(8);
        let mut r = header(PERF_RECORD_SAMPLE, size);
        r.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        r.extend_from_slice(payload);
        r.resize(size, 0);
        r
    }

    fn lost(count: u64) -> Vec<u8> {
        let mut r = header(PERF_RECORD_LOST, HEADER_LEN + 16);
        r.extend_from_slice(&7u64.to_ne_bytes());
        r.extend_from_slice(&count.to_ne_bytes());
        r
    }

    fn samples(data: &[u8], tail: u64, head: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        // SAFETY: `data` is a live buffer of its length, written before.
        unsafe {
            walk(data.as_ptr(), data.len(), tail, head, |a, b| {
                out.push([a, b].concat());
            });
        }
        out
    }

    #[test]
    fn samples_come_out_whole_around_the_wrap() {
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 5 + usize::from(i)]).collect();
        let mut records: Vec<Vec<u8>> = payloads.iter().map(|p| sample(p)).collect();
        records.insert(3, lost(2));
        // Each start puts the wrap somewhere else: inside a payload or
        // between records.
        for start in (0..128).map(|i| 1000 * 1024 + i * 8) {
            let (data, head) = ring(1024, start, &records);
            assert_eq!(samples(&data, start, head), payloads, "from {start}");
        }
    }

    #[test]
    fn a_truncated_ring_stops_without_reading_past_head() {
        let (data, head) = ring(256, 0, &[sample(b"first"), sample(b"second")]);
        assert_eq!(samples(&data, 0, head - 8), [b"first".to_vec()]);
        assert_eq!(samples(&data, 0, 0), Vec::<Vec<u8>>::new());
    }
}

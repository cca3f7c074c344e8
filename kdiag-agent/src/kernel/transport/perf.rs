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
//! The record layouts are the kernel's (include/uapi/linux/perf_event.h),
//! from aya's generated bindings.

use std::mem::offset_of;

use aya_obj::generated::{perf_event_header, perf_event_type};
use kdiag_common::EventHeader;

pub(crate) use crate::sys::perf::PerfBuffer;
use crate::sys::perf::RingView;

/// `struct perf_event_header`, the start of every record: its type, and its
/// size (of the whole record).
const HEADER_LEN: usize = size_of::<perf_event_header>();
const TYPE_AT: usize = offset_of!(perf_event_header, type_);
const SIZE_AT: usize = offset_of!(perf_event_header, size);
/// A PERF_SAMPLE_RAW sample follows its header with a u32 size, then that
/// many bytes (perf_event.h, PERF_RECORD_SAMPLE: `u32 size; char data[size]`).
const RAW_SIZE_LEN: usize = size_of::<u32>();
const PERF_RECORD_SAMPLE: u32 = perf_event_type::PERF_RECORD_SAMPLE as u32;
const PERF_RECORD_LOST: u32 = perf_event_type::PERF_RECORD_LOST as u32;

/// Hands each sample in `ring` to `on_sample` as the up to two pieces it
/// wraps into; other records (lost-sample reports) are skipped: the programs
/// count each failed output per class (kdiag_common::LOSS_LOST), and the
/// kernel's own count is the same samples without the class. Returns the
/// malformed records met: a sample too short for its size field, or a
/// record that is not one, where the walk stops (whatever follows it in
/// this read is lost with it).
fn walk(ring: &RingView<'_>, mut on_sample: impl FnMut(&[u8], &[u8])) -> u64 {
    let mut malformed = 0;
    let mut tail = ring.tail();
    while tail < ring.head() {
        // A record shorter than a header, or one that ends past head, is not
        // one: stop here rather than read past what the kernel published
        // (cannot happen with a well-formed ring).
        let Some(header) = contiguous::<HEADER_LEN>(ring, tail) else {
            return malformed + 1;
        };
        let type_ = u32::from_ne_bytes(field(&header, TYPE_AT));
        let size = usize::from(u16::from_ne_bytes(field(&header, SIZE_AT)));
        if size < HEADER_LEN || tail + size as u64 > ring.head() {
            return malformed + 1;
        }
        // The raw size is its own field because the record is padded to 8.
        if type_ == PERF_RECORD_SAMPLE && size >= HEADER_LEN + RAW_SIZE_LEN {
            let at = tail + HEADER_LEN as u64;
            let Some(raw_size) = contiguous::<RAW_SIZE_LEN>(ring, at) else {
                return malformed + 1;
            };
            let n = u32::from_ne_bytes(raw_size) as usize;
            let at = at + RAW_SIZE_LEN as u64;
            let Some((a, b)) = ring.get(at, n.min(size - HEADER_LEN - RAW_SIZE_LEN)) else {
                return malformed + 1;
            };
            on_sample(a, b);
        } else if type_ != PERF_RECORD_LOST {
            malformed += 1;
        }
        tail += size as u64;
    }
    malformed
}

/// The `N` bytes of `ring` from position `at`, made contiguous.
fn contiguous<const N: usize>(ring: &RingView<'_>, at: u64) -> Option<[u8; N]> {
    let (a, b) = ring.get(at, N)?;
    let mut out = [0; N];
    out[..a.len()].copy_from_slice(a);
    out[a.len()..].copy_from_slice(b);
    Some(out)
}

/// The `N` bytes of `bytes` from `at`.
fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    std::array::from_fn(|i| bytes[at + i])
}

/// The samples of the drains of every CPU's perf buffer, copied out and
/// handed on in the order of their timestamps.
///
/// A connection's next state change starts only after the program that
/// reported the previous one has written it (both run under the socket
/// lock), and a socket's address is reused only after its last change was
/// written; but the two may be written on different CPUs. A drain reads the
/// buffers one after the other, so it can find the later event in one
/// CPU's buffer and miss the earlier one, written after that CPU's buffer
/// was read (more likely the longer a drain takes: under emulation, it
/// happened to a test connection). So a drain hands on only the samples
/// stamped before it began (`before_ns`), and keeps the others for the
/// next: an event stamped earlier than a sample handed on was written
/// before that sample's program began, hence before the drain began, and
/// was read by it. Without this, state changes of one connection came out
/// of order under loopback churn (docs/BENCHMARKS.md has how often), and
/// the connection table took a connection's close before its establishment.
#[derive(Debug, Default)]
pub(crate) struct PerfBatch {
    bytes: Vec<u8>,
    /// (timestamp, start in `bytes`, length) per sample.
    samples: Vec<(u64, usize, usize)>,
    /// `bytes` of the previous drain, for the samples kept.
    spare: Vec<u8>,
    /// Malformed records met since the last `take_malformed`.
    malformed: u64,
}

impl PerfBatch {
    /// Copies every sample queued in `buffer` into the batch and frees their
    /// room.
    pub(crate) fn read_from(&mut self, buffer: &mut PerfBuffer) {
        let mut malformed = 0;
        buffer.read(|ring| malformed = walk(ring, |head, tail| self.push(head, tail)));
        self.malformed += malformed;
    }

    /// Malformed records met since the last call.
    pub(crate) fn take_malformed(&mut self) -> u64 {
        std::mem::take(&mut self.malformed)
    }

    /// Adds a sample, given as the up to two pieces of a perf ring.
    pub(crate) fn push(&mut self, head: &[u8], tail: &[u8]) {
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

    /// Hands every sample stamped before `before_ns` (monotonic, taken
    /// before the buffers were read) to `on_sample`, oldest first (ties in
    /// the order they were read), and keeps the others for the next drain.
    pub(crate) fn drain_in_time_order(&mut self, before_ns: u64, mut on_sample: impl FnMut(&[u8])) {
        self.samples.sort_by_key(|&(ts, _, _)| ts);
        let ready = self.samples.partition_point(|&(ts, _, _)| ts < before_ns);
        for &(_, start, len) in &self.samples[..ready] {
            on_sample(&self.bytes[start..start + len]);
        }
        let mut kept = std::mem::take(&mut self.spare);
        kept.clear();
        for (_, start, len) in &mut self.samples[ready..] {
            let at = kept.len();
            kept.extend_from_slice(&self.bytes[*start..*start + *len]);
            *start = at;
        }
        self.samples.drain(..ready);
        self.spare = std::mem::replace(&mut self.bytes, kept);
    }
}

const TS_OFFSET: usize = offset_of!(EventHeader, ts_ns);

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
        batch.drain_in_time_order(31, |s| out.push(s.to_vec()));
        assert_eq!(out, [b"short".to_vec(), b, c, a, d]);
        let mut again = 0;
        batch.drain_in_time_order(u64::MAX, |_| again += 1);
        assert_eq!(again, 0, "drained batch is empty");
    }

    /// A drain reads CPU 0's buffer, then CPU 1's. `late` (stamped 15) was
    /// still being written on CPU 0 when CPU 0's was read, and `next`
    /// (stamped 25, after `late` was written) is in CPU 1's: the drain that
    /// began at 20 hands on only what was stamped before it, and `next`
    /// comes out after `late`, with the next drain.
    #[test]
    fn samples_stamped_after_the_drain_began_wait_for_the_next() {
        let mut batch = PerfBatch::default();
        let (early, late, next) = (
            timed_sample(10, b"early"),
            timed_sample(15, b"late"),
            timed_sample(25, b"next"),
        );
        batch.push(&early, &[]);
        batch.push(&next, &[]);
        let mut out = Vec::new();
        batch.drain_in_time_order(20, |s| out.push(s.to_vec()));
        assert_eq!(out, std::slice::from_ref(&early));
        batch.push(&late, &[]);
        batch.drain_in_time_order(30, |s| out.push(s.to_vec()));
        assert_eq!(out, [early, late, next]);
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
        let mut h = vec![0; HEADER_LEN];
        h[TYPE_AT..TYPE_AT + 4].copy_from_slice(&type_.to_ne_bytes());
        h[SIZE_AT..SIZE_AT + 2].copy_from_slice(&(size as u16).to_ne_bytes());
        h
    }

    /// A sample record as the kernel writes it: padded to 8 bytes.
    fn sample(payload: &[u8]) -> Vec<u8> {
        let size = (HEADER_LEN + RAW_SIZE_LEN + payload.len()).next_multiple_of(8);
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

    /// The samples in `data` from `tail` to `head`, and the malformed
    /// records met.
    fn walked(data: &[u8], tail: u64, head: u64) -> (Vec<Vec<u8>>, u64) {
        let mut out = Vec::new();
        let malformed = walk(&RingView::new(data, tail, head), |a, b| {
            out.push([a, b].concat());
        });
        (out, malformed)
    }

    fn samples(data: &[u8], tail: u64, head: u64) -> Vec<Vec<u8>> {
        let (out, malformed) = walked(data, tail, head);
        assert_eq!(malformed, 0);
        out
    }

    #[test]
    fn malformed_records_are_counted() {
        let good = sample(b"abc");
        // A record of an unknown type is stepped over; one whose size is
        // smaller than a header ends the walk.
        let records = [
            good.clone(),
            header(99, HEADER_LEN),
            header(PERF_RECORD_SAMPLE, 2),
        ];
        let (data, head) = ring(1024, 0, &records);
        assert_eq!(walked(&data, 0, head), (vec![b"abc".to_vec()], 2));
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
        // The second record ends past head: not one.
        assert_eq!(walked(&data, 0, head - 8), (vec![b"first".to_vec()], 1));
        assert_eq!(samples(&data, 0, 0), Vec::<Vec<u8>>::new());
    }
}

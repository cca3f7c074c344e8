//! One CPU's perf buffer for BPF output: the perf event, its ring mapped
//! into the agent, and its place in a perf event array, where the programs
//! find it. Layouts and constants are the kernel's
//! (include/uapi/linux/perf_event.h, bpf.h), from aya's generated bindings.

use std::{
    ffi::{c_int, c_long, c_uint, c_ulong},
    marker::PhantomData,
    mem::{MaybeUninit, offset_of},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    ptr::{self, NonNull},
    sync::atomic::{AtomicU64, Ordering},
};

use aya_obj::generated::{
    BPF_ANY, PERF_EVENT_IOC_ENABLE, PERF_FLAG_FD_CLOEXEC, bpf_attr, bpf_attr__bindgen_ty_2,
    bpf_attr__bindgen_ty_2__bindgen_ty_1, bpf_cmd, perf_event_attr, perf_event_mmap_page,
    perf_event_sample_format::PERF_SAMPLE_RAW, perf_sw_ids::PERF_COUNT_SW_BPF_OUTPUT,
    perf_type_id::PERF_TYPE_SOFTWARE,
};
use rustix::ioctl::{NoArg, Opcode, ioctl};

use super::{SyscallError, mapping::Mapping};

pub(crate) struct PerfBuffer {
    /// One metadata page (`perf_event_mmap_page`), then `data_len` bytes of
    /// ring. Unmapped before the descriptor closes.
    map: Mapping,
    data_len: usize,
    page_size: usize,
    fd: OwnedFd,
}

impl PerfBuffer {
    /// Opens the BPF output event of `cpu` with a ring of `pages` pages of
    /// `page_size` bytes (a power of two of them) that wakes its reader when
    /// `watermark` bytes are queued, maps it and enables it.
    pub(crate) fn open(
        cpu: u32,
        pages: usize,
        page_size: usize,
        watermark: u32,
    ) -> Result<Self, SyscallError> {
        // SAFETY: perf_event_attr is integers, and unions and bit fields of
        // integers: all-zero is a valid value, and the kernel's default for
        // every field not set below.
        let mut attr: perf_event_attr = unsafe { MaybeUninit::zeroed().assume_init() };
        attr.type_ = PERF_TYPE_SOFTWARE as u32;
        attr.size = size_of::<perf_event_attr>() as u32;
        attr.config = PERF_COUNT_SW_BPF_OUTPUT as u64;
        attr.__bindgen_anon_1.sample_period = 1;
        attr.sample_type = PERF_SAMPLE_RAW as u64;
        attr.set_watermark(1);
        attr.__bindgen_anon_2.wakeup_watermark = watermark.max(1);
        // SAFETY: `attr` is a valid perf_event_attr of the size it states
        // and outlives the call; pid -1 with a cpu is "every process on that
        // CPU", group -1 none.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &raw const attr,
                -1 as libc::pid_t,
                cpu as c_int,
                -1 as c_int,
                c_ulong::from(PERF_FLAG_FD_CLOEXEC),
            )
        };
        if fd < 0 {
            return Err(SyscallError::last_os_error("perf_event_open"));
        }
        // SAFETY: a descriptor the kernel just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let data_len = pages * page_size;
        let map = Mapping::shared(fd.as_fd(), page_size + data_len)?;
        // SAFETY: PERF_EVENT_IOC_ENABLE is `_IO('$', 0)`: an ioctl of perf
        // event descriptors, which this is, without argument.
        unsafe { ioctl(&fd, NoArg::<{ PERF_EVENT_IOC_ENABLE as Opcode }>::new()) }
            .map_err(|e| SyscallError::new("ioctl(PERF_EVENT_IOC_ENABLE)", e))?;
        Ok(Self {
            map,
            data_len,
            page_size,
            fd,
        })
    }

    /// Makes this buffer the one the programs write to on `cpu`: its
    /// descriptor into the perf event array `map` at index `cpu`.
    pub(crate) fn attach_to(&self, map: BorrowedFd<'_>, cpu: u32) -> Result<(), SyscallError> {
        let value = self.fd.as_raw_fd() as u32;
        // SAFETY: bpf_attr is a union of integer structs: all-zero is a
        // valid value, and what the kernel requires of the bytes not set.
        let mut attr: bpf_attr = unsafe { MaybeUninit::zeroed().assume_init() };
        attr.__bindgen_anon_2 = bpf_attr__bindgen_ty_2 {
            map_fd: map.as_raw_fd() as u32,
            key: ptr::from_ref(&cpu) as u64,
            __bindgen_anon_1: bpf_attr__bindgen_ty_2__bindgen_ty_1 {
                value: ptr::from_ref(&value) as u64,
            },
            flags: u64::from(BPF_ANY),
        };
        // SAFETY: `attr` is a valid bpf_attr of the size given; the key and
        // value it points to live until the call returns.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_UPDATE_ELEM as c_long,
                &raw const attr,
                size_of::<bpf_attr>() as c_uint,
            )
        };
        if ret < 0 {
            return Err(SyscallError::last_os_error("bpf(BPF_MAP_UPDATE_ELEM)"));
        }
        Ok(())
    }

    /// Hands the records the kernel has written and this reader not yet read
    /// to `on_records`, then gives their room back to the kernel. The protocol is
    /// the one of tools/include/linux/ring_buffer.h: load data_head with
    /// acquire (the records before it are complete), store data_tail with
    /// release (the reads of the records are done).
    pub(crate) fn read(&mut self, on_records: impl FnOnce(&RingView<'_>)) {
        let head = self.data_head().load(Ordering::Acquire);
        // Only this reader writes data_tail.
        let tail = self.data_tail().load(Ordering::Relaxed);
        if head == tail {
            return;
        }
        // SAFETY: the data area follows the metadata page, `data_len` bytes
        // in the mapping, which lives as long as `self`; the kernel writes
        // no byte of [tail, head) until data_tail moves past it, below, after
        // the view is gone.
        let ring = unsafe {
            RingView::from_raw(
                self.map.ptr().add(self.page_size),
                self.data_len,
                tail,
                head,
            )
        };
        on_records(&ring);
        self.data_tail().store(head, Ordering::Release);
    }

    fn data_head(&self) -> &AtomicU64 {
        self.meta_u64(offset_of!(perf_event_mmap_page, data_head))
    }

    fn data_tail(&self) -> &AtomicU64 {
        self.meta_u64(offset_of!(perf_event_mmap_page, data_tail))
    }

    /// The u64 field at `offset` in the metadata page.
    fn meta_u64(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= size_of::<perf_event_mmap_page>());
        // SAFETY: callers pass the offset of a u64 field of the metadata
        // page, which starts the (page-aligned) mapping, so the pointer is
        // in bounds and aligned, and valid as long as `self`. The kernel
        // and this reader access data_head and data_tail only atomically
        // (smp_store_release / smp_load_acquire, and READ_ONCE of data_tail).
        unsafe { AtomicU64::from_ptr(self.map.ptr().as_ptr().add(offset).cast::<u64>()) }
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

/// The records of a perf ring between two positions, `tail` and `head`
/// (bytes written since the ring was created; the ring holds `len` bytes and
/// position `p` is at byte `p % len`), which do not change while the view
/// lives.
pub(crate) struct RingView<'a> {
    data: NonNull<u8>,
    len: usize,
    tail: u64,
    head: u64,
    _ring: PhantomData<&'a [u8]>,
}

impl<'a> RingView<'a> {
    /// A view of a ring held in `data`: a copy of one, in tests.
    #[cfg(test)]
    pub(crate) fn new(data: &'a [u8], tail: u64, head: u64) -> Self {
        Self {
            data: NonNull::from(data).cast(),
            len: data.len(),
            tail,
            head,
            _ring: PhantomData,
        }
    }

    /// # Safety
    /// `data` must be valid for reads of `len` bytes during `'a`, and
    /// nothing may write the bytes of positions [tail, head) during `'a`.
    unsafe fn from_raw(data: NonNull<u8>, len: usize, tail: u64, head: u64) -> Self {
        Self {
            data,
            len,
            tail,
            head,
            _ring: PhantomData,
        }
    }

    pub(crate) fn tail(&self) -> u64 {
        self.tail
    }

    pub(crate) fn head(&self) -> u64 {
        self.head
    }

    /// The `n` bytes from position `at`, as the up to two pieces the end of
    /// the ring splits them into; `None` unless they all lie in [tail, head).
    pub(crate) fn get(&self, at: u64, n: usize) -> Option<(&'a [u8], &'a [u8])> {
        let end = at.checked_add(n as u64)?;
        if at < self.tail || end > self.head || n > self.len || self.len == 0 {
            return None;
        }
        let start = (at % self.len as u64) as usize;
        let first = n.min(self.len - start);
        let data = self.data.as_ptr().cast_const();
        // SAFETY: start < len and first <= len - start, so the first piece
        // is inside the ring; the second is [0, n - first), and n - first <=
        // start because n <= len. Both are positions in [tail, head), which
        // are readable and unchanged during 'a (`new`, `from_raw`).
        unsafe {
            Some((
                std::slice::from_raw_parts(data.add(start), first),
                std::slice::from_raw_parts(data, n - first),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_view_splits_at_the_end_and_stays_in_tail_to_head() {
        let data: Vec<u8> = (0..16).collect();
        let ring = RingView::new(&data, 30, 40);
        assert_eq!(ring.get(30, 4), Some((&data[14..16], &data[..2])));
        assert_eq!(ring.get(32, 8), Some((&data[0..8], &[][..])));
        assert_eq!(ring.get(29, 2), None, "before tail");
        assert_eq!(ring.get(38, 3), None, "past head");
        assert_eq!(
            RingView::new(&data, 0, 40).get(0, 17),
            None,
            "longer than the ring"
        );
        assert_eq!(RingView::new(&[], 0, 8).get(0, 0), None);
    }
}

//! Memory mappings of descriptors, unmapped on drop.

use std::{
    fs::File,
    os::fd::{AsFd as _, BorrowedFd},
    ptr::{self, NonNull},
};

use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};

use super::SyscallError;

/// `len` bytes of a descriptor, mapped from its start.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// A shared read-write mapping: the perf buffers.
    pub(crate) fn shared(fd: BorrowedFd<'_>, len: usize) -> Result<Self, SyscallError> {
        Self::new(
            fd,
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
        )
    }

    /// The whole of `file`, private and read-only, for [`Mapping::bytes`].
    /// Fails where the file cannot be mapped (most files of sysfs).
    pub(crate) fn read_only(file: &File) -> Result<Self, SyscallError> {
        let len = file
            .metadata()
            .map_err(|e| SyscallError::new("fstat", e))?
            .len();
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len > 0)
            .ok_or_else(|| SyscallError::new("mmap", std::io::ErrorKind::InvalidInput))?;
        Self::new(file.as_fd(), len, ProtFlags::READ, MapFlags::PRIVATE)
    }

    fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        prot: ProtFlags,
        flags: MapFlags,
    ) -> Result<Self, SyscallError> {
        // SAFETY: a new mapping where the kernel chooses, which can overlap
        // no memory in use.
        let ptr = unsafe { mmap(ptr::null_mut(), len, prot, flags, fd, 0) }
            .map_err(|e| SyscallError::new("mmap", e))?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| SyscallError::new("mmap", std::io::ErrorKind::AddrNotAvailable))?;
        Ok(Self { ptr, len })
    }

    /// The mapping's first byte.
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The bytes of a [`Mapping::read_only`] mapping.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `len` readable bytes from `ptr`, mapped as long as `self`
        // lives; a private read-only mapping, which nothing writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once, here; nothing
        // borrowed from it outlives `self`.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

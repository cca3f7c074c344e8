//! Plain-old-data values as bytes and back (the wire types shared with the
//! kernel programs, which implement `aya::Pod`).

/// The bytes of `value`.
#[inline]
pub(crate) fn bytes_of<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `value` is valid for reads of size_of::<T>() bytes for the
    // lifetime of the borrow, and a Pod type has no padding bytes of
    // undefined content (the wire types make their padding explicit fields).
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }
}

/// A `T` from the start of `bytes` (which may be longer), or `None` when they
/// are too short. Unaligned: the bytes come from ring buffers with no
/// alignment guarantee.
#[inline]
pub(crate) fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked above, read_unaligned needs no
    // alignment, and any bytes are a valid Pod value.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use kdiag_common::EventHeader;

    use super::*;

    #[test]
    fn bytes_and_back() {
        let header = EventHeader {
            kind: 3,
            cpu: 1,
            ts_ns: 42,
        };
        let bytes = bytes_of(&header);
        assert_eq!(bytes.len(), size_of::<EventHeader>());
        let back: EventHeader = read(&[bytes, &[0xff]].concat()).unwrap();
        assert_eq!((back.kind, back.cpu, back.ts_ns), (3, 1, 42));
        assert!(read::<EventHeader>(&bytes[1..]).is_none());
    }
}

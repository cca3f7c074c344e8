//! Decoding kernel events from the bytes the transport hands over.

use kdiag_common::{EventHeader, EventKind, stack::KernelStack};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("event of {len} bytes is shorter than the {need} bytes of its kind")]
    Short { len: usize, need: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("expected a {expected:?} event, got kind {got}")]
    WrongKind { expected: EventKind, got: u32 },
    #[error("invalid {field} value {value}")]
    BadField { field: &'static str, value: u64 },
}

/// Reads `T` from the start of `data` (perf samples carry trailing padding,
/// so longer is fine). `read_unaligned`: the bytes come from a ring buffer
/// slice with no alignment guarantee.
pub(crate) fn read_struct<T: aya::Pod>(data: &[u8]) -> Result<T, DecodeError> {
    crate::sys::pod::read(data).ok_or(DecodeError::Short {
        len: data.len(),
        need: size_of::<T>(),
    })
}

/// The kind of an event, from its header.
pub(crate) fn event_kind(data: &[u8]) -> Result<EventKind, DecodeError> {
    let header: EventHeader = read_struct(data)?;
    EventKind::try_from(header.kind).map_err(|_| DecodeError::UnknownKind(header.kind))
}

/// Reads an event of type `T` whose header must say `expected`.
pub(crate) fn decode<T: aya::Pod>(data: &[u8], expected: EventKind) -> Result<T, DecodeError> {
    let header: EventHeader = read_struct(data)?;
    if header.kind != expected as u32 {
        return Err(DecodeError::WrongKind {
            expected,
            got: header.kind,
        });
    }
    read_struct(data)
}

/// The kernel stack that follows an event of type `T` in `data`, if it
/// has one (see kdiag_common::stack: told apart by length).
pub(crate) fn trailing_stack<T>(data: &[u8]) -> Option<KernelStack> {
    crate::sys::pod::read(data.get(size_of::<T>()..)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_decodes() {
        for kind in EventKind::ALL {
            let mut header = [0; size_of::<EventHeader>()];
            header[..4].copy_from_slice(&(kind as u32).to_ne_bytes());
            assert_eq!(event_kind(&header), Ok(kind));
        }
    }

    #[test]
    fn a_stack_follows_by_length() {
        let header = EventHeader {
            kind: EventKind::Softirq as u32,
            cpu: 0,
            ts_ns: 1,
        };
        let event = crate::sys::pod::bytes_of(&header).to_vec();
        assert_eq!(trailing_stack::<EventHeader>(&event), None);
        // A perf sample's padding is no stack.
        let padded = [&event[..], &[0; 4]].concat();
        assert_eq!(trailing_stack::<EventHeader>(&padded), None);
        let mut stack = KernelStack {
            nr: 2,
            _pad: 0,
            ips: [0; kdiag_common::stack::STACK_DEPTH],
        };
        stack.ips[..2].copy_from_slice(&[0xffff_ffff_8100_0000, 0xffff_ffff_8100_0100]);
        let with_stack = [&event[..], crate::sys::pod::bytes_of(&stack)].concat();
        assert_eq!(trailing_stack::<EventHeader>(&with_stack), Some(stack));
    }

    #[test]
    fn short_and_unknown() {
        assert_eq!(
            event_kind(&[1, 0, 0]),
            Err(DecodeError::Short { len: 3, need: 16 })
        );
        assert_eq!(
            event_kind(&[0xff; 16]),
            Err(DecodeError::UnknownKind(u32::MAX))
        );
        assert_eq!(
            event_kind(&[]),
            Err(DecodeError::Short { len: 0, need: 16 })
        );
    }
}

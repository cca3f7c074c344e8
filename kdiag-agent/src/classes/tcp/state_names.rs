//! Kernel TCP state names (include/net/tcp_states.h), printed without the
//! `TCP_` prefix as the tracepoints' print formats do.

/// Number of kernel TCP states, 0 included.
pub(crate) const STATE_COUNT: usize = 13;

const NAMES: [&str; STATE_COUNT] = [
    "UNKNOWN",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// The kernel's number for a state name (`"CLOSE_WAIT"`, any case).
pub(crate) fn state_number(name: &str) -> Option<i32> {
    NAMES
        .iter()
        .skip(1)
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as i32 + 1)
}

pub(crate) fn state_name(state: i32) -> &'static str {
    usize::try_from(state)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(state_name(1), "ESTABLISHED");
        assert_eq!(state_name(2), "SYN_SENT");
        assert_eq!(state_name(12), "NEW_SYN_RECV");
        assert_eq!(state_name(0), "UNKNOWN");
        assert_eq!(state_name(-3), "UNKNOWN");
        assert_eq!(state_name(99), "UNKNOWN");
        assert_eq!(state_number("close_wait"), Some(8));
        assert_eq!(state_number("UNKNOWN"), None);
        assert_eq!(state_number("nope"), None);
    }
}

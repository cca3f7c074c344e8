//! Kernel TCP state names (include/net/tcp_states.h), printed without the
//! `TCP_` prefix as the tracepoints' print formats do.

const NAMES: [&str; 13] = [
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

pub fn state_name(state: i32) -> &'static str {
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
    }
}

//! A bystander BPF program, to see whether the kernel's run-time statistics
//! are on: a socket filter on a UDP socket of this process. The kernel counts
//! a program's runs (`run_cnt`) only while statistics are on, host-wide, so
//! packets sent to the socket tell, by whether its count moves.

use std::{
    fs,
    net::UdpSocket,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

pub struct Bystander {
    program: OwnedFd,
    socket: UdpSocket,
    sender: UdpSocket,
}

// include/uapi/linux/bpf.h
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
const SO_ATTACH_BPF: libc::c_int = 50;

impl Bystander {
    /// Loads `r0 = 0; exit` (keep no bytes: the socket receives nothing)
    /// and attaches it to a loopback UDP socket.
    pub fn new() -> Bystander {
        let insns: [u64; 2] = [
            // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0
            u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
            // BPF_JMP | BPF_EXIT
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns,
        // license; the rest zero.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SOCKET_FILTER.to_ne_bytes());
        attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        // SAFETY: a bpf_attr-sized buffer the kernel reads; the pointers in it
        // outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                attr.as_ptr(),
                attr.len() as libc::c_uint,
            )
        };
        assert!(
            fd >= 0,
            "loading the bystander BPF program: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor the kernel just returned to us.
        let program = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the bystander socket");
        let raw = program.as_raw_fd();
        // SAFETY: a valid socket, and a pointer to an int for the option.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ATTACH_BPF,
                (&raw const raw).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "attaching the bystander program: {}",
            std::io::Error::last_os_error()
        );
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind a sender");
        Bystander {
            program,
            socket,
            sender,
        }
    }

    /// Sends one packet through the filter.
    pub fn poke(&self) {
        let to = self.socket.local_addr().unwrap();
        self.sender
            .send_to(b"x", to)
            .expect("send to the bystander");
    }

    /// The runs the kernel has counted (only those while statistics were on).
    pub fn run_cnt(&self) -> u64 {
        let path = format!("/proc/self/fdinfo/{}", self.program.as_raw_fd());
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.lines()
            .find_map(|l| l.strip_prefix("run_cnt:")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no run_cnt in {path}: {text}"))
    }

    /// Pokes `n` times and returns how many runs were counted.
    pub fn counted_of(&self, n: u32) -> u64 {
        let before = self.run_cnt();
        for _ in 0..n {
            self.poke();
        }
        self.run_cnt() - before
    }
}

impl Default for Bystander {
    fn default() -> Self {
        Self::new()
    }
}

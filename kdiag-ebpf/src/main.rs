//! kdiag's kernel programs: maps shared by every event class, the output path
//! to userspace, and the panic handler. One module per event class holds its
//! tracepoint programs.
#![no_std]
#![no_main]
// Inline asm on the BPF target (rodata.rs). The crate only builds with a
// nightly toolchain anyway (-Z build-std), and aya-ebpf enables the same.
#![feature(asm_experimental_arch)]

mod compaction;
mod cost;
mod ctx;
mod drop;
mod mem;
mod output;
mod rodata;
mod softirq;
mod stack;
mod stall;
mod tcp;
mod vmscan;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it only exists
    // to satisfy no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

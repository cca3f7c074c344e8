//! Rebuild the kernel programs when bpf-linker changes: cargo does not track
//! the linker, and an object linked by a different bpf-linker can differ.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

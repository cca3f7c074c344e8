//! Steady TCP traffic over loopback from inside the test process: every
//! segment the kernel delivers raises NET_RX on the sending CPU. Stopped
//! and joined in Drop.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Bytes per write.
const CHUNK: usize = 1024;

pub struct LoopbackTraffic {
    stop: Arc<AtomicBool>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
    stream: TcpStream,
}

impl LoopbackTraffic {
    /// One write of 1 KiB every `every` (about 1000 softirqs a second at
    /// 1 ms: enough to see, little CPU).
    pub fn start(every: Duration) -> LoopbackTraffic {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let stream = TcpStream::connect(addr).expect("loopback connect");
        let (mut server, _) = listener.accept().expect("loopback accept");
        // Bounded reads, so the receiver sees `stop` even if the sender is gone.
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let receiver = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut buf = [0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match server.read(&mut buf) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
            })
        };
        let sender = {
            let stop = Arc::clone(&stop);
            let mut client = stream.try_clone().expect("clone stream");
            client
                .set_write_timeout(Some(Duration::from_millis(100)))
                .expect("write timeout");
            thread::spawn(move || {
                let chunk = [0x5au8; CHUNK];
                while !stop.load(Ordering::Relaxed) {
                    if client.write_all(&chunk).is_err() {
                        return;
                    }
                    thread::sleep(every);
                }
            })
        };
        LoopbackTraffic {
            stop,
            sender: Some(sender),
            receiver: Some(receiver),
            stream,
        }
    }
}

impl Drop for LoopbackTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        // Both threads check `stop` at least every 100 ms.
        for handle in [self.sender.take(), self.receiver.take()]
            .into_iter()
            .flatten()
        {
            let _ = handle.join();
        }
    }
}

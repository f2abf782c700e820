//! A fault-injecting TCP proxy under a test's control: the processes under test connect to the
//! proxy instead of their peer and do not know it is there. The test cuts the link (live
//! connections are reset, new ones are dropped at once), black-holes it (bytes are swallowed, as on
//! a partitioned network where nothing answers), and heals it.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

const UP: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE: u8 = 2;

struct Shared {
    mode: AtomicU8,
    live: Mutex<Vec<TcpStream>>,
}

/// A proxy from a local port to `target`.
pub struct FaultProxy {
    /// The port to connect to instead of the target.
    pub port: u16,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(UP),
            live: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    if accept_shared.mode.load(Ordering::SeqCst) == CUT {
                        drop(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                    else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    {
                        let mut live = accept_shared.live.lock().expect("not poisoned");
                        for s in [&client, &server] {
                            if let Ok(clone) = s.try_clone() {
                                live.push(clone);
                            }
                        }
                    }
                    for (from, to) in [(&client, &server), (&server, &client)] {
                        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                            continue;
                        };
                        let shared = accept_shared.clone();
                        std::thread::spawn(move || pump(from, to, shared));
                    }
                }
            })?;
        Ok(FaultProxy { port, shared })
    }

    fn reset_live(&self) {
        let mut live = self.shared.live.lock().expect("not poisoned");
        for stream in live.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Cuts the link: live connections are closed, new ones dropped, until [`FaultProxy::heal`].
    pub fn cut(&self) {
        self.shared.mode.store(CUT, Ordering::SeqCst);
        self.reset_live();
    }

    /// Black-holes the link: connections stay open but no byte passes either way (peers find out
    /// only by their own timeouts), until [`FaultProxy::heal`].
    pub fn blackhole(&self) {
        self.shared.mode.store(BLACKHOLE, Ordering::SeqCst);
    }

    /// Restores the link. Connections black-holed meanwhile are closed, as a real network's
    /// peers would have given up on them.
    pub fn heal(&self) {
        if self.shared.mode.swap(UP, Ordering::SeqCst) == BLACKHOLE {
            self.reset_live();
        }
    }

    /// Whether bytes pass.
    pub fn is_up(&self) -> bool {
        self.shared.mode.load(Ordering::SeqCst) == UP
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match shared.mode.load(Ordering::SeqCst) {
            UP => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            BLACKHOLE => {} // swallowed
            _ => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = stream;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(port: u16) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        Ok(buf.to_vec())
    }

    #[test]
    fn passes_cuts_blackholes_and_heals() {
        let proxy = FaultProxy::start(echo_server()).unwrap();
        assert_eq!(round_trip(proxy.port).unwrap(), b"ping");

        let mut live = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        live.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        live.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        live.read_exact(&mut one).unwrap();
        proxy.cut();
        assert!(!proxy.is_up());
        // The live connection is closed under the client (end of stream or a reset, not a
        // read that merely times out); a new one is closed at once too.
        use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, TimedOut, WouldBlock};
        let closed = |e: &std::io::Error| !matches!(e.kind(), WouldBlock | TimedOut);
        match live.read(&mut one) {
            Ok(0) => {}
            Err(e) if matches!(e.kind(), ConnectionReset | ConnectionAborted) => {}
            other => panic!("the cut did not close the live connection: {other:?}"),
        }
        let refused = round_trip(proxy.port).unwrap_err();
        assert!(
            closed(&refused),
            "a new connection was not closed: {refused:?}"
        );

        proxy.heal();
        assert_eq!(round_trip(proxy.port).unwrap(), b"ping");

        // A black hole closes nothing: the client only times out.
        proxy.blackhole();
        let silent = round_trip(proxy.port).unwrap_err();
        assert!(
            !closed(&silent),
            "a black hole answered or closed: {silent:?}"
        );
        proxy.heal();
        assert_eq!(round_trip(proxy.port).unwrap(), b"ping");
    }
}

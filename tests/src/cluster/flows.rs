//! Long-lived TCP flows through a VIP, each sending a message every 100 ms and checking the
//! echo: what a cluster test counts survivors with. A flow fails on a reset, a closed
//! connection, a wrong echo, or a stall: no echo within [`STALL`].

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// How long a flow may go without its echo before it counts as failed.
pub const STALL: Duration = Duration::from_secs(3);
/// Between two messages of a flow.
pub const PERIOD: Duration = Duration::from_millis(100);
/// The most a flow set runs, whatever the test does.
const LIFETIME: Duration = Duration::from_secs(300);

/// One flow's end, if it failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The flow's number.
    pub flow: usize,
    /// What happened: `reset`, `stall`, `closed`, `bad echo`...
    pub what: String,
    /// When, since the flows started.
    pub at: Duration,
}

/// `n` flows, each on a thread of its own, until [`EchoFlows::stop`] or drop.
pub struct EchoFlows {
    /// Per flow, the address its backend saw it from (its node's in NAT mode).
    seen_from: Vec<IpAddr>,
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<Failure>>>,
    echoes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
    total: usize,
}

impl EchoFlows {
    /// Connects `n` flows to `vip` from inside `client` (each from its own port, so ECMP
    /// spreads them) and starts them.
    ///
    /// Panics when a connection cannot be made: the cluster is not ready.
    pub fn start(client: &Netns, vip: SocketAddr, n: usize) -> EchoFlows {
        let streams: Vec<(TcpStream, IpAddr)> = client
            .enter(|| {
                (0..n)
                    .map(|i| {
                        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))
                            .unwrap_or_else(|e| panic!("flow {i} cannot connect to {vip}: {e}"));
                        let from = greeting(&mut s)
                            .unwrap_or_else(|e| panic!("flow {i}: no greeting: {e}"));
                        (s, from)
                    })
                    .collect()
            })
            .expect("enter the client namespace");
        let seen_from = streams.iter().map(|(_, from)| *from).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let echoes = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let threads = streams
            .into_iter()
            .enumerate()
            .map(|(i, (s, _))| {
                let (stop, failures, echoes) = (
                    Arc::clone(&stop),
                    Arc::clone(&failures),
                    Arc::clone(&echoes),
                );
                std::thread::Builder::new()
                    .name(format!("flow-{i}"))
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        if let Err(what) = run_flow(i, s, &stop, &echoes, started) {
                            failures.lock().expect("failures").push(Failure {
                                flow: i,
                                what,
                                at: started.elapsed(),
                            });
                        }
                    })
                    .expect("a flow thread")
            })
            .collect();
        EchoFlows {
            seen_from,
            stop,
            failures,
            echoes,
            threads,
            started,
            total: n,
        }
    }

    /// How many flows there are.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The address flow `i`'s backend saw it from: in NAT mode the `local_address` of the
    /// node that carried it when it started.
    pub fn seen_from(&self, i: usize) -> IpAddr {
        self.seen_from[i]
    }

    /// The failures so far.
    pub fn failures(&self) -> Vec<Failure> {
        self.failures.lock().expect("failures").clone()
    }

    /// Echoes received so far, all flows together.
    pub fn echoes(&self) -> u64 {
        self.echoes.load(Ordering::Relaxed)
    }

    /// Since the flows started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits `d` while the flows run, then asserts that each of them made progress: the
    /// echoes went up by at least one round per flow.
    pub fn run_for(&self, d: Duration) {
        let before = self.echoes();
        std::thread::sleep(d);
        let after = self.echoes();
        assert!(
            after >= before + self.total as u64,
            "the flows made no progress in {d:?}: {before} -> {after} echoes"
        );
    }

    /// Stops every flow (closing its connection) and returns the failures.
    pub fn stop(mut self) -> Vec<Failure> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.failures()
    }
}

impl Drop for EchoFlows {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads the backend's greeting: the address it sees the connection from.
fn greeting(s: &mut TcpStream) -> std::io::Result<IpAddr> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut g = [0u8; super::GREETING];
    s.read_exact(&mut g)?;
    String::from_utf8_lossy(&g)
        .trim()
        .parse()
        .map_err(|e| std::io::Error::other(format!("greeting {g:?}: {e}")))
}

/// One flow: a 16-byte message every [`PERIOD`], its echo within [`STALL`].
fn run_flow(
    i: usize,
    mut s: TcpStream,
    stop: &AtomicBool,
    echoes: &AtomicU64,
    started: Instant,
) -> Result<(), String> {
    s.set_read_timeout(Some(STALL)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(STALL))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LIFETIME {
        let msg = format!("{:06}:{:09}", i % 1_000_000, seq % 1_000_000_000);
        let msg = msg.as_bytes();
        s.write_all(msg).map_err(|e| describe(&e))?;
        let mut echo = [0u8; 16];
        s.read_exact(&mut echo).map_err(|e| describe(&e))?;
        if echo != msg {
            return Err(format!(
                "bad echo {:?} for {:?}",
                String::from_utf8_lossy(&echo),
                String::from_utf8_lossy(msg)
            ));
        }
        echoes.fetch_add(1, Ordering::Relaxed);
        seq += 1;
        std::thread::sleep(PERIOD);
    }
    Ok(())
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("stall: no echo within {STALL:?}")
        }
        std::io::ErrorKind::ConnectionReset => "reset".into(),
        std::io::ErrorKind::UnexpectedEof => "closed".into(),
        _ => e.to_string(),
    }
}

/// Opens `n` short connections to `vip` from inside `client`, one after the other, each
/// sending one message and checking its echo; returns the failures (`connect` waits up to
/// 10 s, so a SYN the network loses is sent again).
pub fn short_connections(client: &Netns, vip: SocketAddr, n: usize) -> Vec<String> {
    client
        .enter(|| {
            let mut failed = Vec::new();
            for i in 0..n {
                let r = (|| -> std::io::Result<()> {
                    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(10))?;
                    greeting(&mut s)?;
                    let msg = format!("short:{i:010}");
                    s.write_all(msg.as_bytes())?;
                    let mut echo = [0u8; 16];
                    s.read_exact(&mut echo)?;
                    if echo != msg.as_bytes() {
                        return Err(std::io::Error::other("bad echo"));
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    failed.push(format!("connection {i}: {e}"));
                }
            }
            failed
        })
        .expect("enter the client namespace")
}

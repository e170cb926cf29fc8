//! The store server under a flood of connections that never authenticate: its threads and its log
//! stay bounded, and a real client is served during and after. A test binary of its own, so the
//! thread count (`/proc/self/task`) and the captured log belong to this test alone.

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burnrun::auth::JobSecret;
use burnrun::rendezvous::{Store, TcpStore, TcpStoreServer, MAX_PENDING_HANDSHAKES};

/// Connections opened by the flood.
const FLOOD: usize = 500;
/// Threads the server may add beyond its handshake threads (which it caps, evicted ones counted
/// until they have returned): the accept thread, the test's client thread and the server threads
/// of the client's connections (one live, at most a few closing).
const THREAD_SLACK: usize = 16;
const LONG: Duration = Duration::from_secs(10);

/// The log lines written while the test runs.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn a_flood_of_unauthenticated_connections_costs_bounded_threads_and_a_few_log_lines() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();
    let secret = JobSecret::generate().unwrap();
    let server = TcpStoreServer::bind("127.0.0.1:0".parse().unwrap(), secret.clone()).unwrap();
    let addr = server.local_addr().to_string();
    let baseline = threads();

    // A real client that keeps working while the flood goes on.
    let client_addr = addr.clone();
    let client_secret = secret.clone();
    // A few fresh connections spread over the flood (not a tight loop: each one's server thread
    // lingers until it notices the close, and those are not what this test bounds).
    let client = std::thread::spawn(move || {
        let started = Instant::now();
        let mut rounds = 0;
        while started.elapsed() < Duration::from_secs(2) || rounds < 3 {
            let store = TcpStore::connect(&client_addr, &client_secret, LONG).expect("connect during the flood");
            store.set("during", b"yes").unwrap();
            assert_eq!(store.get("during", LONG).unwrap(), b"yes");
            rounds += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        rounds
    });

    let mut silent = Vec::with_capacity(FLOOD);
    let mut most_threads = 0;
    for _ in 0..FLOOD {
        // Connected, then silent: the handshake never starts. The server may close it at once.
        if let Ok(stream) = TcpStream::connect(&addr) {
            silent.push(stream);
        }
        most_threads = most_threads.max(threads());
    }
    assert!(client.join().expect("the real client is served during the flood") >= 3);
    most_threads = most_threads.max(threads());
    assert!(
        most_threads <= baseline + MAX_PENDING_HANDSHAKES + THREAD_SLACK,
        "{most_threads} threads for {FLOOD} silent connections (baseline {baseline})"
    );

    // After: the strangers leave, a real client is still served.
    drop(silent);
    let store = TcpStore::connect(&addr, &secret, LONG).expect("connect after the flood");
    store.set("after", b"yes").unwrap();
    assert_eq!(store.get("after", LONG).unwrap(), b"yes");
    drop(store);
    server.shutdown();

    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("store server")).collect();
    eprintln!(
        "{FLOOD} silent connections: at most {} threads above the baseline, {} log line(s)",
        most_threads - baseline,
        lines.len()
    );
    assert!(
        !lines.is_empty() && lines.len() <= 4,
        "{} log lines for {FLOOD} refused connections:\n{text}",
        lines.len()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("unauthenticated connection(s) in the last") && l.contains("last from 127.0.0.1:")),
        "no count of the refusals:\n{text}"
    );
}

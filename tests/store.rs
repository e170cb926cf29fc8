//! The rendezvous store: one conformance body run on every store, then the TCP server's failure paths.
//! Real sockets on 127.0.0.1; every wait is bounded and every thread is joined through a timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use burnrun::auth::JobSecret;
use burnrun::rendezvous::{
    MemoryStore, PrefixStore, Store, StoreError, TcpStore, TcpStoreServer, MAX_KEY_BYTES, MAX_VALUE_BYTES,
};

/// Timeout for waits that are meant to expire.
const SHORT: Duration = Duration::from_millis(200);
/// Timeout for things that must happen; generous, because the test machine is shared and slow.
const LONG: Duration = Duration::from_secs(10);
/// How late an expiring wait may return: scheduling noise on a loaded machine, not a second deadline.
const SLACK: Duration = Duration::from_secs(2);

fn start_server() -> (TcpStoreServer, JobSecret) {
    let secret = JobSecret::generate().unwrap();
    let server = TcpStoreServer::bind("127.0.0.1:0".parse().unwrap(), secret.clone()).unwrap();
    (server, secret)
}

fn connect(server: &TcpStoreServer, secret: &JobSecret) -> TcpStore {
    TcpStore::connect(&server.local_addr().to_string(), secret, LONG).unwrap()
}

/// Runs `f` on a thread and waits at most `limit` for it, so a hang fails the test instead of stalling it.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the operation did not finish in time")
}

fn assert_times_out(result: Result<impl std::fmt::Debug, StoreError>, op: &str, missing: &[&str], started: Instant) {
    match result {
        Err(StoreError::Timeout {
            op: got_op,
            keys,
            timeout,
        }) => {
            assert_eq!(got_op, op);
            // A prefix store names the scoped keys: "<prefix>/<key>".
            assert_eq!(keys.len(), missing.len(), "{keys:?}");
            for (key, expected) in keys.iter().zip(missing) {
                assert!(key == expected || key.ends_with(&format!("/{expected}")), "{keys:?}");
            }
            assert_eq!(timeout, SHORT);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= SHORT, "returned before its timeout: {elapsed:?}");
    assert!(elapsed < SHORT + SLACK, "returned long after its timeout: {elapsed:?}");
}

/// The behaviour every store must share (torch's TCPStore semantics).
fn every_operation_behaves_like_a_store(store: &dyn Store) {
    // set, get, try_get, overwrite
    store.set("a", b"1").unwrap();
    assert_eq!(store.get("a", SHORT).unwrap(), b"1");
    assert_eq!(store.try_get("a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(store.try_get("never-set").unwrap(), None);
    store.set("a", b"two").unwrap();
    assert_eq!(store.get("a", SHORT).unwrap(), b"two");

    // empty, binary, large and unicode-keyed values
    store.set("empty", b"").unwrap();
    assert_eq!(store.try_get("empty").unwrap(), Some(Vec::new()));
    let binary: Vec<u8> = (0..=255).collect();
    store.set("binary", &binary).unwrap();
    assert_eq!(store.get("binary", SHORT).unwrap(), binary);
    let large = vec![7u8; 3 << 20];
    store.set("large", &large).unwrap();
    assert_eq!(store.get("large", SHORT).unwrap(), large);
    store.set("ключ/🔑", b"unicode").unwrap();
    assert_eq!(store.get("ключ/🔑", SHORT).unwrap(), b"unicode");

    // wait
    store.wait(&["a", "empty"], SHORT).unwrap();
    store.wait(&[], SHORT).unwrap();

    // add: missing counts as 0, the value is decimal ASCII
    assert_eq!(store.add("n", 5).unwrap(), 5);
    assert_eq!(store.add("n", -7).unwrap(), -2);
    assert_eq!(store.get("n", SHORT).unwrap(), b"-2");
    store.set("m", b"40").unwrap();
    assert_eq!(store.add("m", 2).unwrap(), 42);
    assert!(matches!(store.add("a", 1), Err(StoreError::NotAnInteger { key }) if key.ends_with('a')));
    store.add("big", i64::MAX).unwrap();
    assert!(matches!(
        store.add("big", 1),
        Err(StoreError::AddOverflow { delta: 1, .. })
    ));
    assert_eq!(store.add("big", 0).unwrap(), i64::MAX, "a refused add changes nothing");

    // compare_set returns the value after the call
    assert_eq!(store.compare_set("cs", None, b"x").unwrap(), b"x");
    assert_eq!(store.compare_set("cs", None, b"y").unwrap(), b"x");
    assert_eq!(store.compare_set("cs", Some(b"x"), b"z").unwrap(), b"z");
    assert_eq!(store.compare_set("cs", Some(b"wrong"), b"w").unwrap(), b"z");
    assert_eq!(store.compare_set("absent", Some(b"q"), b"r").unwrap(), b"");
    assert_eq!(store.try_get("absent").unwrap(), None);

    // delete
    assert!(store.delete("cs").unwrap());
    assert!(!store.delete("cs").unwrap());
    assert_eq!(store.try_get("cs").unwrap(), None);

    // timeouts name the keys still missing
    let started = Instant::now();
    assert_times_out(store.get("missing", SHORT), "get", &["missing"], started);
    let started = Instant::now();
    assert_times_out(store.wait(&["a", "m1", "m2"], SHORT), "wait", &["m1", "m2"], started);

    // limits are refused before anything is sent
    store.set(&"k".repeat(MAX_KEY_BYTES / 2), b"").unwrap();
    let long_key = "k".repeat(MAX_KEY_BYTES + 1);
    assert!(matches!(
        store.set(&long_key, b""),
        Err(StoreError::TooLarge { what: "key bytes", .. })
    ));
    assert!(matches!(store.get(&long_key, SHORT), Err(StoreError::TooLarge { .. })));
    let huge = vec![0u8; MAX_VALUE_BYTES + 1];
    assert!(matches!(
        store.set("huge", &huge),
        Err(StoreError::TooLarge {
            what: "value bytes",
            ..
        })
    ));
    assert_eq!(store.try_get("huge").unwrap(), None);
}

#[test]
fn every_operation_behaves_the_same_on_the_memory_store() {
    every_operation_behaves_like_a_store(&MemoryStore::new());
}

#[test]
fn every_operation_behaves_the_same_on_the_tcp_store() {
    let (server, secret) = start_server();
    let store = connect(&server, &secret);
    within(LONG * 3, move || every_operation_behaves_like_a_store(&store));
}

#[test]
fn every_operation_behaves_the_same_through_a_prefix_store() {
    let (server, secret) = start_server();
    let tcp: Arc<dyn Store> = Arc::new(connect(&server, &secret));
    let prefixed = PrefixStore::new("group0/gen1", Arc::clone(&tcp));
    within(LONG * 3, move || every_operation_behaves_like_a_store(&prefixed));
    assert_eq!(tcp.try_get("group0/gen1/a").unwrap().as_deref(), Some(&b"two"[..]));
    assert_eq!(tcp.try_get("a").unwrap(), None);
    every_operation_behaves_like_a_store(&PrefixStore::new("p", Arc::new(MemoryStore::new())));
}

#[test]
fn prefix_stores_do_not_see_each_others_keys() {
    let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = PrefixStore::new("a", Arc::clone(&inner));
    let b = PrefixStore::new("b", Arc::clone(&inner));
    a.set("rank0", b"addr-a").unwrap();
    b.set("rank0", b"addr-b").unwrap();
    assert_eq!(a.get("rank0", SHORT).unwrap(), b"addr-a");
    assert_eq!(b.get("rank0", SHORT).unwrap(), b"addr-b");
    assert_eq!(a.add("count", 1).unwrap(), 1);
    assert_eq!(b.try_get("count").unwrap(), None);
    assert!(a.delete("rank0").unwrap());
    assert_eq!(b.try_get("rank0").unwrap().as_deref(), Some(&b"addr-b"[..]));
    assert_eq!(inner.try_get("b/rank0").unwrap().as_deref(), Some(&b"addr-b"[..]));
    let nested = PrefixStore::new("c", Arc::new(PrefixStore::new("b", Arc::clone(&inner))));
    nested.set("x", b"1").unwrap();
    assert!(inner.try_get("b/c/x").unwrap().is_some());
    match a.wait(&["only-in-b"], SHORT) {
        Err(StoreError::Timeout { keys, .. }) => assert_eq!(keys, ["a/only-in-b"]),
        other => panic!("expected a timeout naming the scoped key, got {other:?}"),
    }
}

#[test]
fn concurrent_adds_from_eight_threads_sum_correctly() {
    const THREADS: i64 = 8;
    const ADDS: i64 = 200;
    let (server, secret) = start_server();
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let shared_client: Arc<dyn Store> = Arc::new(connect(&server, &secret));
    for (name, store_for) in [
        (
            "memory",
            Box::new(|_| Arc::clone(&memory)) as Box<dyn Fn(i64) -> Arc<dyn Store>>,
        ),
        ("one shared tcp client", Box::new(|_| Arc::clone(&shared_client))),
        (
            "a tcp client per thread",
            Box::new(|_| Arc::new(connect(&server, &secret)) as Arc<dyn Store>),
        ),
    ] {
        let stores: Vec<Arc<dyn Store>> = (0..THREADS).map(&store_for).collect();
        let key = format!("sum of {name}");
        let total = within(LONG * 3, move || {
            let threads: Vec<_> = stores
                .into_iter()
                .enumerate()
                .map(|(i, store)| {
                    let key = key.clone();
                    std::thread::spawn(move || {
                        for _ in 0..ADDS {
                            store.add(&key, i as i64 + 1).unwrap();
                        }
                        store
                    })
                })
                .collect();
            let stores: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            stores[0].add(&key, 0).unwrap()
        });
        assert_eq!(total, ADDS * THREADS * (THREADS + 1) / 2, "{name}");
    }
}

#[test]
fn a_waiter_is_woken_by_a_set_from_another_client() {
    let (server, secret) = start_server();
    let waiter = connect(&server, &secret);
    let setter = connect(&server, &secret);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let started = Instant::now();
        let waited = waiter.wait(&["x", "y"], LONG);
        let got = waiter.get("z", LONG);
        let _ = tx.send((waited, got, started.elapsed()));
    });
    std::thread::sleep(Duration::from_millis(100));
    setter.set("x", b"1").unwrap();
    setter.set("y", b"2").unwrap();
    setter.set("z", b"3").unwrap();
    let (waited, got, elapsed) = rx.recv_timeout(LONG + SLACK).unwrap();
    waited.unwrap();
    assert_eq!(got.unwrap(), b"3");
    assert!(elapsed < LONG / 2, "the waiter was not woken by the set: {elapsed:?}");
}

#[test]
fn a_client_with_a_wrong_secret_is_refused_and_the_server_keeps_serving() {
    let (server, secret) = start_server();
    let addr = server.local_addr().to_string();
    let wrong = JobSecret::generate().unwrap();
    match TcpStore::connect(&addr, &wrong, LONG) {
        Err(StoreError::Auth { addr: named, .. }) => assert_eq!(named, addr),
        other => panic!("expected an auth error, got {other:?}"),
    }
    let good = connect(&server, &secret);
    good.set("still", b"serving").unwrap();
    assert_eq!(good.get("still", SHORT).unwrap(), b"serving");
}

/// Reads until the server closes the connection; fails if it is still open after `LONG`.
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(LONG)).unwrap();
    let mut received = Vec::new();
    match stream.read_to_end(&mut received) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the connection: {e}"),
    }
    received
}

#[test]
fn a_raw_client_sending_garbage_is_disconnected_and_others_are_still_served() {
    let (server, secret) = start_server();
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: burnrun\r\n\r\n").unwrap();
    assert!(read_until_closed(&mut raw).is_empty(), "a stranger must learn nothing");
    let good = connect(&server, &secret);
    good.set("k", b"v").unwrap();
    assert_eq!(good.get("k", SHORT).unwrap(), b"v");
}

#[test]
fn a_silent_connection_does_not_block_other_clients() {
    let (server, secret) = start_server();
    let _silent: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(server.local_addr()).unwrap())
        .collect();
    let started = Instant::now();
    let good = connect(&server, &secret);
    good.set("k", b"v").unwrap();
    assert!(
        started.elapsed() < SLACK,
        "a silent client held up others: {:?}",
        started.elapsed()
    );
}

#[test]
fn shutdown_with_a_blocked_waiter_does_not_hang() {
    let (server, secret) = start_server();
    let addr = server.local_addr().to_string();
    let waiter = connect(&server, &secret);
    let _idle = connect(&server, &secret);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let started = Instant::now();
        let _ = tx.send((waiter.wait(&["never"], Duration::from_secs(60)), started.elapsed()));
    });
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    within(LONG, move || server.shutdown());
    assert!(started.elapsed() < SLACK, "shutdown took {:?}", started.elapsed());
    let (waited, elapsed) = rx.recv_timeout(LONG).expect("the waiter was not woken by shutdown");
    match waited {
        Err(StoreError::Io {
            op: "wait",
            addr: named,
            ..
        }) => assert_eq!(named, addr),
        other => panic!("expected an I/O error naming the server, got {other:?}"),
    }
    assert!(
        elapsed < Duration::from_secs(5),
        "the waiter returned after {elapsed:?}"
    );
}

#[test]
fn a_dead_server_gives_an_io_error_naming_its_address() {
    let (server, secret) = start_server();
    let addr = server.local_addr().to_string();
    let client = connect(&server, &secret);
    client.set("k", b"v").unwrap();
    server.shutdown();
    let started = Instant::now();
    for _ in 0..2 {
        match client.get("k", SHORT) {
            Err(StoreError::Io {
                op: "get", addr: named, ..
            }) => assert_eq!(named, addr),
            other => panic!("expected an I/O error naming the server, got {other:?}"),
        }
    }
    assert!(started.elapsed() < SLACK);
}

#[test]
fn connect_retries_until_the_server_starts() {
    // Find a free port, release it, and start the server there after the client began retrying.
    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let secret = JobSecret::generate().unwrap();
    let (tx, rx) = mpsc::channel();
    {
        let secret = secret.clone();
        std::thread::spawn(move || {
            let _ = tx.send(TcpStore::connect(&addr.to_string(), &secret, LONG));
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let server = TcpStoreServer::bind(addr, secret).unwrap();
    let client = rx.recv_timeout(LONG + SLACK).unwrap().unwrap();
    client.set("late", b"but fine").unwrap();
    assert_eq!(client.local_addr().ip(), addr.ip());
    assert_eq!(server.local_addr(), addr);
}

#[test]
fn connect_to_nothing_gives_up_at_its_timeout() {
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let started = Instant::now();
    match TcpStore::connect(&addr, &JobSecret::generate().unwrap(), SHORT) {
        Err(StoreError::Io {
            op: "connect",
            addr: named,
            ..
        }) => assert_eq!(named, addr),
        other => panic!("expected an I/O error naming the address, got {other:?}"),
    }
    assert!(started.elapsed() < SHORT + SLACK);
}

#[test]
fn stores_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TcpStore>();
    assert_send_sync::<TcpStoreServer>();
    assert_send_sync::<MemoryStore>();
    assert_send_sync::<PrefixStore>();
}

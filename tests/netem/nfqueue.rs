//! A stand-in for `tc netem delay` on kernels built without `sch_netem` (this machine's and
//! CI's): iptables hands a link's packets to an NFQUEUE (`-j NFQUEUE --queue-bypass`), and a
//! thread of the test, inside the node's network namespace, lets each one go `delay` after it
//! arrived. Packets leave in the order they came (one delay for all), as with netem.
//!
//! The kernel's side is `nfnetlink_queue` over a netlink socket: bind the queue, ask for the
//! packets' metadata only (their id), and answer with one batch verdict ("accept every packet up to
//! id N") for all whose delay is over.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// From <linux/netlink.h>, <linux/netfilter/nfnetlink.h>, <linux/netfilter/nfnetlink_queue.h>.
const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HEADER_BYTES: usize = 16;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;

/// Longest wait between two looks at the stop flag.
const POLL_SLICE: Duration = Duration::from_millis(50);

/// Holds the packets of one queue in one namespace for a fixed delay until dropped.
pub struct Delayer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Delayer {
    /// Binds queue `queue` of namespace `netns` (its name under /run/netns) and starts delaying.
    pub fn start(netns: &str, queue: u16, delay: Duration) -> io::Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, stopped) = (netns.to_owned(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || match open(&netns, queue) {
            Ok(socket) => {
                let _ = ready_tx.send(Ok(()));
                relay(socket.as_raw_fd(), queue, delay, &stopped);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        });
        ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the delaying thread died")))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A system call's result: negative is the error in `errno`.
fn check<T: PartialOrd + Default>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Moves this thread into `netns` and binds `queue` there: the socket, and so the queue, belong
/// to the namespace the thread is in when it opens it.
fn open(netns: &str, queue: u16) -> io::Result<OwnedFd> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    // SAFETY: setns on a valid descriptor changes only this thread's network namespace.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
    // SAFETY: plain socket creation; the descriptor is owned right away.
    let fd = check(unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) })?;
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is valid (port id 0: the kernel assigns one).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `addr` is a sockaddr_nl of the length given.
    check(unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    // nfqnl_msg_config_cmd { command, pad, pf (be16) }; nfqnl_msg_config_params { copy_range
    // (be32), copy_mode } packed: metadata only, no payload.
    configure(fd, queue, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])?;
    configure(fd, queue, NFQA_CFG_PARAMS, &[0, 0, 0, 0, NFQNL_COPY_META])?;
    Ok(socket)
}

/// One nfnetlink_queue message: netlink header, nfgenmsg (family unspecified, version 0, the
/// queue number big-endian), then the attributes, each padded to 4 bytes.
fn message(kind: u16, flags: u16, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut msg = vec![0u8; NLMSG_HEADER_BYTES];
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    msg.extend_from_slice(&queue.to_be_bytes());
    for (attr, payload) in attrs {
        msg.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        msg.extend_from_slice(&attr.to_ne_bytes());
        msg.extend_from_slice(payload);
        msg.resize(msg.len().next_multiple_of(4), 0);
    }
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    msg[6..8].copy_from_slice(&flags.to_ne_bytes());
    msg
}

fn send(fd: RawFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is a valid buffer of the length given; an unconnected netlink socket sends to the kernel.
    check(unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) }).map(|_| ())
}

/// Sends one config attribute and waits for the kernel's acknowledgement.
fn configure(fd: RawFd, queue: u16, attr: u16, payload: &[u8]) -> io::Result<()> {
    send(
        fd,
        &message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, queue, &[(attr, payload)]),
    )?;
    let mut buf = [0u8; 1024];
    // SAFETY: `buf` is writable for its length.
    let n = check(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) })? as usize;
    // nlmsgerr { error: i32, the request's header }: error 0 is the acknowledgement.
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if n < NLMSG_HEADER_BYTES + 4 || kind != NLMSG_ERROR {
        return Err(io::Error::other(format!(
            "nfnetlink_queue answered {n} bytes of type {kind} to a config request"
        )));
    }
    match i32::from_ne_bytes(buf[16..20].try_into().expect("4 bytes")) {
        0 => Ok(()),
        error => Err(io::Error::from_raw_os_error(-error)),
    }
}

/// The packet ids of the `NFQNL_MSG_PACKET` messages in one datagram.
fn packet_ids(datagram: &[u8]) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut at = 0;
    while at + NLMSG_HEADER_BYTES <= datagram.len() {
        let len = u32::from_ne_bytes(datagram[at..at + 4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes([datagram[at + 4], datagram[at + 5]]);
        if len < NLMSG_HEADER_BYTES || at + len > datagram.len() {
            break;
        }
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
            // After the nfgenmsg: attributes; nfqnl_msg_packet_hdr starts with the id (be32).
            let mut attr = at + NLMSG_HEADER_BYTES + 4;
            while attr + 4 <= at + len {
                let attr_len = u16::from_ne_bytes([datagram[attr], datagram[attr + 1]]) as usize;
                let attr_kind = u16::from_ne_bytes([datagram[attr + 2], datagram[attr + 3]]) & 0x7fff;
                if attr_len < 4 {
                    break;
                }
                if attr_kind == NFQA_PACKET_HDR && attr_len >= 8 {
                    ids.push(u32::from_be_bytes(
                        datagram[attr + 4..attr + 8].try_into().expect("4 bytes"),
                    ));
                }
                attr += attr_len.next_multiple_of(4);
            }
        }
        at += len.next_multiple_of(4);
    }
    ids
}

/// Receives packets and accepts each `delay` after it came, until `stop`.
fn relay(fd: RawFd, queue: u16, delay: Duration, stop: &AtomicBool) {
    let mut held: VecDeque<(u32, Instant)> = VecDeque::new();
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut last_due = None;
        while let Some(&(id, due)) = held.front() {
            if due > now {
                break;
            }
            last_due = Some(id);
            held.pop_front();
        }
        if let Some(id) = last_due {
            // nfqnl_msg_verdict_hdr { verdict (be32), id (be32) }: the batch covers every id up to it.
            let mut verdict = NF_ACCEPT.to_be_bytes().to_vec();
            verdict.extend_from_slice(&id.to_be_bytes());
            let msg = message(
                NFQNL_MSG_VERDICT_BATCH,
                NLM_F_REQUEST,
                queue,
                &[(NFQA_VERDICT_HDR, &verdict)],
            );
            if send(fd, &msg).is_err() {
                return;
            }
        }
        let wait = held
            .front()
            .map_or(POLL_SLICE, |(_, due)| due.saturating_duration_since(now))
            .min(POLL_SLICE);
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, wait.as_micros().div_ceil(1000) as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            // ENOBUFS: the kernel dropped messages for a full socket buffer; those packets wait
            // in the queue for a later batch verdict, which covers them.
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => continue,
                _ => return,
            }
        }
        let arrived = Instant::now();
        held.extend(
            packet_ids(&buf[..n as usize])
                .into_iter()
                .map(|id| (id, arrived + delay)),
        );
    }
}

//! [`NcclCommunicator`]: burnrun's [`Communicator`] on NCCL, one rank per CUDA device.
//!
//! Every collective is enqueued on the communicator's own CUDA stream and then watched, never
//! waited for blindly: the stream is polled, NCCL's background error is checked, and when the
//! deadline passes (a dead or stuck peer) the communicator is aborted with `ncclCommAbort`, so the
//! call returns an error naming the operation and its sequence number instead of hanging; later
//! calls fail at once. Device buffers go to NCCL by pointer; host buffers are staged through the
//! device (for small control messages: a barrier, a loss to average).
//!
//! Written against NCCL 2.12+ and the CUDA driver API; it needs a GPU to run, which this
//! project's CI machine does not have: construction without a driver is an error (tested), the
//! collectives are exercised by the GPU check.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};

use crate::comm::buffer::blocks_mismatch;
use crate::comm::{fingerprint, BufMut, BufRef, CommError, Communicator, Memory, MemoryMut, OpKind, ReduceOp};
use crate::rendezvous::Store;

use super::check::CallCheck;
use super::error::NcclError;
use super::id::exchange_unique_id;
use super::library::{Comm, Nccl, RawComm, RawStream};
use super::types::{nccl_dtype, nccl_op};

/// Pause between two polls of a running collective, once it has run past [`SPIN_WINDOW`].
const POLL_INTERVAL: Duration = Duration::from_micros(20);
/// How long a collective is polled without sleeping. A sleep costs 50-80 us on Linux (the timer
/// slack), more than a small collective takes on a GPU; a longer one is then polled every
/// [`POLL_INTERVAL`] so that a waiting rank does not hold a core.
const SPIN_WINDOW: Duration = Duration::from_micros(500);

/// A rank of an NCCL communicator on one CUDA device.
pub struct NcclCommunicator {
    nccl: &'static Nccl,
    /// `None` once aborted: every later call fails at once.
    comm: Mutex<Option<Comm>>,
    /// The first failure, for later calls' errors.
    failure: Mutex<Option<String>>,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    seq: AtomicU64,
    p2p_seq: AtomicU64,
    bytes: AtomicU64,
    /// The fingerprint comparison through the store, if set ([`NcclCommunicator::with_check`]).
    check: Option<CallCheck>,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.context.ordinal())
            .finish_non_exhaustive()
    }
}

impl NcclCommunicator {
    /// Joins the NCCL communicator of `world_size` ranks as `rank`, on CUDA device `ordinal`;
    /// rank 0's unique id travels through `store` under `key`. Without a CUDA driver or device
    /// this is an error saying so (never a panic).
    pub fn new(
        store: &dyn Store,
        key: &str,
        rank: usize,
        world_size: usize,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, NcclError> {
        let nccl = Nccl::get()?;
        let cuda = |call: &'static str, why: String| NcclError::Cuda { call, why };
        super::world::cuda_device_count()?;
        let context =
            CudaContext::new(ordinal).map_err(|e| cuda("opening the device", format!("device {ordinal}: {e}")))?;
        let stream = context
            .new_stream()
            .map_err(|e| cuda("creating a stream", e.to_string()))?;
        let id = exchange_unique_id(nccl, store, key, rank, timeout)?;
        // ncclCommInitRank blocks until every rank of the communicator calls it: it runs on a
        // thread of its own, waited for no longer than the deadline (a rank that died after the
        // id exchange would otherwise hold this one forever).
        let (done, outcome) = std::sync::mpsc::channel();
        let bound = context.clone();
        std::thread::Builder::new()
            .name("nccl-init".into())
            .spawn(move || {
                let comm = bound
                    .bind_to_thread()
                    .map_err(|e| cuda("binding the device", e.to_string()))
                    .and_then(|()| nccl.init_rank(id, rank, world_size));
                // A late communicator (the caller gave up) is destroyed here.
                let _ = done.send(comm);
            })
            .map_err(|e| cuda("starting the init thread", e.to_string()))?;
        let comm = outcome.recv_timeout(timeout).map_err(|_| NcclError::InitTimedOut {
            rank,
            world_size,
            timeout,
        })??;
        Ok(Self {
            nccl,
            comm: Mutex::new(Some(comm)),
            failure: Mutex::new(None),
            context,
            stream,
            rank,
            world_size,
            timeout,
            seq: AtomicU64::new(0),
            p2p_seq: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            check: None,
        })
    }

    /// Compares the ranks' calls through the store ([`CallCheck`]): on a failure the error names
    /// the first call where two ranks differ; with `CheckMode::EveryCall` a mismatch is found
    /// before NCCL is called.
    pub fn with_check(mut self, check: CallCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// The communicator, locked for call `seq`, with the device bound to this thread; the error
    /// of a call after an abort when it is gone.
    fn live(&self, op: &'static str, seq: u64) -> Result<std::sync::MutexGuard<'_, Option<Comm>>, CommError> {
        let guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(self.poisoned());
        }
        self.context
            .bind_to_thread()
            .map_err(|e| self.device_err(op, seq, e.to_string()))?;
        Ok(guard)
    }

    /// The error of a call after the communicator was aborted.
    fn poisoned(&self) -> CommError {
        let first = self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        CommError::Poisoned {
            rank: self.rank,
            first: first.unwrap_or_else(|| "the NCCL communicator was aborted".into()),
        }
    }

    /// The CUDA stream every call of this communicator runs on. Device buffers allocated,
    /// filled and read on it are ordered with the collectives without further synchronisation.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA device ordinal this rank runs on.
    pub fn ordinal(&self) -> usize {
        self.context.ordinal()
    }

    /// The device's name (e.g. `NVIDIA H200`), or why the driver could not say.
    pub fn device_name(&self) -> String {
        self.context.name().unwrap_or_else(|e| format!("unnamed device ({e})"))
    }

    /// NCCL's version number (`23007` is 2.30.7).
    pub fn nccl_version(&self) -> Result<i32, NcclError> {
        self.nccl.version()
    }

    /// Sends `send` to rank `to` while receiving `recv` from rank `from`, as one NCCL group, so
    /// both directions of a link are busy at once (nccl-tests' sendrecv). A `send` followed by a
    /// `recv` would deadlock around a ring: every rank's send waits for a receive not yet posted.
    pub fn send_recv(&self, send: BufRef<'_>, to: usize, recv: BufMut<'_>, from: usize) -> Result<(), CommError> {
        for peer in [to, from] {
            if peer >= self.world_size {
                return Err(CommError::InvalidArgument {
                    rank: self.rank,
                    op: "send_recv",
                    reason: format!("peer {peer} is not below the world size {}", self.world_size),
                });
            }
        }
        let (send_dtype, send_count, size) = (nccl_dtype(send.dtype), send.numel, send.size_bytes());
        let (recv_dtype, recv_count) = (nccl_dtype(recv.dtype), recv.numel);
        let (send_address, _staged) = device_ref(self, "send_recv", &send)?;
        self.with_device_mut("send_recv", recv, |recv_address| {
            self.run("send_recv", None, size, |nccl, comm, stream| {
                // SAFETY: `send_count` elements at `send_address` and room for `recv_count` at
                // `recv_address`, both live device buffers for the whole call.
                unsafe {
                    let mut code = (nccl.group_start)();
                    if code == 0 {
                        code = (nccl.send)(ptr(send_address), send_count, send_dtype, to as c_int, comm, stream);
                    }
                    if code == 0 {
                        code = (nccl.recv)(ptr(recv_address), recv_count, recv_dtype, from as c_int, comm, stream);
                    }
                    let end = (nccl.group_end)();
                    if code != 0 {
                        code
                    } else {
                        end
                    }
                }
            })
        })
    }

    fn device_err(&self, op: &'static str, seq: u64, reason: String) -> CommError {
        CommError::Device {
            rank: self.rank,
            op,
            seq,
            reason,
        }
    }

    /// Enqueues one NCCL call on the stream and watches it to the end or the deadline.
    fn run(
        &self,
        op: &'static str,
        fp: Option<u64>,
        bytes: usize,
        enqueue: impl FnOnce(&Nccl, RawComm, RawStream) -> c_int,
    ) -> Result<(), CommError> {
        // Collectives are numbered over the whole group (every rank makes each one); point-to-point
        // calls (no fingerprint) on their own, since only a pair of ranks makes them.
        let seq = match fp {
            Some(_) => self.seq.fetch_add(1, Ordering::Relaxed),
            None => self.p2p_seq.fetch_add(1, Ordering::Relaxed),
        };
        if let (Some(check), Some(fp)) = (&self.check, fp) {
            check.before(op, seq, fp)?;
        }
        // The flight recorder (read by the launcher on a hang): NCCL's calls as their own group.
        let (dtype, count) = fp.map_or(("bytes".to_string(), bytes as u64), |fp| {
            let dtype = crate::comm::DType::from_code(((fp >> 48) & 0xff) as u8).map_or("?".into(), |d| d.to_string());
            (dtype, fp & 0xffff_ffff)
        });
        let slot = crate::flight::begin(crate::flight::NCCL_GROUP, seq, op, &dtype, count, None);
        let outcome = self.run_recorded(op, seq, fp, bytes, enqueue);
        crate::flight::end(slot, outcome.is_ok());
        outcome
    }

    /// [`NcclCommunicator::run`] once numbered and checked.
    fn run_recorded(
        &self,
        op: &'static str,
        seq: u64,
        fp: Option<u64>,
        bytes: usize,
        enqueue: impl FnOnce(&Nccl, RawComm, RawStream) -> c_int,
    ) -> Result<(), CommError> {
        let mut guard = self.live(op, seq)?;
        let Some(comm) = guard.as_ref() else {
            return Err(self.poisoned());
        };
        let code = enqueue(self.nccl, comm.raw(), self.stream.cu_stream() as RawStream);
        self.nccl
            .check(op, code)
            .map_err(|e| self.device_err(op, seq, e.to_string()))?;
        let started = Instant::now();
        let deadline = started + self.timeout;
        let outcome = loop {
            // SAFETY: the stream is alive (owned by self) and the context is bound.
            let state = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
            match state {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => break Ok(()),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                other => break Err(format!("the CUDA stream failed: {other:?}")),
            }
            if let Err(e) = comm.async_error() {
                break Err(e.to_string());
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(format!(
                    "timed out after {:?} (a peer is gone or stuck; NCCL cannot say which)",
                    self.timeout
                ));
            }
            if now - started < SPIN_WINDOW {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(POLL_INTERVAL);
            }
        };
        match outcome {
            Ok(()) => {
                self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(reason) => {
                // Abort, so that no peer and no later call stays blocked on this communicator.
                if let Some(comm) = guard.take() {
                    let _ = comm.abort();
                }
                let diagnosis = match (&self.check, fp) {
                    (Some(check), Some(_)) => check.diagnose(seq),
                    _ => String::new(),
                };
                let error = self.device_err(op, seq, format!("{reason}; the communicator was aborted{diagnosis}"));
                *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Host bytes copied to the device (staging for host buffers).
    fn stage(&self, op: &'static str, bytes: &[u8]) -> Result<CudaSlice<u8>, CommError> {
        let seq = self.seq.load(Ordering::Relaxed);
        self.stream
            .clone_htod(bytes)
            .map_err(|e| self.device_err(op, seq, format!("staging to the device: {e}")))
    }

    /// Copies a staged buffer back to the host bytes.
    fn unstage(&self, op: &'static str, staged: &CudaSlice<u8>, bytes: &mut [u8]) -> Result<(), CommError> {
        let seq = self.seq.load(Ordering::Relaxed);
        self.stream
            .memcpy_dtoh(staged, bytes)
            .and_then(|()| self.stream.synchronize())
            .map_err(|e| self.device_err(op, seq, format!("copying back from the device: {e}")))
    }

    /// Runs `call` with the device address of `buf` (staged through the device when it is host
    /// memory, and copied back afterwards).
    fn with_device_mut(
        &self,
        op: &'static str,
        buf: BufMut<'_>,
        call: impl FnOnce(u64) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        match buf.memory {
            MemoryMut::Device(ptr) => call(ptr.address),
            MemoryMut::Host(bytes) => {
                let staged = self.stage(op, bytes)?;
                {
                    let (address, _sync) = staged.device_ptr(&self.stream);
                    call(address)?;
                }
                self.unstage(op, &staged, bytes)
            }
        }
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<(), CommError> {
        if root >= self.world_size {
            return Err(CommError::InvalidArgument {
                rank: self.rank,
                op,
                reason: format!("root {root} is not below the world size {}", self.world_size),
            });
        }
        Ok(())
    }
}

/// A read-only buffer's device address, staging host memory (kept alive by the returned slice).
fn device_ref(
    comm: &NcclCommunicator,
    op: &'static str,
    buf: &BufRef<'_>,
) -> Result<(u64, Option<CudaSlice<u8>>), CommError> {
    match &buf.memory {
        Memory::Device(ptr) => Ok((ptr.address, None)),
        Memory::Host(bytes) => {
            let staged = comm.stage(op, bytes)?;
            let address = staged.device_ptr(&comm.stream).0;
            Ok((address, Some(staged)))
        }
    }
}

fn ptr(address: u64) -> *mut c_void {
    address as usize as *mut c_void
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn links(&self) -> String {
        format!("NCCL on CUDA device {}", self.context.ordinal())
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn all_reduce(&self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        let fp = fingerprint(OpKind::AllReduce, buf.dtype, buf.numel, None, Some(op));
        let (dtype, count, size) = (nccl_dtype(buf.dtype), buf.numel, buf.numel * buf.dtype.size_bytes());
        self.with_device_mut("all_reduce", buf, |address| {
            self.run("all_reduce", Some(fp), size, |nccl, comm, stream| {
                // SAFETY: in-place all-reduce of `count` elements at a live device address.
                unsafe { (nccl.all_reduce)(ptr(address), ptr(address), count, dtype, nccl_op(op), comm, stream) }
            })
        })
    }

    fn reduce(&self, buf: BufMut<'_>, op: ReduceOp, root: usize) -> Result<(), CommError> {
        self.check_root("reduce", root)?;
        let fp = fingerprint(OpKind::Reduce, buf.dtype, buf.numel, Some(root), Some(op));
        let (dtype, count, size) = (nccl_dtype(buf.dtype), buf.numel, buf.numel * buf.dtype.size_bytes());
        self.with_device_mut("reduce", buf, |address| {
            self.run("reduce", Some(fp), size, |nccl, comm, stream| {
                // SAFETY: in-place reduce of `count` elements at a live device address.
                unsafe {
                    (nccl.reduce)(
                        ptr(address),
                        ptr(address),
                        count,
                        dtype,
                        nccl_op(op),
                        root as c_int,
                        comm,
                        stream,
                    )
                }
            })
        })
    }

    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<(), CommError> {
        self.check_root("broadcast", root)?;
        let fp = fingerprint(OpKind::Broadcast, buf.dtype, buf.numel, Some(root), None);
        let (dtype, count, size) = (nccl_dtype(buf.dtype), buf.numel, buf.numel * buf.dtype.size_bytes());
        self.with_device_mut("broadcast", buf, |address| {
            self.run("broadcast", Some(fp), size, |nccl, comm, stream| {
                // SAFETY: in-place broadcast of `count` elements at a live device address.
                unsafe { (nccl.broadcast)(ptr(address), ptr(address), count, dtype, root as c_int, comm, stream) }
            })
        })
    }

    fn all_gather(&self, input: BufRef<'_>, output: BufMut<'_>) -> Result<(), CommError> {
        let whole = (output.dtype, output.numel);
        if let Some(reason) = blocks_mismatch("output", whole, (input.dtype, input.numel), self.world_size) {
            return Err(CommError::InvalidArgument {
                rank: self.rank,
                op: "all_gather",
                reason,
            });
        }
        let fp = fingerprint(OpKind::AllGather, input.dtype, input.numel, None, None);
        let (dtype, count, size) = (nccl_dtype(input.dtype), input.numel, input.size_bytes());
        let (send, _staged) = device_ref(self, "all_gather", &input)?;
        self.with_device_mut("all_gather", output, |recv| {
            self.run("all_gather", Some(fp), size, |nccl, comm, stream| {
                // SAFETY: `count` elements from `send`, `count * world_size` into `recv`, both live.
                unsafe { (nccl.all_gather)(ptr(send), ptr(recv), count, dtype, comm, stream) }
            })
        })
    }

    fn reduce_scatter(&self, input: BufRef<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        let whole = (input.dtype, input.numel);
        if let Some(reason) = blocks_mismatch("input", whole, (output.dtype, output.numel), self.world_size) {
            return Err(CommError::InvalidArgument {
                rank: self.rank,
                op: "reduce_scatter",
                reason,
            });
        }
        let fp = fingerprint(OpKind::ReduceScatter, input.dtype, input.numel, None, Some(op));
        let (dtype, count, size) = (nccl_dtype(input.dtype), output.numel, input.size_bytes());
        let (send, _staged) = device_ref(self, "reduce_scatter", &input)?;
        self.with_device_mut("reduce_scatter", output, |recv| {
            self.run("reduce_scatter", Some(fp), size, |nccl, comm, stream| {
                // SAFETY: `count * world_size` elements from `send`, `count` into `recv`, both live.
                unsafe { (nccl.reduce_scatter)(ptr(send), ptr(recv), count, dtype, nccl_op(op), comm, stream) }
            })
        })
    }

    fn all_to_all(&self, input: BufRef<'_>, output: BufMut<'_>) -> Result<(), CommError> {
        let n = self.world_size;
        if input.numel != output.numel || input.numel % n != 0 || input.dtype != output.dtype {
            return Err(CommError::InvalidArgument {
                rank: self.rank,
                op: "all_to_all",
                reason: format!(
                    "input {} and output {} elements must be equal and divisible by world_size({n})",
                    input.numel, output.numel
                ),
            });
        }
        let (dtype, chunk, elem) = (nccl_dtype(input.dtype), input.numel / n, input.dtype.size_bytes());
        let size = input.size_bytes();
        let fp = fingerprint(OpKind::AllToAll, input.dtype, input.numel, None, None);
        let (send, _staged) = device_ref(self, "all_to_all", &input)?;
        self.with_device_mut("all_to_all", output, |recv| {
            self.run("all_to_all", Some(fp), size, |nccl, comm, stream| {
                // One group of point-to-point calls: chunk j to rank j, chunk i from rank i.
                // SAFETY: every address is inside the live buffers (chunk * elem bytes each).
                unsafe {
                    let mut code = (nccl.group_start)();
                    for peer in 0..n {
                        if code != 0 {
                            break;
                        }
                        let offset = (peer * chunk * elem) as u64;
                        code = (nccl.send)(ptr(send + offset), chunk, dtype, peer as c_int, comm, stream);
                        if code == 0 {
                            code = (nccl.recv)(ptr(recv + offset), chunk, dtype, peer as c_int, comm, stream);
                        }
                    }
                    let end = (nccl.group_end)();
                    if code != 0 {
                        code
                    } else {
                        end
                    }
                }
            })
        })
    }

    fn send(&self, buf: BufRef<'_>, peer: usize, _tag: u32) -> Result<(), CommError> {
        // NCCL matches point-to-point calls by order between a pair, not by tag.
        let (dtype, count, size) = (nccl_dtype(buf.dtype), buf.numel, buf.size_bytes());
        let (address, _staged) = device_ref(self, "send", &buf)?;
        self.run("send", None, size, |nccl, comm, stream| {
            // SAFETY: `count` elements at a live device address.
            unsafe { (nccl.send)(ptr(address), count, dtype, peer as c_int, comm, stream) }
        })
    }

    fn recv(&self, buf: BufMut<'_>, peer: usize, _tag: u32) -> Result<(), CommError> {
        let (dtype, count) = (nccl_dtype(buf.dtype), buf.numel);
        self.with_device_mut("recv", buf, |address| {
            self.run("recv", None, 0, |nccl, comm, stream| {
                // SAFETY: `count` elements at a live device address.
                unsafe { (nccl.recv)(ptr(address), count, dtype, peer as c_int, comm, stream) }
            })
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut one = [0u8];
        self.all_reduce(BufMut::host(&mut one), ReduceOp::Sum)
    }

    fn new_group(&self, ranks: &[usize]) -> Result<Option<Box<dyn Communicator>>, CommError> {
        let op = "new_group";
        let invalid = |reason: String| CommError::InvalidArgument {
            rank: self.rank,
            op,
            reason,
        };
        if ranks.is_empty() || ranks.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid(format!(
                "ranks {ranks:?} must be non-empty, ascending and distinct"
            )));
        }
        if let Some(&last) = ranks.last().filter(|&&r| r >= self.world_size) {
            return Err(invalid(format!(
                "rank {last} is not below the world size {}",
                self.world_size
            )));
        }
        let member = ranks.iter().position(|&r| r == self.rank);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.live(op, seq)?;
        let Some(parent) = guard.as_ref() else {
            return Err(self.poisoned());
        };
        // ncclCommSplit blocks until every rank of this communicator calls it: run it on its own
        // thread and wait for it no longer than the deadline.
        let (done, outcome) = std::sync::mpsc::channel();
        let parent_raw = SendComm(parent.raw());
        let (nccl, context) = (self.nccl, self.context.clone());
        // One color for the members, none for the others; ordered by their rank in this group.
        let color = member.map(|_| 0);
        std::thread::Builder::new()
            .name("nccl-split".into())
            .spawn(move || {
                let parent_raw = parent_raw;
                let result = context
                    .bind_to_thread()
                    .map_err(|e| e.to_string())
                    // SAFETY: the parent outlives the call: on a timeout it is aborted only
                    // after this thread is abandoned, and the process then stops using it.
                    .and_then(|()| {
                        unsafe { nccl.split_raw(parent_raw.0, color, member.unwrap_or(0)) }.map_err(|e| e.to_string())
                    });
                let _ = done.send(result);
            })
            .map_err(|e| self.device_err(op, seq, format!("starting the split thread: {e}")))?;
        let split = match outcome.recv_timeout(self.timeout) {
            Ok(Ok(split)) => split,
            Ok(Err(reason)) => return Err(self.device_err(op, seq, reason)),
            Err(_) => {
                if let Some(comm) = guard.take() {
                    let _ = comm.abort();
                }
                let error = self.device_err(
                    op,
                    seq,
                    format!(
                        "ncclCommSplit did not finish within {:?} (a rank did not call new_group); the communicator was aborted",
                        self.timeout
                    ),
                );
                *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
                return Err(error);
            }
        };
        drop(guard);
        let (Some(rank), Some(comm)) = (member, split) else {
            return Ok(None);
        };
        let stream = self
            .context
            .new_stream()
            .map_err(|e| self.device_err(op, seq, format!("creating a stream: {e}")))?;
        Ok(Some(Box::new(NcclCommunicator {
            nccl: self.nccl,
            comm: Mutex::new(Some(comm)),
            failure: Mutex::new(None),
            context: self.context.clone(),
            stream,
            rank,
            world_size: ranks.len(),
            timeout: self.timeout,
            seq: AtomicU64::new(0),
            p2p_seq: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            // A sub-group's calls are compared only by its own check, which needs its own keys.
            check: None,
        })))
    }
}

/// A raw communicator handle moved to the thread that splits it.
struct SendComm(RawComm);

// SAFETY: only an address; the split thread is the only user of the parent while it runs (the
// parent's lock is held by the caller meanwhile).
unsafe impl Send for SendComm {}

//! `ProcessGroup`: a communicator plus typed calls, async work handles and sub-groups.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::buffer::{BufMut, BufRef, HostBuffer};
use super::communicator::{CommError, Communicator};
use super::dtype::{Element, ReduceOp};

type Job = Box<dyn FnOnce(&dyn Communicator) + Send>;

/// Runs async work in issue order on one thread per group, so collectives keep the same order
/// on every rank. Synchronous calls first drain it, for the same reason.
struct Executor {
    state: Mutex<ExecState>,
    changed: Condvar,
    /// `state.pending`, written under the lock: a synchronous call with nothing queued (the
    /// usual case) reads this, not the lock.
    pending: AtomicUsize,
}

struct ExecState {
    queue: VecDeque<Job>,
    /// Jobs queued or running.
    pending: usize,
    shutdown: bool,
}

/// A group of ranks that run collectives together.
///
/// Cheap to clone (shared). Typed calls take slices of any [`Element`]; `*_async` calls take
/// ownership of a buffer and return a [`Work`] handle that gives it back on `wait()`.
#[derive(Clone)]
pub struct ProcessGroup {
    inner: Arc<GroupInner>,
}

struct GroupInner {
    comm: Arc<dyn Communicator>,
    /// Global ranks of the members, indexed by group rank.
    global_ranks: Vec<usize>,
    executor: Arc<Executor>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// The job's store (scoped to this group), when the group was built through one: what a
    /// device communicator set up beside it uses for its own rendezvous and checks.
    store: Option<Arc<dyn crate::rendezvous::Store>>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .field("backend", &self.inner.comm.backend())
            .field("global_ranks", &self.inner.global_ranks)
            .finish()
    }
}

impl Drop for GroupInner {
    fn drop(&mut self) {
        if let Ok(mut state) = self.executor.state.lock() {
            state.shutdown = true;
        }
        self.executor.changed.notify_all();
        if let Some(worker) = self.worker.get_mut().ok().and_then(Option::take) {
            let _ = worker.join();
        }
    }
}

/// Where a finished job leaves its result.
type Slot<T> = Arc<(Mutex<Option<Result<T, CommError>>>, Condvar)>;

/// A handle on an asynchronous collective.
#[derive(Debug)]
#[must_use = "a Work handle must be waited on to get the buffer and the error back"]
pub struct Work<T> {
    slot: Slot<T>,
}

impl<T> Work<T> {
    /// Blocks until the collective finished (it has its own deadline) and returns the buffer.
    pub fn wait(self) -> Result<T, CommError> {
        let (lock, cv) = &*self.slot;
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(result) = guard.take() {
                return result;
            }
            guard = cv.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// True once `wait` would return at once.
    pub fn is_done(&self) -> bool {
        self.slot.0.lock().map(|g| g.is_some()).unwrap_or(true)
    }
}

impl ProcessGroup {
    /// Wraps a communicator; `global_ranks[i]` is the global rank of group rank `i`.
    pub fn new(comm: Box<dyn Communicator>, global_ranks: Vec<usize>) -> Self {
        let executor = Arc::new(Executor {
            state: Mutex::new(ExecState {
                queue: VecDeque::new(),
                pending: 0,
                shutdown: false,
            }),
            changed: Condvar::new(),
            pending: AtomicUsize::new(0),
        });
        Self {
            inner: Arc::new(GroupInner {
                comm: Arc::from(comm),
                global_ranks,
                executor,
                worker: Mutex::new(None),
                store: None,
            }),
        }
    }

    /// The group, remembering the store it was built through (see [`ProcessGroup::store`]).
    pub fn with_store(mut self, store: Arc<dyn crate::rendezvous::Store>) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.store = Some(store),
            // Already shared: a group keeps the store it was made with.
            None => tracing::debug!("with_store on a shared process group: ignored"),
        }
        self
    }

    /// The store this group was built through, if any (the world group of a launched job has
    /// one; sub-groups and groups made by hand do not).
    pub fn store(&self) -> Option<&Arc<dyn crate::rendezvous::Store>> {
        self.inner.store.as_ref()
    }

    /// This rank within the group.
    pub fn rank(&self) -> usize {
        self.inner.comm.rank()
    }

    /// Number of ranks in the group.
    pub fn world_size(&self) -> usize {
        self.inner.comm.world_size()
    }

    /// Global ranks of the members, in group order.
    pub fn global_ranks(&self) -> &[usize] {
        &self.inner.global_ranks
    }

    /// Deadline of every blocking call.
    pub fn timeout(&self) -> Duration {
        self.inner.comm.timeout()
    }

    /// Bytes this process has sent over the transport so far (all groups together).
    pub fn bytes_sent(&self) -> u64 {
        self.inner.comm.bytes_sent()
    }

    /// Of [`ProcessGroup::bytes_sent`], the bytes sent to ranks on other hosts (0 when the
    /// backend cannot tell).
    pub fn bytes_sent_across_hosts(&self) -> u64 {
        self.inner.comm.bytes_sent_across_hosts()
    }

    /// The underlying communicator (for buffers of a run-time dtype or device memory).
    pub fn communicator(&self) -> &dyn Communicator {
        &*self.inner.comm
    }

    /// Blocks until every queued async job ran, so a synchronous call keeps issue order.
    fn drain(&self) {
        let exec = &self.inner.executor;
        // Acquire: the finished jobs' effects (their buffers) happen before what follows.
        if exec.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut state = exec.state.lock().unwrap_or_else(|p| p.into_inner());
        while state.pending > 0 {
            state = exec.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn sync<R>(&self, f: impl FnOnce(&dyn Communicator) -> R) -> R {
        self.drain();
        f(&*self.inner.comm)
    }

    fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Communicator) -> Result<R, CommError> + Send + 'static,
    ) -> Work<R> {
        let slot = Arc::new((Mutex::new(None), Condvar::new()));
        let done = Arc::clone(&slot);
        let job: Job = Box::new(move |comm| {
            let result = f(comm);
            let (lock, cv) = &*done;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            cv.notify_all();
        });
        self.ensure_worker();
        let exec = &self.inner.executor;
        let mut state = exec.state.lock().unwrap_or_else(|p| p.into_inner());
        state.queue.push_back(job);
        state.pending += 1;
        exec.pending.store(state.pending, Ordering::Release);
        exec.changed.notify_all();
        Work { slot }
    }

    fn ensure_worker(&self) {
        let mut worker = self.inner.worker.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_some() {
            return;
        }
        let exec = Arc::clone(&self.inner.executor);
        let comm = Arc::clone(&self.inner.comm);
        let spawned = std::thread::Builder::new()
            .name(format!("burnrun-comm-r{}", comm.rank()))
            .spawn(move || loop {
                let job = {
                    let mut state = exec.state.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        if let Some(job) = state.queue.pop_front() {
                            break job;
                        }
                        if state.shutdown {
                            return;
                        }
                        state = exec.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                    }
                };
                job(&*comm);
                let mut state = exec.state.lock().unwrap_or_else(|p| p.into_inner());
                state.pending -= 1;
                exec.pending.store(state.pending, Ordering::Release);
                exec.changed.notify_all();
            });
        // Invariant: thread creation fails only when the OS is out of resources; there is no
        // sensible way to run async collectives then.
        *worker = Some(spawned.expect("cannot spawn the communication thread"));
    }

    /// All-reduce in place.
    pub fn all_reduce<T: Element>(&self, data: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        self.sync(|c| c.all_reduce(BufMut::host(data), op))
    }

    /// All-reduce of a run-time typed buffer.
    pub fn all_reduce_buffer(&self, data: &mut HostBuffer, op: ReduceOp) -> Result<(), CommError> {
        self.sync(|c| c.all_reduce(data.view_mut(), op))
    }

    /// Asynchronous all-reduce: the buffer comes back from [`Work::wait`].
    pub fn all_reduce_async<T: Element>(&self, data: Vec<T>, op: ReduceOp) -> Work<Vec<T>> {
        self.submit(move |c| {
            let mut data = data;
            c.all_reduce(BufMut::host(&mut data), op).map(|()| data)
        })
    }

    /// Asynchronous all-reduce of a run-time typed buffer.
    pub fn all_reduce_buffer_async(&self, data: HostBuffer, op: ReduceOp) -> Work<HostBuffer> {
        self.submit(move |c| {
            let mut data = data;
            c.all_reduce(data.view_mut(), op).map(|()| data)
        })
    }

    /// Reduce to `root`.
    pub fn reduce<T: Element>(&self, data: &mut [T], op: ReduceOp, root: usize) -> Result<(), CommError> {
        self.sync(|c| c.reduce(BufMut::host(data), op, root))
    }

    /// Broadcast from `root`.
    pub fn broadcast<T: Element>(&self, data: &mut [T], root: usize) -> Result<(), CommError> {
        self.sync(|c| c.broadcast(BufMut::host(data), root))
    }

    /// Asynchronous broadcast from `root`.
    pub fn broadcast_async<T: Element>(&self, data: Vec<T>, root: usize) -> Work<Vec<T>> {
        self.submit(move |c| {
            let mut data = data;
            c.broadcast(BufMut::host(&mut data), root).map(|()| data)
        })
    }

    /// All-gather: `output.len() == input.len() * world_size`.
    pub fn all_gather<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<(), CommError> {
        self.sync(|c| c.all_gather(BufRef::host(input), BufMut::host(output)))
    }

    /// Asynchronous all-gather; returns the output.
    pub fn all_gather_async<T: Element>(&self, input: Vec<T>) -> Work<Vec<T>> {
        let n = self.world_size();
        self.submit(move |c| {
            let mut output = vec![T::zeroed(); input.len() * n];
            c.all_gather(BufRef::host(&input), BufMut::host(&mut output))
                .map(|()| output)
        })
    }

    /// Asynchronous all-gather into buffers the caller owns (`output.len() == input.len() *
    /// world_size`); returns both, so that a caller that gathers every step allocates nothing
    /// (and the communication thread never allocates the output in an arena of its own).
    pub fn all_gather_into_async<T: Element>(&self, input: Vec<T>, output: Vec<T>) -> Work<(Vec<T>, Vec<T>)> {
        self.submit(move |c| {
            let mut output = output;
            c.all_gather(BufRef::host(&input), BufMut::host(&mut output))
                .map(|()| (input, output))
        })
    }

    /// Reduce-scatter: `input.len() == output.len() * world_size`.
    pub fn reduce_scatter<T: Element>(&self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        self.sync(|c| c.reduce_scatter(BufRef::host(input), BufMut::host(output), op))
    }

    /// Asynchronous reduce-scatter; returns the output.
    pub fn reduce_scatter_async<T: Element>(&self, input: Vec<T>, op: ReduceOp) -> Work<Vec<T>> {
        let n = self.world_size();
        self.submit(move |c| {
            let mut output = vec![T::zeroed(); input.len() / n.max(1)];
            c.reduce_scatter(BufRef::host(&input), BufMut::host(&mut output), op)
                .map(|()| output)
        })
    }

    /// Asynchronous reduce-scatter into buffers the caller owns (`input.len() == output.len() *
    /// world_size`); returns both, for reuse (see [`Self::all_gather_into_async`]).
    pub fn reduce_scatter_into_async<T: Element>(
        &self,
        input: Vec<T>,
        output: Vec<T>,
        op: ReduceOp,
    ) -> Work<(Vec<T>, Vec<T>)> {
        self.submit(move |c| {
            let mut output = output;
            c.reduce_scatter(BufRef::host(&input), BufMut::host(&mut output), op)
                .map(|()| (input, output))
        })
    }

    /// All-to-all: chunk `j` of `input` goes to rank `j`.
    pub fn all_to_all<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<(), CommError> {
        self.sync(|c| c.all_to_all(BufRef::host(input), BufMut::host(output)))
    }

    /// Tagged point-to-point send to group rank `peer`. Point-to-point messages are matched by
    /// tag, not by issue order, so this does not wait for queued async collectives.
    pub fn send<T: Element>(&self, data: &[T], peer: usize, tag: u32) -> Result<(), CommError> {
        self.inner.comm.send(BufRef::host(data), peer, tag)
    }

    /// Asynchronous send; the buffer comes back when it was handed to the transport.
    pub fn send_async<T: Element>(&self, data: Vec<T>, peer: usize, tag: u32) -> Work<Vec<T>> {
        self.submit(move |c| c.send(BufRef::host(&data), peer, tag).map(|()| data))
    }

    /// Tagged point-to-point receive from group rank `peer`. Like [`Self::send`], it does not
    /// wait for queued async work (an async send to the same peer may still be in flight).
    pub fn recv<T: Element>(&self, data: &mut [T], peer: usize, tag: u32) -> Result<(), CommError> {
        self.inner.comm.recv(BufMut::host(data), peer, tag)
    }

    /// Asynchronous receive into `data`.
    pub fn recv_async<T: Element>(&self, data: Vec<T>, peer: usize, tag: u32) -> Work<Vec<T>> {
        self.submit(move |c| {
            let mut data = data;
            c.recv(BufMut::host(&mut data), peer, tag).map(|()| data)
        })
    }

    /// Barrier.
    pub fn barrier(&self) -> Result<(), CommError> {
        self.sync(|c| c.barrier())
    }

    /// A sub-group of the given group ranks; `None` on ranks outside it. Collective: every rank
    /// of this group calls it with the same list.
    pub fn new_group(&self, ranks: &[usize]) -> Result<Option<ProcessGroup>, CommError> {
        let comm = self.sync(|c| c.new_group(ranks))?;
        Ok(comm.map(|comm| {
            let global = ranks.iter().map(|&r| self.inner.global_ranks[r]).collect();
            ProcessGroup::new(comm, global)
        }))
    }

    /// Splits the group by `color`: ranks with the same color form one group (ordered by rank).
    /// `colors[r]` is rank `r`'s color; every rank passes the same table, as with a mesh axis.
    pub fn split(&self, colors: &[usize]) -> Result<ProcessGroup, CommError> {
        let n = self.world_size();
        if colors.len() != n {
            return Err(CommError::InvalidArgument {
                rank: self.rank(),
                op: "split",
                reason: format!("colors has {} entries but the group has {n} ranks", colors.len()),
            });
        }
        let mut distinct: Vec<usize> = colors.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut mine = None;
        // Every rank creates every group in the same order, so the group ids agree.
        for color in distinct {
            let members: Vec<usize> = (0..n).filter(|&r| colors[r] == color).collect();
            if let Some(group) = self.new_group(&members)? {
                mine = Some(group);
            }
        }
        // Invariant: this rank's own color is in `distinct`, so one of the groups contains it.
        Ok(mine.expect("split: this rank is in the group of its own color"))
    }
}

//! Pipeline activations and their gradients between GPUs on NCCL (feature `cuda`): a stage's
//! output tensor goes to the next stage by its device pointer and arrives in a tensor burn
//! allocated on the receiver's device; nothing is copied to the host.
//!
//! NCCL matches point-to-point calls by their order on a communicator, and one communicator's
//! calls run one after another on its stream. A single communicator for the pipeline would
//! therefore order a stage's sends and receives into one sequence, and 1F1B deadlocks on that: a
//! stage's send of activation m+1 waits for a receive its neighbour posts only after sending the
//! gradient of m, which waits behind that send. So every link between two adjacent stages gets
//! two communicators of two ranks, one per direction: each carries one sender and one receiver,
//! in micro-batch order on both sides. Sends run on a thread of their own per outgoing
//! communicator (a stage never waits for its neighbour to post the receive, as with the host
//! engine's queued sends), receives block the stage (the bubble), and every call keeps the
//! communicator's deadline, abort and error naming. The wait graph is then exactly the host
//! engine's, which the executor's schedules are built for.
//!
//! This machine's CI has no GPU: the module type-checks there; the GPU check runs it where a
//! machine has two GPUs or more (NCCL refuses two ranks on one GPU).

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use burn::tensor::{Device, Tensor};

use crate::comm::nccl::NcclCommunicator;
use crate::comm::Store;
use crate::comm::{BufMut, BufRef, CommError, Communicator, DevicePtr, Memory, MemoryMut, ProcessGroup};

use super::device_sync::{with_cuda_buffer, DeviceSyncError};
use super::pipeline::{Activation, StageLink};

/// A send handed to a link's sending thread.
struct SendJob {
    tensor: Tensor<2>,
    done: mpsc::Sender<Result<(), CommError>>,
}

/// The sending side of one direction of a link: a communicator driven by its own thread.
struct Outbound {
    /// The peer's rank in the two-rank communicator.
    jobs: Option<mpsc::Sender<SendJob>>,
    worker: Option<JoinHandle<()>>,
}

impl Outbound {
    fn start(comm: NcclCommunicator, peer: usize, stage: usize) -> Result<Self, String> {
        let (jobs, queue) = mpsc::channel::<SendJob>();
        let ordinal = comm.ordinal();
        let rank = comm.rank();
        let worker = std::thread::Builder::new()
            .name(format!("nccl-pipe-send-{stage}"))
            .spawn(move || {
                for job in queue {
                    let sent = with_cuda_buffer(
                        job.tensor,
                        false,
                        |address, numel, dtype| {
                            comm.send(
                                BufRef {
                                    dtype,
                                    numel,
                                    memory: Memory::Device(DevicePtr { address, ordinal }),
                                },
                                peer,
                                0,
                            )
                        },
                        |reason| CommError::InvalidArgument {
                            rank,
                            op: "send",
                            reason,
                        },
                    );
                    let _ = job.done.send(sent.map(drop));
                }
            })
            .map_err(|e| format!("starting the send thread: {e}"))?;
        Ok(Self {
            jobs: Some(jobs),
            worker: Some(worker),
        })
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        // Closing the queue ends the thread once its sends are done (each bounded by the
        // communicator's deadline).
        self.jobs.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// A link with one adjacent stage: values come in on one communicator and go out on another.
struct Neighbour {
    stage: usize,
    inbound: NcclCommunicator,
    /// The sender's rank in `inbound`.
    inbound_peer: usize,
    outbound: Outbound,
}

/// A send not yet known to be complete.
struct Pending {
    to: usize,
    tag: u32,
    done: mpsc::Receiver<Result<(), CommError>>,
}

/// [`StageLink`] on NCCL between the GPUs of adjacent stages (see the module's text).
pub struct NcclStageLink {
    rank: usize,
    stage: usize,
    ordinal: usize,
    device: Device,
    timeout: Duration,
    prev: Option<Neighbour>,
    next: Option<Neighbour>,
    pending: Vec<Pending>,
}

impl std::fmt::Debug for NcclStageLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NCCL pipeline link (stage {}, cuda:{}, neighbours {:?})",
            self.stage,
            self.ordinal,
            [self.prev.as_ref(), self.next.as_ref()]
                .iter()
                .flatten()
                .map(|n| n.stage)
                .collect::<Vec<_>>()
        )
    }
}

impl NcclStageLink {
    /// The links of this rank's stage in `pipe` (rank i of the group is stage i) on CUDA device
    /// `ordinal`, whose burn device is `device`. The two-rank communicators' unique ids travel
    /// through the job's `store`, under keys naming the pair's global ranks. Every stage sets
    /// up its link with the previous stage first, then with the next: stage 0 starts the chain,
    /// so every pair finds both of its ranks.
    pub fn new(
        pipe: &ProcessGroup,
        store: Arc<dyn Store>,
        ordinal: usize,
        device: Device,
        timeout: Duration,
    ) -> Result<Self, DeviceSyncError> {
        let (stage, stages) = (pipe.rank(), pipe.world_size());
        let global = pipe.global_ranks().to_vec();
        let rank = global[stage];
        let nccl_err = |source| DeviceSyncError::Nccl { rank, ordinal, source };
        // `lower` and `upper` are adjacent stages; returns (communicator, this rank's index in it).
        let pair = |lower: usize, direction: &str| -> Result<(NcclCommunicator, usize), DeviceSyncError> {
            let key = format!("nccl/pipe/{}-{}/{direction}", global[lower], global[lower + 1]);
            let me = usize::from(stage != lower);
            let comm = NcclCommunicator::new(&*store, &key, me, 2, ordinal, timeout).map_err(nccl_err)?;
            Ok((comm, me))
        };
        let thread_err = |reason| DeviceSyncError::Buffer { rank, reason };
        let prev = match stage {
            0 => None,
            s => {
                // Activations come in from s-1 ("forward"); gradients go back to it ("backward").
                let (inbound, me) = pair(s - 1, "forward")?;
                let (outbound, _) = pair(s - 1, "backward")?;
                Some(Neighbour {
                    stage: s - 1,
                    inbound,
                    inbound_peer: 1 - me,
                    outbound: Outbound::start(outbound, 1 - me, stage).map_err(thread_err)?,
                })
            }
        };
        let next = if stage + 1 < stages {
            let (outbound, me) = pair(stage, "forward")?;
            let (inbound, _) = pair(stage, "backward")?;
            Some(Neighbour {
                stage: stage + 1,
                inbound,
                inbound_peer: 1 - me,
                outbound: Outbound::start(outbound, 1 - me, stage).map_err(thread_err)?,
            })
        } else {
            None
        };
        Ok(Self {
            rank,
            stage,
            ordinal,
            device,
            timeout,
            prev,
            next,
            pending: Vec::new(),
        })
    }

    fn neighbour(&self, op: &'static str, stage: usize) -> Result<&Neighbour, CommError> {
        [self.prev.as_ref(), self.next.as_ref()]
            .into_iter()
            .flatten()
            .find(|n| n.stage == stage)
            .ok_or_else(|| CommError::InvalidArgument {
                rank: self.rank,
                op,
                reason: format!("stage {stage} is not adjacent to stage {}", self.stage),
            })
    }
}

impl StageLink for NcclStageLink {
    fn send(&mut self, value: Activation, to: usize, tag: u32) -> Result<(), CommError> {
        let tensor = value.into_tensor(&self.device.clone().inner());
        let jobs = self.neighbour("send", to)?.outbound.jobs.as_ref();
        let (done, result) = mpsc::channel();
        jobs.and_then(|jobs| jobs.send(SendJob { tensor, done }).ok())
            .ok_or_else(|| CommError::InvalidArgument {
                rank: self.rank,
                op: "send",
                reason: format!("the send thread to stage {to} has stopped"),
            })?;
        self.pending.push(Pending { to, tag, done: result });
        Ok(())
    }

    fn recv(&mut self, shape: &[usize], from: usize, _tag: u32) -> Result<Activation, CommError> {
        let rank = self.rank;
        let neighbour = self.neighbour("recv", from)?;
        let &[rows, cols] = shape else {
            return Err(CommError::InvalidArgument {
                rank,
                op: "recv",
                reason: format!("an activation of shape {shape:?}; the pipeline carries [batch, width]"),
            });
        };
        // The device's float type: the stage's compute dtype, which its neighbour sends.
        let empty = Tensor::<2>::empty([rows, cols], &self.device.clone().inner());
        let tensor = with_cuda_buffer(
            empty,
            true,
            |address, numel, dtype| {
                neighbour.inbound.recv(
                    BufMut {
                        dtype,
                        numel,
                        memory: MemoryMut::Device(DevicePtr {
                            address,
                            ordinal: self.ordinal,
                        }),
                    },
                    neighbour.inbound_peer,
                    0,
                )
            },
            |reason| CommError::InvalidArgument {
                rank,
                op: "recv",
                reason,
            },
        )?;
        Ok(Activation::Tensor(Box::new(tensor)))
    }

    fn finish(&mut self) -> Result<(), CommError> {
        // Each send is bounded by its communicator's deadline; the margin only covers the
        // thread's own bookkeeping.
        let bound = self.timeout + Duration::from_secs(5);
        let mut first = Ok(());
        for pending in self.pending.drain(..) {
            let outcome = pending.done.recv_timeout(bound).unwrap_or_else(|_| {
                Err(CommError::InvalidArgument {
                    rank: self.rank,
                    op: "send",
                    reason: format!(
                        "the send of tag {} to stage {} did not report within {bound:?}",
                        pending.tag, pending.to
                    ),
                })
            });
            if let (Err(e), true) = (outcome, first.is_ok()) {
                first = Err(e);
            }
        }
        first
    }
}

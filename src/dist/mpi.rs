//! [`Collective`] over MPI (the `mpi` crate on the system's OpenMPI or MPICH), on host
//! buffers. One instance per process: it owns MPI's `Universe` (dropping it finalises MPI).

use std::sync::Mutex;

use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use ::mpi::datatype::PartitionMut;
use ::mpi::environment::{Threading, Universe};
use ::mpi::topology::{Communicator, SimpleCommunicator};
use ::mpi::Count;

use super::{Collective, CollectiveStats, DistConfig, DistError, Op, Watchdog};

struct World {
    // Dropped last (field order): MPI_Finalize after every use of the communicator.
    comm: SimpleCommunicator,
    _universe: Universe,
}

/// MPI_COMM_WORLD with MPI initialised for serialised calls from any thread (the training
/// loop runs on its own thread); the mutex serialises them.
pub struct MpiCollective {
    world: Mutex<World>,
    rank: usize,
    size: usize,
    watchdog: Watchdog,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED (checked in `init`), under which MPI
// may be called from any thread as long as no two calls overlap; every call goes through the
// `world` mutex, so they never do. The communicator handle is a plain MPI handle (no
// thread-local state), valid until the Universe it sits beside is dropped.
unsafe impl Send for MpiCollective {}
// SAFETY: as above: `&self` methods only reach MPI through the mutex.
unsafe impl Sync for MpiCollective {}

impl MpiCollective {
    /// MPI_Init_thread (serialised) and MPI_COMM_WORLD; starts the collective watchdog.
    pub fn init(cfg: DistConfig) -> Result<Self, DistError> {
        let (universe, provided) =
            ::mpi::initialize_with_threading(Threading::Serialized).ok_or(DistError::Init)?;
        if provided != Threading::Serialized && provided != Threading::Multiple {
            return Err(DistError::Protocol {
                op: "init",
                message: format!(
                    "the MPI library offers {provided:?} threading; odcd needs Serialized \
                     (its training loop runs on its own thread)"
                ),
            });
        }
        let comm = universe.world();
        let rank = comm.rank().max(0) as usize;
        let size = comm.size().max(1) as usize;
        Ok(MpiCollective {
            world: Mutex::new(World {
                comm,
                _universe: universe,
            }),
            rank,
            size,
            watchdog: Watchdog::start(rank, size, cfg.timeout),
        })
    }

    fn with<T>(
        &self,
        op: Op,
        bytes: usize,
        f: impl FnOnce(&SimpleCommunicator) -> T,
    ) -> Result<T, DistError> {
        let w = self.world.lock().map_err(|_| DistError::Protocol {
            op: op.name(),
            message: "a previous collective panicked".into(),
        })?;
        Ok(self.watchdog.watch(op, bytes, || f(&w.comm)))
    }

    fn counts(&self, op: &'static str, len: usize) -> Result<Vec<Count>, DistError> {
        let mine = Count::try_from(len).map_err(|_| DistError::Protocol {
            op,
            message: format!("{len} elements exceed MPI's count limit"),
        })?;
        let mut counts = vec![0 as Count; self.size];
        self.with(Op::AllGather, std::mem::size_of::<Count>(), |c| {
            c.all_gather_into(&mine, &mut counts[..])
        })?;
        Ok(counts)
    }

    fn gather_var<T: ::mpi::traits::Equivalence + Copy + Default>(
        &self,
        op: &'static str,
        local: &[T],
    ) -> Result<Vec<Vec<T>>, DistError> {
        let counts = self.counts(op, local.len())?;
        let mut displs = Vec::with_capacity(counts.len());
        let mut total: usize = 0;
        for &n in &counts {
            displs.push(Count::try_from(total).map_err(|_| DistError::Protocol {
                op,
                message: format!("{total} elements exceed MPI's count limit"),
            })?);
            total += n.max(0) as usize;
        }
        let mut all = vec![T::default(); total];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.with(Op::AllGather, std::mem::size_of_val(local), |c| {
                c.all_gather_varcount_into(local, &mut part)
            })?;
        }
        let mut out = Vec::with_capacity(self.size);
        let mut at = 0usize;
        for &n in &counts {
            let n = n.max(0) as usize;
            out.push(all[at..at + n].to_vec());
            at += n;
        }
        Ok(out)
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let send = buf.to_vec();
        self.with(Op::AllReduce, std::mem::size_of_val(buf), |c| {
            c.all_reduce_into(&send[..], buf, SystemOperation::sum())
        })
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
        let send = buf.to_vec();
        self.with(Op::AllReduce, std::mem::size_of_val(buf), |c| {
            c.all_reduce_into(&send[..], buf, SystemOperation::sum())
        })
    }

    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, DistError> {
        self.gather_var("all-gather f32", local)
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        self.gather_var("all-gather bytes", local)
    }

    fn broadcast_f32(&self, root: usize, buf: &mut [f32]) -> Result<(), DistError> {
        let bytes = if self.rank == root {
            std::mem::size_of_val(buf)
        } else {
            0
        };
        self.with(Op::Broadcast, bytes, |c| {
            c.process_at_rank(root as i32).broadcast_into(buf)
        })
    }

    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), DistError> {
        let mut len = [buf.len() as u64];
        let lb = if self.rank == root { 8 } else { 0 };
        self.with(Op::Broadcast, lb, |c| {
            c.process_at_rank(root as i32).broadcast_into(&mut len[..])
        })?;
        if self.rank != root {
            buf.clear();
            buf.resize(len[0] as usize, 0);
        }
        let bytes = if self.rank == root { buf.len() } else { 0 };
        self.with(Op::Broadcast, bytes, |c| {
            c.process_at_rank(root as i32).broadcast_into(&mut buf[..])
        })
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.with(Op::Barrier, 0, |c| c.barrier())
    }

    fn stats(&self) -> CollectiveStats {
        self.watchdog.stats()
    }

    fn stop_requested(&self) {
        self.watchdog.stop_requested()
    }
}

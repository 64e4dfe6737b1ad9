//! Collectives for data-parallel training: one [`Collective`] interface, a single-process
//! implementation (size 1, every operation the identity) and an MPI one (`--features mpi`,
//! [`mpi::MpiCollective`], CPU buffers). `odcd run` started by an MPI launcher (`mpirun`,
//! `srun`, `mpiexec`) finds its rank and world size in the launcher's environment
//! ([`launcher_world`]); a plain `odcd run` stays one process.
//!
//! Every collective is timed and its bytes counted ([`CollectiveStats`]), and watched: one
//! that does not complete within [`DistConfig::timeout`] (a rank died, or was stopped) ends
//! the process with an error naming the operation, so a job never hangs on a dead peer.

#[cfg(feature = "mpi")]
pub mod mpi;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(
        "odcd was started by an MPI launcher as rank {rank} of {size} ({var} is set) but built \
         without MPI: build with `cargo build --release --features mpi`, or start one process \
         without mpirun"
    )]
    NotBuiltWithMpi {
        rank: usize,
        size: usize,
        var: &'static str,
    },
    #[error(
        "MPI could not be initialised (MPI_Init_thread failed or MPI was already initialised)"
    )]
    Init,
    #[error(
        "MPI reports rank {mpi_rank} of {mpi_size} but the launcher's environment says rank \
         {env_rank} of {env_size}: start odcd with one launcher only"
    )]
    WorldMismatch {
        mpi_rank: usize,
        mpi_size: usize,
        env_rank: usize,
        env_size: usize,
    },
    #[error("collective {op}: {message}")]
    Protocol { op: &'static str, message: String },
    #[error("{var} = {value:?} is not a number of seconds > 0")]
    BadTimeout { var: &'static str, value: String },
}

/// The environment variable that bounds how long one collective may wait for the other ranks.
pub const TIMEOUT_VAR: &str = "ODCD_COLLECTIVE_TIMEOUT_SECS";
/// After a stop request, how long a collective may still wait for the other ranks (a clean
/// stop flushes every rank's sinks before the last checkpoint; 20 s covers that).
pub const STOPPING_GRACE: Duration = Duration::from_secs(20);
/// Default bound: long enough for rank 0's initial k-means on a large warm-up buffer, which
/// the other ranks wait for inside a broadcast.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Settings of the collectives, from the environment (they belong to the launch, not to the
/// training config).
#[derive(Debug, Clone)]
pub struct DistConfig {
    /// A collective waiting longer than this ends the process (`ODCD_COLLECTIVE_TIMEOUT_SECS`).
    pub timeout: Duration,
}

impl DistConfig {
    pub fn from_env() -> Result<Self, DistError> {
        let timeout = match std::env::var(TIMEOUT_VAR) {
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => Duration::from_secs_f64(s),
                _ => {
                    return Err(DistError::BadTimeout {
                        var: TIMEOUT_VAR,
                        value: v,
                    })
                }
            },
            Err(_) => DEFAULT_TIMEOUT,
        };
        Ok(DistConfig { timeout })
    }
}

/// Rank and world size announced by an MPI launcher, with the variable that said so; `None`
/// when no launcher started this process (or it started a world of one).
pub fn launcher_world() -> Option<(usize, usize, &'static str)> {
    // OpenMPI (mpirun), then PMI/PMI-2 (MPICH's hydra, Slurm's srun --mpi=pmi2), then PMIx.
    const PAIRS: &[(&str, &str)] = &[
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("PMIX_RANK", "PMIX_SIZE"),
    ];
    let num = |v: &str| {
        std::env::var(v)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
    };
    PAIRS.iter().find_map(|&(r, s)| {
        let (rank, size) = (num(r)?, num(s)?);
        (size > 1 && rank < size).then_some((rank, size, s))
    })
}

/// Ranks sharing this host, as the launcher says (OpenMPI, Slurm, MPICH), else 1.
pub fn ranks_on_this_host() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
    .filter(|&n| n > 0)
    .unwrap_or(1)
}

/// Sizes the global rayon pool (odcd's CPU kernels, k-means) to this rank's share of the
/// host's cores, unless `RAYON_NUM_THREADS` says otherwise: N ranks each starting one thread
/// per core would oversubscribe the host N times. Returns the threads used (None: the pool
/// was already built, or the environment decides).
pub fn share_cores_between_ranks() -> Option<usize> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / ranks_on_this_host()).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok()
        .map(|_| threads)
}

/// The collective operations data-parallel ODC needs. Buffers live on the host; the rank
/// order of gathered parts is the rank order. All ranks must call the same operations in the
/// same order (MPI's rule); a size-1 world returns its input.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Element-wise sum over ranks in f64 (BatchNorm's channel sums), in place.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError>;
    /// Every rank's `local` (of any length), in rank order, on every rank.
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, DistError>;
    /// Every rank's `local` bytes (of any length), in rank order, on every rank.
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>, DistError>;
    /// `root`'s `buf` to every rank; every rank passes a buffer of the same length.
    fn broadcast_f32(&self, root: usize, buf: &mut [f32]) -> Result<(), DistError>;
    /// `root`'s bytes (any length) to every rank; the others' `buf` is replaced.
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), DistError>;
    fn barrier(&self) -> Result<(), DistError>;
    /// Calls, bytes and time per operation so far.
    fn stats(&self) -> CollectiveStats;
    /// This process was asked to stop (SIGTERM, SIGINT): from now on a collective that waits
    /// more than [`STOPPING_GRACE`] for the other ranks ends the process. A launcher that saw
    /// one rank die signals the others, which may be waiting for it.
    fn stop_requested(&self) {}

    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, DistError> {
        Ok(vec![local.to_vec()])
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        Ok(vec![local.to_vec()])
    }
    fn broadcast_f32(&self, _root: usize, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast_bytes(&self, _root: usize, _buf: &mut Vec<u8>) -> Result<(), DistError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
    fn stats(&self) -> CollectiveStats {
        CollectiveStats::default()
    }
}

/// The collective for this process: MPI when a launcher started it with more than one rank
/// (needs `--features mpi`), else [`SingleProcess`].
pub fn from_environment() -> Result<Arc<dyn Collective>, DistError> {
    match launcher_world() {
        None => Ok(Arc::new(SingleProcess)),
        #[cfg(feature = "mpi")]
        Some((rank, size, _)) => {
            let c = mpi::MpiCollective::init(DistConfig::from_env()?)?;
            if c.rank() != rank || c.size() != size {
                return Err(DistError::WorldMismatch {
                    mpi_rank: c.rank(),
                    mpi_size: c.size(),
                    env_rank: rank,
                    env_size: size,
                });
            }
            Ok(Arc::new(c))
        }
        #[cfg(not(feature = "mpi"))]
        Some((rank, size, var)) => Err(DistError::NotBuiltWithMpi { rank, size, var }),
    }
}

/// Totals of one kind of collective.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct OpStats {
    pub calls: u64,
    /// Bytes this rank contributed (sent) to the operation.
    pub bytes: u64,
    pub seconds: f64,
}

/// Totals per operation, for the bench and the metrics.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CollectiveStats {
    pub all_reduce: OpStats,
    pub all_gather: OpStats,
    pub broadcast: OpStats,
    pub barrier: OpStats,
}

impl CollectiveStats {
    pub fn total_bytes(&self) -> u64 {
        self.all_reduce.bytes + self.all_gather.bytes + self.broadcast.bytes + self.barrier.bytes
    }
    pub fn total_seconds(&self) -> f64 {
        self.all_reduce.seconds
            + self.all_gather.seconds
            + self.broadcast.seconds
            + self.barrier.seconds
    }
}

/// Which operation a [`Watchdog`] is waiting on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AllReduce,
    AllGather,
    Broadcast,
    Barrier,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::AllGather => "all-gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
    const ALL: [Op; 4] = [Op::AllReduce, Op::AllGather, Op::Broadcast, Op::Barrier];
    fn index(self) -> u64 {
        self as u64 + 1
    }
}

/// Times and counts the collectives of one rank and ends the process when one of them waits
/// longer than the timeout: a blocking MPI call cannot be interrupted, and a peer that died
/// (kill -9, out of memory) would otherwise hold every other rank for ever.
pub struct Watchdog {
    rank: usize,
    size: usize,
    /// Operation in flight (`Op::index`, 0: none) and when it started (ms since `epoch`).
    in_flight: Arc<AtomicU64>,
    started_ms: Arc<AtomicU64>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    epoch: Instant,
    stats: Mutex<CollectiveStats>,
}

impl Watchdog {
    /// Starts the watching thread (it lives as long as the process).
    pub fn start(rank: usize, size: usize, timeout: Duration) -> Self {
        let in_flight = Arc::new(AtomicU64::new(0));
        let started_ms = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let epoch = Instant::now();
        let (f, s, stop) = (in_flight.clone(), started_ms.clone(), stopping.clone());
        let spawned = std::thread::Builder::new()
            .name("odcd-collective-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let op = f.load(Ordering::Acquire);
                if op == 0 {
                    continue;
                }
                let since = Duration::from_millis(s.load(Ordering::Acquire));
                let waited = epoch.elapsed().saturating_sub(since);
                let stopping = stop.load(Ordering::Acquire);
                let bound = if stopping {
                    timeout.min(STOPPING_GRACE)
                } else {
                    timeout
                };
                if waited >= bound && f.load(Ordering::Acquire) == op {
                    let name = Op::ALL
                        .iter()
                        .find(|o| o.index() == op)
                        .map_or("collective", |o| o.name());
                    let why = if stopping {
                        "after this rank was asked to stop".to_string()
                    } else {
                        format!("(bound: {TIMEOUT_VAR} = {:.0} s)", timeout.as_secs_f64())
                    };
                    let msg = format!(
                        "rank {rank} of {size}: the {name} has waited {:.0} s for the other ranks \
                         {why}; a rank has died or stopped. Exiting; restart the job with the \
                         same number of ranks to resume from the last checkpoint",
                        waited.as_secs_f64(),
                    );
                    tracing::error!("{msg}");
                    eprintln!("odcd: {msg}");
                    std::process::exit(3);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("collective watchdog not started ({e}); a dead rank may hang this one");
        }
        Watchdog {
            rank,
            size,
            in_flight,
            started_ms,
            stopping,
            epoch,
            stats: Mutex::new(CollectiveStats::default()),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f` as operation `op` moving `bytes`, watched and counted.
    pub fn watch<T>(&self, op: Op, bytes: usize, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        self.started_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        self.in_flight.store(op.index(), Ordering::Release);
        let out = f();
        self.in_flight.store(0, Ordering::Release);
        let secs = t0.elapsed().as_secs_f64();
        if let Ok(mut s) = self.stats.lock() {
            let o = match op {
                Op::AllReduce => &mut s.all_reduce,
                Op::AllGather => &mut s.all_gather,
                Op::Broadcast => &mut s.broadcast,
                Op::Barrier => &mut s.barrier,
            };
            o.calls += 1;
            o.bytes += bytes as u64;
            o.seconds += secs;
        }
        out
    }

    pub fn stats(&self) -> CollectiveStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// See [`Collective::stop_requested`].
    pub fn stop_requested(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// Length-prefixed strings in one byte buffer (keys and source positions travel this way).
pub fn encode_strings<S: AsRef<str>>(items: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in items {
        let b = s.as_ref().as_bytes();
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

/// The inverse of [`encode_strings`].
pub fn decode_strings(mut bytes: &[u8]) -> Result<Vec<String>, DistError> {
    let bad = |m: &str| DistError::Protocol {
        op: "decode strings",
        message: m.to_string(),
    };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes
            .split_first_chunk::<8>()
            .ok_or_else(|| bad("truncated length"))?;
        let len = u64::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(bad("truncated string"));
        }
        let (s, rest) = rest.split_at(len);
        out.push(String::from_utf8(s.to_vec()).map_err(|_| bad("not UTF-8"))?);
        bytes = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_survive_the_byte_encoding() {
        let keys = vec!["a".to_string(), String::new(), "sh\nard/ü-3".to_string()];
        let back = decode_strings(&encode_strings(&keys)).unwrap();
        assert_eq!(back, keys);
        assert!(decode_strings(&[1, 0, 0]).is_err());
        assert!(decode_strings(&[5, 0, 0, 0, 0, 0, 0, 0, b'x']).is_err());
    }

    #[test]
    fn a_single_process_collective_returns_its_input() {
        let c = SingleProcess;
        let mut v = vec![1.0f32, 2.0];
        c.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, vec![1.0, 2.0]);
        assert_eq!(c.all_gather_f32(&v).unwrap(), vec![v.clone()]);
        assert_eq!((c.rank(), c.size(), c.is_root()), (0, 1, true));
    }
}

//! A bounded share of the machine's cores for release work beside training: the work runs
//! on its own rayon pool of ceil(share × cores) threads (the CPU kernels parallelise on the
//! current pool), and after each piece of work the caller pauses so that busy time stays at
//! share × cores of the wall time.

use std::time::{Duration, Instant};

/// A pool sized to `share` of the cores and the pause that keeps its duty cycle.
pub struct CpuShare {
    pool: rayon::ThreadPool,
    share: f64,
    /// Fraction of wall time the pool's threads may be busy (≤ 1).
    duty: f64,
    threads: usize,
    busy: Duration,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl CpuShare {
    /// A share of `share` (0 < share ≤ 1) of this machine's cores.
    pub fn new(share: f64) -> Result<Self, rayon::ThreadPoolBuildError> {
        let share = share.clamp(1e-3, 1.0);
        let budget = share * cores() as f64;
        let threads = (budget.ceil() as usize).max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("odcd-release-{i}"))
            .build()?;
        Ok(CpuShare {
            pool,
            share,
            duty: (budget / threads as f64).min(1.0),
            threads,
            busy: Duration::ZERO,
        })
    }

    pub fn share(&self) -> f64 {
        self.share
    }

    /// Threads of the pool (also the decode threads of the release's data path).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Busy time so far (what the share bounds).
    pub fn busy(&self) -> Duration {
        self.busy
    }

    /// Runs `f` on the pool, then pauses the calling thread so that the busy fraction stays
    /// within the duty cycle. Call it from a thread of its own (never a tokio worker).
    pub fn run<T: Send>(&mut self, f: impl FnOnce() -> T + Send) -> T {
        let t = Instant::now();
        let out = self.pool.install(f);
        let busy = t.elapsed();
        self.busy += busy;
        if self.duty < 1.0 {
            std::thread::sleep(busy.mul_f64(1.0 / self.duty - 1.0));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_sizes_the_pool_and_pauses_for_its_duty_cycle() {
        let mut s = CpuShare::new(1.0).unwrap();
        assert_eq!(s.threads(), cores());
        assert_eq!(s.run(rayon::current_num_threads), cores());
        // A tenth of the cores: one thread, busy at most share × cores of the wall time.
        let mut s = CpuShare::new(0.1 / cores() as f64).unwrap();
        assert_eq!(s.threads(), 1);
        let t = Instant::now();
        s.run(|| std::thread::sleep(Duration::from_millis(20)));
        let wall = t.elapsed().as_secs_f64();
        assert!(
            wall >= 0.2 - 0.01,
            "paused {wall} s for 20 ms of work at a 10% duty cycle"
        );
        assert!(s.busy() >= Duration::from_millis(20));
    }
}

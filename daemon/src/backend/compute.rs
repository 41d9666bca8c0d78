//! Compute turns: the one CPU thread pool that every CPU model shares, lent for one forward
//! pass at a time.
//!
//! The lock is fair (first come, first served), so models with work alternate step by step
//! instead of one starving the others; a translation lends the pool pass by pass too.

use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::marian::PoolAccess;
use parking_lot::FairMutex;

#[derive(Debug)]
pub struct ComputeTurns {
    pool: FairMutex<ThreadPool>,
}

impl ComputeTurns {
    pub fn new(threads: usize) -> ComputeTurns {
        ComputeTurns {
            pool: FairMutex::new(ThreadPool::new(threads)),
        }
    }

    /// Waits for this model's turn, then runs one pass on the pool.
    pub fn with_pool<R>(&self, pass: impl FnOnce(&ThreadPool) -> R) -> R {
        let pool = self.pool.lock();
        pass(&pool)
    }
}

impl PoolAccess for ComputeTurns {
    fn with_pool(&self, f: &mut dyn FnMut(&ThreadPool)) {
        ComputeTurns::with_pool(self, |pool| f(pool))
    }
}

//! A persistent thread pool with a cheap fork-join dispatch.
//!
//! A decode step of a thin model runs a couple of hundred small matmuls, each only tens of
//! microseconds long, so spawning threads per operation (or even waking parked threads through
//! the kernel each time) would cost as much as the arithmetic. Instead the workers are started
//! once and, between jobs, spin on a shared generation counter for a short while before parking.
//! A job published while they spin starts within a cache-line transfer; one published after they
//! parked costs a `futex` wake, which is the price of not burning a core while the model idles.
//!
//! The job is a borrowed closure: [`ThreadPool::run`] does not return until every worker has
//! finished with it, which is what makes erasing its lifetime for the workers sound.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};

/// How many polls a thread makes before parking. At a few nanoseconds per poll this is some tens
/// of microseconds: longer than the gap between two matmuls of a decode step (norms, attention,
/// activations on the calling thread), far shorter than a user's pause between requests.
const SPIN_POLLS: u32 = 20_000;

/// The job being run: a lifetime-erased pointer to the caller's closure.
type Job = *const (dyn Fn(usize, usize) + Sync + 'static);

/// State shared between the dispatching thread and the workers.
struct Shared {
    n_threads: usize,
    /// Bumped once per job; workers run the job when they see a value they have not run yet.
    generation: AtomicU64,
    /// The current job. Written only by the dispatcher, and only while no worker reads it: before
    /// `generation` is bumped (Release), after `pending` has dropped to zero (Acquire).
    job: UnsafeCell<Option<Job>>,
    /// The dispatching thread, woken by the worker that finishes last when it parked.
    caller: UnsafeCell<Option<Thread>>,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// Set by the dispatcher before it parks waiting for `pending` to reach zero.
    caller_parked: AtomicBool,
    /// Whether some worker's part of the current job panicked.
    worker_panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Per worker: set before it parks, so that the dispatcher knows to unpark it.
    parked: Vec<AtomicBool>,
}

// SAFETY: the `UnsafeCell` fields are written only by the dispatcher while it holds `dispatch`
// (one dispatcher at a time) and no worker is between observing a new generation and decrementing
// `pending`; workers only read them in that window. The atomics order those accesses (see `job`).
// The job pointer itself refers to a `Sync` closure, so sharing it across threads is fine.
unsafe impl Sync for Shared {}
// SAFETY: as above; nothing in `Shared` is tied to the thread that created it.
unsafe impl Send for Shared {}

/// Worker threads for the kernels, sized once (`--threads`). Thread 0 is the caller of
/// [`run`](ThreadPool::run); the pool owns `n_threads - 1` workers.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<(Thread, JoinHandle<()>)>,
    /// Serialises `run` calls from different threads sharing the pool.
    dispatch: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.shared.n_threads)
            .finish()
    }
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all (at least 1), counting the caller of `run`.
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads,
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            caller: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            caller_parked: AtomicBool::new(false),
            worker_panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            parked: (0..n_threads).map(|_| AtomicBool::new(false)).collect(),
        });
        let mut workers = Vec::with_capacity(n_threads - 1);
        for index in 1..n_threads {
            let shared = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name(format!("egpu-kernel-{index}"))
                .spawn(move || worker_loop(&shared, index));
            match handle {
                Ok(handle) => workers.push((handle.thread().clone(), handle)),
                // Out of threads: run with fewer. Each job is split by `n_threads()`, so the
                // pool must report the number it really has.
                Err(_) => break,
            }
        }
        let spawned = workers.len() + 1;
        if spawned != n_threads {
            // No worker has seen a job yet, so rebuilding the shared state is safe.
            return ThreadPool::shrunk(workers, spawned, shared);
        }
        ThreadPool {
            shared,
            workers,
            dispatch: Mutex::new(()),
        }
    }

    /// Stops the workers that did start and builds a pool of `n` threads instead.
    fn shrunk(workers: Vec<(Thread, JoinHandle<()>)>, n: usize, shared: Arc<Shared>) -> Self {
        let partial = ThreadPool {
            shared,
            workers,
            dispatch: Mutex::new(()),
        };
        drop(partial);
        ThreadPool::new(n)
    }

    /// Threads in all, including the caller of `run`.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(thread_index, n_threads)` on every thread (the caller is thread 0) and returns when
    /// all are done. A panic in any part is re-raised here once every thread has stopped.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.shared.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        let _serial = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        // SAFETY: the pointer only erases the closure's lifetime. Workers dereference it only
        // between seeing the new generation and decrementing `pending`, and this function does not
        // return (nor unwind: see `WaitForWorkers`) before `pending` is zero, so the closure
        // outlives every use.
        let job: Job = unsafe {
            std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), Job>(
                f as *const (dyn Fn(usize, usize) + Sync),
            )
        };
        // SAFETY: we hold `dispatch` and the previous job's `pending` reached zero before the
        // previous `run` returned, so no worker is reading these cells.
        unsafe {
            *shared.job.get() = Some(job);
            *shared.caller.get() = Some(thread::current());
        }
        shared.worker_panicked.store(false, Ordering::Relaxed);
        shared.caller_parked.store(false, Ordering::Relaxed);
        shared.pending.store(n - 1, Ordering::Relaxed);
        shared.generation.fetch_add(1, Ordering::SeqCst);
        for (index, (thread, _)) in self.workers.iter().enumerate() {
            // SeqCst pairs with the worker's store of `parked` and re-check of `generation`:
            // either it sees the new generation, or we see it parked and wake it.
            if shared.parked[index + 1].load(Ordering::SeqCst) {
                thread.unpark();
            }
        }
        let wait = WaitForWorkers(shared);
        f(0, n);
        drop(wait);
        if shared.worker_panicked.load(Ordering::Relaxed) {
            resume_unwind(Box::new("a kernel worker thread panicked"));
        }
    }
}

/// Waits for the current job's workers, also when the caller's own part unwinds: the job borrows
/// the caller's stack, so `run` must not leave while a worker may still use it.
struct WaitForWorkers<'a>(&'a Shared);

impl Drop for WaitForWorkers<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        let mut polls = 0u32;
        while shared.pending.load(Ordering::Acquire) != 0 {
            if polls < SPIN_POLLS {
                polls += 1;
                std::hint::spin_loop();
                continue;
            }
            shared.caller_parked.store(true, Ordering::SeqCst);
            if shared.pending.load(Ordering::SeqCst) == 0 {
                break;
            }
            thread::park();
        }
        // Make every worker's writes visible to the caller.
        std::sync::atomic::fence(Ordering::Acquire);
    }
}

fn worker_loop(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin, then park.
        let mut polls = 0u32;
        let generation = loop {
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen || shared.shutdown.load(Ordering::Acquire) {
                break g;
            }
            if polls < SPIN_POLLS {
                polls += 1;
                std::hint::spin_loop();
                continue;
            }
            shared.parked[index].store(true, Ordering::SeqCst);
            if shared.generation.load(Ordering::SeqCst) == seen
                && !shared.shutdown.load(Ordering::SeqCst)
            {
                thread::park();
            }
            shared.parked[index].store(false, Ordering::SeqCst);
        };
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = generation;
        // SAFETY: the dispatcher wrote `job` and `caller` before bumping the generation we just
        // observed with Acquire, and will not touch them again until we decrement `pending`.
        let (job, caller) = unsafe { (*shared.job.get(), (*shared.caller.get()).clone()) };
        if let Some(job) = job {
            // SAFETY: the closure outlives this call: `run` waits for `pending` to reach zero.
            let f = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| f(index, shared.n_threads))).is_err() {
                shared.worker_panicked.store(true, Ordering::Relaxed);
            }
        }
        if shared.pending.fetch_sub(1, Ordering::AcqRel) == 1
            && shared.caller_parked.load(Ordering::SeqCst)
        {
            if let Some(caller) = caller {
                caller.unpark();
            }
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for (thread, _) in &self.workers {
            thread.unpark();
        }
        for (_, handle) in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_thread_runs_each_job_once() {
        for n in 1..=4 {
            let pool = ThreadPool::new(n);
            assert_eq!(pool.n_threads(), n);
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..1000 {
                pool.run(&|i, total| {
                    assert_eq!(total, n);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), 1000);
            }
        }
    }

    #[test]
    fn jobs_after_workers_parked_still_run() {
        let pool = ThreadPool::new(3);
        let count = AtomicUsize::new(0);
        for _ in 0..3 {
            // Long enough for the workers to give up spinning and park.
            thread::sleep(std::time::Duration::from_millis(20));
            pool.run(&|_, _| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(count.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == 1 {
                    panic!("worker part fails");
                }
            })
        }));
        assert!(result.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_caller_panic_waits_for_the_workers() {
        let pool = ThreadPool::new(2);
        let done = AtomicUsize::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == 0 {
                    panic!("caller part fails");
                }
                thread::sleep(std::time::Duration::from_millis(10));
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(result.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_pool_can_be_shared_between_threads() {
        let pool = Arc::new(ThreadPool::new(2));
        let count = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (pool, count) = (Arc::clone(&pool), Arc::clone(&count));
                thread::spawn(move || {
                    for _ in 0..200 {
                        pool.run(&|_, _| {
                            count.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(count.load(Ordering::Relaxed), 3 * 200 * 2);
    }
}

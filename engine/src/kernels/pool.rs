//! A persistent thread pool with a cheap fork-join dispatch that tolerates a busy machine.
//!
//! A decode step of a thin model runs a couple of hundred small matmuls, each only tens of
//! microseconds long, so spawning threads per operation (or even waking parked threads through
//! the kernel each time) would cost as much as the arithmetic. The workers are started once and,
//! between jobs, poll a shared generation counter for some tens of microseconds before parking
//! (see `idle_busy_poll`).
//!
//! A job is split into *parts* that threads claim one at a time from an atomic counter, and the
//! calling thread starts claiming at once. A worker joins a job only if it gets there before the
//! parts run out; the caller then waits only for workers that actually joined. So a worker that
//! is parked, or descheduled because other processes share the cores, delays nothing: its parts
//! are done by whoever is running (a static "thread i does part i" split would make every job
//! wait for the slowest thread to be scheduled). Each part's work is fixed by its index, not by
//! the thread running it, so results do not depend on scheduling.
//!
//! The job is a borrowed closure: a worker joins by incrementing a counter that the caller closes
//! (sets a bit in) before waiting for it to drain, so no worker can use the closure after
//! [`ThreadPool::run_parts`] returns, which is what makes erasing its lifetime sound.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};

/// How many `pause` polls an idle worker makes first: about a microsecond, enough to catch a
/// job that follows at once. Not more: under a hypervisor a vCPU that keeps executing `pause`
/// is trapped and descheduled (KVM's pause-loop exiting), so it would miss the jobs it spins
/// for. It then polls with plain loads, which are not trapped ([`idle_busy_poll`]), and parks.
/// A parked worker costs a futex wake, which the caller does not wait for.
const IDLE_SPIN_POLLS: u32 = 50;
/// How many polls the caller makes waiting for joined workers to finish their last parts before
/// it yields the CPU (possibly to the very worker it waits for); short for the same reason.
const WAIT_SPIN_POLLS: u32 = 200;
/// How many times the caller yields before parking until the last worker wakes it.
const WAIT_YIELDS: u32 = 50;

/// How long an idle worker then keeps polling with plain loads (no `pause`, so no pause-loop
/// exit) before it parks: 50 µs, unless `EGPU_POOL_SPIN_US` says otherwise (0: park at once).
/// The gaps between a decode step's jobs (norms, RoPE, the cache write on the calling thread)
/// are a few microseconds to tens of microseconds; a worker that parks in them must be woken
/// through the kernel for the next job, and on a VM that wake arrives late enough that the
/// caller has done most of the parts itself. It costs at most this long of one core after the
/// last job of a burst.
fn idle_busy_poll() -> std::time::Duration {
    static SPIN: OnceLock<std::time::Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        let micros = std::env::var("EGPU_POOL_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(50);
        std::time::Duration::from_micros(micros)
    })
}

/// Polls `generation` with plain loads until it moves past `seen`, shutdown is asked, or
/// `budget` has passed; true if something happened.
fn busy_poll(shared: &Shared, seen: u64, budget: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + budget;
    loop {
        // Reading the clock costs more than a load: look at it every 64 polls.
        for _ in 0..64 {
            if shared.generation.load(Ordering::Acquire) != seen
                || shared.shutdown.load(Ordering::Relaxed)
            {
                return true;
            }
        }
        if std::time::Instant::now() >= until {
            return false;
        }
    }
}

/// The job being run: a lifetime-erased pointer to the caller's closure.
type Job = *const (dyn Fn(usize, usize) + Sync + 'static);

/// In `inside`: set when the caller has closed the job to new workers.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Keeps a value on its own cache line (two, against adjacent-line prefetch), so that threads
/// polling one atomic do not slow down writes to another.
#[derive(Default)]
#[repr(align(128))]
struct CacheLine<T>(T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// State shared between the dispatching thread and the workers. The atomics that idle workers
/// poll (`generation`), that parts are claimed from (`next_part`) and that joined workers
/// update (`inside`) each have their own cache line: sharing one made every part claim a
/// cross-core transfer against the polling workers, ~4 µs per job.
struct Shared {
    n_threads: usize,
    /// Bumped once per job; workers look at the job when they see a value they have not seen.
    generation: CacheLine<AtomicU64>,
    /// The current job and its number of parts. Written only by the dispatcher while `inside`
    /// is `CLOSED` with no worker inside; read only by workers that joined (see `inside`).
    job: UnsafeCell<Option<(Job, usize)>>,
    /// The dispatching thread, woken by the last worker out when it parked.
    caller: UnsafeCell<Option<Thread>>,
    /// The next part to claim.
    next_part: CacheLine<AtomicUsize>,
    /// Workers inside the current job, plus `CLOSED` once the caller stops admitting them. The
    /// dispatcher resets it to 0 (Release) after writing `job`, and a worker joins by a CAS that
    /// reads that 0 or a later count (Acquire), so a joined worker sees the current job.
    inside: CacheLine<AtomicUsize>,
    /// Set by the dispatcher before it parks waiting for `inside` to drain.
    caller_parked: AtomicBool,
    /// Whether some worker's part of the current job panicked.
    worker_panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Per worker: set before it parks, so that the dispatcher knows to unpark it.
    parked: Vec<AtomicBool>,
}

// SAFETY: the `UnsafeCell` fields are written only by the dispatcher while it holds `dispatch`
// (one dispatcher at a time) and no worker is inside a job; workers read them only while inside
// (see `inside`). The job pointer refers to a `Sync` closure, so sharing it is fine.
unsafe impl Sync for Shared {}
// SAFETY: as above; nothing in `Shared` is tied to the thread that created it.
unsafe impl Send for Shared {}

/// Worker threads for the kernels, sized once (`--threads`): the caller of
/// [`run`](ThreadPool::run) plus `n_threads - 1` workers owned by the pool.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<(Thread, JoinHandle<()>)>,
    /// Serialises jobs from different threads sharing the pool.
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
            generation: CacheLine(AtomicU64::new(0)),
            job: UnsafeCell::new(None),
            caller: UnsafeCell::new(None),
            next_part: CacheLine(AtomicUsize::new(0)),
            inside: CacheLine(AtomicUsize::new(CLOSED)),
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
                // Out of threads: run with the ones we have.
                Err(_) => break,
            }
        }
        ThreadPool {
            shared,
            workers,
            dispatch: Mutex::new(()),
        }
    }

    /// Threads in all, including the caller of `run`.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(part, n)` once for every `part < n` with `n = n_threads()`, and returns when all
    /// are done. Parts are claimed by whichever threads are running: usually one part per thread,
    /// but a busy or parked worker's part may run on the caller, after its own. A panic in any
    /// part is re-raised here once every thread has left the job.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        self.run_parts(self.shared.n_threads, f);
    }

    /// Runs `f(part, n_parts)` once for every `part < n_parts`, on whichever threads of the pool
    /// are free, and returns when all are done. More parts than threads balance the load when
    /// some threads are slowed by other processes, at the cost of one atomic add per part.
    pub fn run_parts(&self, n_parts: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.workers.is_empty() || n_parts <= 1 {
            for part in 0..n_parts {
                f(part, n_parts);
            }
            return;
        }
        let _serial = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        // SAFETY: the pointer only erases the closure's lifetime. Workers dereference it only
        // while counted in `inside`, and this function does not return (nor unwind: see
        // `CloseAndWait`) before closing `inside` and seeing it drain, so the closure outlives
        // every use.
        let job: Job = unsafe {
            std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), Job>(
                f as *const (dyn Fn(usize, usize) + Sync),
            )
        };
        // SAFETY: we hold `dispatch`, and the previous job left `inside` CLOSED and drained, so
        // no worker reads these cells until we reopen it below.
        unsafe {
            *shared.job.get() = Some((job, n_parts));
            *shared.caller.get() = Some(thread::current());
        }
        shared.worker_panicked.store(false, Ordering::Relaxed);
        shared.caller_parked.store(false, Ordering::Relaxed);
        shared.next_part.store(0, Ordering::Relaxed);
        shared.inside.store(0, Ordering::Release);
        shared.generation.fetch_add(1, Ordering::SeqCst);
        for (index, (thread, _)) in self.workers.iter().enumerate() {
            // SeqCst pairs with the worker's store of `parked` and re-check of `generation`:
            // either it sees the new generation, or we see it parked and wake it.
            if shared.parked[index + 1].load(Ordering::SeqCst) {
                thread.unpark();
            }
        }
        let close = CloseAndWait(shared);
        claim_parts(shared, f, n_parts);
        drop(close);
        if shared.worker_panicked.load(Ordering::Relaxed) {
            resume_unwind(Box::new("a kernel worker thread panicked"));
        }
    }
}

/// Claims and runs parts until none are left.
fn claim_parts(shared: &Shared, f: &(dyn Fn(usize, usize) + Sync), n_parts: usize) {
    loop {
        let part = shared.next_part.fetch_add(1, Ordering::Relaxed);
        if part >= n_parts {
            return;
        }
        f(part, n_parts);
    }
}

/// Closes the job to new workers and waits for the joined ones to leave, also when the caller's
/// own parts unwind: the job borrows the caller's stack.
struct CloseAndWait<'a>(&'a Shared);

impl Drop for CloseAndWait<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        shared.inside.fetch_or(CLOSED, Ordering::AcqRel);
        let mut polls = 0u32;
        while shared.inside.load(Ordering::Acquire) != CLOSED {
            polls += 1;
            if polls < WAIT_SPIN_POLLS {
                std::hint::spin_loop();
            } else if polls < WAIT_SPIN_POLLS + WAIT_YIELDS {
                thread::yield_now();
            } else {
                shared.caller_parked.store(true, Ordering::SeqCst);
                if shared.inside.load(Ordering::SeqCst) == CLOSED {
                    break;
                }
                thread::park();
            }
        }
    }
}

fn worker_loop(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin, then park.
        let mut polls = 0u32;
        loop {
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen || shared.shutdown.load(Ordering::Acquire) {
                seen = g;
                break;
            }
            if polls < IDLE_SPIN_POLLS {
                polls += 1;
                std::hint::spin_loop();
                continue;
            }
            if polls == IDLE_SPIN_POLLS {
                polls += 1;
                let budget = idle_busy_poll();
                if !budget.is_zero() && busy_poll(shared, seen, budget) {
                    continue;
                }
            }
            shared.parked[index].store(true, Ordering::SeqCst);
            if shared.generation.load(Ordering::SeqCst) == seen
                && !shared.shutdown.load(Ordering::SeqCst)
            {
                thread::park();
            }
            shared.parked[index].store(false, Ordering::SeqCst);
        }
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        // Join the job unless the caller already closed it (then its parts are all done).
        let mut state = shared.inside.load(Ordering::Relaxed);
        let joined = loop {
            if state & CLOSED != 0 {
                break false;
            }
            match shared.inside.compare_exchange_weak(
                state,
                state + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => break true,
                Err(now) => state = now,
            }
        };
        if !joined {
            continue;
        }
        // SAFETY: we are counted in `inside`, so the dispatcher neither rewrites these cells nor
        // lets the closure die until we leave; our Acquire CAS saw its Release reset of `inside`,
        // made after it wrote them.
        let (job, caller) = unsafe { (*shared.job.get(), (*shared.caller.get()).clone()) };
        if let Some((job, n_parts)) = job {
            // SAFETY: the closure outlives our stay inside the job (see above).
            let f = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| claim_parts(shared, f, n_parts))).is_err() {
                shared.worker_panicked.store(true, Ordering::Relaxed);
            }
        }
        let before = shared.inside.fetch_sub(1, Ordering::AcqRel);
        if before == CLOSED + 1 && shared.caller_parked.load(Ordering::SeqCst) {
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
    fn every_part_of_run_runs_once() {
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
    fn a_caller_panic_waits_for_parts_in_flight() {
        let pool = ThreadPool::new(2);
        let (started, finished) = (AtomicUsize::new(0), AtomicUsize::new(0));
        for _ in 0..20 {
            let result = catch_unwind(AssertUnwindSafe(|| {
                pool.run_parts(8, &|part, _| {
                    started.fetch_add(1, Ordering::SeqCst);
                    if part == 3 {
                        panic!("a part fails");
                    }
                    thread::sleep(std::time::Duration::from_millis(1));
                    finished.fetch_add(1, Ordering::SeqCst);
                })
            }));
            assert!(result.is_err());
            // Every part that started has finished (or is the one that panicked).
            let (s, f) = (
                started.load(Ordering::SeqCst),
                finished.load(Ordering::SeqCst),
            );
            started.store(0, Ordering::SeqCst);
            finished.store(0, Ordering::SeqCst);
            assert_eq!(s, f + 1);
        }
    }

    #[test]
    fn every_part_runs_once_for_any_part_count() {
        for threads in 1..=3 {
            let pool = ThreadPool::new(threads);
            for n_parts in [0, 1, 2, 5, 100] {
                let hits: Vec<AtomicUsize> = (0..n_parts).map(|_| AtomicUsize::new(0)).collect();
                for _ in 0..50 {
                    pool.run_parts(n_parts, &|part, n| {
                        assert_eq!(n, n_parts);
                        hits[part].fetch_add(1, Ordering::Relaxed);
                    });
                }
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
            }
        }
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

//! The tinygrad worker process: starting it, watching it, restarting it, and the link that
//! egpud's calls to it go through (each with a deadline).
//!
//! The worker (`worker/egpu_worker/serve.py`) is the one process that holds the device; egpud
//! talks to it over `proto/worker.proto` on a Unix socket in a private temporary folder. The
//! supervisor task here keeps one worker running:
//!
//! - start: spawn `python -m egpu_worker.serve`, wait for its `egpu-worker ready` line, call
//!   Hello; the worker's stdin is a pipe egpud holds, so the worker exits with egpud.
//! - watch: a Ping every `--worker-heartbeat`; no answer within `--worker-heartbeat-timeout`,
//!   a failed call, a step past `--worker-step-timeout`, or the process exiting all mean
//!   the device is lost: the worker is killed and every [`WorkerPhase`] watcher hears `Lost`
//!   (the residency manager then fails that device's requests with UNAVAILABLE "device lost").
//! - restart with exponential backoff (reset once a worker stayed up a while); watchers hear
//!   `Ready` again (the residency manager then reloads pinned models).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{FairMutex, Mutex};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};

use super::wire::{
    LoadedOnWorker, RpcError, RpcFailure, StepItem, StepReply, WorkerDevice, WorkerRpc,
};
use crate::error::DaemonError;
use crate::metrics::Metrics;

/// The worker protocol version this egpud speaks (`HelloResponse.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before failing was healthy: the next restart is immediate-ish.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Worker stderr lines kept to explain a failure.
const STDERR_TAIL: usize = 20;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub python: PathBuf,
    pub heartbeat: Duration,
    pub heartbeat_timeout: Duration,
    pub start_timeout: Duration,
    pub step_timeout: Duration,
    /// `--device-memory-budget`; None = 90% of the device memory the worker reports.
    pub memory_budget: Option<u64>,
    pub metrics: Arc<Metrics>,
}

/// What the supervisor is doing; watchers get every change.
#[derive(Debug, Clone)]
pub enum WorkerPhase {
    Starting,
    Ready(Arc<WorkerLink>),
    Lost {
        /// The generation of the worker that was lost (0 if none had started).
        generation: u64,
        reason: String,
    },
    Stopped,
}

/// The supervisor's handle.
#[derive(Debug)]
pub struct Worker {
    settings: WorkerSettings,
    phase: watch::Sender<WorkerPhase>,
    restarts: AtomicU32,
    /// Why the last worker failed, shown while the next one starts.
    last_failure: Mutex<String>,
    stop: watch::Sender<bool>,
}

/// A running worker: its client and what it reported. Cheap to share; once `lost`, every
/// call fails fast with [`DaemonError::DeviceLost`].
#[derive(Debug)]
pub struct WorkerLink {
    rpc: WorkerRpc,
    pub device: WorkerDevice,
    pub pid: u32,
    /// Counts worker starts, so a loss is only applied to the models of that worker.
    pub generation: u64,
    runtime: Handle,
    step_timeout: Duration,
    lost: AtomicBool,
    /// Asks the supervisor to kill this worker (a call timed out or failed at the transport).
    kill: Notify,
    kill_reason: Mutex<String>,
    /// Models take turns on the device, fairly, as CPU models do on the thread pool.
    pub turns: FairMutex<()>,
    allocated: AtomicU64,
    free: AtomicU64,
    /// Held so the worker lives: closing it (dropping the link) makes the worker exit.
    _stdin: Mutex<Option<ChildStdin>>,
    /// The private folder with the worker's socket, removed with the link.
    _dir: tempfile::TempDir,
}

impl Worker {
    /// Starts the supervisor on the current tokio runtime.
    pub fn start(settings: WorkerSettings) -> Arc<Worker> {
        let (phase, _) = watch::channel(WorkerPhase::Starting);
        let (stop, _) = watch::channel(false);
        let worker = Arc::new(Worker {
            settings,
            phase,
            restarts: AtomicU32::new(0),
            last_failure: Mutex::new(String::new()),
            stop,
        });
        tokio::spawn(worker.clone().supervise());
        worker
    }

    pub fn subscribe(&self) -> watch::Receiver<WorkerPhase> {
        self.phase.subscribe()
    }

    pub fn phase(&self) -> WorkerPhase {
        self.phase.borrow().clone()
    }

    /// The running worker, or why there is none.
    pub fn link(&self) -> Result<Arc<WorkerLink>, DaemonError> {
        match &*self.phase.borrow() {
            WorkerPhase::Ready(link) if !link.is_lost() => Ok(link.clone()),
            WorkerPhase::Ready(_) => Err(DaemonError::DeviceUnavailable(
                "the worker was just lost; egpud is restarting it".into(),
            )),
            WorkerPhase::Starting => Err(DaemonError::DeviceUnavailable(
                "the worker is starting; retry in a moment".into(),
            )),
            WorkerPhase::Lost { reason, .. } => Err(DaemonError::DeviceUnavailable(format!(
                "{reason}; egpud is restarting the worker"
            ))),
            WorkerPhase::Stopped => Err(DaemonError::ShuttingDown),
        }
    }

    /// The running worker, waiting while one is starting for at most the start timeout: a Load
    /// sent just after egpud started is served, not turned away. A worker that failed (lost,
    /// waiting to be restarted) answers at once with why.
    pub async fn ready_link(&self) -> Result<Arc<WorkerLink>, DaemonError> {
        let deadline = tokio::time::Instant::now() + self.settings.start_timeout;
        let mut phases = self.subscribe();
        loop {
            if !matches!(*phases.borrow_and_update(), WorkerPhase::Starting) {
                return self.link();
            }
            match tokio::time::timeout_at(deadline, phases.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(DaemonError::ShuttingDown),
                Err(_) => return self.link(),
            }
        }
    }

    /// Device memory models may hold: `--device-memory-budget`, else 90% of the device.
    pub fn budget(&self, link: &WorkerLink) -> Result<u64, DaemonError> {
        if let Some(b) = self.settings.memory_budget {
            return Ok(b);
        }
        match link.device.memory_total_bytes {
            0 => Err(DaemonError::DeviceUnavailable(format!(
                "the worker cannot tell how much memory {} has; start egpud with \
                 --device-memory-budget",
                link.device.device
            ))),
            total => Ok(total / 10 * 9),
        }
    }

    /// Why the last worker failed; empty if none has.
    pub fn last_failure(&self) -> String {
        self.last_failure.lock().clone()
    }

    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Kills the worker and ends the supervisor.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    async fn supervise(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut backoff = FIRST_BACKOFF;
        let mut generation = 0u64;
        loop {
            if *stop.borrow() {
                break;
            }
            generation += 1;
            if generation > 1 {
                self.settings.metrics.worker_restarts.inc();
            }
            self.phase.send_replace(WorkerPhase::Starting);
            let started = Instant::now();
            let reason = match self.spawn(generation).await {
                Ok((link, mut child, stderr)) => {
                    tracing::info!(
                        pid = link.pid,
                        device = %link.device.device,
                        name = %link.device.name,
                        arch = %link.device.arch,
                        memory = link.device.memory_total_bytes,
                        "tinygrad worker ready"
                    );
                    self.phase.send_replace(WorkerPhase::Ready(link.clone()));
                    let reason = self.watch(&link, &mut child, &mut stop).await;
                    link.lost.store(true, Ordering::SeqCst);
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    let tail = stderr.lock().iter().cloned().collect::<Vec<_>>();
                    match tail.last() {
                        Some(last) if !*stop.borrow() => {
                            format!("{reason} (last worker output: {last})")
                        }
                        _ => reason,
                    }
                }
                Err(reason) => reason,
            };
            if *stop.borrow() {
                break;
            }
            if started.elapsed() >= HEALTHY_AFTER {
                backoff = FIRST_BACKOFF;
            }
            self.restarts.fetch_add(1, Ordering::Relaxed);
            *self.last_failure.lock() = reason.clone();
            tracing::error!(cause = %reason, retry_in = ?backoff, "tinygrad device lost");
            self.settings.metrics.device_lost.inc();
            self.phase
                .send_replace(WorkerPhase::Lost { generation, reason });
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        self.phase.send_replace(WorkerPhase::Stopped);
    }

    /// Watches a running worker until it must be replaced; returns why.
    async fn watch(
        &self,
        link: &WorkerLink,
        child: &mut Child,
        stop: &mut watch::Receiver<bool>,
    ) -> String {
        let mut ticker = tokio::time::interval(self.settings.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                status = child.wait() => {
                    return match status {
                        Ok(s) => format!("the tinygrad worker exited ({s})"),
                        Err(e) => format!("the tinygrad worker is gone ({e})"),
                    };
                }
                () = link.kill.notified() => return link.kill_reason.lock().clone(),
                _ = stop.changed() => return "egpud is stopping".into(),
                _ = ticker.tick() => {
                    match tokio::time::timeout(self.settings.heartbeat_timeout, link.rpc.ping()).await {
                        Ok(Ok(report)) => {
                            link.allocated.store(report.allocated_bytes, Ordering::Relaxed);
                            link.free.store(report.memory_free_bytes, Ordering::Relaxed);
                        }
                        Ok(Err(err)) => {
                            return format!("the tinygrad worker failed a heartbeat: {}", err.message)
                        }
                        Err(_) => {
                            return format!(
                                "the tinygrad worker did not answer a heartbeat within {:?}",
                                self.settings.heartbeat_timeout
                            )
                        }
                    }
                }
            }
        }
    }

    /// Starts one worker and waits until it serves.
    async fn spawn(
        &self,
        generation: u64,
    ) -> Result<(Arc<WorkerLink>, Child, Arc<Mutex<VecDeque<String>>>), String> {
        let python = &self.settings.python;
        if !python.exists() {
            return Err(format!(
                "the worker's Python {} does not exist; create it with scripts/setup-worker.sh \
                 (or pass --worker-python)",
                python.display()
            ));
        }
        // A private folder (mode 0700) for the socket: only egpud's user can connect.
        let dir = tempfile::Builder::new()
            .prefix("egpu-worker-")
            .tempdir()
            .map_err(|e| format!("cannot create the worker's socket folder: {e}"))?;
        let socket = dir.path().join("worker.sock");
        let mut child = Command::new(python)
            .args(["-m", "egpu_worker.serve", "--socket"])
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {} -m egpu_worker.serve: {e}",
                    python.display()
                )
            })?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take();
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "egpu_worker", pid, "{line}");
                    let mut tail = tail.lock();
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line.trim() == "egpu-worker ready" => return Ok(()),
                    Ok(Some(line)) => tracing::info!(target: "egpu_worker", pid, "{line}"),
                    Ok(None) | Err(_) => return Err(()),
                }
            }
        };
        let explain = |what: &str| {
            let tail = stderr_tail.lock();
            let tail: Vec<&str> = tail.iter().map(String::as_str).collect();
            format!("{what}: {}", tail.join(" | "))
        };
        match tokio::time::timeout(self.settings.start_timeout, ready).await {
            Ok(Ok(())) => {}
            Ok(Err(())) => {
                let status = child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                // stderr may still be draining: give its reader the rest of the pipe.
                tokio::task::yield_now().await;
                return Err(explain(&format!(
                    "the tinygrad worker failed to start ({status})"
                )));
            }
            Err(_) => {
                let _ = child.start_kill();
                return Err(explain(&format!(
                    "the tinygrad worker did not start within {:?}",
                    self.settings.start_timeout
                )));
            }
        }
        // Keep draining stdout so the worker never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "egpu_worker", pid, "{line}");
            }
        });
        let rpc = WorkerRpc::connect(&socket)
            .await
            .map_err(|e| format!("cannot reach the tinygrad worker: {e}"))?;
        let hello = tokio::time::timeout(self.settings.heartbeat_timeout, rpc.hello())
            .await
            .map_err(|_| "the tinygrad worker did not answer Hello".to_string())?
            .map_err(|e| format!("the tinygrad worker failed Hello: {}", e.message))?;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(format!(
                "the tinygrad worker speaks protocol {}, egpud {PROTOCOL_VERSION}; \
                 re-run scripts/setup-worker.sh from the same checkout as egpud",
                hello.protocol_version
            ));
        }
        let device = hello.device;
        let link = Arc::new(WorkerLink {
            rpc,
            free: AtomicU64::new(device.memory_free_bytes),
            device,
            pid: hello.pid,
            generation,
            runtime: Handle::current(),
            step_timeout: self.settings.step_timeout,
            lost: AtomicBool::new(false),
            kill: Notify::new(),
            kill_reason: Mutex::new(String::new()),
            turns: FairMutex::new(()),
            allocated: AtomicU64::new(0),
            _stdin: Mutex::new(stdin),
            _dir: dir,
        });
        Ok((link, child, stderr_tail))
    }
}

impl WorkerLink {
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Bytes tinygrad had allocated on the device at the last heartbeat.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Asks the worker for its memory figures now (Status shows them fresh); keeps the last
    /// heartbeat's figures if it does not answer within a second.
    pub async fn refresh(&self) {
        if self.is_lost() {
            return;
        }
        if let Ok(Ok(report)) = tokio::time::timeout(Duration::from_secs(1), self.rpc.ping()).await
        {
            self.allocated
                .store(report.allocated_bytes, Ordering::Relaxed);
            self.free.store(report.memory_free_bytes, Ordering::Relaxed);
        }
    }

    /// Free device memory at the last heartbeat (0 = unknown).
    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<(), DaemonError> {
        if self.is_lost() {
            Err(DaemonError::DeviceLost(
                "the tinygrad worker stopped; egpud is restarting it".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Marks the worker lost and has the supervisor kill it.
    fn give_up(&self, reason: String) -> DaemonError {
        if !self.lost.swap(true, Ordering::SeqCst) {
            *self.kill_reason.lock() = reason.clone();
            self.kill.notify_one();
        }
        DaemonError::DeviceLost(reason)
    }

    /// Maps a failed call: request errors stay request errors; anything else means the
    /// worker can no longer be trusted with the device.
    fn failed(&self, call: &str, err: RpcError) -> DaemonError {
        let message = err.message;
        match err.failure {
            RpcFailure::Rejected => {
                DaemonError::InvalidArgument(format!("tinygrad worker: {message}"))
            }
            RpcFailure::OutOfMemory => DaemonError::DeviceOutOfMemory(message),
            // A load that fails inside the worker leaves the device as it was. A forward pass
            // that fails half-way (a driver error, a device that went away under it) leaves
            // caches and device state unknown: the worker is replaced, as if it had died.
            RpcFailure::Internal if call != "Step" => {
                DaemonError::Internal(format!("tinygrad worker {call}: {message}"))
            }
            _ => self.give_up(format!("the tinygrad worker failed {call}: {message}")),
        }
    }

    pub async fn load(
        &self,
        path: &std::path::Path,
        context: usize,
        slots: usize,
        config_json: String,
    ) -> Result<LoadedOnWorker, DaemonError> {
        self.check()?;
        let call = self.rpc.load(path, context, slots, config_json);
        match tokio::time::timeout(self.step_timeout, call).await {
            Ok(Ok(loaded)) => Ok(loaded),
            Ok(Err(err)) => Err(self.failed("Load", err)),
            Err(_) => Err(self.give_up(format!(
                "a load took longer than {:?} (--worker-step-timeout)",
                self.step_timeout
            ))),
        }
    }

    /// One forward pass; blocks the calling (batching) thread, never a runtime thread.
    pub fn step_blocking(
        &self,
        model_id: u64,
        items: Vec<StepItem>,
        hidden: bool,
    ) -> Result<StepReply, DaemonError> {
        self.check()?;
        self.block_on_step(self.rpc.step(model_id, items, hidden), "a forward pass")
    }

    /// Runs a step-like call (a forward pass or a cache copy) on the calling thread under
    /// `--worker-step-timeout`: a failure inside the worker is a failed step (see `failed`), a
    /// missed deadline a lost device.
    fn block_on_step<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, RpcError>>,
        what: &str,
    ) -> Result<T, DaemonError> {
        let timeout = self.step_timeout;
        match self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, call).await })
        {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(err)) => Err(self.failed("Step", err)),
            Err(_) => Err(self.give_up(format!(
                "{what} took longer than {timeout:?} (--worker-step-timeout)"
            ))),
        }
    }

    /// Copies a prompt prefix between two slots of a model (see `TinygradModel::copy_prefix`);
    /// blocks the calling (batching) thread. A copy that fails inside the worker leaves the
    /// device as a failed step does: the worker is replaced.
    pub fn copy_prefix_blocking(
        &self,
        model_id: u64,
        from: usize,
        to: usize,
        positions: usize,
    ) -> Result<u64, DaemonError> {
        self.check()?;
        let call = self.rpc.copy_prefix(model_id, from, to, positions);
        self.block_on_step(call, "a prefix copy")
    }

    /// Frees a model on the device and waits until the worker did. Blocks the calling
    /// thread, or, on a runtime thread, runs in the background. Like every call it has a
    /// deadline (`--worker-step-timeout`): a device thread stuck in tinygrad must not hold an
    /// unload, an eviction or a shutdown forever, so a missed deadline is a lost device and
    /// the worker is replaced (which frees everything it held).
    pub fn unload(self: &Arc<Self>, model_id: u64) {
        if self.is_lost() {
            return;
        }
        let link = self.clone();
        let timeout = self.step_timeout;
        let call = async move {
            match tokio::time::timeout(timeout, link.rpc.unload(model_id)).await {
                Ok(Ok(unloaded)) => tracing::info!(
                    model_id,
                    freed = unloaded.bytes_freed,
                    allocated = unloaded.allocated_bytes,
                    "worker freed a model"
                ),
                Ok(Err(err)) => {
                    tracing::warn!(model_id, cause = %err.message, "worker unload failed")
                }
                Err(_) => {
                    let lost = link.give_up(format!(
                        "an unload took longer than {timeout:?} (--worker-step-timeout)"
                    ));
                    tracing::error!(model_id, cause = %lost, "worker unload timed out");
                }
            }
        };
        if Handle::try_current().is_ok() {
            self.runtime.spawn(call);
        } else {
            self.runtime.block_on(call);
        }
    }
}

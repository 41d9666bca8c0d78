//! egpud's lifecycle: claim the socket, serve until told to stop, end streams, clean up.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::net::UnixListener;

use crate::backend::device::cpu_device;
use crate::backend::tinygrad::{Worker, WorkerSettings};
use crate::backend::{BackendKind, ComputeTurns};
use crate::config::{Config, CPU_DEFAULT_BUDGET_PERCENT};
use crate::core::Core;
use crate::frontend;
use crate::residency::{Residency, ResidencySettings};
use crate::state::StateStore;

/// How long open streams get to end after a shutdown signal before egpud exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves until `shutdown` completes, then ends every stream with UNAVAILABLE and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let socket = config.socket_path();
    let device = cpu_device();
    let budget = config
        .memory_budget
        .unwrap_or_else(|| device.memory_total / 100 * CPU_DEFAULT_BUDGET_PERCENT);
    if budget == 0 {
        bail!("cannot tell how much memory this machine has; pass --memory-budget");
    }
    let threads = config.threads();
    let models_dir = config.models_dir();
    let state_dir = config.state_dir();

    let listener = claim_socket(&socket)?;
    let _socket_guard = SocketGuard(socket.clone());
    // Only now, with the socket ours: a second egpud refused above must not touch the state.
    let state = Arc::new(StateStore::open(&state_dir));
    tracing::info!(
        socket = %socket.display(),
        budget,
        threads,
        models_dir = %models_dir.display(),
        state_dir = %state_dir.display(),
        device = %device.name,
        "egpud {} listening",
        env!("CARGO_PKG_VERSION")
    );

    // The tinygrad backend: its worker starts in the background (importing tinygrad and
    // compiling a first kernel takes seconds); the socket answers meanwhile.
    let worker = (config.backend == BackendKind::Tinygrad).then(|| {
        let python = config.worker_python();
        tracing::info!(python = %python.display(), dev = %std::env::var("DEV").unwrap_or_default(), "starting the tinygrad worker");
        Worker::start(WorkerSettings {
            python,
            heartbeat: config.worker_heartbeat,
            heartbeat_timeout: config.worker_heartbeat_timeout,
            start_timeout: config.worker_start_timeout,
            step_timeout: config.worker_step_timeout,
            memory_budget: config.device_memory_budget,
        })
    });
    let mut residency = Residency::new(
        ResidencySettings {
            budget,
            models_dir,
            default_backend: config.backend,
            default_keep_alive: config.keep_alive,
            max_queue: config.max_queue,
            batch_tokens: config.batch_tokens as usize,
        },
        Arc::new(ComputeTurns::new(threads)),
    )
    .with_state(state);
    if let Some(worker) = &worker {
        residency = residency.with_worker(worker.clone());
    }
    let residency = Arc::new(residency);
    let follow_worker = tokio::spawn(residency.clone().follow_worker());
    let keep_alive = tokio::spawn(residency.clone().run_keep_alive());
    // In the background: the socket answers while the pinned models load again.
    let reload = tokio::spawn(residency.clone().reload_pinned(BackendKind::Cpu));
    let core = Core::new(residency.clone(), threads);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal_residency = residency.clone();
    let serve_shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: ending open streams");
        signal_residency.shutdown().await;
        let _ = stop_tx.send(());
    };
    let server = frontend::grpc::serve(listener, core, serve_shutdown);

    // Clients that keep idle connections open would hold a graceful shutdown forever; after
    // the grace period egpud exits anyway (every stream has already been ended).
    let grace = async {
        let _ = stop_rx.await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result?,
        () = grace => tracing::warn!("clients still connected after {SHUTDOWN_GRACE:?}; exiting"),
    }
    keep_alive.abort();
    reload.abort();
    residency.shutdown().await;
    follow_worker.abort();
    if let Some(worker) = &worker {
        worker.shutdown();
    }
    tracing::info!("egpud stopped");
    Ok(())
}

/// Binds the socket, mode 0600. A live egpud on the path is an error; a stale socket left
/// by a crash (nothing accepts on it) is removed; anything that is not a socket is left alone.
fn claim_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if path.as_os_str().len() > 100 {
        bail!(
            "socket path {} is {} bytes; keep it under 100 (macOS allows 104)",
            path.display(),
            path.as_os_str().len()
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => bail!(
                    "another egpud is already serving on {}; stop it first (or pass --socket)",
                    path.display()
                ),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::warn!(socket = %path.display(), "removing a stale socket");
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing stale socket {}", path.display()))?;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("probing {}", path.display()));
                }
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!(
                "cannot create socket {}: folder {} does not exist",
                path.display(),
                parent.display()
            );
        }
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Removes the socket file when egpud exits normally.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

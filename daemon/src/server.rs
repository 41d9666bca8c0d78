//! egpud's lifecycle: claim the socket, serve until told to stop, end streams, clean up.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use egpu_proto::v1::egpu_server::EgpuServer;
use egpu_proto::v1::FILE_DESCRIPTOR_SET;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::InterceptorLayer;
use tonic::transport::Server;

use crate::api::{check_peer, Api};
use crate::config::{Config, CPU_DEFAULT_BUDGET_PERCENT};
use crate::device::cpu_device;
use crate::residency::{Residency, ResidencySettings};
use crate::scheduler::Device;
use crate::state::{reload_pinned, StateStore};
use crate::worker::{Worker, WorkerSettings};

/// How long open streams get to end after a shutdown signal before egpud exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves until `shutdown` completes, then ends every stream with UNAVAILABLE and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let started = Instant::now();
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
    let worker = (config.backend == "tinygrad").then(|| {
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
            default_backend: config.backend.clone(),
            default_keep_alive: config.keep_alive,
            max_queue: config.max_queue,
            batch_tokens: config.batch_tokens as usize,
        },
        Arc::new(Device::new(threads)),
    )
    .with_state(state.clone());
    if let Some(worker) = &worker {
        residency = residency.with_worker(worker.clone());
    }
    let residency = Arc::new(residency);
    let follow_worker = tokio::spawn(residency.clone().follow_worker());
    let keep_alive = tokio::spawn(residency.clone().run_keep_alive());
    // In the background: the socket answers while the pinned models load again.
    let reload = tokio::spawn(reload_pinned(residency.clone(), state, None));

    let api = Api {
        residency: residency.clone(),
        device: cpu_device,
        started,
        threads,
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<EgpuServer<Api>>().await;
    // Reflection in both versions: grpcurl asks for v1, older clients (and grpcio's
    // reflection database) for v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the reflection service")?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal_residency = residency.clone();
    let serve_shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: ending open streams");
        health_reporter.set_not_serving::<EgpuServer<Api>>().await;
        signal_residency.shutdown().await;
        let _ = stop_tx.send(());
    };
    let server = Server::builder()
        .layer(InterceptorLayer::new(check_peer))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            EgpuServer::new(api)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), serve_shutdown);

    // Clients that keep idle connections open would hold a graceful shutdown forever; after
    // the grace period egpud exits anyway (every stream has already been ended).
    let grace = async {
        let _ = stop_rx.await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result.context("serving gRPC")?,
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

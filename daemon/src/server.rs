//! egpud's lifecycle: claim the socket, serve until told to stop, end streams, clean up.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::net::UnixListener;

use crate::backend::device::cpu_device;
use crate::backend::tinygrad::{Worker, WorkerSettings};
use crate::backend::{BackendKind, ComputeTurns};
use crate::config::{Config, HttpAddr, CPU_DEFAULT_BUDGET_PERCENT};
use crate::core::{Core, Endpoints};
use crate::frontend;
use crate::frontend::http::listen::Listeners;
use crate::frontend::http::{HttpSettings, DEFAULT_MAX_CONNECTIONS};
use crate::metrics::Metrics;
use crate::residency::{Residency, ResidencySettings};
use crate::state::StateStore;

/// How long open streams get to end after a shutdown signal before egpud exits anyway.
/// How long a shutdown waits for runners before it kills the tinygrad worker under them.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(2);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves until `shutdown` completes, then ends every stream with UNAVAILABLE and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    raise_fd_limit();
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

    // Exclusive locks first: two egpuds started together could otherwise both find a stale
    // socket, both replace it, and end up sharing one state folder.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state_dir)
        .with_context(|| format!("creating the state folder {}", state_dir.display()))?;
    let _state_lock = lock_exclusively(
        &state_dir.join(LOCK_FILE),
        &format!(
            "is using the state folder {}; stop it first, or give this one its own --state-dir",
            state_dir.display()
        ),
    )?;
    prepare_socket_folder(&socket)?;
    let _socket_lock = match socket.parent().filter(|p| p.is_dir()) {
        Some(_) => Some(lock_exclusively(
            &lock_path_of(&socket),
            &format!(
                "is already serving on {}; stop it first (or pass --socket)",
                socket.display()
            ),
        )?),
        // claim_socket says what is wrong with a socket path whose folder is missing.
        None => None,
    };
    let listener = claim_socket(&socket)?;
    let _socket_guard = SocketGuard(socket.clone());
    let state = Arc::new(StateStore::open(&state_dir));
    let http = open_http(&config, &state_dir).await?;
    let _http_socket_guard = http.socket.clone().map(SocketGuard);
    tracing::info!(
        socket = %socket.display(),
        http = %http.endpoints.http_url,
        http_socket = %http.endpoints.http_socket,
        budget,
        threads,
        models_dir = %models_dir.display(),
        state_dir = %state_dir.display(),
        device = %device.name,
        "egpud {} listening",
        env!("CARGO_PKG_VERSION")
    );

    let metrics = Arc::new(Metrics::new());
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
            metrics: metrics.clone(),
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
        metrics,
    )
    .with_state(state);
    if let Some(worker) = &worker {
        residency = residency.with_worker(worker.clone());
    }
    let residency = Arc::new(residency);
    let follow_worker = tokio::spawn(residency.clone().follow_worker());
    let keep_alive = tokio::spawn(residency.clone().run_keep_alive());
    let watch_files = tokio::spawn(residency.clone().watch_files());
    // In the background: the socket answers while the pinned models load again.
    let reload = tokio::spawn(residency.clone().reload_pinned(BackendKind::Cpu));
    // Chat templates render in copies of this binary (core::templates says why).
    let renderer_program = std::env::current_exe().context("cannot find egpud's own binary")?;
    let core = Core::new(
        residency.clone(),
        threads,
        http.endpoints.clone(),
        renderer_program,
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (http_stop_tx, mut http_stop_rx) = tokio::sync::watch::channel(false);
    let signal_residency = residency.clone();
    let signal_worker = worker.clone();
    let serve_shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: ending open streams");
        // Runners end at their next step; one waiting on a tinygrad step that does not come
        // back would hold the exit for the step timeout (minutes). After a short grace the
        // worker is killed, which fails that step at once: the device is being let go anyway.
        let drain = signal_residency.shutdown();
        tokio::pin!(drain);
        if tokio::time::timeout(WORKER_STOP_GRACE, &mut drain)
            .await
            .is_err()
        {
            if let Some(worker) = &signal_worker {
                tracing::warn!(
                    "runners still busy after {WORKER_STOP_GRACE:?}: stopping the tinygrad worker"
                );
                worker.shutdown();
            }
            drain.await;
        }
        http_stop_tx.send_replace(true);
        let _ = stop_tx.send(());
    };
    let http_server = tokio::spawn(frontend::http::listen::serve(
        http.listeners,
        frontend::http::router(core.clone(), Arc::new(http.settings)),
        http.max_connections,
        async move {
            let _ = http_stop_rx.wait_for(|stop| *stop).await;
        },
    ));
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
    http_server.abort();
    keep_alive.abort();
    watch_files.abort();
    reload.abort();
    residency.shutdown().await;
    follow_worker.abort();
    if let Some(worker) = &worker {
        worker.shutdown();
    }
    tracing::info!("egpud stopped");
    Ok(())
}

/// The HTTP front end as configured: its listeners (what could be opened), its settings, and
/// where it can be reached.
struct OpenHttp {
    listeners: Listeners,
    settings: HttpSettings,
    max_connections: usize,
    endpoints: Endpoints,
    socket: Option<PathBuf>,
}

/// Opens the HTTP listeners. The Unix socket is claimed like the gRPC one (an error stops
/// egpud); a TCP port that is taken is one log line, and egpud serves without TCP.
async fn open_http(config: &Config, state_dir: &Path) -> anyhow::Result<OpenHttp> {
    let mut endpoints = Endpoints::default();
    let unix = match config.http_socket_path() {
        Some(path) => {
            let listener = claim_socket(&path).context("the HTTP socket (--http-socket)")?;
            endpoints.http_socket = path.display().to_string();
            Some((listener, path))
        }
        None => None,
    };
    let tcp = match config.http {
        HttpAddr::Off => None,
        HttpAddr::On(addr) => match frontend::http::listen::bind_tcp(addr).await {
            Ok(listener) => {
                let bound = listener.local_addr().unwrap_or(addr);
                if !bound.ip().is_loopback() {
                    tracing::warn!(addr = %bound, "HTTP listens beyond loopback: anyone who can reach this address and has the key can use the models");
                }
                endpoints.http_url = format!("http://{bound}");
                Some(listener)
            }
            Err(e) => {
                tracing::error!("HTTP on {addr} is off: {e} (pass --http ADDR for another port, or --http off); gRPC serves as usual");
                None
            }
        },
    };
    let api_key = if tcp.is_some() && config.http_auth == "key" {
        let key = crate::state::api_key(state_dir, egpu_proto::API_KEY_FILE)
            .with_context(|| format!("the HTTP API key in {}", state_dir.display()))?;
        endpoints.api_key_file = state_dir
            .join(egpu_proto::API_KEY_FILE)
            .display()
            .to_string();
        Some(key)
    } else {
        None
    };
    let (unix, socket) = match unix {
        Some((listener, path)) => (Some(listener), Some(path)),
        None => (None, None),
    };
    Ok(OpenHttp {
        listeners: Listeners { tcp, unix },
        settings: HttpSettings {
            api_key,
            allowed_hosts: config.http_allowed_hosts.clone(),
            origins: config.http_origins.clone(),
            max_body_bytes: usize::try_from(config.http_max_body).unwrap_or(usize::MAX),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        },
        max_connections: DEFAULT_MAX_CONNECTIONS,
        endpoints,
        socket,
    })
}

/// The socket's folder must be egpud's user's own: in a folder another user can write to
/// (`/tmp`), that user could put their own socket at the path first and hear every prompt.
/// The default folder without `$XDG_RUNTIME_DIR`, `/tmp/egpu-$UID`, is created here (0700).
fn prepare_socket_folder(socket: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(dir) = socket.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    if !dir.exists() && socket == egpu_proto::default_socket_path() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the socket folder {}", dir.display()))?;
    }
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(()); // claim_socket says the folder is missing
    };
    let own = rustix::process::getuid().as_raw();
    if meta.uid() != own || !meta.is_dir() {
        bail!(
            "the socket's folder {} belongs to uid {}, not to this user (uid {own}); another \
             user could put a socket of theirs at {} and read every request: use a folder of \
             your own (--socket, or leave the default)",
            dir.display(),
            meta.uid(),
            socket.display()
        );
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one (at most 65536): launchd starts agents
/// with 256, which a few hundred HTTP and gRPC clients would exhaust. The connection limits
/// stay below it, and a failed accept pauses rather than spins.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = limit.maximum.unwrap_or(u64::MAX).min(65536);
    if limit.current.is_some_and(|c| c >= want) {
        return;
    }
    let raised = Rlimit {
        current: Some(want),
        maximum: limit.maximum,
    };
    // macOS refuses more than OPEN_MAX (10240) whatever the hard limit says.
    let fallback = Rlimit {
        current: Some(want.min(10240)),
        maximum: limit.maximum,
    };
    if setrlimit(Resource::Nofile, raised).is_err()
        && setrlimit(Resource::Nofile, fallback).is_err()
    {
        tracing::warn!(soft = ?limit.current, "could not raise the open-files limit");
    }
}

/// The lock file in the state folder that the running egpud holds.
const LOCK_FILE: &str = "egpud.lock";

/// `<socket>.lock`, beside the socket.
fn lock_path_of(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Holds an exclusive `flock` on `path` (created, mode 0600, with egpud's pid in it) while it
/// lives; fails at once, saying "another egpud (pid N) {held}", when another process holds it.
/// The kernel drops the lock when egpud exits, however it exits, so a crash leaves no lock.
fn lock_exclusively(path: &Path, held: &str) -> anyhow::Result<std::fs::File> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .with_context(|| format!("opening the lock {}", path.display()))?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let holder = std::fs::read_to_string(path).unwrap_or_default();
        bail!("another egpud (pid {}) {held}", holder.trim());
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
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

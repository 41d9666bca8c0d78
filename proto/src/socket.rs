//! The daemon's socket: its default path, and a client connection over it.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::v1::egpu_client::EgpuClient;

/// Environment variable that overrides the socket path for egpud and its clients.
pub const SOCKET_ENV: &str = "EGPU_SOCKET";

/// Where egpud listens unless told otherwise: `$EGPU_SOCKET`, else
/// `$XDG_RUNTIME_DIR/egpu.sock`, else `/tmp/egpu-$UID/egpu.sock` (a folder of the user's own:
/// in `/tmp` itself another user could create the path first and answer in egpud's place).
///
/// The path stays short because macOS limits socket paths to 104 bytes (Linux: 108); a
/// per-user name keeps two users of one machine apart.
pub fn default_socket_path() -> PathBuf {
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return Path::new(&dir).join("egpu.sock");
    }
    PathBuf::from(format!("/tmp/egpu-{}", rustix::process::getuid().as_raw())).join("egpu.sock")
}

/// The HTTP front end's Unix socket beside a gRPC socket: `egpu.sock` → `egpu-http.sock`.
pub fn http_socket_beside(grpc_socket: &Path) -> PathBuf {
    let name = grpc_socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let http = match name.strip_suffix(".sock") {
        Some(stem) => format!("{stem}-http.sock"),
        None => format!("{name}-http"),
    };
    grpc_socket.with_file_name(http)
}

/// egpud's state folder: `$XDG_STATE_HOME/egpu`, else `~/.local/state/egpu`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp"))
                .join(".local")
                .join("state")
        })
        .join("egpu")
}

/// The file in the state folder that holds the key HTTP clients send over TCP.
pub const API_KEY_FILE: &str = "api-key";

/// The loopback address egpud's HTTP front end listens on by default: not Ollama's 11434, so
/// both can run side by side.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:11470";

/// Why a client could not reach egpud.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "egpud is not running: no socket at {path} (start it with `egpud`, or set {SOCKET_ENV})"
    )]
    NoSocket { path: PathBuf },
    #[error(
        "egpud is not answering on {path}: {reason} (start it with `egpud`, or set {SOCKET_ENV})"
    )]
    NotAnswering { path: PathBuf, reason: String },
    #[error(
        "{path} belongs to uid {owner}, not to this user (uid {own}): refusing to talk to it \
         (another user may have put it there to read requests); remove it, or set {SOCKET_ENV}"
    )]
    NotOurs { path: PathBuf, owner: u32, own: u32 },
}

/// Refuses a socket file owned by another user: only egpud of this user's own may hear its
/// prompts.
pub fn check_owner(path: &Path) -> Result<(), ConnectError> {
    use std::os::unix::fs::MetadataExt as _;
    let own = rustix::process::getuid().as_raw();
    match std::fs::metadata(path) {
        Ok(meta) if meta.uid() != own => Err(ConnectError::NotOurs {
            path: path.to_owned(),
            owner: meta.uid(),
            own,
        }),
        _ => Ok(()),
    }
}

/// Connects a gRPC client to egpud's Unix socket.
pub async fn connect(path: &Path) -> Result<EgpuClient<Channel>, ConnectError> {
    let channel = connect_channel(path).await?;
    Ok(EgpuClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// An HTTP/2 channel to whatever gRPC server listens on the Unix socket `path` (egpud uses it
/// to reach its worker, too).
pub async fn connect_channel(path: &Path) -> Result<Channel, ConnectError> {
    if !path.exists() {
        return Err(ConnectError::NoSocket {
            path: path.to_owned(),
        });
    }
    check_owner(path)?;
    let socket = path.to_owned();
    // The URI is required by the HTTP/2 layer but unused: every connection goes to the socket.
    Endpoint::from_static("http://egpud.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                // The file's owner was checked; the process answering must be ours too.
                let own = rustix::process::getuid().as_raw();
                let peer = stream.peer_cred()?.uid();
                if peer != own {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!("the process serving the socket runs as uid {peer}, not {own}"),
                    ));
                }
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| ConnectError::NotAnswering {
            path: path.to_owned(),
            reason: source_chain(&e),
        })
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

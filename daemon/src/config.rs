//! egpud's settings: flags, their environment variables, and their defaults.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::backend::BackendKind;
pub use crate::residency::KeepAlive;

/// Models may hold this share of physical memory on the CPU backend unless `--memory-budget`
/// says otherwise; the rest is left to the OS and the user's other programs.
pub const CPU_DEFAULT_BUDGET_PERCENT: u64 = 75;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "egpud",
    // A later flag wins over an earlier one (wrappers and tests put defaults first).
    args_override_self = true,
    version,
    about = "egpu daemon: keeps models resident on one device and serves them over gRPC on a \
             Unix socket",
    after_help = "Environment: EGPU_SOCKET (socket path), EGPU_MODELS (models folder), EGPU_LOG \
                  (log filter, e.g. info or egpud=debug)."
)]
pub struct Config {
    /// Unix socket to listen on, in a folder of this user's own [default:
    /// $XDG_RUNTIME_DIR/egpu.sock, else /tmp/egpu-$UID/egpu.sock].
    #[arg(long, env = "EGPU_SOCKET")]
    pub socket: Option<PathBuf>,

    /// Most memory resident models may hold, e.g. 2GiB, 1500MB, 800000000 [default for the cpu
    /// backend: 75% of physical memory].
    #[arg(long, value_parser = parse_size)]
    pub memory_budget: Option<u64>,

    /// Where egpud keeps its state [default: $XDG_STATE_HOME/egpu, else ~/.local/state/egpu].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,

    /// Folder that model names are resolved in [default: $EGPU_MODELS, else ~/.egpu/models].
    #[arg(long, env = "EGPU_MODELS")]
    pub models_dir: Option<PathBuf>,

    /// Backend for models loaded without one: cpu, or tinygrad (starts the tinygrad worker,
    /// which holds the device named by DEV; the cpu backend keeps serving beside it).
    #[arg(long, default_value = "cpu", value_parser = parse_backend)]
    pub backend: BackendKind,

    /// Python of the tinygrad worker's environment [default: $EGPU_WORKER_PYTHON, else
    /// worker/.venv/bin/python of the checkout egpud was built in, else
    /// $XDG_DATA_HOME/egpu/worker/.venv/bin/python]. scripts/setup-worker.sh creates it.
    #[arg(long)]
    pub worker_python: Option<PathBuf>,

    /// Most device memory models on the tinygrad backend may hold [default: 90% of the
    /// device memory the worker reports].
    #[arg(long, value_parser = parse_size)]
    pub device_memory_budget: Option<u64>,

    /// How often egpud checks that the tinygrad worker answers.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub worker_heartbeat: Duration,

    /// A worker that has not answered a heartbeat for this long is killed and restarted.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub worker_heartbeat_timeout: Duration,

    /// Longest a worker may take to start (import tinygrad, open the device, compile a
    /// first kernel) before it counts as failed.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub worker_start_timeout: Duration,

    /// Longest one forward pass on the worker may take (first passes compile kernels);
    /// longer, and the device counts as lost.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    pub worker_step_timeout: Duration,

    /// Worker threads for the CPU backend [default: the machine's available parallelism].
    #[arg(long)]
    pub threads: Option<usize>,

    /// Requests that may wait for a slot, per model; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,

    /// Most tokens one forward pass carries: prompt chunks are cut to fit beside the decoding
    /// sequences, so a long prompt never stalls other streams for longer than one such pass.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(8..=4096))]
    pub batch_tokens: u32,

    /// HTTP (OpenAI- and Ollama-compatible API, /metrics) on TCP: an address, or `off`. Keep
    /// it on loopback: anything else exposes the models to the network.
    #[arg(long, env = "EGPU_HTTP", default_value = egpu_proto::DEFAULT_HTTP_ADDR, value_parser = parse_http_addr)]
    pub http: HttpAddr,

    /// HTTP on a Unix socket (mode 0600, other users refused; no key needed), or `off`
    /// [default: beside the gRPC socket, `egpu-http.sock`].
    #[arg(long, env = "EGPU_HTTP_SOCKET")]
    pub http_socket: Option<PathBuf>,

    /// `key`: TCP clients must send the key in <state-dir>/api-key (`Authorization: Bearer`
    /// or `x-api-key`); `none`: no key — any local user and any web page that can reach the
    /// port can use the models (Host and Origin checks still apply).
    #[arg(long, default_value = "key", value_parser = ["key", "none"])]
    pub http_auth: String,

    /// More host names a TCP request's Host header may name besides localhost, 127.0.0.1 and
    /// [::1] (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub http_allowed_hosts: Vec<String>,

    /// Web origins allowed to call the HTTP API from a browser (CORS), comma-separated, e.g.
    /// http://localhost:3000 [default: none].
    #[arg(long, value_delimiter = ',')]
    pub http_origins: Vec<String>,

    /// Largest HTTP request body.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub http_max_body: u64,

    /// Keep-alive of models loaded without one, e.g. 5m, 30s, 0, forever.
    #[arg(long, default_value = "5m", value_parser = parse_keep_alive)]
    pub keep_alive: KeepAlive,
}

impl Config {
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(egpu_proto::default_socket_path)
    }

    pub fn models_dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(|| home().join(".egpu").join("models"))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(egpu_proto::default_state_dir)
    }

    /// The HTTP front end's Unix socket, unless `--http-socket off`.
    pub fn http_socket_path(&self) -> Option<PathBuf> {
        match self.http_socket.as_deref() {
            Some(p) if p.as_os_str() == "off" => None,
            Some(p) => Some(p.to_owned()),
            None => Some(egpu_proto::http_socket_beside(&self.socket_path())),
        }
    }

    /// The tinygrad worker's Python (see `--worker-python`; `egpuctl doctor` finds it the
    /// same way).
    pub fn worker_python(&self) -> PathBuf {
        egpu_proto::paths::worker_python(self.worker_python.as_deref()).path
    }

    pub fn threads(&self) -> usize {
        self.threads
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// A leading decimal number and the unit text after it: `"1.5GiB"` → `(1.5, "GiB")`.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit))
}

/// Parses a byte size: a number with an optional unit (B, KB, MB, GB, TB in powers of 1000;
/// KiB, MiB, GiB, TiB in powers of 1024; case-insensitive; decimals allowed).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = number_and_unit(text)
        .ok_or_else(|| format!("{text:?} is not a size (try 2GiB or 1500MB)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, MB, GB, MiB, GiB)"
            ))
        }
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is not a usable size"));
    }
    Ok(bytes as u64)
}

/// Parses a keep-alive (see [`KeepAlive::parse`]).
pub fn parse_keep_alive(text: &str) -> Result<KeepAlive, String> {
    KeepAlive::parse(text)
}

/// Where `--http` listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpAddr {
    Off,
    On(std::net::SocketAddr),
}

/// `off`, or a socket address (`127.0.0.1:11470`, `[::1]:0`).
pub fn parse_http_addr(text: &str) -> Result<HttpAddr, String> {
    let text = text.trim();
    if text == "off" {
        return Ok(HttpAddr::Off);
    }
    text.parse()
        .map(HttpAddr::On)
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:11470 (or off)"))
}

/// A backend's name: `cpu` or `tinygrad`.
pub fn parse_backend(text: &str) -> Result<BackendKind, String> {
    BackendKind::parse(text.trim()).ok_or_else(|| {
        let names: Vec<&str> = BackendKind::ALL.iter().map(|b| b.as_str()).collect();
        format!("unknown backend {text:?} (use {})", names.join(" or "))
    })
}

/// A plain duration (`30s`, `500ms`, `5m`); "forever" is not one.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match parse_keep_alive(text)? {
        KeepAlive::For(d) if !d.is_zero() => Ok(d),
        _ => Err(format!(
            "{text:?} is not a positive duration (try 500ms, 30s, 5m)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1500MB"), Ok(1_500_000_000));
        assert_eq!(parse_size("0.5 gib"), Ok(1 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2 parsecs").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn keep_alives() {
        assert_eq!(
            parse_keep_alive("5m"),
            Ok(KeepAlive::For(Duration::from_secs(300)))
        );
        assert_eq!(parse_keep_alive("0"), Ok(KeepAlive::For(Duration::ZERO)));
        assert_eq!(parse_keep_alive("forever"), Ok(KeepAlive::Forever));
        assert_eq!(parse_keep_alive("-1"), Ok(KeepAlive::Forever));
        assert_eq!(
            parse_keep_alive("250ms"),
            Ok(KeepAlive::For(Duration::from_millis(250)))
        );
        assert!(parse_keep_alive("5 fortnights").is_err());
        // Go's duration forms, as Ollama's keep_alive sends them.
        assert_eq!(
            parse_keep_alive("1h30m"),
            Ok(KeepAlive::For(Duration::from_secs(5400)))
        );
        assert_eq!(
            parse_keep_alive("1.5h"),
            Ok(KeepAlive::For(Duration::from_secs(5400)))
        );
        assert_eq!(
            parse_keep_alive("5m0s"),
            Ok(KeepAlive::For(Duration::from_secs(300)))
        );
        assert_eq!(parse_keep_alive("-1m"), Ok(KeepAlive::Forever));
        assert!(parse_keep_alive("1h30").is_err());
        assert!(parse_keep_alive("").is_err());
        assert_eq!(KeepAlive::from_millis(-1), KeepAlive::Forever);
    }
}

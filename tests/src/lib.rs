//! The end-to-end harness: starts a real `egpud` process on a socket in a temporary folder and
//! hands out real gRPC clients. The tests are in `tests/`; they need the `egpud` and `egpuctl`
//! binaries built (`scripts/test.sh` builds them first) and the real model files
//! (`scripts/fetch-models.sh`).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use egpu_proto::v1::egpu_client::EgpuClient;
use egpu_proto::v1::{self as pb};
use tonic::transport::Channel;

pub use egpu_proto::v1;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// How long egpud may take to start listening (it only parses flags and binds).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The real models folder: `$EGPU_MODELS`, or `<repo>/models` where `scripts/fetch-models.sh`
/// puts the files.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("EGPU_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"),
    }
}

/// The absolute path of a real model file (or model folder); fails with instructions when it
/// is missing.
pub fn model_path(file: &str) -> PathBuf {
    let path = models_dir().join(file);
    assert!(
        path.is_file() || path.join("config.json").is_file(),
        "model file {} is missing: run scripts/fetch-models.sh (CI does) or set EGPU_MODELS",
        path.display()
    );
    std::fs::canonicalize(path).expect("canonical model path")
}

/// The tinygrad worker's Python: `$EGPU_WORKER_PYTHON`, or the checkout's worker/.venv that
/// `scripts/setup-worker.sh` creates (scripts/test.sh runs it).
pub fn worker_python() -> PathBuf {
    let path = match std::env::var_os("EGPU_WORKER_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../worker/.venv/bin/python"),
    };
    assert!(
        path.exists(),
        "the tinygrad worker's Python {} is missing: run scripts/setup-worker.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A binary of this workspace, built next to the test executable (`target/<profile>/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build -p egpud -p egpuctl` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A running egpud. Killed when dropped, so a failing test never leaves one behind.
#[derive(Debug)]
pub struct TestDaemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub dir: tempfile::TempDir,
    log: Arc<Log>,
}

/// egpud's log lines, and a signal for each new one.
#[derive(Debug, Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

impl TestDaemon {
    /// Starts egpud with a fresh socket and state folder, the real models folder, and extra
    /// flags; returns once its log says it is listening.
    pub fn start(extra_args: &[&str]) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("egpu-e2e-")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("egpud.sock");
        Self::start_on(dir, socket, extra_args).expect("egpud did not start")
    }

    /// Starts egpud on a given socket; `Err` carries its log when it exits instead.
    pub fn start_on(
        dir: tempfile::TempDir,
        socket: PathBuf,
        extra_args: &[&str],
    ) -> Result<TestDaemon, String> {
        let state_dir = dir.path().join("state");
        Self::spawn(dir, socket, &state_dir, extra_args)
    }

    /// Starts egpud on a socket and state folder that outlive it (a restart reuses both);
    /// `dir` is a fresh temporary folder for anything else. `Err` carries its log.
    pub fn start_with_state(
        socket: &Path,
        state_dir: &Path,
        extra_args: &[&str],
    ) -> Result<TestDaemon, String> {
        let dir = tempfile::Builder::new()
            .prefix("egpu-e2e-")
            .tempdir()
            .expect("temp dir");
        Self::spawn(dir, socket.to_owned(), state_dir, extra_args)
    }

    fn spawn(
        dir: tempfile::TempDir,
        socket: PathBuf,
        state_dir: &Path,
        extra_args: &[&str],
    ) -> Result<TestDaemon, String> {
        Self::spawn_with_env(dir, socket, state_dir, &models_dir(), extra_args, &[])
    }

    /// Starts egpud with the tinygrad backend on `DEV` (its worker from the checkout's
    /// worker/.venv), plus extra flags; returns once egpud listens (the worker may still be
    /// starting: see [`TestDaemon::wait_for_log`]).
    pub fn start_tinygrad(dev: &str, extra_args: &[&str]) -> TestDaemon {
        Self::start_tinygrad_with_env(dev, extra_args, &[])
    }

    /// [`TestDaemon::start_tinygrad`] with extra environment for egpud and its worker.
    pub fn start_tinygrad_with_env(
        dev: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("egpu-e2e-")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("egpud.sock");
        let state_dir = dir.path().join("state");
        let python = worker_python();
        let mut args = vec![
            "--backend",
            "tinygrad",
            "--worker-python",
            python.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra_args);
        // On DEV=CPU most of a first pass is tinygrad optimizing and compiling kernels (tens
        // of seconds per model on 2 cores); NOOPT=1 skips the optimizations (upcasts,
        // unrolls): slower kernels, the same math up to f32 summation order. GPUs keep the
        // defaults.
        let noopt = if dev == "CPU" { "1" } else { "0" };
        let mut vars = vec![("DEV", dev), ("NOOPT", noopt)];
        vars.extend_from_slice(env);
        Self::spawn_with_env(dir, socket, &state_dir, &models_dir(), &args, &vars)
            .expect("egpud did not start")
    }

    /// Starts egpud on a models folder of the test's own (not the shared real one), with extra
    /// environment variables.
    pub fn start_with_models(
        models: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("egpu-e2e-")
            .tempdir()
            .expect("temp dir");
        let (socket, state_dir) = (dir.path().join("egpud.sock"), dir.path().join("state"));
        Self::spawn_with_env(dir, socket, &state_dir, models, extra_args, env)
            .expect("egpud did not start")
    }

    /// Starts egpud with its open-files limit (soft and hard) at `limit`, as a machine that
    /// has run out of descriptors would have it.
    pub fn start_with_open_files_limit(limit: u64, extra_args: &[&str]) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("egpu-e2e-")
            .tempdir()
            .expect("temp dir");
        let (socket, state_dir) = (dir.path().join("egpud.sock"), dir.path().join("state"));
        // Set in a tiny exec wrapper: std's Command has no safe way to set a child's rlimit.
        let mut wrapper = Command::new("python3");
        wrapper.args([
            "-c",
            "import os, resource, sys\n\
             n = int(sys.argv[1])\n\
             resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n\
             os.execv(sys.argv[2], sys.argv[2:])\n",
            &limit.to_string(),
        ]);
        wrapper.arg(binary("egpud"));
        Self::spawn_command(
            wrapper,
            dir,
            socket,
            &state_dir,
            &models_dir(),
            extra_args,
            &[],
        )
        .expect("egpud did not start")
    }

    fn spawn_with_env(
        dir: tempfile::TempDir,
        socket: PathBuf,
        state_dir: &Path,
        models: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<TestDaemon, String> {
        let command = Command::new(binary("egpud"));
        Self::spawn_command(command, dir, socket, state_dir, models, extra_args, env)
    }

    fn spawn_command(
        mut command: Command,
        dir: tempfile::TempDir,
        socket: PathBuf,
        state_dir: &Path,
        models: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<TestDaemon, String> {
        let mut child = command
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--models-dir")
            .arg(models)
            .args(["--threads", "2"])
            // Tests run side by side: each egpud takes a free loopback port for HTTP.
            .args(["--http", "127.0.0.1:0"])
            .args(extra_args)
            .env("EGPU_LOG", "info")
            .envs(env.iter().copied())
            .env_remove("EGPU_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning egpud");
        let log = Arc::new(Log::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        // EGPU_TEST_ECHO=1: each egpud's log also goes to the test's stderr as it is written
        // (with --nocapture), for a test that hangs instead of failing.
        let echo = std::env::var_os("EGPU_TEST_ECHO").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Logged before the signal, so a test woken by it finds the line.
                let listening = line.contains("listening");
                if echo {
                    eprintln!("[egpud] {line}");
                }
                sink.lines.lock().unwrap().push(line);
                sink.grew.notify_all();
                if listening {
                    let _ = ready_tx.send(true);
                }
            }
            let _ = ready_tx.send(false);
        });
        let daemon = TestDaemon {
            child: Some(child),
            socket,
            state_dir: state_dir.to_owned(),
            dir,
            log,
        };
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(true) => Ok(daemon),
            _ => Err(daemon.log_text()),
        }
    }

    /// The HTTP front end's TCP URL (`http://127.0.0.1:PORT`), from egpud's listening line.
    pub fn http_url(&self) -> String {
        let log = self.log_text();
        let line = log
            .lines()
            .find(|l| l.contains(" listening"))
            .unwrap_or_else(|| panic!("no listening line:\n{log}"));
        let start = line
            .find("http=http://")
            .unwrap_or_else(|| panic!("HTTP is off: {line}"))
            + "http=".len();
        line[start..]
            .split_whitespace()
            .next()
            .expect("an address")
            .to_owned()
    }

    /// The HTTP front end's Unix socket (beside the gRPC one).
    pub fn http_socket(&self) -> PathBuf {
        egpu_proto::http_socket_beside(&self.socket)
    }

    /// The key TCP clients send (egpud writes it in its state folder at start).
    pub fn api_key(&self) -> String {
        let path = self.state_dir.join(egpu_proto::API_KEY_FILE);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    pub async fn client(&self) -> EgpuClient<Channel> {
        egpu_proto::connect(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connecting: {e}\n{}", self.log_text()))
    }

    /// Everything egpud has logged so far.
    pub fn log_text(&self) -> String {
        self.log.lines.lock().unwrap().join("\n")
    }

    /// Waits until at least `count` log lines contain `needle`; false on timeout. Woken by
    /// each new line, so it returns as soon as egpud has said it.
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if lines.iter().filter(|l| l.contains(needle)).count() >= count {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            lines = self.log.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// How many log lines contain `needle` so far.
    pub fn log_count(&self, needle: &str) -> usize {
        let lines = self.log.lines.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("running");
        matches!(child.try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL (a crash: no cleanup at all) and waits for it.
    pub fn kill_9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("SIGKILL");
        child.wait().expect("waiting for egpud")
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        child.wait().expect("waiting for egpud")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a Python script with the test clients on its path (`pydeps`) for at most `limit`;
/// its stdout's last line is JSON. A failure shows the script's output and egpud's log.
pub fn run_python_json(
    daemon: &TestDaemon,
    mut cmd: Command,
    limit: Duration,
) -> serde_json::Value {
    cmd.env("PYTHONPATH", pydeps());
    let out = output_within(cmd, limit);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed:\n{}\n{stdout}\negpud:\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("a JSON line")
}

/// Loads a model and returns its info (the stream's last event).
pub async fn load(
    client: &mut EgpuClient<Channel>,
    request: pb::LoadRequest,
) -> Result<pb::ModelInfo, tonic::Status> {
    let mut stream = client.load(request).await?.into_inner();
    let mut info = None;
    while let Some(event) = stream.message().await? {
        if let Some(pb::load_event::Event::Model(m)) = event.event {
            info = Some(m);
        }
    }
    info.ok_or_else(|| tonic::Status::internal("load stream ended without the model"))
}

/// Loads the real SmolLM2 under `name`.
pub async fn load_smollm2(
    client: &mut EgpuClient<Channel>,
    name: &str,
    context: u32,
    slots: u32,
) -> pb::ModelInfo {
    load(
        client,
        pb::LoadRequest {
            source: model_path(SMOLLM2).display().to_string(),
            name: name.into(),
            context_length: context,
            slots,
            ..Default::default()
        },
    )
    .await
    .expect("loading SmolLM2")
}

/// Everything one Generate stream returned.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<pb::TokenLogprobs>,
    pub done: Option<pb::GenerateDone>,
}

/// A raw greedy request for `max_tokens` tokens.
pub fn greedy(model: &str, prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        raw: true,
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

/// Runs a Generate request to its end.
pub async fn generate(
    client: &mut EgpuClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<Generated, tonic::Status> {
    let stream = client.generate(request).await?.into_inner();
    collect(stream).await
}

/// Reads a Generate stream to its end.
pub async fn collect(
    mut stream: tonic::Streaming<pb::GenerateEvent>,
) -> Result<Generated, tonic::Status> {
    let mut out = Generated::default();
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(pb::generate_event::Event::Chunk(c)) => {
                out.text.push_str(&c.text);
                out.token_ids.extend(c.token_ids);
                out.logprobs.extend(c.logprobs);
            }
            Some(pb::generate_event::Event::Done(d)) => out.done = Some(d),
            None => {}
        }
    }
    Ok(out)
}

pub async fn status(client: &mut EgpuClient<Channel>) -> pb::StatusResponse {
    client
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// Names of the resident models, sorted.
pub async fn resident_names(client: &mut EgpuClient<Channel>) -> Vec<String> {
    let mut names: Vec<String> = status(client)
        .await
        .models
        .into_iter()
        .map(|m| m.name)
        .collect();
    names.sort();
    names
}

/// A client that names itself (for fair scheduling) with the `x-egpu-client` header.
pub fn named<T>(message: T, client_name: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        egpu_proto::CLIENT_NAME_HEADER,
        client_name.parse().expect("ascii client name"),
    );
    request
}

/// Runs a command to its end with piped output; a command still running after `limit` is
/// killed and fails the test (a hang is a failure, not a stuck test run).
pub fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let start = Instant::now();
    // Polling try_wait: std has no wait with a timeout; the poll only bounds the wait.
    while child.try_wait().expect("waiting").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("hung for {limit:?}: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("the command's output")
}

/// Writes `bytes` to a file in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("writing a test file");
    path
}

/// `PYTHONPATH` holding the Python clients (grpcio, openai, ollama, prometheus-client):
/// `$EGPU_PYDEPS`, else `<repo>/.pydeps` (scripts/python-deps.sh).
pub fn pydeps() -> PathBuf {
    let dir = std::env::var_os("EGPU_PYDEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.pydeps"));
    assert!(
        dir.join("grpc").is_dir() && dir.join("openai").is_dir(),
        "the Python clients are not installed in {}: run scripts/python-deps.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// Where an HTTP request goes: egpud's TCP address (`127.0.0.1:PORT`) or its HTTP socket.
#[derive(Debug, Clone)]
pub enum HttpTarget {
    Tcp(String),
    Unix(PathBuf),
}

impl HttpTarget {
    /// The TCP address of a daemon's HTTP front end.
    pub fn tcp(daemon: &TestDaemon) -> HttpTarget {
        let url = daemon.http_url();
        HttpTarget::Tcp(url.trim_start_matches("http://").to_owned())
    }

    pub fn unix(daemon: &TestDaemon) -> HttpTarget {
        HttpTarget::Unix(daemon.http_socket())
    }

    /// An open connection to it.
    pub async fn connect(&self) -> Box<dyn HttpStream> {
        match self {
            HttpTarget::Tcp(addr) => Box::new(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .unwrap_or_else(|e| panic!("connecting to {addr}: {e}")),
            ),
            HttpTarget::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display())),
            ),
        }
    }
}

pub trait HttpStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> HttpStream for T {}

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// The request line and headers of an HTTP/1.1 request that closes the connection after
/// the response. `Host` is `127.0.0.1` unless `headers` names one.
pub fn http_head(method: &str, path: &str, headers: &[(&str, &str)], body_len: usize) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str("Host: 127.0.0.1\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {body_len}\r\nConnection: close\r\n\r\n"
    ));
    head
}

/// Sends one request and reads the whole response (a small HTTP/1.1 client, so the tests see
/// exactly what goes over the wire: any Host, any header, any body size).
pub async fn http_request(
    target: &HttpTarget,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = target.connect().await;
    let head = http_head(method, path, headers, body.len());
    stream.write_all(head.as_bytes()).await.expect("writing");
    // A server may answer (413) before reading the whole body, and then close.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    parse_http_reply(&raw)
}

/// Parses a response read to the end of the connection (chunked or not).
pub fn parse_http_reply(raw: &[u8]) -> HttpReply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    HttpReply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// The JSON payloads of an SSE body's `data:` lines, and whether it ended with `[DONE]`.
pub fn sse_events(body: &str) -> (Vec<serde_json::Value>, bool) {
    let mut events = Vec::new();
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).expect("a JSON event"));
        }
    }
    (events, done)
}

/// A copy of the GGUF at `source`, written to `dest` with `tokenizer.chat_template` set to
/// `template`: a model whose template is whatever a test needs, hostile ones included.
pub fn with_chat_template(source: &Path, template: &str, dest: &Path) -> PathBuf {
    use egpu_engine::gguf::write::GgufWriter;
    use egpu_engine::gguf::{GgufFile, MetaValue};
    let file = GgufFile::open(source).expect("source GGUF");
    let writer = GgufWriter::copy_of(&file).set_kv(
        "tokenizer.chat_template",
        MetaValue::String(template.to_owned()),
    );
    std::fs::write(dest, writer.to_bytes()).expect("write the GGUF");
    dest.to_owned()
}

/// A reference file of `tests/fixtures/` (each written by a script in `scripts/`) and its
/// `texts`, the inputs its vectors belong to.
pub fn embedding_reference(file: &str) -> (serde_json::Value, Vec<String>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reference: serde_json::Value = serde_json::from_str(&text).expect("reference JSON");
    let texts = reference["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .map(|t| t.as_str().expect("a text").to_owned())
        .collect();
    (reference, texts)
}

/// A tiny model fixture of the engine (`engine/tests/fixtures/models/`).
pub fn tiny_fixture(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/fixtures/models")
        .join(file)
}

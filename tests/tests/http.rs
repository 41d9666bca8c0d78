//! The HTTP front end, end to end: the official `openai` and `ollama` Python packages against a
//! real egpud, the same greedy tokens as `egpuctl generate`, the guards on TCP, cancellation
//! on disconnect, concurrency beside gRPC, models loaded on demand from every store, eviction,
//! and metrics that parse and move.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use egpu_e2e::*;
use serde_json::{json, Value};

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

fn run_python(daemon: &TestDaemon, cmd: Command) -> Value {
    run_python_json(daemon, cmd, Duration::from_secs(240))
}

/// What `egpuctl generate` answers greedily for a prompt rendered by the chat template.
fn egpuctl_generate(daemon: &TestDaemon, model: &str, prompt: &str, max_tokens: u32) -> Value {
    let mut cmd = Command::new(binary("egpuctl"));
    cmd.arg("--socket").arg(&daemon.socket).args([
        "generate",
        model,
        prompt,
        "--max-tokens",
        &max_tokens.to_string(),
        "--temperature",
        "0",
        "--json",
    ]);
    let out = output_within(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("egpuctl's JSON")
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn chat_over(target: &HttpTarget, key: Option<&str>, body: Value) -> HttpReply {
    let auth = key.map(bearer);
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    http_request(
        target,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.to_string().as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_package_works_over_tcp_and_matches_egpuctl() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smollm2", 512, 4).await;
    let prompt = "Name three colors.";
    let mut cmd = Command::new("python3");
    cmd.arg(script("openai_check.py"))
        .args(["--base-url", &format!("{}/v1", daemon.http_url())])
        .args(["--key", &daemon.api_key()])
        .args([
            "--model",
            "smollm2",
            "--prompt",
            prompt,
            "--max-tokens",
            "16",
        ]);
    let out = run_python(&daemon, cmd);

    let cli = egpuctl_generate(&daemon, "smollm2", prompt, 16);
    assert_eq!(out["chat"], cli["text"], "{out}\n{cli}");
    assert_eq!(out["chat_stream"], out["chat"]);
    assert_eq!(
        out["chat_tokens"].as_u64(),
        Some(cli["token_ids"].as_array().unwrap().len() as u64)
    );
    assert_eq!(out["stream_usage"]["completion_tokens"], out["chat_tokens"]);
    assert!(out["not_found"].as_str().unwrap().contains("no-such-model"));
    assert!(out["bad_key"].as_str().unwrap().contains("API key"));
    assert!(out["n2"].as_str().unwrap().contains("n must be 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_chat_over_the_unix_socket_matches_egpuctl_without_a_key() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smollm2", 512, 2).await;
    let prompt = "What is the capital of France?";
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 20,
    });
    let unix = chat_over(&HttpTarget::unix(&daemon), None, body.clone()).await;
    assert_eq!(unix.status, 200, "{}", unix.text());
    let cli = egpuctl_generate(&daemon, "smollm2", prompt, 20);
    let reply = unix.json();
    assert_eq!(reply["choices"][0]["message"]["content"], cli["text"]);
    assert_eq!(
        reply["usage"]["completion_tokens"].as_u64(),
        Some(cli["token_ids"].as_array().unwrap().len() as u64)
    );
    // The same request over TCP needs the key.
    let tcp = HttpTarget::tcp(&daemon);
    assert_eq!(chat_over(&tcp, None, body.clone()).await.status, 401);
    let with_key = chat_over(&tcp, Some(&daemon.api_key()), body).await;
    assert_eq!(
        with_key.json()["choices"][0]["message"]["content"],
        cli["text"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ollama_package_lists_chats_generates_and_unloads() {
    let daemon = TestDaemon::start(&[]);
    let model = "SmolLM2-135M-Instruct.Q4_1";
    let mut cmd = Command::new("python3");
    cmd.arg(script("ollama_check.py"))
        .args(["--host", &daemon.http_url(), "--model", model])
        .env("OLLAMA_API_KEY", daemon.api_key());
    let out = run_python(&daemon, cmd);
    assert_eq!(out["chat"], out["chat_stream"], "{out}");
    assert!(!out["chat"].as_str().unwrap().is_empty());
    assert_eq!(out["ps_before"], json!([model]));
    assert_eq!(out["ps_after"], json!([]));
    assert!(out["pull"].as_str().unwrap().contains("never downloads"));
    // The model came on demand (no Load was sent) and went with keep_alive 0.
    let mut client = daemon.client().await;
    assert!(resident_names(&mut client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_requests_must_show_a_loopback_host_an_allowed_origin_and_the_key() {
    let daemon = TestDaemon::start(&["--http-origins", "http://localhost:3000"]);
    let tcp = HttpTarget::tcp(&daemon);
    let key = daemon.api_key();
    let auth = bearer(&key);
    let get = |headers: Vec<(&'static str, String)>| {
        let tcp = tcp.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            http_request(&tcp, "GET", "/v1/models", &headers, b"").await
        }
    };
    assert_eq!(get(vec![("Authorization", auth.clone())]).await.status, 200);
    let no_key = get(vec![]).await;
    assert_eq!(no_key.status, 401);
    assert_eq!(no_key.json()["error"]["type"], "authentication_error");
    assert_eq!(get(vec![("x-api-key", key.clone())]).await.status, 200);
    // DNS rebinding: a page on another domain that resolves to 127.0.0.1.
    let rebound = get(vec![
        ("Host", "attacker.example:11470".into()),
        ("Authorization", auth.clone()),
    ])
    .await;
    assert_eq!(rebound.status, 403);
    for host in ["localhost:1234", "[::1]:80", "127.0.0.1"] {
        let ok = get(vec![("Host", host.into()), ("Authorization", auth.clone())]).await;
        assert_eq!(ok.status, 200, "{host}");
    }
    // CORS: an unlisted origin is refused, preflight or not; the listed one is answered.
    let evil = |method: &'static str| {
        let tcp = tcp.clone();
        async move {
            http_request(
                &tcp,
                method,
                "/v1/chat/completions",
                &[
                    ("Origin", "https://evil.example"),
                    ("Access-Control-Request-Method", "POST"),
                ],
                b"",
            )
            .await
        }
    };
    assert_eq!(evil("OPTIONS").await.status, 403);
    assert_eq!(evil("POST").await.status, 403);
    let preflight = http_request(
        &tcp,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", "http://localhost:3000"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ],
        b"",
    )
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("http://localhost:3000")
    );
    assert!(preflight
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("authorization")));
    let from_page = get(vec![
        ("Origin", "http://localhost:3000".into()),
        ("Authorization", auth.clone()),
    ])
    .await;
    assert_eq!(from_page.status, 200);
    assert_eq!(
        from_page.header("access-control-allow-origin"),
        Some("http://localhost:3000")
    );
    // Bodies are bounded (8 MiB by default).
    let huge = vec![b' '; 9 << 20];
    let too_big = http_request(
        &tcp,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &auth)],
        &huge,
    )
    .await;
    assert_eq!(too_big.status, 413, "{}", too_big.text());
    // Metrics follow the same rules.
    let metrics = http_request(&tcp, "GET", "/metrics", &[], b"").await;
    assert_eq!(metrics.status, 401);
    // Bad input is a 400 in OpenAI's shape, never a 500.
    let garbage = http_request(
        &tcp,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &auth)],
        b"{\"model\": 5",
    )
    .await;
    assert_eq!(garbage.status, 400);
    assert_eq!(garbage.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_tcp_needs_no_key_but_still_checks_the_host() {
    let daemon = TestDaemon::start(&["--http-auth", "none"]);
    let tcp = HttpTarget::tcp(&daemon);
    assert_eq!(
        http_request(&tcp, "GET", "/api/tags", &[], b"")
            .await
            .status,
        200
    );
    let rebound = http_request(&tcp, "GET", "/api/tags", &[("Host", "evil.example")], b"").await;
    assert_eq!(rebound.status, 403);
    assert!(rebound.json()["error"]
        .as_str()
        .unwrap()
        .contains("loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_is_refused_on_the_http_socket() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    if !rustix::process::getuid().is_root() {
        eprintln!("note: not root, so no client can run as another uid here");
        return;
    }
    let daemon = TestDaemon::start(&[]);
    let perms = |mode| std::fs::Permissions::from_mode(mode);
    // Open the way for everyone, as a misconfigured system might: the uid check must still
    // refuse.
    std::fs::set_permissions(daemon.dir.path(), perms(0o755)).unwrap();
    std::fs::set_permissions(daemon.http_socket(), perms(0o666)).unwrap();
    let client = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(b'GET /api/tags HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
                  data = b''\n\
                  while chunk := s.recv(65536): data += chunk\n\
                  print(data.decode())\n";
    let out = Command::new("python3")
        .args(["-c", client])
        .arg(daemon.http_socket())
        // The checkout may be closed to other users (a `mktemp -d` clone is 0700).
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("uid 65534"), "{text}");
}

/// Opens a streaming chat completion on a raw connection and returns it once the first token
/// has arrived.
async fn open_stream(target: &HttpTarget, key: &str, body: Value) -> Box<dyn HttpStream> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let auth = bearer(key);
    let body = body.to_string();
    let mut stream = target.connect().await;
    let head = http_head(
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &auth)],
        body.len(),
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"") || seen.len() < 400 {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_slot_within_a_second() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    // A stream long enough (4000 tokens, ~20 s) that it is still running when the client goes,
    // even when 15 tests share 2 cores and this one waits seconds for its turn (a 900-token
    // stream once finished before the test's Status call in CI).
    load_smollm2(&mut client, "smollm2", 4096, 1).await;
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 4000,
        // Sampled text may end the story early, and a finished request is not active: the
        // stream must still be running when the client goes.
        "ignore_eos": true,
        "stream": true,
    });
    let stream = open_stream(&HttpTarget::tcp(&daemon), &daemon.api_key(), body).await;
    // The stream's first frame can arrive before the runner has admitted the request (it is
    // queued until then): wait for the admission, which a loaded CI machine can delay.
    let admitted = Instant::now();
    while status(&mut client).await.models[0].active != 1 {
        assert!(
            admitted.elapsed() < Duration::from_secs(10),
            "the request was not admitted within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(stream);
    let closed = Instant::now();
    // Polled: the runner notices at its next step; the bound is the test.
    while status(&mut client).await.models[0].active != 0 {
        assert!(
            closed.elapsed() < Duration::from_secs(1),
            "the slot is still busy {:?} after the client left",
            closed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The one slot serves the next request.
    let next = generate(&mut client, greedy("smollm2", "Hello", 4))
        .await
        .unwrap();
    assert!(next.done.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_http_streams_and_four_grpc_streams_each_get_what_they_get_alone() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smollm2", 256, 8).await;
    let prompts: Vec<String> = (0..20)
        .map(|i| format!("Write one sentence about the number {i}."))
        .collect();
    let chat_request = |prompt: &str| egpu_proto::v1::GenerateRequest {
        model: "smollm2".into(),
        input: Some(egpu_proto::v1::generate_request::Input::Prompt(
            prompt.into(),
        )),
        max_tokens: Some(12),
        ..Default::default()
    };
    // Alone, one at a time.
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(generate(&mut client, chat_request(p)).await.unwrap().text);
    }
    // Together: 16 over HTTP (streamed), 4 over gRPC.
    let tcp = HttpTarget::tcp(&daemon);
    let key = daemon.api_key();
    let mut tasks = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let p = p.clone();
        if i < 16 {
            let (tcp, key) = (tcp.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let body = json!({
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": p}],
                    "temperature": 0,
                    "max_tokens": 12,
                    "stream": true,
                    "user": format!("app-{i}"),
                });
                let reply = chat_over(&tcp, Some(&key), body).await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                let (events, done) = sse_events(&reply.text());
                assert!(done, "no [DONE]: {}", reply.text());
                events
                    .iter()
                    .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
                    .collect::<String>()
            }));
        } else {
            let mut grpc = daemon.client().await;
            let request = chat_request(&p);
            tasks.push(tokio::spawn(async move {
                generate(&mut grpc, request).await.unwrap().text
            }));
        }
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), alone[i], "request {i}");
    }
}

/// A copy of a committed tiny model (400 KB) at `to`.
fn tiny(name: &str, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let from = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/fixtures/models")
        .join(name);
    std::fs::copy(from, to).unwrap();
}

/// Stores laid out as Ollama, LM Studio and huggingface_hub lay them out.
fn stores(root: &Path) {
    let ollama = root.join("ollama");
    tiny("tiny-llama31.gguf", &ollama.join("blobs/sha256-0123abcd"));
    let manifest = json!({
        "schemaVersion": 2,
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:99"},
            {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:0123abcd"},
        ]
    });
    let dir = ollama.join("manifests/registry.ollama.ai/library/tinyllama");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("latest"), manifest.to_string()).unwrap();
    tiny(
        "tiny-qwen2.gguf",
        &root.join("home/.lmstudio/models/someone/tiny-qwen-GGUF/tiny-qwen2-Q8_0.gguf"),
    );
    let repo = root.join("hf/models--owner--tiny-gpt2-GGUF");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "c0ffee").unwrap();
    tiny(
        "tiny-gpt2.gguf",
        &repo.join("snapshots/c0ffee/tiny-gpt2.f32.gguf"),
    );
    tiny("tiny-llama31-q8_0.gguf", &root.join("models/tiny-own.gguf"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_load_on_demand_from_every_store() {
    let root = tempfile::tempdir().unwrap();
    stores(root.path());
    let path = |p: &str| root.path().join(p).display().to_string();
    let daemon = TestDaemon::start_with_models(
        &root.path().join("models"),
        &[],
        &[
            ("HOME", &path("home")),
            ("OLLAMA_MODELS", &path("ollama")),
            ("HF_HUB_CACHE", &path("hf")),
        ],
    );
    let unix = HttpTarget::unix(&daemon);
    let tags = http_request(&unix, "GET", "/api/tags", &[], b"")
        .await
        .json();
    let listed: Vec<(String, String)> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["egpu_store"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("tiny-own", "models"),
        ("tinyllama:latest", "ollama"),
        ("someone/tiny-qwen-GGUF", "lmstudio"),
        ("owner/tiny-gpt2-GGUF", "huggingface"),
        ("owner/tiny-gpt2-GGUF:tiny-gpt2.f32.gguf", "huggingface"),
    ];
    for (name, store) in expected {
        assert!(
            listed.contains(&(name.to_owned(), store.to_owned())),
            "{name} ({store}) not in {listed:?}"
        );
    }
    // Each name loads on its first request, as the name it was asked by.
    for name in [
        "tiny-own",
        "tinyllama",
        "someone/tiny-qwen-GGUF",
        "owner/tiny-gpt2-GGUF",
    ] {
        let body = json!({"model": name, "prompt": "hello", "stream": false,
                          "options": {"num_predict": 2, "temperature": 0}});
        let reply = http_request(
            &unix,
            "POST",
            "/api/generate",
            &[],
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        // A random tiny model may end its text at once; it was served either way.
        let reply = reply.json();
        assert_eq!(reply["done"], true, "{name}");
        let tokens = reply["eval_count"].as_u64().unwrap();
        assert!((1..=2).contains(&tokens), "{name}: {reply}");
    }
    let mut client = daemon.client().await;
    let resident = resident_names(&mut client).await;
    assert_eq!(
        resident,
        [
            "owner/tiny-gpt2-GGUF",
            "someone/tiny-qwen-GGUF",
            "tiny-own",
            "tinyllama",
        ]
    );
    // egpuctl lists every store, and says where each file came from.
    let mut cmd = Command::new(binary("egpuctl"));
    cmd.arg("--socket")
        .arg(&daemon.socket)
        .args(["models", "--json"]);
    let out = output_within(cmd, Duration::from_secs(30));
    let files: Value = serde_json::from_slice(&out.stdout).unwrap();
    let stores: Vec<&str> = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["store"].as_str().unwrap())
        .collect();
    for store in ["models", "ollama", "lmstudio", "huggingface"] {
        assert!(stores.contains(&store), "{store} missing from {files}");
    }
    // A name that resolves nowhere: 404 listing what exists, in each API's shape.
    let missing = chat_over(
        &unix,
        None,
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(missing.status, 404);
    let message = missing.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("tinyllama:latest") && message.contains("tiny-own"),
        "{message}"
    );
    let body = json!({"model": "gpt-4o", "prompt": "x"});
    let missing = http_request(
        &unix,
        "POST",
        "/api/generate",
        &[],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"]
        .as_str()
        .unwrap()
        .contains("not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_evicts_the_idle_model_for_an_on_demand_load() {
    // The two tiny models' estimates, from a first egpud.
    let estimate = |daemon: &TestDaemon, model: &'static str| {
        let unix = HttpTarget::unix(daemon);
        async move {
            let body = json!({"model": model, "prompt": "hi", "stream": false, "options": {"num_predict": 1}});
            let reply = http_request(
                &unix,
                "POST",
                "/api/generate",
                &[],
                body.to_string().as_bytes(),
            )
            .await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    };
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/models");
    let first = TestDaemon::start_with_models(&models, &[], &[]);
    estimate(&first, "tiny-llama31").await;
    estimate(&first, "tiny-qwen2").await;
    let mut client = first.client().await;
    let most = status(&mut client)
        .await
        .models
        .iter()
        .map(|m| m.bytes_estimated.max(m.bytes))
        .max()
        .unwrap();
    drop(first);
    // Room for one of them only.
    let budget = (most + most / 10).to_string();
    let daemon = TestDaemon::start_with_models(&models, &["--memory-budget", &budget], &[]);
    estimate(&daemon, "tiny-llama31").await;
    estimate(&daemon, "tiny-qwen2").await;
    let mut client = daemon.client().await;
    assert_eq!(resident_names(&mut client).await, ["tiny-qwen2"]);
    let metrics = http_request(&HttpTarget::unix(&daemon), "GET", "/metrics", &[], b"").await;
    assert!(
        metrics
            .text()
            .contains("egpu_evictions_total{model=\"tiny-llama31\"} 1"),
        "{}",
        metrics.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_what_is_served() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smollm2", 256, 2).await;
    let unix = HttpTarget::unix(&daemon);
    let scrape = || {
        let unix = unix.clone();
        async move {
            let reply = http_request(&unix, "GET", "/metrics", &[], b"").await;
            assert_eq!(reply.status, 200);
            assert!(reply
                .header("content-type")
                .is_some_and(|c| c.starts_with("text/plain")));
            reply.text()
        }
    };
    let parse = |text: &str| {
        // prometheus_client's own parser reads every family; print the samples as JSON.
        let code = "import json, sys\n\
                    from prometheus_client.parser import text_string_to_metric_families\n\
                    out = {}\n\
                    for family in text_string_to_metric_families(sys.stdin.read()):\n\
                    \x20   for s in family.samples:\n\
                    \x20       key = s.name + json.dumps(s.labels, sort_keys=True)\n\
                    \x20       out[key] = s.value\n\
                    print(json.dumps(out))\n";
        let mut cmd = Command::new("python3");
        cmd.args(["-c", code]).env("PYTHONPATH", pydeps());
        cmd.stdin(std::process::Stdio::piped());
        cmd.stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let samples: Value = serde_json::from_slice(&out.stdout).unwrap();
        samples
    };
    let before = parse(&scrape().await);
    let key = |name: &str, labels: &str| format!("{name}{labels}");
    let requests = key(
        "egpu_requests_total",
        "{\"kind\": \"generate\", \"model\": \"smollm2\", \"outcome\": \"ok\"}",
    );
    assert!(before.get(&requests).is_none(), "{before}");
    for _ in 0..3 {
        let reply = chat_over(
            &unix,
            None,
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    let after = parse(&scrape().await);
    assert_eq!(after[&requests], 3.0, "{after}");
    assert_eq!(
        after[&key("egpu_generated_tokens_total", "{\"model\": \"smollm2\"}")],
        15.0
    );
    assert_eq!(
        after[&key(
            "egpu_time_to_first_token_seconds_count",
            "{\"model\": \"smollm2\"}"
        )],
        3.0
    );
    let number = |k: String| {
        after[&k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {after}"))
    };
    // The same chat three times: the second and third find all but the prompt's last token
    // in the slot the first used.
    let model_label = "{\"model\": \"smollm2\"}";
    assert_eq!(
        after[&key("egpu_prefix_cache_lookups_total", model_label)],
        3.0
    );
    assert_eq!(
        after[&key("egpu_prefix_cache_hits_total", model_label)],
        2.0
    );
    let reused = number(key("egpu_prefix_cache_reused_tokens_total", model_label));
    let fed = number(key("egpu_prompt_tokens_total", model_label));
    assert!(reused > 0.0 && (fed + reused) % 3.0 == 0.0, "{after}");
    assert_eq!(reused, 2.0 * ((fed + reused) / 3.0 - 1.0), "{after}");
    assert!(number(key("egpu_resident_bytes", "{\"model\": \"smollm2\"}")) > 1e6);
    assert!(number(key("egpu_budget_bytes", "{\"backend\": \"cpu\"}")) > 0.0);
    assert_eq!(
        after[&key(
            "egpu_model_loads_total",
            "{\"model\": \"smollm2\", \"outcome\": \"ok\"}"
        )],
        1.0
    );
}

/// A chat app resending the conversation: its second turn reports the reused prefix in
/// OpenAI's `usage.prompt_tokens_details.cached_tokens` and answers what a model that never saw
/// the first turn answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chats_next_turn_over_http_reuses_the_cached_prefix_and_says_so() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smollm2", 1024, 2).await;
    let unix = HttpTarget::unix(&daemon);
    let chat = |model: &str, messages: Value| {
        let unix = unix.clone();
        let body =
            json!({"model": model, "messages": messages, "temperature": 0, "max_tokens": 20});
        async move {
            let reply = chat_over(&unix, None, body).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            reply.json()
        }
    };
    let first = json!([{"role": "user", "content": "Give me a short tip for learning to cook."}]);
    let one = chat("smollm2", first.clone()).await;
    assert_eq!(one["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let mut second = first.as_array().unwrap().clone();
    second.push(json!({"role": "assistant", "content": one["choices"][0]["message"]["content"]}));
    second.push(json!({"role": "user", "content": "And one for baking?"}));
    let two = chat("smollm2", Value::Array(second.clone())).await;
    let cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens");
    assert!(
        cached >= one["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{one}\n{two}"
    );
    load_smollm2(&mut client, "fresh", 1024, 1).await;
    let fresh = chat("fresh", Value::Array(second)).await;
    assert_eq!(fresh["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        fresh["choices"][0]["message"]["content"],
        two["choices"][0]["message"]["content"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_leaves_grpc_and_the_http_socket_serving() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let daemon = TestDaemon::start(&["--http", &addr]);
    // One clear line, and egpud goes on.
    assert!(
        daemon.wait_for_log("is off", 1, Duration::from_secs(10)),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.log_count("is off"), 1, "{}", daemon.log_text());
    let mut client = daemon.client().await;
    assert!(status(&mut client).await.http_url.is_empty());
    let tags = http_request(&HttpTarget::unix(&daemon), "GET", "/api/tags", &[], b"").await;
    assert_eq!(tags.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egpuctl_prints_the_key_that_tcp_clients_send() {
    let daemon = TestDaemon::start(&[]);
    let mut cmd = Command::new(binary("egpuctl"));
    cmd.arg("--socket").arg(&daemon.socket).arg("api-key");
    let out = output_within(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap();
    assert_eq!(key.trim(), daemon.api_key());
    let reply = http_request(
        &HttpTarget::tcp(&daemon),
        "GET",
        "/v1/models",
        &[("Authorization", &bearer(key.trim()))],
        b"",
    )
    .await;
    assert_eq!(reply.status, 200);
    // Status tells where HTTP answers.
    let mut client = daemon.client().await;
    let s = status(&mut client).await;
    assert_eq!(s.http_url, daemon.http_url());
    assert_eq!(PathBuf::from(&s.http_socket), daemon.http_socket());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_share_one_load() {
    let daemon = TestDaemon::start(&[]);
    let unix = HttpTarget::unix(&daemon);
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let unix = unix.clone();
            tokio::spawn(async move {
                let body = json!({
                    "model": "SmolLM2-135M-Instruct.Q4_1",
                    "messages": [{"role": "user", "content": format!("Say {i}.")}],
                    "max_tokens": 3,
                });
                chat_over(&unix, None, body).await.status
            })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    let metrics = http_request(&unix, "GET", "/metrics", &[], b"")
        .await
        .text();
    let loads: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("egpu_model_loads_total{"))
        .collect();
    assert_eq!(
        loads,
        ["egpu_model_loads_total{model=\"SmolLM2-135M-Instruct.Q4_1\",outcome=\"ok\"} 1"]
    );
}

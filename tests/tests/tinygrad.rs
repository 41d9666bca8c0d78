//! The tinygrad backend end to end: a real egpud starts its real tinygrad worker (from the
//! checkout's worker/.venv, `scripts/setup-worker.sh`) on `DEV=CPU` — or on the device named
//! by `EGPU_TEST_DEV` (e.g. CUDA when a GPU is lent) — and real clients compare it with the
//! native CPU engine in the same daemon, then break the worker on purpose.
//!
//! Agreement tolerance: the two backends round differently on purpose. The CPU engine, like
//! llama.cpp, rounds activations to 8 bits inside its quantized dot products (Q8_1 × Q4_1
//! etc.); the worker keeps activations in f32 and dequantizes weights to f16 in its kernels
//! (a 2^-11 relative rounding, worth about 0.002 in SmolLM2's log-probabilities). So they
//! differ the way llama.cpp and an exact-f32 run differ: `../shared/reference` shows
//! top-1/top-2 gaps moving by up to ~0.5 at near-ties. Checked: every log-probability within
//! [`LOGPROB_TOLERANCE`], their mean difference within [`MEAN_TOLERANCE`], and the same best
//! token wherever the CPU's top two are more than [`CLEAR_GAP`] apart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egpu_e2e::v1::egpu_client::EgpuClient;
use egpu_e2e::v1::{self as pb};
use egpu_e2e::{
    collect, embedding_reference, generate, greedy, load, model_path, status, worker_python,
    TestDaemon, SMOLLM2,
};
use tonic::transport::Channel;
use tonic::Code;

const WORKER_READY: &str = "tinygrad worker ready";
/// Starting a worker imports tinygrad and compiles a first kernel; first loads compile more.
const WORKER_START: Duration = Duration::from_secs(300);
const LOGPROB_TOLERANCE: f32 = 0.25;
const MEAN_TOLERANCE: f32 = 0.05;
const CLEAR_GAP: f32 = 0.5;
/// Log-probability difference allowed between a reused prefix and a fresh prefill on tinygrad.
const REUSE_TOLERANCE: f32 = 0.02;
const TEXT: &str = "The capital of France is Paris. The capital of Germany is Berlin, and \
                    the capital of Italy is Rome.";

fn dev() -> String {
    std::env::var("EGPU_TEST_DEV").unwrap_or_else(|_| "CPU".into())
}

fn start(extra_args: &[&str]) -> TestDaemon {
    let daemon = TestDaemon::start_tinygrad(&dev(), extra_args);
    assert!(
        daemon.wait_for_log(WORKER_READY, 1, WORKER_START),
        "the tinygrad worker did not start:\n{}",
        daemon.log_text()
    );
    daemon
}

async fn load_on(
    client: &mut EgpuClient<Channel>,
    source: &Path,
    name: &str,
    backend: &str,
    context: u32,
    slots: u32,
    pin: bool,
) -> Result<pb::ModelInfo, tonic::Status> {
    load(
        client,
        pb::LoadRequest {
            source: source.display().to_string(),
            name: name.into(),
            context_length: context,
            slots,
            pin,
            backend: backend.into(),
            ..Default::default()
        },
    )
    .await
}

async fn score(client: &mut EgpuClient<Channel>, model: &str, text: &str) -> pb::ScoreResponse {
    client
        .score(pb::ScoreRequest {
            model: model.into(),
            text: text.into(),
            raw: true,
            top_k: 2,
        })
        .await
        .unwrap_or_else(|e| panic!("scoring on {model}: {e}"))
        .into_inner()
}

/// Compares two scorings of the same text: the same tokens, every log-probability within
/// the tolerance, and the same best token wherever the reference's top two are not a
/// near-tie. Returns (max, mean) absolute log-probability difference.
fn agree(reference: &pb::ScoreResponse, other: &pb::ScoreResponse, what: &str) -> (f32, f32) {
    assert_eq!(reference.token_ids, other.token_ids, "{what}: tokens");
    let mut max = 0f32;
    let mut sum = 0f32;
    let mut n = 0;
    for (i, (r, o)) in reference.positions.iter().zip(&other.positions).enumerate() {
        let (Some(a), Some(b)) = (r.logprob, o.logprob) else {
            continue;
        };
        let d = (a - b).abs();
        assert!(
            d <= LOGPROB_TOLERANCE,
            "{what}: position {i}: log-prob {a} (cpu) vs {b} (tinygrad)"
        );
        max = max.max(d);
        sum += d;
        n += 1;
        if r.top.len() == 2 && r.top[0].logprob - r.top[1].logprob > CLEAR_GAP {
            assert_eq!(r.top[0].id, o.top[0].id, "{what}: best token at {i}");
        }
    }
    assert!(n > 0, "{what}: nothing was compared");
    let mean = sum / n as f32;
    assert!(
        mean <= MEAN_TOLERANCE,
        "{what}: mean log-prob difference {mean}"
    );
    (max, mean)
}

fn tinygrad_backend(st: &pb::StatusResponse) -> pb::BackendStatus {
    st.backends
        .iter()
        .find(|b| b.backend == "tinygrad")
        .cloned()
        .expect("Status lists the tinygrad backend")
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(pid, signal).expect("signalling the worker");
}

/// A tiny llama-architecture GGUF with random blocks of `ggml_type` (worker/egpu_worker/synth.py).
fn synthetic(dir: &Path, ggml_type: &str) -> PathBuf {
    let path = dir.join(format!("tiny-{}.gguf", ggml_type.to_lowercase()));
    let out = std::process::Command::new(worker_python())
        .args(["-m", "egpu_worker.synth"])
        .arg(&path)
        .args(["--type", ggml_type])
        .output()
        .expect("running egpu_worker.synth");
    assert!(
        out.status.success(),
        "egpu_worker.synth {ggml_type} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_on_tinygrad_agrees_with_the_cpu_engine() {
    let daemon = start(&[]);
    let mut client = daemon.client().await;
    let smol = model_path(SMOLLM2);
    load_on(&mut client, &smol, "smol-cpu", "cpu", 256, 2, false)
        .await
        .expect("cpu load");
    let info = load_on(&mut client, &smol, "smol-tg", "tinygrad", 256, 3, false)
        .await
        .unwrap_or_else(|e| panic!("tinygrad load: {e}\n{}", daemon.log_text()));
    assert_eq!(info.backend, "tinygrad");
    assert!(
        info.bytes > 0,
        "the worker reports the model's device bytes"
    );

    let st = status(&mut client).await;
    let tg = tinygrad_backend(&st);
    assert_eq!(tg.state, "ready");
    assert!(tg.pid > 0 && tg.budget_bytes > 0, "{tg:?}");
    assert!(tg.used_bytes >= info.bytes, "{tg:?}");
    assert!(
        tg.allocated_bytes >= info.bytes / 2,
        "tinygrad's own count: {tg:?}"
    );

    let (max, mean) = agree(
        &score(&mut client, "smol-cpu", TEXT).await,
        &score(&mut client, "smol-tg", TEXT).await,
        "SmolLM2",
    );
    eprintln!(
        "SmolLM2 Q4_1 teacher-forced log-prob |cpu - tinygrad|: max {max:.5}, mean {mean:.5}"
    );

    // Greedy continuations: the same tokens up to the first near-tie (at index 5 here: the
    // CPU engine picks llama.cpp's token, the worker the exact-f32 one, see
    // ../shared/reference), and on tinygrad the same with other sequences in the same steps.
    let prompt = "The capital of France is";
    let mut request = greedy("smol-cpu", prompt, 12);
    request.top_logprobs = 2;
    let cpu = generate(&mut client, request).await.expect("cpu");
    let alone = generate(&mut client, greedy("smol-tg", prompt, 12))
        .await
        .expect("tg");
    let clear = cpu
        .logprobs
        .iter()
        .take_while(|l| l.top.len() == 2 && l.top[0].logprob - l.top[1].logprob > CLEAR_GAP)
        .count();
    eprintln!("greedy: {clear} tokens before the CPU's first near-tie");
    assert!(
        clear >= 3,
        "the prompt should give a few clear tokens: {:?}",
        cpu.logprobs
    );
    assert_eq!(
        alone.token_ids[..clear],
        cpu.token_ids[..clear],
        "greedy tokens before the first near-tie, cpu vs tinygrad"
    );
    let others = ["Once upon a time", "fn main() {"];
    let mut streams = Vec::new();
    for p in std::iter::once(prompt).chain(others) {
        let mut c = client.clone();
        streams.push(tokio::spawn(async move {
            generate(&mut c, greedy("smol-tg", p, 12)).await
        }));
    }
    let batched = streams
        .remove(0)
        .await
        .expect("task")
        .expect("batched generate");
    for s in streams {
        s.await.expect("task").expect("other stream");
    }
    assert_eq!(
        batched.token_ids, alone.token_ids,
        "batched with two other streams"
    );

    // The steps above captured graphs (decode batch sizes, prompt lengths) that hold device
    // memory from now on: the model's bytes, and so the budget, count them.
    let after = status(&mut client).await;
    let model = after
        .models
        .iter()
        .find(|m| m.name == "smol-tg")
        .expect("smol-tg in status");
    assert!(
        model.bytes > info.bytes,
        "bytes after steps {} against {} at load",
        model.bytes,
        info.bytes
    );
    eprintln!(
        "smol-tg bytes: estimated {}, at load {}, after the steps {}",
        model.bytes_estimated, info.bytes, model.bytes
    );
    let tg = tinygrad_backend(&after);
    assert!(tg.used_bytes >= model.bytes, "{tg:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_quant_type_agrees_with_the_cpu_engine_on_synthetic_models() {
    let daemon = start(&[]);
    let mut client = daemon.client().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let text = "abc def ghi, jkl mno pqr! stu vwx yz 0123456789";
    for ggml_type in [
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
    ] {
        let path = synthetic(dir.path(), ggml_type);
        let (cpu, tg) = (format!("{ggml_type}-cpu"), format!("{ggml_type}-tg"));
        load_on(&mut client, &path, &cpu, "cpu", 64, 1, false)
            .await
            .unwrap_or_else(|e| panic!("{ggml_type} on cpu: {e}"));
        load_on(&mut client, &path, &tg, "tinygrad", 64, 1, false)
            .await
            .unwrap_or_else(|e| panic!("{ggml_type} on tinygrad: {e}\n{}", daemon.log_text()));
        let (max, mean) = agree(
            &score(&mut client, &cpu, text).await,
            &score(&mut client, &tg, text).await,
            ggml_type,
        );
        eprintln!("{ggml_type}: log-prob |cpu - tinygrad| max {max:.5}, mean {mean:.5}");
        for name in [cpu, tg] {
            client
                .unload(pb::UnloadRequest { name, force: false })
                .await
                .expect("unload");
        }
    }
}

/// A Hugging Face GPT-2 folder on the worker: the converted GGUF is an ordinary gpt2 GGUF there,
/// checked against the CPU engine and against transformers' log-probabilities for the same folder
/// (`engine/tests/fixtures/hf`, `scripts/gen_tiny_hf.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hugging_face_gpt2_folder_runs_on_tinygrad_like_transformers() {
    let daemon = start(&[]);
    let mut client = daemon.client().await;
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/hf");
    let folder = fixtures.join("tiny-gpt2");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("tiny-gpt2.ref.json")).expect("reference"),
    )
    .expect("json");
    let text = &reference["greedy_text"];
    let prompt = text["prompt"].as_str().expect("prompt");
    load_on(&mut client, &folder, "hf-cpu", "cpu", 64, 1, false)
        .await
        .expect("HF folder on cpu");
    load_on(&mut client, &folder, "hf-tg", "tinygrad", 64, 1, false)
        .await
        .unwrap_or_else(|e| panic!("HF folder on tinygrad: {e}\n{}", daemon.log_text()));
    let (cpu, tg) = (
        score(&mut client, "hf-cpu", prompt).await,
        score(&mut client, "hf-tg", prompt).await,
    );
    let (max, mean) = agree(&cpu, &tg, "tiny-gpt2 (HF)");
    let mut vs_transformers = 0f64;
    for (pos, want) in tg.positions[1..]
        .iter()
        .zip(text["score_logprobs"].as_array().expect("logprobs"))
    {
        let got = f64::from(pos.logprob.expect("a log-prob"));
        vs_transformers = vs_transformers.max((got - want.as_f64().expect("number")).abs());
    }
    eprintln!(
        "HF gpt2: |cpu - tinygrad| max {max:e}, mean {mean:e}; |tinygrad - transformers| max \
         {vs_transformers:e}"
    );
    // F32 weights stay F32 on DEV=CPU: the issue's 1e-4. GPUs may take F32 matrices through
    // half-precision paths, so they get the backends' agreement tolerance.
    let limit = if dev() == "CPU" {
        1e-4
    } else {
        f64::from(LOGPROB_TOLERANCE)
    };
    assert!(
        vs_transformers <= limit,
        "tinygrad vs transformers: {vs_transformers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_ends_its_streams_and_comes_back_with_the_pinned_models() {
    let daemon = start(&["--worker-heartbeat", "200ms"]);
    let mut client = daemon.client().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let smol = model_path(SMOLLM2);
    load_on(&mut client, &smol, "smol-cpu", "cpu", 256, 1, false)
        .await
        .expect("cpu load");
    load_on(&mut client, &smol, "smol-tg", "tinygrad", 512, 1, false)
        .await
        .unwrap_or_else(|e| panic!("tinygrad load: {e}\n{}", daemon.log_text()));
    let pinned = synthetic(dir.path(), "Q8_0");
    load_on(&mut client, &pinned, "pinned-tg", "tinygrad", 64, 1, true)
        .await
        .unwrap_or_else(|e| panic!("pinned tinygrad load: {e}\n{}", daemon.log_text()));
    let worker_pid = tinygrad_backend(&status(&mut client).await).pid;

    // A long stream on the worker; kill the worker once it is producing tokens.
    let mut request = greedy("smol-tg", "Write a long story about a dragon.", 400);
    request.stop_at_eos = Some(false);
    let mut stream = client
        .generate(request)
        .await
        .expect("generate")
        .into_inner();
    let first = stream.message().await.expect("first event");
    assert!(
        first.is_some(),
        "the stream produced a token before the kill"
    );
    signal(worker_pid, rustix::process::Signal::KILL);
    let err = collect(stream).await.expect_err("the stream must fail");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("device lost"), "{}", err.message());

    // Until the new worker has it back, the pinned model is not "unknown": a request gets
    // UNAVAILABLE (the device is being restarted; the model is pinned and coming back), or,
    // once its reload has begun, waits for it. Before, this window answered NOT_FOUND "load
    // it first", which tells a client to give up.
    match generate(&mut client, greedy("pinned-tg", "abc", 3)).await {
        Ok(out) => assert_eq!(out.token_ids.len(), 3),
        Err(err) => assert_eq!(err.code(), Code::Unavailable, "{err:?}"),
    }

    // The CPU backend is untouched.
    let cpu = generate(&mut client, greedy("smol-cpu", "Hello", 4))
        .await
        .expect("cpu generate");
    assert_eq!(cpu.token_ids.len(), 4);

    // The worker comes back; the pinned model with it, the other one not.
    assert!(
        daemon.wait_for_log(WORKER_READY, 2, WORKER_START),
        "the worker was not restarted:\n{}",
        daemon.log_text()
    );
    assert!(
        daemon.wait_for_log("pinned model resident again", 1, WORKER_START),
        "the pinned model was not reloaded:\n{}",
        daemon.log_text()
    );
    let st = status(&mut client).await;
    let tg = tinygrad_backend(&st);
    assert_eq!(tg.state, "ready");
    assert_eq!(tg.restarts, 1, "{}", daemon.log_text());
    assert_ne!(tg.pid, worker_pid);
    let names: Vec<&str> = st.models.iter().map(|m| m.name.as_str()).collect();
    assert!(
        names.contains(&"pinned-tg") && !names.contains(&"smol-tg"),
        "{names:?}"
    );
    let out = generate(&mut client, greedy("pinned-tg", "abc", 3))
        .await
        .expect("after restart");
    assert_eq!(out.token_ids.len(), 3);
    // The lost model is gone: a clear NOT_FOUND, not a hang.
    let err = generate(&mut client, greedy("smol-tg", "Hi", 2))
        .await
        .expect_err("lost model");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_answering_heartbeats_is_replaced() {
    let daemon = start(&[
        "--worker-heartbeat",
        "200ms",
        "--worker-heartbeat-timeout",
        "1s",
    ]);
    let mut client = daemon.client().await;
    let pid = tinygrad_backend(&status(&mut client).await).pid;
    // A stopped process holds its socket open but answers nothing: a hang, as a wedged
    // driver call would look.
    signal(pid, rustix::process::Signal::STOP);
    assert!(
        daemon.wait_for_log("did not answer a heartbeat", 1, Duration::from_secs(60)),
        "{}",
        daemon.log_text()
    );
    assert!(
        daemon.wait_for_log(WORKER_READY, 2, WORKER_START),
        "{}",
        daemon.log_text()
    );
    let tg = tinygrad_backend(&status(&mut client).await);
    assert_eq!(tg.state, "ready");
    assert_ne!(tg.pid, pid);
    // The stopped worker was killed, not left behind.
    let gone = rustix::process::test_kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("pid"),
    )
    .is_err();
    assert!(gone, "the unresponsive worker {pid} is still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_load_unload_cycles_return_the_device_memory() {
    let daemon = start(&[]);
    let mut client = daemon.client().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = synthetic(dir.path(), "Q4_K");
    let mut after_unload = Vec::new();
    for cycle in 0..20 {
        let info = load_on(&mut client, &path, "cycled", "tinygrad", 64, 2, false)
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        assert!(info.bytes > 0);
        generate(&mut client, greedy("cycled", "abc", 3))
            .await
            .expect("generate");
        client
            .unload(pb::UnloadRequest {
                name: "cycled".into(),
                force: false,
            })
            .await
            .expect("unload");
        after_unload.push(tinygrad_backend(&status(&mut client).await).allocated_bytes);
    }
    eprintln!("tinygrad allocated bytes after each unload: {after_unload:?}");
    let first = after_unload[0];
    assert!(
        after_unload.iter().all(|&b| b <= first),
        "device memory grew over 20 load/unload cycles: {after_unload:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_worker_environment_the_cpu_backend_still_serves() {
    let dir = tempfile::Builder::new()
        .prefix("egpu-e2e-")
        .tempdir()
        .expect("temp dir");
    let socket = dir.path().join("egpud.sock");
    let daemon = TestDaemon::start_on(
        dir,
        socket,
        &[
            "--backend",
            "tinygrad",
            "--worker-python",
            "/nonexistent/python",
        ],
    )
    .expect("egpud starts without its worker");
    assert!(daemon.wait_for_log("tinygrad device lost", 1, Duration::from_secs(30)));
    let mut client = daemon.client().await;
    let tg = tinygrad_backend(&status(&mut client).await);
    // Between tries it is "lost", during one "starting"; the reason stays either way.
    assert_ne!(tg.state, "ready");
    assert!(tg.detail.contains("setup-worker.sh"), "{}", tg.detail);
    let smol = model_path(SMOLLM2);
    let err = load_on(&mut client, &smol, "smol-tg", "", 256, 1, false)
        .await
        .expect_err("the default backend is tinygrad, which is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    load_on(&mut client, &smol, "smol-cpu", "cpu", 256, 1, false)
        .await
        .expect("the cpu backend serves");
    let out = generate(&mut client, greedy("smol-cpu", "Hello", 3))
        .await
        .expect("generate");
    assert_eq!(out.token_ids.len(), 3);
}

/// A Load sent while the worker is still starting waits for it (up to its start timeout)
/// instead of being refused with "retry in a moment", as a user expects from a daemon that
/// has just started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_sent_while_the_worker_starts_waits_for_it() {
    let daemon = TestDaemon::start_tinygrad(&dev(), &[]);
    let mut client = daemon.client().await;
    assert_eq!(
        daemon.log_count(WORKER_READY),
        0,
        "the worker was ready before the Load: nothing to wait for"
    );
    let info = load_on(
        &mut client,
        &model_path(SMOLLM2),
        "m",
        "tinygrad",
        256,
        1,
        false,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log_text()));
    assert_eq!(info.backend, "tinygrad");
    assert!(daemon.log_count(WORKER_READY) >= 1);
}

/// Whether process `pid` still exists.
fn alive(pid: u32) -> bool {
    rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid as i32).expect("pid"))
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_stuck_on_the_device_thread_is_a_lost_device_not_a_hang() {
    // The worker's device thread hangs in Unload (a wedged driver) while its gRPC threads,
    // heartbeats included, keep answering: only the call's own deadline can tell.
    let daemon = TestDaemon::start_tinygrad_with_env(
        &dev(),
        &["--worker-step-timeout", "3s"],
        &[("EGPU_WORKER_STALL", "Unload")],
    );
    assert!(daemon.wait_for_log(WORKER_READY, 1, WORKER_START));
    let mut client = daemon.client().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = synthetic(dir.path(), "Q8_0");
    load_on(&mut client, &path, "stuck", "tinygrad", 64, 1, false)
        .await
        .expect("load");
    let pid = tinygrad_backend(&status(&mut client).await).pid;
    let started = Instant::now();
    let unload = tokio::time::timeout(
        Duration::from_secs(60),
        client.unload(pb::UnloadRequest {
            name: "stuck".into(),
            force: false,
        }),
    )
    .await
    .expect("Unload hung on the stuck device thread");
    unload.expect("unload");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        daemon.wait_for_log("an unload took longer than", 1, Duration::from_secs(30)),
        "{}",
        daemon.log_text()
    );
    // The wedged worker is replaced, and the new one serves.
    assert!(
        daemon.wait_for_log(WORKER_READY, 2, WORKER_START),
        "{}",
        daemon.log_text()
    );
    assert!(!alive(pid), "the stuck worker {pid} is still alive");
    let tg = tinygrad_backend(&status(&mut client).await);
    assert_eq!(tg.state, "ready");
    assert_ne!(tg.pid, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_seconds_while_the_device_thread_is_stuck() {
    // The default step timeout (3 minutes) stays: the exit must not wait for it.
    let mut daemon =
        TestDaemon::start_tinygrad_with_env(&dev(), &[], &[("EGPU_WORKER_STALL", "Step")]);
    assert!(daemon.wait_for_log(WORKER_READY, 1, WORKER_START));
    let mut client = daemon.client().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = synthetic(dir.path(), "Q8_0");
    load_on(&mut client, &path, "stuck", "tinygrad", 64, 1, false)
        .await
        .expect("load");
    let pid = tinygrad_backend(&status(&mut client).await).pid;
    let mut stream_client = daemon.client().await;
    let stream =
        tokio::spawn(async move { generate(&mut stream_client, greedy("stuck", "abc", 3)).await });
    assert!(
        daemon.wait_for_log(
            "the device thread hangs in Step",
            1,
            Duration::from_secs(60)
        ),
        "{}",
        daemon.log_text()
    );
    let started = Instant::now();
    let exit = daemon.terminate();
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "SIGTERM took {:?}",
        started.elapsed()
    );
    // The stream ended (with an error), and the worker went with egpud.
    let ended = tokio::time::timeout(Duration::from_secs(10), stream)
        .await
        .expect("the stream did not end");
    assert!(ended.unwrap().is_err());
    let gone = Instant::now();
    while alive(pid) {
        assert!(
            gone.elapsed() < Duration::from_secs(10),
            "the worker {pid} outlived egpud"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon whose worker holds every Load on a named pipe until [`HeldLoad::release`]: the
/// model stays in the loading state for as long as a test needs, without timing.
struct HeldLoad {
    daemon: TestDaemon,
    gate: PathBuf,
    _dir: tempfile::TempDir,
    loading: tokio::task::JoinHandle<Result<pb::ModelInfo, tonic::Status>>,
}

impl HeldLoad {
    /// Starts egpud and a Load of a synthetic model as "held"; returns once the worker holds it.
    async fn start() -> HeldLoad {
        let dir = tempfile::tempdir().expect("temp dir");
        let gate = dir.path().join("hold-load");
        let made = std::process::Command::new("mkfifo")
            .arg(&gate)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let daemon = TestDaemon::start_tinygrad_with_env(
            &dev(),
            &[],
            &[("EGPU_WORKER_HOLD_LOAD", gate.to_str().expect("utf-8 path"))],
        );
        assert!(daemon.wait_for_log(WORKER_READY, 1, WORKER_START));
        let path = synthetic(dir.path(), "Q8_0");
        let mut load_client = daemon.client().await;
        let loading = tokio::spawn(async move {
            load_on(&mut load_client, &path, "held", "tinygrad", 64, 1, false).await
        });
        assert!(
            daemon.wait_for_log("Load waits for", 1, Duration::from_secs(60)),
            "{}",
            daemon.log_text()
        );
        HeldLoad {
            daemon,
            gate,
            _dir: dir,
            loading,
        }
    }

    /// Waits until egpud logs that a call waits for the held load (or fails the test).
    fn wait_for_a_waiter(&self) {
        assert!(
            self.daemon.wait_for_log(
                "a request waits for the model's load to finish",
                1,
                Duration::from_secs(60)
            ),
            "no call waited for the load\n{}",
            self.daemon.log_text()
        );
    }

    /// Lets the load go on (writing to the pipe unblocks the worker's read) and waits for it.
    async fn release(&mut self) {
        let gate = self.gate.clone();
        tokio::task::spawn_blocking(move || std::fs::write(&gate, b"go"))
            .await
            .expect("join")
            .expect("write to the pipe");
        (&mut self.loading)
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("load: {e:?}\n{}", self.daemon.log_text()));
    }
}

/// A request for a model that is still loading waits for the load and is then served, as
/// Ollama's clients expect; before, it failed at once with INVALID_ARGUMENT "still loading".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_model_still_loading_waits_for_the_load() {
    let mut held = HeldLoad::start().await;
    let mut client = held.daemon.client().await;
    let request =
        tokio::spawn(async move { generate(&mut client, greedy("held", "abc", 3)).await });
    held.wait_for_a_waiter();
    held.release().await;
    let out = request
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("the waiting request: {e:?}\n{}", held.daemon.log_text()));
    assert_eq!(out.token_ids.len(), 3);
}

/// An Unload sent while its model loads waits for the load and then unloads it; before, it
/// was refused with INVALID_ARGUMENT (found by the soak test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_sent_while_the_model_loads_unloads_it_once_loaded() {
    let mut held = HeldLoad::start().await;
    let mut client = held.daemon.client().await;
    let unload = tokio::spawn(async move {
        client
            .unload(pb::UnloadRequest {
                name: "held".into(),
                force: false,
            })
            .await
    });
    held.wait_for_a_waiter();
    held.release().await;
    unload
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("unload: {e:?}\n{}", held.daemon.log_text()));
    let mut client = held.daemon.client().await;
    let st = status(&mut client).await;
    assert!(
        st.models.iter().all(|m| m.name != "held"),
        "{:?}",
        st.models
    );
}

/// Prompt-prefix reuse on the tinygrad backend: a chat's next turn reuses its slot on the
/// worker (egpud tells the worker where each chunk starts, so keeping a prefix is egpud's
/// bookkeeping) and gets the tokens of a fresh instance that prefills the whole conversation,
/// with log-probabilities within [`REUSE_TOLERANCE`]. Not bit for bit, unlike the CPU engine:
/// tinygrad generates a kernel per pass shape, and its reduction order differs between a
/// decode step, a 64-token prefill bucket and a 128-token one, so a cache entry written by
/// one differs in the last bits from the same entry written by another, and the f16 cache
/// rounds some of those differences up to a unit in the last place (measured: log-probabilities
/// up to ~5e-3 apart on SmolLM2, printed by the test). The same holds for batching on this backend, where the
/// tests compare tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chats_next_turn_on_tinygrad_reuses_its_slot_like_a_fresh_prefill() {
    let daemon = start(&[]);
    let mut client = daemon.client().await;
    let smol = model_path(SMOLLM2);
    for (name, slots) in [("smol", 2), ("fresh", 1)] {
        load_on(&mut client, &smol, name, "tinygrad", 512, slots, false)
            .await
            .unwrap_or_else(|e| panic!("tinygrad load: {e}\n{}", daemon.log_text()));
    }
    let chat = |model: &str, messages: Vec<(&str, String)>| {
        let mut client = client.clone();
        let request = pb::GenerateRequest {
            model: model.into(),
            input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
                messages: messages
                    .into_iter()
                    .map(|(role, content)| pb::ChatMessage {
                        role: role.into(),
                        content,
                        ..Default::default()
                    })
                    .collect(),
            })),
            max_tokens: Some(12),
            top_logprobs: 3,
            ..Default::default()
        };
        async move { generate(&mut client, request).await.expect("generate") }
    };
    let question = ("user", "Name a planet with rings.".to_string());
    let first = chat("smol", vec![question.clone()]).await;
    let conversation = vec![
        question,
        ("assistant", first.text.clone()),
        ("user", "And the largest planet?".to_string()),
    ];
    let reused = chat("smol", conversation.clone()).await;
    let fresh = chat("fresh", conversation.clone()).await;
    // The conversation as the next turn will send it.
    let mut conversation_turn = conversation;
    conversation_turn.push(("assistant", reused.text.clone()));
    let (reused_done, fresh_done) = (reused.done.unwrap(), fresh.done.unwrap());
    assert!(
        reused_done.cached_prompt_tokens >= first.done.unwrap().prompt_tokens,
        "{reused_done:?}"
    );
    assert_eq!(fresh_done.cached_prompt_tokens, 0);
    assert_eq!(reused.token_ids, fresh.token_ids);
    let mut compared = 0;
    let mut max = 0f32;
    for (r, f) in reused.logprobs.iter().zip(&fresh.logprobs) {
        for (a, b) in r.top.iter().zip(&f.top) {
            assert_eq!(a.id, b.id, "the same alternatives");
            let d = (a.logprob - b.logprob).abs();
            assert!(d <= REUSE_TOLERANCE, "{} vs {}", a.logprob, b.logprob);
            max = max.max(d);
            compared += 1;
        }
    }
    assert_eq!(compared, 3 * reused.token_ids.len());
    eprintln!("tinygrad reused vs fresh prefix: max |log-prob difference| {max:.5}");

    // Another conversation shares only the template's system prompt with the first: it takes
    // the empty slot, the worker copies that prefix into it from the first conversation's
    // slot, and it gets a fresh instance's tokens; the first conversation's slot stays whole.
    let other = vec![("user", "Name a red planet.".to_string())];
    let copied = chat("smol", other.clone()).await;
    let fresh_other = chat("fresh", other).await;
    let copied_done = copied.done.clone().unwrap();
    assert!(
        copied_done.cached_prompt_tokens > 0
            && copied_done.cached_prompt_tokens < copied_done.prompt_tokens,
        "{copied_done:?}"
    );
    assert_eq!(copied.token_ids, fresh_other.token_ids);
    for (c, f) in copied.logprobs.iter().zip(&fresh_other.logprobs) {
        for (a, b) in c.top.iter().zip(&f.top) {
            assert!((a.logprob - b.logprob).abs() <= REUSE_TOLERANCE);
        }
    }
    let mut again = conversation_turn.clone();
    again.push(("user", "Thanks.".to_string()));
    let resumed = chat("smol", again).await.done.unwrap();
    assert!(
        resumed.cached_prompt_tokens >= reused_done.prompt_tokens,
        "{resumed:?}"
    );
}

/// Constrained generation is egpud's mask over whatever logits the backend returns, so it holds
/// on tinygrad as on the CPU engine: JSON that parses with the schema's keys and types (SmolLM2
/// on both backends, Gemma 3 on tinygrad greedy and sampled), and sampled answers that match a
/// regular expression whole. (The two greedy documents may differ
/// where the backends' logits nearly tie: measured, `"Ava"` on the CPU and `"Mara"` on tinygrad
/// for the name, the rest equal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_generation_holds_on_tinygrad_like_on_the_cpu() {
    use pb::constraint::Kind;
    let daemon = start(&[]);
    let mut client = daemon.client().await;
    let smol = model_path(SMOLLM2);
    load_on(&mut client, &smol, "smol-cpu", "cpu", 256, 2, false)
        .await
        .expect("cpu load");
    load_on(&mut client, &smol, "smol-tg", "tinygrad", 256, 2, false)
        .await
        .unwrap_or_else(|e| panic!("tinygrad load: {e}\n{}", daemon.log_text()));
    let schema = r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": false}"#;
    let request = |model: &str, kind: Kind, seed: Option<u64>| pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Prompt(
            "Describe a made-up person as JSON.".into(),
        )),
        max_tokens: Some(48),
        sampling: seed.map(|seed| pb::SamplingOptions {
            temperature: 1.5,
            seed: Some(seed),
            ..Default::default()
        }),
        constraint: Some(pb::Constraint { kind: Some(kind) }),
        ..Default::default()
    };
    // Gemma 3 too (262k vocabulary, K-quants), on tinygrad: greedy and sampled.
    let gemma = model_path("gemma-3-270m-q4_k_m.gguf");
    load_on(&mut client, &gemma, "gemma-tg", "tinygrad", 256, 2, false)
        .await
        .unwrap_or_else(|e| panic!("tinygrad load: {e}\n{}", daemon.log_text()));
    let runs = [
        ("smol-cpu", None),
        ("smol-tg", None),
        ("gemma-tg", None),
        ("gemma-tg", Some(1)),
        ("gemma-tg", Some(2)),
    ];
    for (model, seed) in runs {
        let out = generate(
            &mut client,
            request(model, Kind::JsonSchema(schema.into()), seed),
        )
        .await
        .unwrap_or_else(|e| panic!("{model}: {e}\n{}", daemon.log_text()));
        let value: serde_json::Value = serde_json::from_str(&out.text)
            .unwrap_or_else(|e| panic!("{model} seed {seed:?}: {e}: {}", out.text));
        let object = value.as_object().expect("an object");
        assert_eq!(object.len(), 2, "{model}: {value}");
        assert!(object["name"]
            .as_str()
            .is_some_and(|n| n.chars().count() <= 20));
        assert!(object["age"].as_u64().is_some_and(|a| a <= 120));
        assert_eq!(
            out.done.unwrap().finish_reason(),
            pb::FinishReason::Stop,
            "{model} seed {seed:?}"
        );
    }
    for (model, seed) in [
        ("smol-tg", 0),
        ("smol-tg", 1),
        ("smol-tg", 2),
        ("gemma-tg", 0),
    ] {
        let date = Kind::Regex("[0-9]{4}-[0-9]{2}-[0-9]{2}".into());
        let out = generate(&mut client, request(model, date, Some(seed)))
            .await
            .expect("tinygrad");
        let b = out.text.as_bytes();
        assert!(
            b.len() == 10
                && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 {
                    *c == b'-'
                } else {
                    c.is_ascii_digit()
                }),
            "{model} seed {seed}: {:?}",
            out.text
        );
    }
}

/// `source` loaded on each backend (as `{name}-cpu` and `{name}-tg`, its own context, one
/// slot) and `texts` embedded by both: (cpu, tinygrad), the same number of vectors and tokens.
async fn embed_on_both(
    daemon: &TestDaemon,
    client: &mut EgpuClient<Channel>,
    source: &Path,
    name: &str,
    context: u32,
    texts: &[String],
) -> (pb::EmbedResponse, pb::EmbedResponse) {
    let (cpu_name, tg_name) = (format!("{name}-cpu"), format!("{name}-tg"));
    load_on(client, source, &cpu_name, "cpu", context, 1, false)
        .await
        .expect("cpu load");
    load_on(client, source, &tg_name, "tinygrad", context, 1, false)
        .await
        .unwrap_or_else(|e| panic!("tinygrad load: {e}\n{}", daemon.log_text()));
    let embed = |model: &str| pb::EmbedRequest {
        model: model.into(),
        inputs: texts.to_vec(),
        ..Default::default()
    };
    let cpu = client
        .embed(embed(&cpu_name))
        .await
        .expect("cpu")
        .into_inner();
    let tg = client
        .embed(embed(&tg_name))
        .await
        .unwrap_or_else(|e| panic!("tinygrad embed: {e}\n{}", daemon.log_text()))
        .into_inner();
    assert_eq!(tg.embeddings.len(), texts.len());
    assert_eq!(tg.prompt_tokens, cpu.prompt_tokens);
    (cpu, tg)
}

/// Embeddings on tinygrad: the worker returns final hidden states (StepRequest.hidden), pooled
/// and scaled by egpud as on the CPU. Compared with llama.cpp's vectors of the same texts
/// (tests/fixtures/embeddings.ref.json) and with the CPU backend's; a nomic-bert model is
/// refused there with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_on_tinygrad_agree_with_llama_cpp_and_the_cpu() {
    // Passes of at most 16 tokens: the longer texts go to the worker in chunks.
    let daemon = start(&["--batch-tokens", "16"]);
    let mut client = daemon.client().await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (reference, texts) = embedding_reference("embeddings.ref.json");
    let smol = model_path(SMOLLM2);
    let (cpu, tg) = embed_on_both(&daemon, &mut client, &smol, "smol", 256, &texts).await;
    let cosine = |a: &[f32], b: &[f64]| -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
        let na = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let nb = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        dot / (na * nb)
    };
    let llama: Vec<Vec<f64>> = reference["models"][SMOLLM2]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    for (i, (t, c)) in tg.embeddings.iter().zip(&cpu.embeddings).enumerate() {
        let to_llama = cosine(&t.values, &llama[i]);
        let c64: Vec<f64> = c.values.iter().map(|x| f64::from(*x)).collect();
        let to_cpu = cosine(&t.values, &c64);
        eprintln!("text {i}: tinygrad·llama.cpp {to_llama:.5}, tinygrad·cpu {to_cpu:.5}");
        assert!(
            to_llama >= 0.999,
            "text {i}: cosine to llama.cpp {to_llama}"
        );
        assert!(
            to_cpu >= 0.999,
            "text {i}: cosine to the cpu backend {to_cpu}"
        );
    }
    // nomic-bert runs on the CPU engine only: refused with the reason.
    let nomic = root.join("../engine/tests/fixtures/models/tiny-nomic-bert.gguf");
    let err = load_on(&mut client, &nomic, "nomic-tg", "tinygrad", 0, 1, false)
        .await
        .unwrap_err();
    assert!(
        err.message().contains("cpu backend only"),
        "{}",
        err.message()
    );
}

/// BERT on tinygrad: the real all-MiniLM-L6-v2 from its sentence-transformers folder (egpud
/// converts it), each text one bidirectional pass in the worker, against sentence-transformers'
/// own vectors (tests/fixtures/minilm.ref.json) and the CPU backend's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_minilm_l6_v2_embeds_on_tinygrad_as_on_the_cpu() {
    const MAX_ABS_DIFF: f64 = 3e-4;
    let daemon = start(&[]);
    let mut client = daemon.client().await;
    let (reference, texts) = embedding_reference("minilm.ref.json");
    let folder = model_path("all-MiniLM-L6-v2");
    let (cpu, tg) = embed_on_both(&daemon, &mut client, &folder, "minilm", 0, &texts).await;
    let (mut to_reference, mut to_cpu) = (0f64, 0f64);
    for (i, (t, c)) in tg.embeddings.iter().zip(&cpu.embeddings).enumerate() {
        let want = reference["sentence_transformers"][i].as_array().unwrap();
        assert_eq!(t.values.len(), 384);
        for ((a, b), w) in t.values.iter().zip(&c.values).zip(want) {
            to_reference = to_reference.max((f64::from(*a) - w.as_f64().unwrap()).abs());
            to_cpu = to_cpu.max((a - b).abs().into());
        }
    }
    eprintln!("all-MiniLM-L6-v2 on tinygrad: max |Δ| {to_reference:.2e} to sentence-transformers, {to_cpu:.2e} to the cpu backend");
    assert!(
        to_reference < MAX_ABS_DIFF,
        "to sentence-transformers: {to_reference}"
    );
    assert!(to_cpu < MAX_ABS_DIFF, "to the cpu backend: {to_cpu}");
    // An encoder has no LM head: generation is refused as on the CPU.
    let err = generate(&mut client, greedy("minilm-tg", "hello", 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

/// A prefix copy is a worker call like a forward pass. Clients asking for status meanwhile
/// (each answer reads every model's queue) must neither wait for it on egpud's runtime threads
/// nor keep it from finishing: the CI hang of stop 34 was a copy made while the runner held
/// its queue's lock, whose reply then needed the runtime threads that status calls had blocked
/// on that lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_polled_during_prefix_copies_on_tinygrad_stalls_nothing() {
    let daemon = start(&[]);
    let mut client = daemon.client().await;
    let smol = model_path(SMOLLM2);
    load_on(&mut client, &smol, "smol", "tinygrad", 256, 3, false)
        .await
        .unwrap_or_else(|e| panic!("tinygrad load: {e}\n{}", daemon.log_text()));
    let system = "You are a careful assistant. Answer in one short sentence, and never \
                  use more words than the question needs.";
    let request = |question: &str| pb::GenerateRequest {
        model: "smol".into(),
        input: Some(pb::generate_request::Input::Prompt(format!(
            "{system}\nQuestion: {question}\nAnswer:"
        ))),
        max_tokens: Some(2),
        ..Default::default()
    };
    let first = generate(&mut client, request("What is two plus two?"))
        .await
        .expect("first");
    // Status pollers, each on its own connection, as long as the copies run.
    let polling = Arc::new(AtomicBool::new(true));
    let mut pollers = Vec::new();
    for _ in 0..4 {
        let mut client = daemon.client().await;
        let polling = polling.clone();
        pollers.push(tokio::spawn(async move {
            let mut answers = 0u64;
            while polling.load(Ordering::Relaxed) {
                status(&mut client).await;
                answers += 1;
            }
            answers
        }));
    }
    // Each question takes an empty slot (an empty one is preferred), so what it reuses was
    // copied there from another slot: the first copy runs the worker's copy plainly, the
    // second captures its graph.
    let questions = ["Name a red fruit.", "Name a blue bird."];
    let mut copied = Vec::new();
    for question in questions {
        let out = tokio::time::timeout(
            Duration::from_secs(240),
            generate(&mut client, request(question)),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "a request with a prefix copy did not finish while status was polled:\n{}",
                daemon.log_text()
            )
        })
        .expect("generate");
        copied.push(out.done.expect("done").cached_prompt_tokens);
    }
    polling.store(false, Ordering::Relaxed);
    for poller in pollers {
        assert!(poller.await.expect("poller") > 0, "status answered");
    }
    // Every question copied at least the system prompt, and status says they were copies.
    let prompt = first.done.expect("done").prompt_tokens;
    assert!(
        copied.iter().all(|&c| c > prompt / 2),
        "{copied:?} of {prompt}"
    );
    let st = status(&mut client).await;
    let prefix = st.models[0].prefix_cache.expect("counters");
    let total: u32 = copied.iter().sum();
    assert_eq!(
        (prefix.copies, prefix.copied_tokens),
        (2, u64::from(total)),
        "{prefix:?}"
    );
}

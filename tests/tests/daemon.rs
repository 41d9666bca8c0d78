//! egpud end to end: a real daemon process on a real Unix socket, the real SmolLM2 model.

use std::time::{Duration, Instant};

use egpu_e2e::v1::{self as pb};
use egpu_e2e::*;
use egpu_engine::kernels::ThreadPool;
use egpu_engine::models::decoder::{BatchItem, LogitsWanted, Model};
use egpu_engine::ops::log_softmax;
use egpu_engine::sampler::argmax;
use egpu_engine::tokenizer::Tokenizer;
use tonic::Code;

/// The engine's own greedy continuation of a raw prompt, in-process: what egpud must match.
fn engine_greedy(prompt: &str, n: usize) -> Vec<u32> {
    let model = Model::open(model_path(SMOLLM2)).unwrap();
    let tokenizer = Tokenizer::from_gguf(model.file().metadata()).unwrap();
    let ids = tokenizer.encode(prompt, true, true);
    let pool = ThreadPool::new(2);
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(ids.len() + n).unwrap();
    let mut out = Vec::new();
    let mut input = ids;
    while out.len() < n {
        let logits = model
            .forward(
                &pool,
                &mut scratch,
                &mut [BatchItem::append(&mut cache, &input, LogitsWanted::Last)],
            )
            .unwrap();
        let next = argmax(logits.last(0).unwrap()).unwrap() as u32;
        if tokenizer.is_end_of_generation(next) {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    out
}

/// Polls Status until `check` holds, for at most `limit`. Status is cheap; each poll is a
/// real request, and the wait between polls is short.
async fn wait_for_status(
    client: &mut egpu_proto::v1::egpu_client::EgpuClient<tonic::transport::Channel>,
    limit: Duration,
    check: impl Fn(&pb::StatusResponse) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check(&status(client).await) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_load_generate_unload() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;

    let before = status(&mut client).await;
    assert!(before.models.is_empty());
    assert!(before.budget_bytes > 0 && before.used_bytes == 0);
    assert_eq!(before.device.as_ref().unwrap().kind, "cpu");

    let info = load_smollm2(&mut client, "smollm2", 512, 2).await;
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.state, pb::ModelState::Ready as i32);
    assert_eq!((info.context_length, info.slots), (512, 2));
    // Loading by name from the models folder resolves to the same file: a no-op.
    let again = load(
        &mut client,
        pb::LoadRequest {
            source: "SmolLM2-135M-Instruct.Q4_1".into(),
            name: "smollm2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(again.source, info.source);

    let st = status(&mut client).await;
    assert_eq!(st.models.len(), 1);
    let m = &st.models[0];
    let file_len = std::fs::metadata(model_path(SMOLLM2)).unwrap().len();
    assert!(
        m.bytes > file_len / 2 && m.bytes <= m.bytes_estimated,
        "measured {} bytes, estimated {}, file {file_len}",
        m.bytes,
        m.bytes_estimated
    );
    assert_eq!(st.used_bytes, m.bytes);
    assert!(st.used_bytes <= st.budget_bytes);
    assert!(m.quant_mix.iter().any(|q| q.r#type == "Q4_1"));

    let prompt = "The capital of France is";
    let got = generate(&mut client, greedy("smollm2", prompt, 24))
        .await
        .unwrap();
    let expected = engine_greedy(prompt, 24);
    assert_eq!(got.token_ids, expected, "daemon: {:?}", got.text);
    let done = got.done.expect("a done event");
    assert_eq!(done.completion_tokens as usize, expected.len());
    let tokenizer =
        Tokenizer::from_gguf(Model::open(model_path(SMOLLM2)).unwrap().file().metadata()).unwrap();
    assert_eq!(
        done.prompt_tokens as usize,
        tokenizer.encode(prompt, true, true).len()
    );
    let timings = done.timings.unwrap();
    assert!(timings.decode_tokens_per_s > 0.0 && timings.prefill_tokens_per_s > 0.0);

    let st = status(&mut client).await;
    assert_eq!(st.models[0].requests_served, 1);
    let unloaded = client
        .unload(pb::UnloadRequest {
            name: "smollm2".into(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unloaded.freed_bytes, m.bytes.max(unloaded.freed_bytes));
    let st = status(&mut client).await;
    assert!(st.models.is_empty() && st.used_bytes == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_score_and_tokenize() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 512, 2).await;

    // Chat messages go through the model's template; logprobs come with every token.
    let request = pb::GenerateRequest {
        model: "m".into(),
        input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "What is 2+2?".into(),
                ..Default::default()
            }],
        })),
        max_tokens: Some(8),
        top_logprobs: 3,
        ..Default::default()
    };
    let got = generate(&mut client, request).await.unwrap();
    assert!(!got.token_ids.is_empty());
    assert_eq!(got.logprobs.len(), got.token_ids.len());
    for (lp, &id) in got.logprobs.iter().zip(&got.token_ids) {
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.token.as_ref().unwrap().id, id);
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].id, id);
        assert!(lp.top[0].logprob >= lp.top[1].logprob && lp.top[1].logprob >= lp.top[2].logprob);
    }

    // Score equals the engine's teacher-forced log-probabilities.
    let text = "The quick brown fox jumps over the lazy dog.";
    let scored = client
        .score(pb::ScoreRequest {
            model: "m".into(),
            text: text.into(),
            raw: false,
            top_k: 2,
        })
        .await
        .unwrap()
        .into_inner();
    let model = Model::open(model_path(SMOLLM2)).unwrap();
    let tokenizer = Tokenizer::from_gguf(model.file().metadata()).unwrap();
    let ids = tokenizer.encode(text, true, true);
    assert_eq!(scored.token_ids, ids);
    assert_eq!(scored.positions.len(), ids.len());
    assert!(scored.positions[0].logprob.is_none() && scored.positions[0].top.is_empty());
    let pool = ThreadPool::new(2);
    let mut scratch = model.new_scratch();
    let mut cache = model.new_kv_cache(ids.len()).unwrap();
    let logits = model
        .forward(
            &pool,
            &mut scratch,
            &mut [BatchItem::append(&mut cache, &ids, LogitsWanted::All)],
        )
        .unwrap();
    for (i, &id) in ids.iter().enumerate().skip(1) {
        let expected = log_softmax(logits.row(0, i - 1).unwrap())[id as usize];
        let got = scored.positions[i].logprob.unwrap() as f64;
        assert!(
            (got - expected).abs() < 1e-3,
            "position {i}: {got} vs {expected}"
        );
        assert_eq!(scored.positions[i].top.len(), 2);
    }

    let tokenized = client
        .tokenize(pb::TokenizeRequest {
            model: "m".into(),
            text: text.into(),
            add_special: true,
            parse_special: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tokenized.token_ids, ids);
    let text_back = client
        .detokenize(pb::DetokenizeRequest {
            model: "m".into(),
            token_ids: ids[usize::from(tokenizer.adds_bos())..].to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert_eq!(text_back, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_clients_get_what_they_get_alone() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 256, 4).await;
    let prompts = [
        "Once upon a time",
        "The capital of France is",
        "def fibonacci(n):",
        "My favourite colour is",
        "In 1492, Columbus",
        "The square root of 16 is",
        "Water boils at",
        "A haiku about the sea:",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(
            generate(&mut client, greedy("m", p, 16))
                .await
                .unwrap()
                .token_ids,
        );
    }
    let mut tasks = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        // Each task is its own connection: a separate client.
        let mut c = daemon.client().await;
        let request = named(greedy("m", p, 16), &format!("client-{i}"));
        tasks.push(tokio::spawn(async move {
            let stream = c.generate(request).await.unwrap().into_inner();
            collect(stream).await.unwrap().token_ids
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), alone[i], "prompt {:?}", prompts[i]);
    }
    let st = status(&mut client).await;
    assert_eq!(st.models[0].requests_served, 16);
    assert_eq!((st.models[0].active, st.models[0].queued), (0, 0));
    // After batched steps the scratch buffers have grown; the measured bytes still stay
    // within what was estimated (and reserved against the budget) before loading.
    let m = &st.models[0];
    assert!(
        m.bytes <= m.bytes_estimated,
        "{} > {}",
        m.bytes,
        m.bytes_estimated
    );

    // A long prompt goes in chunks; the measured bytes still stay within the estimate.
    let long = "The river flows to the sea and the sea returns as rain. ".repeat(16);
    let chunked = generate(&mut client, greedy("m", &long, 4)).await.unwrap();
    assert!(
        chunked.done.unwrap().prompt_tokens > 128,
        "longer than one pass"
    );
    let m = &status(&mut client).await.models[0];
    assert!(
        m.bytes <= m.bytes_estimated,
        "{} > {}",
        m.bytes,
        m.bytes_estimated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_lru_pinned_busy_and_impossible() {
    // Learn the estimate from a first daemon, then give a second one room for two copies.
    let estimate = {
        let probe = TestDaemon::start(&[]);
        let mut c = probe.client().await;
        load_smollm2(&mut c, "probe", 256, 1).await.bytes_estimated
    };
    let budget = (estimate * 2 + estimate / 2).to_string();
    let daemon = TestDaemon::start(&["--memory-budget", &budget]);
    let mut client = daemon.client().await;

    load_smollm2(&mut client, "a", 256, 1).await;
    load_smollm2(&mut client, "b", 256, 1).await;
    // Use a, so b is the least recently used.
    generate(&mut client, greedy("a", "Hello", 2))
        .await
        .unwrap();
    load_smollm2(&mut client, "c", 256, 1).await;
    assert_eq!(resident_names(&mut client).await, ["a", "c"]);
    let st = status(&mut client).await;
    assert!(st.used_bytes <= st.budget_bytes);

    // A pinned model is never evicted, even when it is the least recently used.
    client
        .unload(pb::UnloadRequest {
            name: "a".into(),
            force: false,
        })
        .await
        .unwrap();
    load(
        &mut client,
        pb::LoadRequest {
            source: model_path(SMOLLM2).display().to_string(),
            name: "pinned".into(),
            context_length: 256,
            slots: 1,
            pin: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    generate(&mut client, greedy("c", "Hello", 2))
        .await
        .unwrap();
    load_smollm2(&mut client, "d", 256, 1).await;
    assert_eq!(resident_names(&mut client).await, ["d", "pinned"]);

    // A busy model is never evicted: with d generating and the other pinned, a load fails
    // and evicts nothing.
    let mut busy_client = daemon.client().await;
    let mut busy = busy_client
        .generate(greedy("d", "Count to one hundred: 1, 2, 3,", 200))
        .await
        .unwrap()
        .into_inner();
    busy.message().await.unwrap().expect("a first chunk");
    let err = load(
        &mut client,
        pb::LoadRequest {
            source: model_path(SMOLLM2).display().to_string(),
            name: "e".into(),
            context_length: 256,
            slots: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("needs")
            && err.message().contains("pinned")
            && err.message().contains("busy"),
        "{}",
        err.message()
    );
    drop(busy);
    assert_eq!(resident_names(&mut client).await, ["d", "pinned"]);

    // An impossible load (more than the whole budget) fails and evicts nothing.
    let err = load(
        &mut client,
        pb::LoadRequest {
            source: model_path(SMOLLM2).display().to_string(),
            name: "huge".into(),
            context_length: 8192,
            slots: 64,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains(&format!("{}-byte budget", st.budget_bytes)),
        "{}",
        err.message()
    );
    assert_eq!(resident_names(&mut client).await, ["d", "pinned"]);
}

/// A greedy request that decodes all `tokens` tokens, past any end-of-generation token: how
/// long it holds its slot then does not depend on where the model's greedy text ends (a change
/// in the last bits of the logits moved that end for this prompt, and the queue drained faster
/// than this test filled it).
fn long_request(model: &str, tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        stop_at_eos: Some(false),
        ..greedy(model, "Tell me a long story.", tokens)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_does_not_starve_another() {
    let daemon = TestDaemon::start(&["--max-queue", "24"]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 256, 1).await;

    // The flood's first request holds the only slot until this test lets it go, so the flood's
    // other 19 and the other client's one all wait together: which of them runs next is then
    // the admission rule's choice alone, not a race with requests finishing while the rest are
    // still being sent. It decodes 240 tokens, past any end-of-generation token, while the
    // others queue in milliseconds; it stops when the test drops it. (Stopping at its
    // end-of-generation token, it could finish before the last of the others was queued.)
    let mut holder = client.clone();
    let mut held_slot = holder
        .generate(named(long_request("m", 240), "flood"))
        .await
        .unwrap()
        .into_inner();
    held_slot.message().await.unwrap().expect("first chunk");
    let mut flood = Vec::new();
    for _ in 0..19 {
        let mut c = client.clone();
        let stream = c
            .generate(named(greedy("m", "Tell me a story.", 12), "flood"))
            .await
            .unwrap()
            .into_inner();
        flood.push(tokio::spawn(async move {
            collect(stream).await.unwrap();
            Instant::now()
        }));
    }
    let mut other = client.clone();
    let other_stream = other
        .generate(named(greedy("m", "Hi", 4), "other"))
        .await
        .unwrap()
        .into_inner();
    let all_waiting = wait_for_status(&mut client, Duration::from_secs(10), |st| {
        st.models[0].active == 1 && st.models[0].queued == 20
    })
    .await;
    assert!(
        all_waiting.is_some(),
        "the holder runs and 20 wait: {:?}",
        status(&mut client).await.models[0]
    );
    // The holder's client leaves; its slot frees.
    drop(held_slot);
    let other_done = {
        collect(other_stream).await.unwrap();
        Instant::now()
    };
    let mut flood_done = Vec::new();
    for task in flood {
        flood_done.push(task.await.unwrap());
    }
    let before_other = flood_done.iter().filter(|&&t| t < other_done).count();
    // With one slot, the other client's request is admitted next, ahead of the flood's 19
    // (first-come order would run it last). A flood request finishes at the earliest a whole
    // prefill and 12 decode steps after the other's; one is tolerated in case this test's own
    // task stamps the other's end that late on a loaded machine.
    assert!(
        before_other <= 1,
        "{before_other} of the flood's 19 waiting requests finished before the other client's one"
    );

    // The bounded queue: more than slots + max-queue requests get RESOURCE_EXHAUSTED.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..30 {
        match client.generate(long_request("m", 200)).await {
            Ok(stream) => held.push(stream.into_inner()),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("the queue must fill");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("queue full"),
        "{}",
        refused.message()
    );
    assert!(
        held.len() >= 24 && held.len() <= 25,
        "{} accepted",
        held.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_frees_its_slot_within_a_second() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 512, 2).await;
    {
        let mut doomed = daemon.client().await;
        let mut stream = doomed
            .generate(greedy("m", "Write a very long essay about the sea.", 400))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().expect("first chunk");
        assert_eq!(status(&mut client).await.models[0].active, 1);
        // The client goes away mid-stream: stream and connection dropped.
    }
    let freed = wait_for_status(&mut client, Duration::from_secs(1), |st| {
        st.models[0].active == 0
    })
    .await;
    assert!(
        freed.is_some(),
        "slot still held after 1 s\n{}",
        daemon.log_text()
    );
    // The daemon keeps serving.
    let ok = generate(&mut client, greedy("m", "Hello", 3))
        .await
        .unwrap();
    assert_eq!(ok.token_ids.len(), 3);

    // A deadline is honoured between steps.
    let mut request = tonic::Request::new(greedy("m", "Write a very long essay.", 400));
    request.set_timeout(Duration::from_millis(300));
    let stream = client.generate(request).await.unwrap().into_inner();
    let err = collect(stream).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    let freed = wait_for_status(&mut client, Duration::from_secs(1), |st| {
        st.models[0].active == 0
    })
    .await;
    assert!(freed.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_the_daemon_keeps_serving() {
    let mut daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 64, 1).await;

    let expect = |result: Result<Generated, tonic::Status>, code: Code, words: &[&str]| {
        let err = result.expect_err("should fail");
        assert_eq!(err.code(), code, "{err:?}");
        for w in words {
            assert!(err.message().contains(w), "{:?} lacks {w:?}", err.message());
        }
    };
    // Unknown model.
    expect(
        generate(&mut client, greedy("nope", "Hi", 4)).await,
        Code::NotFound,
        &["nope", "m"],
    );
    // Missing file, unknown name, corrupt files.
    let missing = daemon.dir.path().join("missing.gguf");
    let err = load(
        &mut client,
        pb::LoadRequest {
            source: missing.display().to_string(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("missing.gguf"));
    let err = load(
        &mut client,
        pb::LoadRequest {
            source: "no-such-model".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("SmolLM2"),
        "lists what exists: {}",
        err.message()
    );
    let garbage = write_file(daemon.dir.path(), "garbage.gguf", b"not a model at all");
    let real = std::fs::read(model_path(SMOLLM2)).unwrap();
    let truncated = write_file(daemon.dir.path(), "truncated.gguf", &real[..real.len() / 3]);
    for path in [garbage, truncated] {
        let err = load(
            &mut client,
            pb::LoadRequest {
                source: path.display().to_string(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains(&path.display().to_string()),
            "{}",
            err.message()
        );
    }
    // A prompt longer than the context.
    let long = "word ".repeat(100);
    expect(
        generate(&mut client, greedy("m", &long, 4)).await,
        Code::InvalidArgument,
        &["context"],
    );
    // max_tokens of 0 and of 10^9.
    expect(
        generate(&mut client, greedy("m", "Hi", 0)).await,
        Code::InvalidArgument,
        &["max_tokens"],
    );
    expect(
        generate(&mut client, greedy("m", "Hi", 1_000_000_000)).await,
        Code::InvalidArgument,
        &["max_tokens", "context"],
    );
    // An empty prompt, invalid sampling values.
    expect(
        generate(&mut client, greedy("m", "", 4)).await,
        Code::InvalidArgument,
        &["empty"],
    );
    for (sampling, word) in [
        (
            pb::SamplingOptions {
                temperature: -0.5,
                ..Default::default()
            },
            "temperature",
        ),
        (
            pb::SamplingOptions {
                top_p: Some(1.5),
                ..Default::default()
            },
            "top_p",
        ),
        (
            pb::SamplingOptions {
                min_p: -1.0,
                ..Default::default()
            },
            "min_p",
        ),
    ] {
        let mut request = greedy("m", "Hi", 4);
        request.sampling = Some(sampling);
        expect(
            generate(&mut client, request).await,
            Code::InvalidArgument,
            &[word],
        );
    }
    // A wrong socket path.
    let wrong = daemon.dir.path().join("elsewhere.sock");
    let err = egpu_proto::connect(&wrong).await.unwrap_err();
    assert!(err.to_string().contains("elsewhere.sock") && err.to_string().contains("egpud"));

    // A generation that runs into the end of its context ends cleanly.
    let full = generate(&mut client, greedy("m", "Count: 1, 2, 3, 4,", 64))
        .await
        .unwrap();
    let done = full.done.unwrap();
    assert!(done.prompt_tokens + done.completion_tokens <= 65);

    // Still serving, still the same process.
    assert!(daemon.is_running());
    let ok = generate(&mut client, greedy("m", "Hello", 3))
        .await
        .unwrap();
    assert_eq!(ok.token_ids.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_ownership_and_shutdown() {
    let mut daemon = TestDaemon::start(&[]);
    // Mode 0600.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // A second egpud on the same socket refuses to start, and says why.
    let dir = tempfile::tempdir().unwrap();
    let err = TestDaemon::start_on(dir, daemon.socket.clone(), &[]).unwrap_err();
    assert!(err.contains("already serving"), "{err}");

    // gRPC health checking answers on the socket (reflection is checked by the Python client).
    let socket = daemon.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://egpud.local")
        .connect_with_connector(tower_service(socket))
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "egpu.v1.Egpu".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // SIGTERM mid-stream: the stream ends with UNAVAILABLE and egpud exits 0.
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 512, 1).await;
    let mut stream = client
        .generate(greedy("m", "Write a very long essay about mountains.", 400))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("first chunk");
    let started = Instant::now();
    let exit = daemon.terminate();
    let err = collect(stream).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!daemon.socket.exists(), "the socket is removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stale.sock");
    // A socket file nobody listens on, as a crash leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let daemon = TestDaemon::start_on(dir, socket, &[]).expect("starts over a stale socket");
    let mut client = daemon.client().await;
    assert!(status(&mut client).await.models.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_loads_of_one_model_coalesce() {
    let daemon = TestDaemon::start(&[]);
    let mut loads = Vec::new();
    for _ in 0..3 {
        let mut c = daemon.client().await;
        loads.push(tokio::spawn(async move {
            load_smollm2(&mut c, "m", 256, 1).await
        }));
    }
    for l in loads {
        assert_eq!(l.await.unwrap().name, "m");
    }
    let mut client = daemon.client().await;
    assert_eq!(resident_names(&mut client).await, ["m"]);
    let loading_lines = daemon.log_text().matches(" loading").count();
    assert_eq!(
        loading_lines,
        1,
        "one load for three requests\n{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_unloads_when_idle() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load(
        &mut client,
        pb::LoadRequest {
            source: model_path(SMOLLM2).display().to_string(),
            name: "brief".into(),
            context_length: 128,
            slots: 1,
            keep_alive_ms: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Not used yet: it stays, so the load was not for nothing.
    assert_eq!(resident_names(&mut client).await, ["brief"]);
    // Idle after a request: it goes.
    generate(&mut client, greedy("brief", "Hello", 2))
        .await
        .unwrap();
    let gone = wait_for_status(&mut client, Duration::from_secs(5), |st| {
        st.models.is_empty()
    })
    .await;
    assert!(gone.is_some(), "{}", daemon.log_text());
}

/// A connector that dials a Unix socket, for clients other than egpu's own.
fn tower_service(
    socket: std::path::PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_| {
        let socket = socket.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(socket).await?,
            ))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_refuses_a_busy_model_unless_forced() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 512, 1).await;
    let mut streaming = daemon.client().await;
    let mut stream = streaming
        .generate(greedy("m", "Write a very long essay about rivers.", 400))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("first chunk");

    let busy = client
        .unload(pb::UnloadRequest {
            name: "m".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");
    assert!(busy.message().contains("busy") && busy.message().contains("force"));
    assert_eq!(resident_names(&mut client).await, ["m"]);

    let forced = client
        .unload(pb::UnloadRequest {
            name: "m".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forced.aborted_requests, 1);
    let err = collect(stream).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("unloaded"));
    assert!(resident_names(&mut client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_reproduce_and_stop_strings_cut() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 512, 2).await;
    let sampled = |seed: u64| {
        let mut request = greedy("m", "Once upon a time", 24);
        request.sampling = Some(pb::SamplingOptions {
            temperature: 0.9,
            top_k: 40,
            top_p: Some(0.95),
            seed: Some(seed),
            ..Default::default()
        });
        request
    };
    let a = generate(&mut client, sampled(7)).await.unwrap();
    let b = generate(&mut client, sampled(7)).await.unwrap();
    let c = generate(&mut client, sampled(8)).await.unwrap();
    assert_eq!(a.token_ids, b.token_ids, "same seed, same tokens");
    assert_ne!(a.token_ids, c.token_ids, "another seed, other tokens");

    // A stop string taken from the greedy text: the output ends just before it.
    let full = generate(&mut client, greedy("m", "The capital of France is", 24))
        .await
        .unwrap();
    let words: Vec<&str> = full.text.split_whitespace().collect();
    assert!(words.len() > 4, "{:?}", full.text);
    let stop = words[3];
    let at = full.text.find(stop).unwrap();
    let mut request = greedy("m", "The capital of France is", 24);
    request.stop = vec![stop.to_owned()];
    let cut = generate(&mut client, request).await.unwrap();
    assert_eq!(cut.text, full.text[..at], "stop {stop:?}");
    assert_eq!(
        cut.done.unwrap().finish_reason,
        pb::FinishReason::StopString as i32
    );
}

/// A folder uid 65534 can read, holding grpcio (copied from `.pydeps`) and, if asked, the
/// Python client: the checkout itself may sit in a folder only its owner can enter (a
/// `mktemp -d` clone is 0700).
fn readable_by_everyone(with_client: bool) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    // grpc and what importing it needs.
    let status = std::process::Command::new("cp")
        .arg("-R")
        .arg(pydeps().join("grpc"))
        .arg(pydeps().join("typing_extensions.py"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    if with_client {
        let client = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../clients/python/egpu_client.py");
        std::fs::copy(client, dir.path().join("egpu_client.py")).unwrap();
    }
    let status = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_uid_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    if !rustix::process::getuid().is_root() {
        // Running a client as another user needs root (CI runs as root).
        eprintln!("note: not root, so no client can run as another uid here");
        return;
    }
    let daemon = TestDaemon::start(&[]);
    // Open the way to the socket for everyone, as a misconfigured system might: the uid
    // check must still refuse.
    let perms = |mode| std::fs::Permissions::from_mode(mode);
    std::fs::set_permissions(daemon.dir.path(), perms(0o755)).unwrap();
    std::fs::set_permissions(&daemon.socket, perms(0o666)).unwrap();
    // egpuctl would refuse a socket owned by another user before sending anything (see the
    // next test); a bare gRPC call shows what egpud itself answers.
    let call = "import grpc, sys\n\
                ch = grpc.insecure_channel('unix:' + sys.argv[1], options=[('grpc.default_authority', 'localhost')])\n\
                status = ch.unary_unary('/egpu.v1.Egpu/Status', request_serializer=lambda m: m, response_deserializer=lambda b: b)\n\
                try:\n\
                \x20   status(b'', timeout=10)\n\
                \x20   print('SERVED')\n\
                except grpc.RpcError as e:\n\
                \x20   print(e.code().name, e.details())\n";
    let readable = readable_by_everyone(false);
    let out = std::process::Command::new("python3")
        .args(["-c", call])
        .arg(&daemon.socket)
        .env("PYTHONPATH", readable.path())
        .current_dir(readable.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PERMISSION_DENIED") && text.contains("65534"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_refuse_a_socket_that_another_user_owns() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    if !rustix::process::getuid().is_root() {
        eprintln!("note: not root, so no client can run as another uid here");
        return;
    }
    // root's egpud, reachable by everyone: a squatter's socket, as uid 65534 sees it.
    let daemon = TestDaemon::start(&[]);
    let perms = |mode| std::fs::Permissions::from_mode(mode);
    std::fs::set_permissions(daemon.dir.path(), perms(0o755)).unwrap();
    std::fs::set_permissions(&daemon.socket, perms(0o666)).unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), perms(0o755)).unwrap();
    let egpuctl = bin_dir.path().join("egpuctl");
    std::fs::copy(binary("egpuctl"), &egpuctl).unwrap();
    std::fs::set_permissions(&egpuctl, perms(0o755)).unwrap();
    let out = std::process::Command::new(&egpuctl)
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("belongs to uid 0"), "{err}");
    // The Python client checks the same.
    let readable = readable_by_everyone(true);
    let out = std::process::Command::new("python3")
        .arg(readable.path().join("egpu_client.py"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("hello")
        .env("PYTHONPATH", readable.path())
        .current_dir(readable.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("belongs to uid 0"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_is_prefilled_in_chunks_beside_decoding_streams() {
    let daemon = TestDaemon::start(&["--batch-tokens", "64"]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 1024, 2).await;

    // Stream A decodes (past any end-of-text token); its chunks are timestamped as they arrive.
    let mut a_client = daemon.client().await;
    let mut a_request = greedy("m", "Write a very long story about the sea.", 300);
    a_request.stop_at_eos = Some(false);
    let mut a = a_client.generate(a_request).await.unwrap().into_inner();
    a.message().await.unwrap().expect("A's first chunk");
    let a_times = tokio::spawn(async move {
        let mut times = Vec::new();
        while let Some(event) = a.message().await.unwrap() {
            if matches!(event.event, Some(pb::generate_event::Event::Chunk(_))) {
                times.push(Instant::now());
            }
        }
        times
    });

    // B's prompt needs about ten passes of 64 tokens.
    let long = "The river flows to the sea and the sea returns as rain. ".repeat(48);
    let b_sent = Instant::now();
    let mut b = client
        .generate(greedy("m", &long, 1))
        .await
        .unwrap()
        .into_inner();
    b.message().await.unwrap().expect("B's token");
    let b_first = Instant::now();
    let b_prompt = collect(b).await.unwrap().done.unwrap().prompt_tokens;
    assert!(b_prompt > 500, "{b_prompt} prompt tokens");

    let a_times = a_times.await.unwrap();
    let during = a_times
        .iter()
        .filter(|&&t| t > b_sent && t < b_first)
        .count();
    // One pass per step: while B's prompt went through in chunks, A kept getting a token per
    // pass. A single 500-token pass would have let A through at most once.
    assert!(
        during >= 5,
        "A got {during} tokens while B's {b_prompt}-token prompt was prefilled"
    );
}

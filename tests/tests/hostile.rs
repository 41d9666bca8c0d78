//! Hostile input against a real egpud: files and requests that used to take memory or time
//! without bound get a clear error at once, and egpud keeps answering.

use std::time::{Duration, Instant};

use egpu_e2e::v1 as pb;
use egpu_e2e::*;
use egpu_engine::gguf::write::GgufWriter;
use egpu_engine::gguf::MetaValue;
use tonic::Code;

/// A request, timed: hostile input must be refused before it costs anything.
async fn quickly<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = call.await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{what} took {:?}",
        started.elapsed()
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_text_is_refused_before_it_is_tokenized() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 2048, 2).await;
    // 20 MiB of text: the gRPC message limit lets it in; the byte limit (32 per token of
    // context: 64 KiB here) stops it before a tokenizer would spend seconds and gigabytes.
    let huge = "word ".repeat(4 << 20);
    let err = quickly("generate", generate(&mut client, greedy("m", &huge, 4)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("bytes"), "{}", err.message());
    let err = quickly(
        "score",
        client.score(pb::ScoreRequest {
            model: "m".into(),
            text: huge.clone(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = quickly(
        "tokenize",
        client.tokenize(pb::TokenizeRequest {
            model: "m".into(),
            text: huge,
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Just under the limit is served.
    let fine = "word ".repeat(10_000);
    let tokens = client
        .tokenize(pb::TokenizeRequest {
            model: "m".into(),
            text: fine,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tokens.token_ids.len() >= 10_000);
    assert!(status(&mut client).await.models[0].name == "m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_are_bounded_in_count_and_length() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 256, 1).await;
    let mut many = greedy("m", "Hello", 4);
    many.stop = (0..17).map(|i| format!("stop{i}")).collect();
    let err = generate(&mut client, many).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 16"), "{}", err.message());
    let mut long = greedy("m", "Hello", 4);
    long.stop = vec!["x".repeat(257)];
    let err = generate(&mut client, long).await.unwrap_err();
    assert!(err.message().contains("at most 256"), "{}", err.message());
    let mut fine = greedy("m", "Hello", 4);
    fine.stop = (0..16).map(|i| format!("{i}").repeat(16)).collect();
    assert!(generate(&mut client, fine).await.unwrap().done.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_claiming_two_to_the_sixty_layers_is_a_load_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = GgufWriter::new()
        .kv("general.architecture", MetaValue::String("llama".into()))
        .kv("llama.block_count", MetaValue::U64(1 << 60))
        .kv("llama.embedding_length", MetaValue::U32(8))
        .kv("llama.context_length", MetaValue::U32(64))
        .kv("llama.feed_forward_length", MetaValue::U32(16))
        .kv("llama.attention.head_count", MetaValue::U32(2))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        )
        .kv("tokenizer.ggml.model", MetaValue::String("llama".into()))
        .tensor_f32("token_embd.weight", &[8, 4], &[0.0; 32])
        .to_bytes();
    let path = write_file(dir.path(), "hostile.gguf", &bytes);
    // A budget large enough that the estimate does not refuse it first.
    let daemon = TestDaemon::start(&["--memory-budget", "1TB"]);
    let mut client = daemon.client().await;
    let err = load(
        &mut client,
        pb::LoadRequest {
            source: path.display().to_string(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "{err:?}"
    );
    // Still serving.
    load_smollm2(&mut client, "m", 256, 1).await;
    assert!(generate(&mut client, greedy("m", "Hi", 2))
        .await
        .unwrap()
        .done
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_egpud_on_the_same_state_folder_is_refused_whatever_its_socket() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let first = TestDaemon::start_with_state(&root.path().join("a.sock"), &state, &[]).unwrap();
    let Err(log) = TestDaemon::start_with_state(&root.path().join("b.sock"), &state, &[]) else {
        panic!("a second egpud on one state folder must not start");
    };
    assert!(log.contains("state folder"), "{log}");
    assert!(
        log.contains(&first.pid().to_string()),
        "names the holder: {log}"
    );
    // The first one serves on, and its state is its own.
    let mut client = first.client().await;
    assert!(status(&mut client).await.models.is_empty());
    // Once it is gone the lock goes with it, even after kill -9.
    let mut first = first;
    first.kill_9();
    let again = TestDaemon::start_with_state(&root.path().join("b.sock"), &state, &[]);
    assert!(again.is_ok(), "{:?}", again.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egpuds_racing_for_one_stale_socket_leave_exactly_one_serving() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("egpud.sock");
    // A stale socket file, as a crash leaves it: nobody listens.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let starts: Vec<_> = (0..4)
        .map(|i| {
            let socket = socket.clone();
            let state = root.path().join(format!("state-{i}"));
            std::thread::spawn(move || TestDaemon::start_with_state(&socket, &state, &[]))
        })
        .collect();
    let results: Vec<_> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    let serving: Vec<&TestDaemon> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        serving.len(),
        1,
        "{:?}",
        results.iter().map(|r| r.as_ref().err()).collect::<Vec<_>>()
    );
    let mut client = serving[0].client().await;
    assert!(status(&mut client).await.models.is_empty());
}

/// User plus system CPU seconds a process has used (Linux).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) end the line; utime and stime are
    // the 14th and 15th fields, in clock ticks (100 per second on Linux).
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_egpud_pauses_instead_of_spinning_and_serves_again() {
    if !cfg!(target_os = "linux") {
        return;
    }
    let daemon = TestDaemon::start_with_open_files_limit(64, &[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "m", 256, 1).await;
    // More connections than descriptors: accepts fail with EMFILE on both sockets.
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap());
        held.push(std::os::unix::net::UnixStream::connect(daemon.http_socket()).unwrap());
    }
    assert!(
        daemon.wait_for_log("failed", 1, Duration::from_secs(10)),
        "egpud never ran out: {}",
        daemon.log_text()
    );
    // While the descriptors are gone, egpud pauses between accepts (tonic's own loop retried
    // at once and spun a core). The one-second window is the measurement, not a wait.
    let before = cpu_seconds(daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_seconds(daemon.pid()) - before;
    assert!(
        used < 0.5,
        "egpud used {used:.2} s of CPU in 1 s while out of descriptors"
    );
    // Once they come back, egpud serves, the already-connected client included.
    drop(held);
    let done = generate(&mut client, greedy("m", "Hi", 2)).await.unwrap();
    assert!(done.done.is_some());
    let started = Instant::now();
    loop {
        // Polled: the listener takes the freed descriptors at its next accept.
        if let Ok(mut fresh) = egpu_proto::connect(&daemon.socket).await {
            if fresh.status(pb::StatusRequest {}).await.is_ok() {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A chat request to `model` with one user message.
fn chat(model: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
                ..Default::default()
            }],
        })),
        max_tokens: Some(2),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_chat_templates_fail_their_request_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_fixture("tiny-llama31.gguf");
    // Each template below, rendered inside egpud, aborted it (the doubling string: an
    // allocation failure is an abort) or held a thread for hours (a 100 MB copy per loop
    // step, inside the instruction fuel). Now each costs one renderer process.
    let hostile = [
        (
            "doubling",
            "{% set ns = namespace(a='x') %}{% for i in range(64) %}\
             {% set ns.a = ns.a ~ ns.a %}{% endfor %}{{ ns.a | length }}",
            "more than the 512 MiB",
        ),
        (
            "slow",
            "{% set a = 'x' * 100000000 %}{% for i in range(100000) %}\
             {% if (a ~ i) | length == 0 %}{% endif %}{% endfor %}",
            "deadline",
        ),
        (
            "recursive",
            "{% macro down(n) %}{{ down(n + 1) }}{% endmacro %}{{ down(0) }}",
            "recursion",
        ),
        (
            "flood",
            "{% set a = 'x' * 1000000 %}{% for i in range(100000) %}{{ a }}{% endfor %}",
            "output passed",
        ),
    ];
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "good", 256, 1).await;
    for (name, template, why) in hostile {
        let path = with_chat_template(&tiny, template, &dir.path().join(format!("{name}.gguf")));
        load(
            &mut client,
            pb::LoadRequest {
                source: path.display().to_string(),
                name: name.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // The hostile render runs while Status and another model keep answering.
        let mut other = daemon.client().await;
        let render = tokio::spawn(async move { generate(&mut other, chat(name)).await });
        let started = Instant::now();
        status(&mut client).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{name}: Status took {:?} during the render",
            started.elapsed()
        );
        let err = render.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(why), "{name}: {}", err.message());
        // The same model still serves a raw prompt, and the other model its chats.
        assert!(generate(&mut client, greedy(name, "Hi", 2))
            .await
            .unwrap()
            .done
            .is_some());
        assert!(generate(&mut client, chat("good"))
            .await
            .unwrap()
            .done
            .is_some());
    }
    assert!(daemon.log_count("panicked") == 0, "{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_written_in_place_while_loaded_is_unloaded_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    // SmolLM2: slow enough (hundreds of tokens a second) to be mid-stream when the file goes.
    let original = std::fs::read(model_path(SMOLLM2)).unwrap();
    let plain = write_file(dir.path(), "plain.gguf", &original);
    let pinned = write_file(dir.path(), "pinned.gguf", &original);
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    for (name, path, pin) in [("plain", &plain, false), ("pinned", &pinned, true)] {
        load(
            &mut client,
            pb::LoadRequest {
                source: path.display().to_string(),
                name: name.into(),
                context_length: 1024,
                slots: 1,
                pin,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let mut streaming = daemon.client().await;
    let long = pb::GenerateRequest {
        stop_at_eos: Some(false),
        ..greedy("plain", "abc", 900)
    };
    let running = tokio::spawn(async move { generate(&mut streaming, long).await });
    // What `cp new.gguf plain.gguf` does: truncate the loaded file, then write (here only
    // half of it, as if caught mid-copy). Reads of the lost pages used to raise SIGBUS.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&plain)
        .unwrap();
    std::io::Write::write_all(&mut &file, &original[..original.len() / 2]).unwrap();
    drop(file);
    let err = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the stream did not end")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(
        err.message().contains("written in place"),
        "{}",
        err.message()
    );
    // egpud is alive, and the model is gone rather than serving garbage.
    let names = resident_names(&mut client).await;
    assert!(!names.contains(&"plain".to_owned()), "{names:?}");

    // A pinned model's file rewritten in place is loaded again from the new bytes.
    std::fs::write(&pinned, &original).unwrap();
    assert!(
        daemon.wait_for_log(
            "model file changed while loaded",
            2,
            Duration::from_secs(10)
        ),
        "{}",
        daemon.log_text()
    );
    let started = Instant::now();
    loop {
        let st = status(&mut client).await;
        if st
            .models
            .iter()
            .any(|m| m.name == "pinned" && m.state == pb::ModelState::Ready as i32)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(generate(&mut client, greedy("pinned", "abc", 3))
        .await
        .unwrap()
        .done
        .is_some());
}

//! Pinned models survive a crash of egpud: the state file in --state-dir, reloaded in the
//! background on start; a damaged state file never stops egpud.

use std::path::Path;
use std::time::{Duration, Instant};

use egpu_e2e::v1::{self as pb};
use egpu_e2e::*;
use serde_json::Value;

type Client = egpu_proto::v1::egpu_client::EgpuClient<tonic::transport::Channel>;

async fn load_pinned(client: &mut Client, name: &str) -> pb::ModelInfo {
    load(
        client,
        pb::LoadRequest {
            source: model_path(SMOLLM2).display().to_string(),
            name: name.into(),
            context_length: 256,
            slots: 1,
            pin: true,
            ..Default::default()
        },
    )
    .await
    .expect("loading SmolLM2 pinned")
}

fn state_json(state_dir: &Path) -> Value {
    let text = std::fs::read_to_string(state_dir.join("state.json")).expect("state.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("state.json: {e}: {text}"))
}

fn state_names(state: &Value) -> Vec<String> {
    state["models"]
        .as_array()
        .expect("models array")
        .iter()
        .map(|m| m["name"].as_str().expect("name").to_owned())
        .collect()
}

/// The state folder's files, but for the HTTP API key and the lock egpud keeps there too.
fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("reading a folder")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != egpu_proto::API_KEY_FILE && n != "egpud.lock")
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_models_come_back_after_kill_9() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("egpud.sock");
    let state_dir = root.path().join("state");

    let mut first = TestDaemon::start_with_state(&socket, &state_dir, &[]).expect("egpud starts");
    let mut client = first.client().await;
    load_pinned(&mut client, "alpha").await;
    load_pinned(&mut client, "beta").await;
    // Neither an unpinned model nor a pinned one that was unloaded is persisted.
    load_smollm2(&mut client, "loose", 256, 1).await;
    load_pinned(&mut client, "gone").await;
    client
        .unload(pb::UnloadRequest {
            name: "gone".into(),
            force: false,
        })
        .await
        .expect("unloading a pinned model");
    let state = state_json(&state_dir);
    assert_eq!(state["version"], 1);
    assert_eq!(state_names(&state), ["alpha", "beta"]);
    let alpha = &state["models"][0];
    assert_eq!(alpha["source"], model_path(SMOLLM2).display().to_string());
    assert_eq!(
        (alpha["context_length"].as_u64(), alpha["slots"].as_u64()),
        (Some(256), Some(1))
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&state_dir).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);

    let prompt = "The capital of France is";
    let before = generate(&mut client, greedy("beta", prompt, 8))
        .await
        .unwrap();
    drop(client);
    first.kill_9();
    assert!(socket.exists(), "a killed egpud leaves its socket behind");

    let restarted = Instant::now();
    let second = TestDaemon::start_with_state(&socket, &state_dir, &[]).expect("egpud restarts");
    let mut client = second.client().await;
    let first_status = status(&mut client).await;
    let answered = restarted.elapsed();
    let mut seen_states = Vec::new();
    let ready = loop {
        let st = status(&mut client).await;
        let models: Vec<(String, i32)> = st
            .models
            .iter()
            .map(|m| (m.name.clone(), m.state))
            .collect();
        for m in &st.models {
            assert!(m.pinned, "{} came back unpinned", m.name);
        }
        if seen_states.last() != Some(&models) {
            seen_states.push(models.clone());
        }
        let mut names: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        if names == ["alpha", "beta"]
            && models
                .iter()
                .all(|(_, s)| *s == pb::ModelState::Ready as i32)
        {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "pinned models not ready 5 s after the restart; states seen: {seen_states:?}\n{}",
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let after = generate(&mut client, greedy("beta", prompt, 8))
        .await
        .unwrap();
    let total = restarted.elapsed();
    assert_eq!(
        after.token_ids, before.token_ids,
        "same greedy tokens after the restart"
    );
    assert!(
        total < Duration::from_secs(5),
        "restart to first generation took {total:?}"
    );
    // Every state observed was "loading" or "ready"; "loose" never came back.
    for snapshot in &seen_states {
        for (name, state) in snapshot {
            assert!(name == "alpha" || name == "beta", "{name} came back");
            assert!(
                *state == pb::ModelState::Loading as i32 || *state == pb::ModelState::Ready as i32,
                "{name} in state {state}"
            );
        }
    }
    eprintln!(
        "restart: first Status after {answered:?} ({} models listed), both pinned models ready \
         after {ready:?}, greedy generation done after {total:?}; states seen: {seen_states:?}",
        first_status.models.len()
    );
    assert!(second.log_text().contains("reloading pinned models"));
    assert_eq!(state_names(&state_json(&state_dir)), ["alpha", "beta"]);
}

/// Polls egpud's log until it contains `needle`, for at most 10 s.
fn wait_for_log(daemon: &TestDaemon, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let log = daemon.log_text();
        if log.contains(needle) {
            return log;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "egpud's log never mentioned {needle:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_state_file_is_moved_aside() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("egpud.sock");
    let state_dir = root.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    // A valid file cut short, as if a write had been interrupted half-way.
    let full = serde_json::json!({
        "version": 1,
        "models": [{
            "name": "alpha",
            "source": model_path(SMOLLM2).display().to_string(),
            "context_length": 256,
            "slots": 1,
            "keep_alive_ms": -1,
            "backend": "cpu",
        }],
    })
    .to_string();
    std::fs::write(state_dir.join("state.json"), &full[..full.len() / 2]).unwrap();

    let daemon = TestDaemon::start_with_state(&socket, &state_dir, &[]).expect("egpud starts");
    let mut client = daemon.client().await;
    assert!(status(&mut client).await.models.is_empty());
    let log = wait_for_log(&daemon, "state.json");
    assert!(log.contains("corrupt"), "{log}");
    let names = dir_names(&state_dir);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("state.json.corrupt-"), "{names:?}");

    // egpud works on, and the next pin writes a fresh file.
    load_pinned(&mut client, "beta").await;
    assert_eq!(state_names(&state_json(&state_dir)), ["beta"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_model_whose_file_is_missing_waits_and_loads_once_it_is_back() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("egpud.sock");
    let state_dir = root.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    // A disk not mounted yet, a file being replaced: the pins must survive it.
    let later = root.path().join("later.gguf");
    let never = root.path().join("never.gguf");
    let pin = |name: &str, source: &Path| {
        serde_json::json!({"name": name, "source": source.display().to_string(),
            "context_length": 256, "slots": 1, "keep_alive_ms": -1, "backend": "cpu"})
    };
    let state = serde_json::json!({
        "version": 1,
        "models": [pin("later", &later), pin("never", &never), pin("alpha", &model_path(SMOLLM2))],
    });
    std::fs::write(state_dir.join("state.json"), state.to_string()).unwrap();

    let daemon = TestDaemon::start_with_state(&socket, &state_dir, &[]).expect("egpud starts");
    let mut client = daemon.client().await;
    wait_for_log(&daemon, "it stays pinned and egpud retries it");
    let state_of = |st: &pb::StatusResponse, name: &str| {
        st.models
            .iter()
            .find(|m| m.name == name)
            .map(|m| (m.state, m.detail.clone()))
    };
    let st = status(&mut client).await;
    let (state, detail) = state_of(&st, "later").expect("later listed");
    assert_eq!(state, pb::ModelState::Waiting as i32);
    assert!(detail.contains("later.gguf"), "{detail}");
    // Requests name the wait, not an unknown model.
    let err = generate(&mut client, greedy("later", "Hi", 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("not loaded yet"),
        "{}",
        err.message()
    );
    // Still in the state file.
    let pinned = || {
        let mut names = state_names(&state_json(&state_dir));
        names.sort();
        names
    };
    assert_eq!(pinned(), ["alpha", "later", "never"]);

    // The file comes back: the next retry (1 s, 2 s, 4 s after the first failure) loads it.
    std::fs::copy(tiny_fixture("tiny-llama31.gguf"), &later).unwrap();
    let start = Instant::now();
    while state_of(&status(&mut client).await, "later").map(|s| s.0)
        != Some(pb::ModelState::Ready as i32)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(generate(&mut client, greedy("later", "Hi", 2))
        .await
        .unwrap()
        .done
        .is_some());

    // Unloading a waiting pin gives it up: gone from Status and from the state file.
    client
        .unload(pb::UnloadRequest {
            name: "never".into(),
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(state_of(&status(&mut client).await, "never"), None);
    assert_eq!(pinned(), ["alpha", "later"]);
}

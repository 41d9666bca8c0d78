//! Marian (opus-mt) translation through egpud: the tiny random MarianMT folder of
//! `engine/tests/fixtures/hf/tiny-marian` (source.spm, target.spm, vocab.json, safetensors) loaded
//! by path, translated with the Translate RPC and with `egpuctl translate`, against transformers'
//! greedy and beam-search outputs for the same folder (`scripts/gen_tiny_marian.py`).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use egpu_e2e::v1 as pb;
use egpu_e2e::{binary, load, status, TestDaemon};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/fixtures/hf")
        .join(name)
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny-marian.ref.json")).unwrap())
        .unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// transformers' output row: without the start token, cut after `</s>` (id 0).
fn generated(row: &Value) -> Vec<u32> {
    let mut out = Vec::new();
    for id in row.as_array().unwrap().iter().skip(1) {
        let id = id.as_u64().unwrap() as u32;
        out.push(id);
        if id == 0 {
            break;
        }
    }
    out
}

fn load_request(source: PathBuf, name: &str, quantize: &str) -> pb::LoadRequest {
    pb::LoadRequest {
        source: source.display().to_string(),
        name: name.into(),
        quantize: quantize.into(),
        ..Default::default()
    }
}

fn translate_request(model: &str, texts: &[String], beams: u32) -> pb::TranslateRequest {
    pb::TranslateRequest {
        model: model.into(),
        texts: texts.to_vec(),
        num_beams: beams,
        max_tokens: 0,
    }
}

#[tokio::test]
async fn marian_folder_translates_like_transformers_greedy_and_beam() {
    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &[], &[]);
    let mut client = daemon.client().await;
    let info = load(&mut client, load_request(fixture("tiny-marian"), "", ""))
        .await
        .unwrap();
    assert_eq!(info.name, "tiny-marian");
    assert_eq!(info.architecture, "marian");
    assert!(info.bytes_estimated > 0);

    let reference = reference();
    for (kind, beams) in [("beam", 0), ("greedy", 1)] {
        let r = &reference[kind];
        let sources = strings(&r["sources"]);
        let response = client
            .translate(translate_request("tiny-marian", &sources, beams))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.translations.len(), sources.len());
        assert_eq!(
            response.num_beams as u64,
            r["num_beams"].as_u64().unwrap(),
            "{kind}: generation_config.json's beams are the default"
        );
        let texts = strings(&r["text"]);
        for ((t, want), text) in response
            .translations
            .iter()
            .zip(r["ids"].as_array().unwrap())
            .zip(&texts)
        {
            assert_eq!(t.token_ids, generated(want), "{kind}");
            assert_eq!(&t.text, text, "{kind}");
        }
    }
    let st = status(&mut client).await;
    let model = st.models.iter().find(|m| m.name == "tiny-marian").unwrap();
    assert_eq!(model.requests_served, 2);
}

#[tokio::test]
async fn wrong_requests_are_refused_and_egpud_keeps_serving() {
    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &[], &[]);
    let mut client = daemon.client().await;
    load(&mut client, load_request(fixture("tiny-marian"), "mt", ""))
        .await
        .unwrap();
    load(&mut client, load_request(fixture("tiny-gpt2"), "", ""))
        .await
        .unwrap();
    let one = vec!["Où est la bibliothèque ?".to_owned()];

    // Generation from a translation model, translation with a text model.
    let err = client
        .generate(pb::GenerateRequest {
            model: "mt".into(),
            input: Some(pb::generate_request::Input::Prompt("hello".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("translation model"),
        "{}",
        err.message()
    );
    let err = client
        .translate(translate_request("tiny-gpt2", &one, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("not a translation model"),
        "{}",
        err.message()
    );
    let err = client
        .translate(translate_request("no-such-model", &one, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = client
        .translate(translate_request("mt", &[], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = client
        .translate(translate_request("mt", &one, 99))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Longer than the model's positions (64 in the fixture).
    let long = vec!["word ".repeat(200)];
    let err = client
        .translate(translate_request("mt", &long, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = load(
        &mut client,
        load_request(fixture("tiny-marian"), "q", "q4_k"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Still serving, and a capped length is honoured (end token forced within it).
    let ok = client
        .translate(pb::TranslateRequest {
            model: "mt".into(),
            texts: one,
            num_beams: 2,
            max_tokens: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.translations[0].token_ids.len() <= 3, "{ok:?}");
}

#[tokio::test]
async fn q8_0_conversion_is_smaller_and_still_translates() {
    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &[], &[]);
    let mut client = daemon.client().await;
    let f32_info = load(&mut client, load_request(fixture("tiny-marian"), "f32", ""))
        .await
        .unwrap();
    let q8_info = load(
        &mut client,
        load_request(fixture("tiny-marian"), "q8", "q8_0"),
    )
    .await
    .unwrap();
    assert!(
        q8_info.quant_mix.iter().any(|q| q.r#type == "Q8_0"),
        "{q8_info:?}"
    );
    let weights = |info: &pb::ModelInfo| info.quant_mix.iter().map(|q| q.bytes).sum::<u64>();
    assert!(
        weights(&q8_info) * 2 < weights(&f32_info),
        "q8_0 {} vs f32 {}",
        weights(&q8_info),
        weights(&f32_info)
    );
    let texts = strings(&reference()["beam"]["sources"]);
    let response = client
        .translate(translate_request("q8", &texts, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.translations.len(), texts.len());
    assert!(response
        .translations
        .iter()
        .all(|t| !t.token_ids.is_empty()));
}

#[tokio::test]
async fn egpuctl_translate_reads_arguments_or_stdin_lines() {
    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &[], &[]);
    let mut client = daemon.client().await;
    load(&mut client, load_request(fixture("tiny-marian"), "mt", ""))
        .await
        .unwrap();
    let reference = reference();
    let sources = strings(&reference["beam"]["sources"]);
    let expected = strings(&reference["beam"]["text"]);
    let egpuctl = |args: &[&str]| {
        let mut cmd = Command::new(binary("egpuctl"));
        cmd.arg("--socket").arg(&daemon.socket).args(args);
        cmd.env_remove("EGPU_SOCKET").env("NO_COLOR", "1");
        cmd
    };

    let mut args = vec!["translate", "mt"];
    args.extend(sources.iter().map(String::as_str));
    let out = egpuctl(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines, expected);

    // From stdin: one sentence per line, a blank line kept in place.
    let mut child = egpuctl(&["translate", "mt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("{}\n\n{}\n", sources[0], sources[1]);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n\n{}\n", expected[0], expected[1])
    );
}

/// A job big enough to cut short: the reference's sources repeated to `texts` texts.
fn big_translation(model: &str, texts: usize, num_beams: u32) -> pb::TranslateRequest {
    let sources = strings(&reference()["beam"]["sources"]);
    pb::TranslateRequest {
        model: model.into(),
        texts: sources.iter().cycle().take(texts).cloned().collect(),
        num_beams,
        max_tokens: 60,
    }
}

/// A translation whose deadline passes is abandoned between decoder steps, not finished in
/// the background: the next request does not wait for it, and egpud keeps serving.
#[tokio::test]
async fn a_translation_past_its_deadline_is_abandoned() {
    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &[], &[]);
    let mut client = daemon.client().await;
    load(&mut client, load_request(fixture("tiny-marian"), "mt", ""))
        .await
        .unwrap();
    let big_request = || big_translation("mt", 64, 8);
    // How long the whole job takes here.
    let full = client
        .translate(big_request())
        .await
        .unwrap()
        .into_inner()
        .translate_ms;
    assert!(full > 50.0, "the job is too small to cut short: {full} ms");

    let started = std::time::Instant::now();
    let mut request = tonic::Request::new(big_request());
    request.set_timeout(std::time::Duration::from_secs_f64(full / 1e3 / 10.0));
    let err = client.translate(request).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    let sources = strings(&reference()["beam"]["sources"]);
    let small = client
        .translate(translate_request("mt", &sources[..1], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(small.translations.len(), 1);
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    assert!(
        elapsed < full * 0.6,
        "the abandoned job held the model: {elapsed:.0} ms of a {full:.0} ms job"
    );
    let st = status(&mut client).await;
    let model = st.models.iter().find(|m| m.name == "mt").unwrap();
    assert_eq!(model.requests_served, 2, "{model:?}");
    assert_eq!(model.active, 0);
}

/// An Unload with force ends a running translation at its next decoder step with ABORTED,
/// rather than letting it run to its end first (it used to check only its client and deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_unload_ends_a_running_translation_at_once() {
    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &[], &[]);
    let mut client = daemon.client().await;
    load(&mut client, load_request(fixture("tiny-marian"), "mt", ""))
        .await
        .unwrap();
    let big_request = || big_translation("mt", 256, 16);
    let full = client
        .translate(big_request())
        .await
        .unwrap()
        .into_inner()
        .translate_ms;
    assert!(full > 200.0, "the job is too small to cut short: {full} ms");

    let mut running = daemon.client().await;
    let request = big_request();
    let job = tokio::spawn(async move { running.translate(request).await });
    // Polled until the job holds the model (then Unload has something to end).
    while status(&mut client).await.models[0].active == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let unloaded_at = std::time::Instant::now();
    let unloaded = client
        .unload(pb::UnloadRequest {
            name: "mt".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unloaded.aborted_requests, 1);
    let err = job.await.unwrap().unwrap_err();
    let took = unloaded_at.elapsed();
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(
        took.as_secs_f64() * 1e3 < (full * 0.5).min(1000.0),
        "the translation ran on for {took:?} of a {full:.0} ms job"
    );
}

/// A request far past the working memory the model reserved at load (its `slots` sentences at
/// its own settings) runs in passes that fit it, with the same results as one sentence at a
/// time; a single sentence that needs more than the budget has free is refused up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translation_memory_stays_inside_the_reservation_and_the_budget() {
    let sources = strings(&reference()["beam"]["sources"]);
    let texts: Vec<String> = sources.iter().cycle().take(12).cloned().collect();
    let one_slot = || pb::LoadRequest {
        slots: 1,
        ..load_request(fixture("tiny-marian"), "mt", "")
    };
    let request = |texts: &[String], beams: u32, max_tokens: u32| pb::TranslateRequest {
        max_tokens,
        ..translate_request("mt", texts, beams)
    };

    let models = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_models(models.path(), &[], &[]);
    let mut client = daemon.client().await;
    let info = load(&mut client, one_slot()).await.unwrap();
    let reserved = info.bytes_estimated;
    let together = client
        .translate(request(&texts, 16, 20))
        .await
        .unwrap()
        .into_inner();
    assert!(
        daemon.wait_for_log(
            "translating in passes",
            1,
            std::time::Duration::from_secs(5)
        ),
        "{}",
        daemon.log_text()
    );
    for (text, got) in texts.iter().zip(&together.translations) {
        let alone = client
            .translate(request(std::slice::from_ref(text), 16, 20))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(alone.translations[0].token_ids, got.token_ids, "{text}");
        assert_eq!(alone.translations[0].score, got.score, "{text}");
    }
    // The borrowed working memory went back once the job ended.
    let after = status(&mut client).await.models[0].clone();
    assert!(after.bytes <= reserved, "{} > {reserved}", after.bytes);
    drop(daemon);

    // A budget with the model's reservation and barely more: 16 beams to the longest output
    // need more than the model reserved and more than is free.
    let budget = (reserved + 1000).to_string();
    let daemon = TestDaemon::start_with_models(models.path(), &["--memory-budget", &budget], &[]);
    let mut client = daemon.client().await;
    load(&mut client, one_slot()).await.unwrap();
    let err = client
        .translate(request(&texts[..1], 16, 60))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("working memory"),
        "{}",
        err.message()
    );
    // The model's own settings still translate, many sentences at once.
    let fine = client
        .translate(translate_request("mt", &texts, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fine.translations.len(), texts.len());
}

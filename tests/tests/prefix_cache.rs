//! Prompt-prefix reuse on the CPU backend, end to end: a chat's next turn finds its earlier
//! turns in the slot it used, prefills only what is new, and gets exactly the bits a model that
//! never saw the conversation computes from scratch; two conversations keep their own slots,
//! the second copying the system prompt they share from the first's; Status counts hits and
//! reused tokens.

use egpu_e2e::v1::{self as pb};
use egpu_e2e::*;

const SYSTEM: &str = "You are a careful assistant. Answer in one or two sentences.";

fn message(role: &str, content: &str) -> pb::ChatMessage {
    pb::ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

/// A greedy chat turn with the top 5 log-probabilities of every generated token.
fn turn(model: &str, messages: &[pb::ChatMessage], max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
            messages: messages.to_vec(),
        })),
        max_tokens: Some(max_tokens),
        top_logprobs: 5,
        ..Default::default()
    }
}

/// Every generated token's id, and the bits of its log-probability and of its alternatives'.
fn bits(g: &Generated) -> Vec<(u32, Vec<(u32, u32)>)> {
    g.logprobs
        .iter()
        .map(|l| {
            let token = l.token.as_ref().expect("the chosen token");
            let top = l.top.iter().map(|t| (t.id, t.logprob.to_bits())).collect();
            (token.id, top)
        })
        .collect()
}

fn cached(g: &Generated) -> u32 {
    g.done.as_ref().expect("a done event").cached_prompt_tokens
}

fn prompt_tokens(g: &Generated) -> u32 {
    g.done.as_ref().expect("a done event").prompt_tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chats_next_turn_reuses_its_slot_and_gets_the_bits_of_a_fresh_prefill() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smol", 1024, 2).await;
    let shared = client.clone();
    let run = |request: pb::GenerateRequest| {
        let mut client = shared.clone();
        async move { generate(&mut client, request).await.expect("generate") }
    };

    // Two conversations, interleaved: each turn 2 must find its own turn 1 in its own slot.
    let a1_messages = vec![
        message("system", SYSTEM),
        message("user", "Why is the sky blue during the day?"),
    ];
    let b1_messages = vec![
        message("system", SYSTEM),
        message("user", "What do bees make from nectar?"),
    ];
    let a1 = run(turn("smol", &a1_messages, 24)).await;
    let b1 = run(turn("smol", &b1_messages, 24)).await;
    assert_eq!(cached(&a1), 0, "nothing is cached before the first request");
    // b1 shares the system prompt (and the template around it) with a1: it takes the empty
    // slot rather than cut a1's conversation, and copies that part of a1's cache into it.
    assert!(
        cached(&b1) > 0 && cached(&b1) < prompt_tokens(&b1),
        "b1: {} cached of {}",
        cached(&b1),
        prompt_tokens(&b1)
    );

    let next = |first: &[pb::ChatMessage], answer: &Generated, question: &str| {
        let mut m = first.to_vec();
        m.push(message("assistant", &answer.text));
        m.push(message("user", question));
        m
    };
    let a2_messages = next(&a1_messages, &a1, "And why is it red at sunset?");
    let b2_messages = next(&b1_messages, &b1, "How do they store it?");
    let a2 = run(turn("smol", &a2_messages, 16)).await;
    let b2 = run(turn("smol", &b2_messages, 16)).await;
    for (what, first, second) in [("a", &a1, &a2), ("b", &b1, &b2)] {
        // The whole first prompt and (when the answer tokenizes back to what was generated)
        // the answer come from the cache; the new message is prefilled.
        assert!(
            cached(second) >= prompt_tokens(first),
            "{what}: {} cached of a first prompt of {}",
            cached(second),
            prompt_tokens(first)
        );
        assert!(cached(second) < prompt_tokens(second));
    }
    eprintln!(
        "turn 2: {} of {} prompt tokens cached (a), {} of {} (b)",
        cached(&a2),
        prompt_tokens(&a2),
        cached(&b2),
        prompt_tokens(&b2)
    );

    // The same turns from scratch on new instances of the same file: the same tokens, bit for
    // bit the same log-probabilities. The cached part includes the answer's tokens, whose
    // keys and values were written one decode step at a time.
    // b1's first positions were copied from a1's slot, and b2 continues b1.
    for (name, messages, reused, max_tokens) in [
        ("fresh-a", &a2_messages, &a2, 16),
        ("fresh-b", &b2_messages, &b2, 16),
        ("fresh-b1", &b1_messages, &b1, 24),
    ] {
        load_smollm2(&mut client, name, 1024, 1).await;
        let fresh = run(turn(name, messages, max_tokens)).await;
        assert_eq!(cached(&fresh), 0, "a new instance has nothing cached");
        assert_eq!(fresh.token_ids, reused.token_ids);
        assert_eq!(bits(&fresh), bits(reused), "log-probability bits");
    }

    // Regenerating the same turn reuses all but the prompt's last token and repeats itself.
    let again = run(turn("smol", &a2_messages, 16)).await;
    assert_eq!(cached(&again), prompt_tokens(&a2) - 1);
    assert_eq!(bits(&again), bits(&a2));

    let st = status(&mut client).await;
    let smol = st.models.iter().find(|m| m.name == "smol").expect("smol");
    let prefix = smol.prefix_cache.expect("prefix cache counters");
    assert_eq!((prefix.lookups, prefix.hits), (5, 4), "{prefix:?}");
    let reused: u32 = [&b1, &a2, &b2, &again].iter().map(|g| cached(g)).sum();
    assert_eq!(prefix.reused_tokens, u64::from(reused), "{prefix:?}");
    // Only b1's prefix came from another slot; every later turn found its own.
    assert_eq!(
        (prefix.copies, prefix.copied_tokens),
        (1, u64::from(cached(&b1))),
        "{prefix:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_never_reuses_a_prefix_and_leaves_one_for_generation() {
    let daemon = TestDaemon::start(&[]);
    let mut client = daemon.client().await;
    load_smollm2(&mut client, "smol", 512, 1).await;
    let text = "The quick brown fox jumps over the lazy dog. The quick brown fox";
    let score = |text: &str| {
        let mut client = client.clone();
        let text = text.to_string();
        async move {
            client
                .score(pb::ScoreRequest {
                    model: "smol".into(),
                    text,
                    raw: true,
                    top_k: 3,
                })
                .await
                .expect("score")
                .into_inner()
        }
    };
    let first = score(text).await;
    // The slot now holds the text: a second scoring still needs every position's logits,
    // so it prefills everything and answers the same.
    let second = score(text).await;
    assert_eq!(first.positions.len(), second.positions.len());
    for (a, b) in first.positions.iter().zip(&second.positions) {
        assert_eq!(a.logprob.map(f32::to_bits), b.logprob.map(f32::to_bits));
    }
    // A generation that continues the scored text finds it in the slot.
    let mut request = greedy("smol", text, 4);
    request.top_logprobs = 1;
    let continued = generate(&mut client, request.clone())
        .await
        .expect("generate");
    let done = continued.done.expect("done");
    assert_eq!(done.cached_prompt_tokens, done.prompt_tokens - 1);
    let st = status(&mut client).await;
    let prefix = st.models[0].prefix_cache.expect("counters");
    assert_eq!(
        (prefix.lookups, prefix.hits),
        (1, 1),
        "scorings are not lookups"
    );
}

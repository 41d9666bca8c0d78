//! The JSON that `--json` prints. Each shape is a struct built from the proto messages, so
//! its keys are fixed in one place and tests (here and in the end-to-end crate, through
//! the `egpuctl` library) can build the same value from hand-made messages.

use egpu_proto::v1::{
    FinishReason, GenerateChunk, GenerateDone, ListModelFilesResponse, ModelInfo, ModelState,
    ScoreResponse, StatusResponse, TokenLogprob, Translation, UnloadResponse,
};
use serde::Serialize;

/// `status --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusJson {
    pub budget_bytes: u64,
    pub used_bytes: u64,
    pub device: DeviceJson,
    pub models: Vec<ModelJson>,
    pub version: String,
    pub uptime_seconds: f64,
    pub models_dir: String,
    pub backends: Vec<BackendJson>,
    /// The HTTP front end's TCP URL; empty when off.
    pub http_url: String,
    /// Its Unix socket; empty when off.
    pub http_socket: String,
    /// Where the key TCP clients send is kept; empty when none is needed.
    pub api_key_file: String,
}

/// One backend in `status --json`: "cpu", and "tinygrad" when egpud runs its worker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendJson {
    pub backend: String,
    pub state: String,
    pub detail: String,
    pub device: DeviceJson,
    pub dev: String,
    pub arch: String,
    pub interface: String,
    pub budget_bytes: u64,
    pub used_bytes: u64,
    pub allocated_bytes: u64,
    pub restarts: u32,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceJson {
    pub name: String,
    pub kind: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

/// One resident model, in `status --json` and (with `already_resident`) `load --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelJson {
    pub name: String,
    pub source: String,
    pub bytes: u64,
    pub pinned: bool,
    pub active: u32,
    pub queued: u32,
    pub architecture: String,
    pub bytes_estimated: u64,
    pub context_length: u32,
    pub slots: u32,
    pub keep_alive_expires_unix_ms: i64,
    pub requests_served: u64,
    pub last_used_unix_ms: i64,
    pub backend: String,
    /// `"loading"` or `"ready"`.
    pub state: &'static str,
    /// Why a waiting model is not loaded yet; absent otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    pub quant_mix: Vec<QuantJson>,
    /// Prompt-prefix reuse since the model was loaded.
    pub prefix_cache: PrefixCacheJson,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrefixCacheJson {
    pub lookups: u64,
    pub hits: u64,
    pub reused_tokens: u64,
    pub copies: u64,
    pub copied_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantJson {
    #[serde(rename = "type")]
    pub ggml_type: String,
    pub tensors: u32,
    pub bytes: u64,
}

/// `load --json`: the model's object plus whether it was resident already.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadJson {
    #[serde(flatten)]
    pub model: ModelJson,
    pub already_resident: bool,
}

/// `unload --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnloadJson {
    pub name: String,
    pub freed_bytes: u64,
    pub aborted_requests: u32,
}

/// A token and its log-probability, as `generate` and `score` list alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprobJson {
    pub id: u32,
    pub logprob: f32,
}

/// `generate --json`, built up chunk by chunk while the stream runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerateJson {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Per generated token: the best alternatives at that step, most likely first. Empty
    /// when no log-probabilities were asked for.
    pub logprobs: Vec<Vec<TokenLogprobJson>>,
    /// Per generated token: the chosen token's log-probability. Empty when no
    /// log-probabilities were asked for.
    pub token_logprobs: Vec<f32>,
    pub finish_reason: &'static str,
    pub prompt_tokens: u32,
    /// Of those, the ones reused from a slot's cache rather than prefilled.
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// With `--tools`: the calls the model made (their text is not in `text`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallJson>,
}

/// A tool call in `generate --json`: the arguments as a JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallJson {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

/// `score --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreJson {
    pub token_ids: Vec<u32>,
    /// `null` at position 0, where nothing precedes the token.
    pub logprobs: Vec<Option<f32>>,
    pub top: Vec<Vec<TokenLogprobJson>>,
}

/// `tokenize --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenizeJson {
    pub token_ids: Vec<u32>,
    pub pieces: Vec<String>,
}

/// `models --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelFilesJson {
    pub models_dir: String,
    pub files: Vec<ModelFileJson>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelFileJson {
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
    /// Empty when the header could not be read.
    pub architecture: String,
    pub resident_as: Vec<String>,
    /// Why the header could not be read; empty when it could.
    pub error: String,
    /// `models`, `ollama`, `lmstudio` or `huggingface`.
    pub store: String,
}

pub fn status(response: &StatusResponse) -> StatusJson {
    let device = response.device.clone().unwrap_or_default();
    StatusJson {
        budget_bytes: response.budget_bytes,
        used_bytes: response.used_bytes,
        device: DeviceJson {
            name: device.name,
            kind: device.kind,
            memory_total_bytes: device.memory_total_bytes,
            memory_free_bytes: device.memory_free_bytes,
        },
        models: response.models.iter().map(model).collect(),
        version: response.version.clone(),
        uptime_seconds: response.uptime_seconds,
        models_dir: response.models_dir.clone(),
        http_url: response.http_url.clone(),
        http_socket: response.http_socket.clone(),
        api_key_file: response.api_key_file.clone(),
        backends: response
            .backends
            .iter()
            .map(|b| {
                let device = b.device.clone().unwrap_or_default();
                BackendJson {
                    backend: b.backend.clone(),
                    state: b.state.clone(),
                    detail: b.detail.clone(),
                    device: DeviceJson {
                        name: device.name,
                        kind: device.kind,
                        memory_total_bytes: device.memory_total_bytes,
                        memory_free_bytes: device.memory_free_bytes,
                    },
                    dev: b.dev.clone(),
                    arch: b.arch.clone(),
                    interface: b.interface.clone(),
                    budget_bytes: b.budget_bytes,
                    used_bytes: b.used_bytes,
                    allocated_bytes: b.allocated_bytes,
                    restarts: b.restarts,
                    pid: b.pid,
                }
            })
            .collect(),
    }
}

pub fn model(info: &ModelInfo) -> ModelJson {
    ModelJson {
        name: info.name.clone(),
        source: info.source.clone(),
        bytes: info.bytes,
        pinned: info.pinned,
        active: info.active,
        queued: info.queued,
        architecture: info.architecture.clone(),
        bytes_estimated: info.bytes_estimated,
        context_length: info.context_length,
        slots: info.slots,
        keep_alive_expires_unix_ms: info.keep_alive_expires_unix_ms,
        requests_served: info.requests_served,
        prefix_cache: {
            let p = info.prefix_cache.unwrap_or_default();
            PrefixCacheJson {
                lookups: p.lookups,
                hits: p.hits,
                reused_tokens: p.reused_tokens,
                copies: p.copies,
                copied_tokens: p.copied_tokens,
            }
        },
        last_used_unix_ms: info.last_used_unix_ms,
        backend: info.backend.clone(),
        state: model_state(info.state),
        detail: info.detail.clone(),
        quant_mix: info
            .quant_mix
            .iter()
            .map(|q| QuantJson {
                ggml_type: q.r#type.clone(),
                tensors: q.tensors,
                bytes: q.bytes,
            })
            .collect(),
    }
}

/// The lowercase name of a `ModelState`; a state newer than this client is `"unknown"`.
pub fn model_state(state: i32) -> &'static str {
    match ModelState::try_from(state) {
        Ok(ModelState::Loading) => "loading",
        Ok(ModelState::Ready) => "ready",
        Ok(ModelState::Waiting) => "waiting",
        Ok(ModelState::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

pub fn load(info: &ModelInfo, already_resident: bool) -> LoadJson {
    LoadJson {
        model: model(info),
        already_resident,
    }
}

pub fn unload(name: &str, response: &UnloadResponse) -> UnloadJson {
    UnloadJson {
        name: name.to_owned(),
        freed_bytes: response.freed_bytes,
        aborted_requests: response.aborted_requests,
    }
}

/// The string `--json` and the stats line use for a `FinishReason`.
pub fn finish_reason(reason: i32) -> &'static str {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Stop) => "stop",
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::StopString) => "stop_string",
        Ok(FinishReason::ContextLength) => "context_length",
        Ok(FinishReason::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

fn token_logprob(t: &TokenLogprob) -> TokenLogprobJson {
    TokenLogprobJson {
        id: t.id,
        logprob: t.logprob,
    }
}

impl GenerateJson {
    /// Appends one streamed chunk.
    pub fn add_chunk(&mut self, chunk: &GenerateChunk) {
        self.text.push_str(&chunk.text);
        self.token_ids.extend_from_slice(&chunk.token_ids);
        for step in &chunk.logprobs {
            self.logprobs
                .push(step.top.iter().map(token_logprob).collect());
            // The chosen token is always present when logprobs are; a missing one would be
            // egpud's bug, and NaN shows it instead of shifting later tokens' values.
            self.token_logprobs
                .push(step.token.as_ref().map_or(f32::NAN, |t| t.logprob));
        }
    }

    /// Records the closing `done` event.
    pub fn finish(&mut self, done: &GenerateDone) {
        let timings = done.timings.unwrap_or_default();
        self.finish_reason = finish_reason(done.finish_reason);
        self.prompt_tokens = done.prompt_tokens;
        self.cached_prompt_tokens = done.cached_prompt_tokens;
        self.completion_tokens = done.completion_tokens;
        self.prefill_tokens_per_s = timings.prefill_tokens_per_s;
        self.decode_tokens_per_s = timings.decode_tokens_per_s;
        self.tool_calls = done
            .tool_calls
            .iter()
            .map(|c| ToolCallJson {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments: serde_json::from_str(&c.arguments_json)
                    .unwrap_or_else(|_| serde_json::Value::String(c.arguments_json.clone())),
            })
            .collect();
    }
}

pub fn score(response: &ScoreResponse) -> ScoreJson {
    ScoreJson {
        token_ids: response.token_ids.clone(),
        logprobs: response.positions.iter().map(|p| p.logprob).collect(),
        top: response
            .positions
            .iter()
            .map(|p| p.top.iter().map(token_logprob).collect())
            .collect(),
    }
}

/// `translate --json`: one line per sentence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TranslationJson {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub score: f32,
    pub source_tokens: u32,
}

pub fn translation(t: &Translation) -> serde_json::Value {
    serde_json::to_value(TranslationJson {
        text: t.text.clone(),
        token_ids: t.token_ids.clone(),
        score: t.score,
        source_tokens: t.source_tokens,
    })
    .unwrap_or_default()
}

pub fn model_files(response: &ListModelFilesResponse) -> ModelFilesJson {
    ModelFilesJson {
        models_dir: response.models_dir.clone(),
        files: response
            .files
            .iter()
            .map(|f| ModelFileJson {
                name: f.name.clone(),
                path: f.path.clone(),
                size_bytes: f.size_bytes,
                architecture: f.architecture.clone(),
                resident_as: f.resident_as.clone(),
                error: f.error.clone(),
                store: f.store.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use egpu_proto::v1::{DeviceInfo, QuantShare, ScorePosition, Timings, TokenLogprobs};
    use serde_json::json;

    pub(crate) fn sample_model() -> ModelInfo {
        ModelInfo {
            name: "smollm2".into(),
            source: "/models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            architecture: "llama".into(),
            quant_mix: vec![
                QuantShare {
                    r#type: "Q4_1".into(),
                    tensors: 210,
                    bytes: 80_000_000,
                },
                QuantShare {
                    r#type: "F32".into(),
                    tensors: 61,
                    bytes: 400_000,
                },
            ],
            bytes: 104_200_000,
            bytes_estimated: 110_000_000,
            context_length: 2048,
            slots: 4,
            pinned: false,
            keep_alive_expires_unix_ms: 1_700_000_300_000,
            active: 1,
            queued: 2,
            requests_served: 7,
            last_used_unix_ms: 1_700_000_000_000,
            backend: "cpu".into(),
            state: ModelState::Ready as i32,
            parameters: 134_515_008,
            vocab_size: 49152,
            trained_context_length: 8192,
            detail: String::new(),
            prefix_cache: Some(egpu_proto::v1::PrefixCacheStats {
                lookups: 6,
                hits: 4,
                reused_tokens: 3000,
                copies: 1,
                copied_tokens: 1200,
            }),
        }
    }

    pub(crate) fn sample_status() -> StatusResponse {
        StatusResponse {
            device: Some(DeviceInfo {
                name: "AMD EPYC 7B13".into(),
                kind: "cpu".into(),
                memory_total_bytes: 16_000_000_000,
                memory_free_bytes: 9_000_000_000,
            }),
            budget_bytes: 8_000_000_000,
            used_bytes: 104_200_000,
            models: vec![sample_model()],
            version: "0.1.0".into(),
            uptime_seconds: 192.5,
            models_dir: "/models".into(),
            threads: 2,
            backends: Vec::new(),
            http_url: "http://127.0.0.1:11470".into(),
            http_socket: "/run/user/1000/egpu-http.sock".into(),
            api_key_file: "/home/me/.local/state/egpu/api-key".into(),
        }
    }

    fn sample_model_json() -> serde_json::Value {
        json!({
            "name": "smollm2",
            "source": "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            "bytes": 104_200_000,
            "pinned": false,
            "active": 1,
            "queued": 2,
            "architecture": "llama",
            "bytes_estimated": 110_000_000,
            "context_length": 2048,
            "slots": 4,
            "keep_alive_expires_unix_ms": 1_700_000_300_000_i64,
            "requests_served": 7,
            "last_used_unix_ms": 1_700_000_000_000_i64,
            "backend": "cpu",
            "state": "ready",
            "quant_mix": [
                {"type": "Q4_1", "tensors": 210, "bytes": 80_000_000},
                {"type": "F32", "tensors": 61, "bytes": 400_000}
            ],
            "prefix_cache": {"lookups": 6, "hits": 4, "reused_tokens": 3000, "copies": 1,
                             "copied_tokens": 1200}
        })
    }

    #[test]
    fn status_shape() {
        let value = serde_json::to_value(status(&sample_status())).unwrap();
        assert_eq!(
            value,
            json!({
                "budget_bytes": 8_000_000_000_u64,
                "used_bytes": 104_200_000,
                "device": {
                    "name": "AMD EPYC 7B13",
                    "kind": "cpu",
                    "memory_total_bytes": 16_000_000_000_u64,
                    "memory_free_bytes": 9_000_000_000_u64
                },
                "models": [sample_model_json()],
                "version": "0.1.0",
                "uptime_seconds": 192.5,
                "models_dir": "/models",
                "backends": [],
                "http_url": "http://127.0.0.1:11470",
                "http_socket": "/run/user/1000/egpu-http.sock",
                "api_key_file": "/home/me/.local/state/egpu/api-key"
            })
        );
    }

    #[test]
    fn status_without_device_still_has_every_key() {
        let value = serde_json::to_value(status(&StatusResponse::default())).unwrap();
        assert_eq!(
            value["device"],
            json!({"name": "", "kind": "", "memory_total_bytes": 0, "memory_free_bytes": 0})
        );
        assert_eq!(value["models"], json!([]));
    }

    #[test]
    fn load_shape_is_the_model_plus_already_resident() {
        let mut loading = sample_model();
        loading.state = ModelState::Loading as i32;
        let value = serde_json::to_value(load(&loading, true)).unwrap();
        let mut expected = sample_model_json();
        expected["state"] = json!("loading");
        expected["already_resident"] = json!(true);
        assert_eq!(value, expected);
    }

    #[test]
    fn state_names() {
        assert_eq!(model_state(ModelState::Loading as i32), "loading");
        assert_eq!(model_state(ModelState::Ready as i32), "ready");
        assert_eq!(model_state(ModelState::Waiting as i32), "waiting");
        assert_eq!(model_state(99), "unknown");
    }

    #[test]
    fn unload_shape() {
        let response = UnloadResponse {
            freed_bytes: 5,
            aborted_requests: 1,
        };
        assert_eq!(
            serde_json::to_value(unload("m", &response)).unwrap(),
            json!({"name": "m", "freed_bytes": 5, "aborted_requests": 1})
        );
    }

    fn lp(id: u32, logprob: f32, text: &str) -> TokenLogprob {
        TokenLogprob {
            id,
            logprob,
            text: text.into(),
        }
    }

    #[test]
    fn generate_shape_with_logprobs() {
        let mut out = GenerateJson::default();
        out.add_chunk(&GenerateChunk {
            text: "Hi".into(),
            token_ids: vec![10],
            logprobs: vec![TokenLogprobs {
                token: Some(lp(10, -0.5, "Hi")),
                top: vec![lp(10, -0.5, "Hi"), lp(11, -1.25, "Hello")],
            }],
        });
        // A chunk holding a token whose text is still undecided.
        out.add_chunk(&GenerateChunk {
            text: String::new(),
            token_ids: vec![12],
            logprobs: vec![TokenLogprobs {
                token: Some(lp(12, -2.0, "!")),
                top: vec![lp(13, -0.25, "."), lp(12, -2.0, "!")],
            }],
        });
        out.add_chunk(&GenerateChunk {
            text: "!".into(),
            token_ids: vec![],
            logprobs: vec![],
        });
        out.finish(&GenerateDone {
            finish_reason: FinishReason::Length as i32,
            prompt_tokens: 12,
            cached_prompt_tokens: 8,
            completion_tokens: 2,
            tool_calls: Vec::new(),
            timings: Some(Timings {
                queue_ms: 0.0,
                prefill_ms: 14.0,
                decode_ms: 10.0,
                prefill_tokens_per_s: 850.0,
                decode_tokens_per_s: 95.5,
            }),
        });
        assert_eq!(
            serde_json::to_value(&out).unwrap(),
            json!({
                "text": "Hi!",
                "token_ids": [10, 12],
                "logprobs": [
                    [{"id": 10, "logprob": -0.5}, {"id": 11, "logprob": -1.25}],
                    [{"id": 13, "logprob": -0.25}, {"id": 12, "logprob": -2.0}]
                ],
                "token_logprobs": [-0.5, -2.0],
                "finish_reason": "length",
                "prompt_tokens": 12,
                "cached_prompt_tokens": 8,
                "completion_tokens": 2,
                "prefill_tokens_per_s": 850.0,
                "decode_tokens_per_s": 95.5
            })
        );
    }

    #[test]
    fn generate_shape_without_logprobs() {
        let mut out = GenerateJson::default();
        out.add_chunk(&GenerateChunk {
            text: "ok".into(),
            token_ids: vec![1, 2],
            logprobs: vec![],
        });
        out.finish(&GenerateDone {
            finish_reason: FinishReason::StopString as i32,
            prompt_tokens: 3,
            cached_prompt_tokens: 0,
            completion_tokens: 2,
            tool_calls: Vec::new(),
            timings: None,
        });
        let value = serde_json::to_value(&out).unwrap();
        assert_eq!(value["logprobs"], json!([]));
        assert_eq!(value["token_logprobs"], json!([]));
        assert_eq!(value["finish_reason"], json!("stop_string"));
        assert_eq!(value["decode_tokens_per_s"], json!(0.0));
        assert_eq!(value.as_object().unwrap().len(), 10);
    }

    #[test]
    fn finish_reason_names() {
        assert_eq!(finish_reason(FinishReason::Stop as i32), "stop");
        assert_eq!(finish_reason(FinishReason::Length as i32), "length");
        assert_eq!(
            finish_reason(FinishReason::StopString as i32),
            "stop_string"
        );
        assert_eq!(
            finish_reason(FinishReason::ContextLength as i32),
            "context_length"
        );
    }

    #[test]
    fn score_shape_has_null_first_logprob() {
        let response = ScoreResponse {
            token_ids: vec![1, 42, 7],
            positions: vec![
                ScorePosition {
                    logprob: None,
                    top: vec![],
                },
                ScorePosition {
                    logprob: Some(-3.5),
                    top: vec![lp(40, -1.0, "a")],
                },
                ScorePosition {
                    logprob: Some(-0.125),
                    top: vec![lp(7, -0.125, "b")],
                },
            ],
            total_logprob: -3.625,
        };
        assert_eq!(
            serde_json::to_value(score(&response)).unwrap(),
            json!({
                "token_ids": [1, 42, 7],
                "logprobs": [null, -3.5, -0.125],
                "top": [[], [{"id": 40, "logprob": -1.0}], [{"id": 7, "logprob": -0.125}]]
            })
        );
    }

    #[test]
    fn model_files_shape() {
        let response = ListModelFilesResponse {
            models_dir: "/m".into(),
            files: vec![egpu_proto::v1::ModelFile {
                name: "a".into(),
                path: "/m/a.gguf".into(),
                size_bytes: 9,
                architecture: String::new(),
                resident_as: vec!["a".into(), "b".into()],
                error: "bad magic".into(),
                store: "models".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(model_files(&response)).unwrap(),
            json!({
                "models_dir": "/m",
                "files": [{
                    "name": "a", "path": "/m/a.gguf", "size_bytes": 9, "architecture": "",
                    "resident_as": ["a", "b"], "error": "bad magic", "store": "models"
                }]
            })
        );
    }
}

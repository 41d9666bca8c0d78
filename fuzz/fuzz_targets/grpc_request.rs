//! Any bytes as the gRPC requests egpud accepts: decoded (protobuf) and put through the same
//! conversion and checks the daemon applies before a request reaches a model (sampling
//! options, input size, stop strings), then, where accepted, through a sampler and a stop
//! matcher. Every step gives a value or a typed error, never a panic.
#![no_main]

use egpu_engine::sampler::{Sampler, StopMatcher};
use egpu_proto::v1 as pb;
use egpud::core::requests::{check_input_bytes, check_stops};
use egpud::frontend::grpc::convert;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            let Ok(message) = pb::GenerateRequest::decode(bytes) else {
                return;
            };
            let request = convert::generate_request(message);
            let Ok(params) = request.sampling.validate() else {
                return;
            };
            if let Some(input) = &request.input {
                let _ = check_input_bytes(input.bytes(), 4096, "the prompt");
            }
            if check_stops(&request.stop).is_err() {
                return;
            }
            let mut sampler = Sampler::new(params);
            let logits: Vec<f32> = bytes.iter().map(|&b| b as f32 / 16.0 - 8.0).collect();
            if !logits.is_empty() {
                let id = sampler.sample(&logits);
                assert!((id as usize) < logits.len());
            }
            let mut stops = StopMatcher::new(request.stop.clone());
            for piece in String::from_utf8_lossy(bytes).split_inclusive(' ') {
                let _ = stops.push(piece);
            }
        }
        1 => {
            if let Ok(message) = pb::LoadRequest::decode(bytes) {
                let _ = convert::load_options(message);
            }
        }
        2 => {
            if let Ok(message) = pb::ScoreRequest::decode(bytes) {
                let _ = convert::score_request(message);
            }
        }
        _ => {
            if let Ok(message) = pb::TranslateRequest::decode(bytes) {
                let _ = convert::translate_request(message);
            }
        }
    }
});

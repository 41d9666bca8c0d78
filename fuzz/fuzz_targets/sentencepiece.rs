//! Any bytes as a SentencePiece `ModelProto` (a Marian `source.spm`) give a model or an error;
//! an accepted model encodes text, including the input's own bytes, without panicking, and its
//! ids stay inside its pieces.
#![no_main]

use egpu_engine::tokenizer::unigram::SentencePiece;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = SentencePiece::from_bytes(data) else {
        return;
    };
    let n = model.pieces().len() as u32;
    for text in [
        "Hello, world!",
        "  two  spaces\tand\nlines ",
        &String::from_utf8_lossy(data),
    ] {
        for id in model.encode(text) {
            assert!(id < n);
        }
    }
});

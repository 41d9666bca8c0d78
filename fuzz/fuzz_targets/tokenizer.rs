//! Arbitrary bytes through the real tokenizers (GPT-2 BPE and LLaMA SentencePiece vocabularies
//! from `models/vocab/`, fetched by `scripts/fetch-vocabs.sh`): encoding any text and decoding
//! any ids, in range or not, never panics; encoded ids are in the vocabulary.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use egpu_engine::gguf::GgufFile;
use egpu_engine::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fn tokenizers() -> &'static Vec<Tokenizer> {
    static TOKENIZERS: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let vocab = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/vocab");
        let tokenizers: Vec<Tokenizer> = ["ggml-vocab-gpt-2.gguf", "ggml-vocab-llama-spm.gguf"]
            .iter()
            .filter_map(|name| GgufFile::open(vocab.join(name)).ok())
            .filter_map(|file| Tokenizer::from_gguf(file.metadata()).ok())
            .collect();
        assert!(
            !tokenizers.is_empty(),
            "no vocabularies in {}: run scripts/fetch-vocabs.sh",
            vocab.display()
        );
        tokenizers
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let ids: Vec<u32> = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % 300_000)
        .collect();
    for tokenizer in tokenizers() {
        let n = tokenizer.vocab_size() as u32;
        for (add_special, parse_special) in [(false, false), (true, true)] {
            for id in tokenizer.encode(&text, add_special, parse_special) {
                assert!(id < n, "id {id} outside a {n}-token vocabulary");
            }
        }
        let _ = tokenizer.decode(&ids);
        let _ = tokenizer.decode_rendering_special(&ids);
    }
});

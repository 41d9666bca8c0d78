//! Any byte string given to the GGUF reader must give `Ok` or an error, never a panic, and an
//! accepted file must be internally consistent: every tensor's data in bounds and, where its
//! type has a decoder, dequantizable.
#![no_main]

use egpu_engine::gguf::GgufFile;
use egpu_engine::quant::can_dequantize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for t in file.tensors() {
        assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes);
        // Keep each run cheap: decode only small tensors.
        if can_dequantize(t.ggml_type) && t.n_elements <= 1 << 16 {
            file.dequantize_f32(&t.name)
                .expect("checked tensor must decode");
            file.dequantize_f16(&t.name)
                .expect("checked tensor must decode");
        }
    }
    let _ = egpu_engine::models::info::estimate_memory(&file, 4096);
});

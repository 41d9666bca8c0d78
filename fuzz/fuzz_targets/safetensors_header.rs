//! Any bytes given to the safetensors reader give `Ok` or an error, never a panic; an accepted
//! file's tensors lie inside it and convert to f32.
#![no_main]

use egpu_engine::convert::safetensors::SafetensorsFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = SafetensorsFile::from_vec("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    for tensor in file.tensors() {
        assert_eq!(file.data(tensor).len(), tensor.n_bytes());
        if tensor.n_elements() <= 1 << 16 {
            let _ = file.to_f32(tensor);
        }
    }
});

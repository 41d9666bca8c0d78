//! Tiny synthetic models built in memory, for properties that need a shape no fixture has
//! (a Gemma 3 whose sliding window is shorter than a test sequence) or a deliberately broken
//! file.

use egpu_engine::gguf::write::GgufWriter;
use egpu_engine::gguf::{GgufFile, MetaValue};
use egpu_engine::quant::GgmlType;

/// Deterministic pseudo-random numbers (xorshift64*), so models are the same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % u64::from(n)) as u32
    }

    pub fn tokens(&mut self, n: usize, n_vocab: u32) -> Vec<u32> {
        (0..n).map(|_| self.below(n_vocab)).collect()
    }
}

/// Shape of a tiny Gemma 3.
pub struct TinyGemma3 {
    pub n_layer: usize,
    pub sliding_window: u32,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
}

impl Default for TinyGemma3 {
    fn default() -> Self {
        TinyGemma3 {
            n_layer: 5,
            sliding_window: 3,
            n_vocab: 64,
            n_embd: 32,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            n_ff: 64,
        }
    }
}

impl TinyGemma3 {
    /// The GGUF writer with every metadata key and tensor, random weights of scale ~1/√fan_in
    /// and norm weights near 1.
    pub fn writer(&self, seed: u64) -> GgufWriter {
        let mut rng = Rng::new(seed);
        let (e, hd, ff) = (self.n_embd as u64, self.head_dim as u64, self.n_ff as u64);
        let (q, kv) = (self.n_head as u64 * hd, self.n_head_kv as u64 * hd);
        let mut w = GgufWriter::new()
            .kv("general.architecture", MetaValue::String("gemma3".into()))
            .kv("gemma3.context_length", MetaValue::U32(256))
            .kv("gemma3.embedding_length", MetaValue::U32(e as u32))
            .kv("gemma3.block_count", MetaValue::U32(self.n_layer as u32))
            .kv("gemma3.feed_forward_length", MetaValue::U32(ff as u32))
            .kv(
                "gemma3.attention.head_count",
                MetaValue::U32(self.n_head as u32),
            )
            .kv(
                "gemma3.attention.head_count_kv",
                MetaValue::U32(self.n_head_kv as u32),
            )
            .kv("gemma3.attention.key_length", MetaValue::U32(hd as u32))
            .kv("gemma3.attention.value_length", MetaValue::U32(hd as u32))
            .kv(
                "gemma3.attention.layer_norm_rms_epsilon",
                MetaValue::F32(1e-6),
            )
            .kv("gemma3.rope.freq_base", MetaValue::F32(1e6))
            .kv(
                "gemma3.attention.sliding_window",
                MetaValue::U32(self.sliding_window),
            );
        let mut matrix = |w: GgufWriter, name: String, cols: u64, rows: u64| {
            let s = 1.0 / (cols as f32).sqrt();
            let values: Vec<f32> = (0..cols * rows).map(|_| rng.unit() * s * 1.7).collect();
            w.tensor_f32(name, &[cols, rows], &values)
        };
        w = matrix(w, "token_embd.weight".into(), e, self.n_vocab as u64);
        for il in 0..self.n_layer {
            let p = |n: &str| format!("blk.{il}.{n}.weight");
            w = matrix(w, p("attn_q"), e, q);
            w = matrix(w, p("attn_k"), e, kv);
            w = matrix(w, p("attn_v"), e, kv);
            w = matrix(w, p("attn_output"), q, e);
            w = matrix(w, p("ffn_gate"), e, ff);
            w = matrix(w, p("ffn_up"), e, ff);
            w = matrix(w, p("ffn_down"), ff, e);
            for (name, len) in [
                ("attn_norm", e),
                ("post_attention_norm", e),
                ("ffn_norm", e),
                ("post_ffw_norm", e),
                ("attn_q_norm", hd),
                ("attn_k_norm", hd),
            ] {
                let values: Vec<f32> = (0..len).map(|i| 1.0 + 0.1 * (i as f32).sin()).collect();
                w = w.tensor_f32(p(name), &[len], &values);
            }
        }
        let ones = vec![1.0f32; self.n_embd];
        w.tensor_f32("output_norm.weight", &[e], &ones)
    }

    pub fn file(&self, seed: u64) -> GgufFile {
        GgufFile::from_bytes(self.writer(seed).to_bytes()).expect("valid synthetic GGUF")
    }
}

/// A GGUF with only `general.architecture` and one tensor.
pub fn with_architecture(arch: &str) -> GgufFile {
    let bytes = GgufWriter::new()
        .kv("general.architecture", MetaValue::String(arch.into()))
        .tensor_f32("token_embd.weight", &[4, 2], &[0.0; 8])
        .to_bytes();
    GgufFile::from_bytes(bytes).expect("valid GGUF")
}

/// The tiny Gemma 3 with one matrix stored as a type the kernels cannot read.
pub fn gemma3_with_unreadable_tensor(name: &str) -> GgufFile {
    let shape = TinyGemma3::default();
    let mut w = GgufWriter::new();
    // Rebuild with the named tensor replaced by I32 data of the same shape.
    let full = shape.file(1);
    for (key, value) in full.metadata().iter() {
        w = w.kv(key, value.clone());
    }
    for info in full.tensors() {
        let data = full.tensor_data(info).to_vec();
        w = if info.name == name {
            w.tensor(&info.name, &info.dims, GgmlType::I32, data)
        } else {
            w.tensor(&info.name, &info.dims, info.ggml_type, data)
        };
    }
    GgufFile::from_bytes(w.to_bytes()).expect("valid GGUF")
}

/// The tiny Gemma 3 without the named tensor.
pub fn gemma3_without_tensor(name: &str) -> GgufFile {
    let full = TinyGemma3::default().file(1);
    let mut w = GgufWriter::new();
    for (key, value) in full.metadata().iter() {
        w = w.kv(key, value.clone());
    }
    for info in full.tensors().iter().filter(|t| t.name != name) {
        w = w.tensor(
            &info.name,
            &info.dims,
            info.ggml_type,
            full.tensor_data(info).to_vec(),
        );
    }
    GgufFile::from_bytes(w.to_bytes()).expect("valid GGUF")
}

//! Text embeddings from a model's final hidden states (after its output norm, as llama.cpp
//! takes them): pooled over the text's tokens and, as OpenAI, Ollama and llama.cpp's server
//! return them, scaled to unit length.

use crate::gguf::Metadata;

/// How a text's token states become one vector (GGUF's `<arch>.pooling_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The average over the tokens (llama.cpp's 1).
    Mean,
    /// The first token's state (llama.cpp's 2, BERT's `[CLS]`).
    Cls,
    /// The last token's state (llama.cpp's 3): what a decoder-only model has read the whole
    /// text by.
    Last,
}

impl Pooling {
    /// The file's pooling, else last-token pooling, the one that suits a decoder-only model
    /// (its other positions have not seen the end of the text). A value egpu does not pool by
    /// (none, rank) is an error naming it.
    pub fn from_metadata(meta: &Metadata, architecture: &str) -> Result<Pooling, String> {
        match meta.get_u64(&format!("{architecture}.pooling_type")) {
            None => Ok(Pooling::Last),
            Some(1) => Ok(Pooling::Mean),
            Some(2) => Ok(Pooling::Cls),
            Some(3) => Ok(Pooling::Last),
            Some(other) => Err(format!(
                "{architecture}.pooling_type is {other}; egpu pools by mean (1), CLS (2) or last \
                 token (3)"
            )),
        }
    }

    /// Which token states the pooling reads: all of them (mean) or one.
    pub fn needs_every_token(self) -> bool {
        self == Pooling::Mean
    }

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
        }
    }

    /// One vector from `rows` token states of `width` values each (all of the text's states
    /// for mean pooling; for CLS the first and for last the last suffice).
    pub fn pool(self, rows: &[f32], width: usize) -> Vec<f32> {
        let n = rows.len() / width.max(1);
        match self {
            Pooling::Cls => rows[..width].to_vec(),
            Pooling::Last => rows[(n - 1) * width..][..width].to_vec(),
            Pooling::Mean => {
                // Summed in f64: long texts add thousands of rows.
                let mut sum = vec![0f64; width];
                for row in rows.chunks_exact(width) {
                    for (s, &v) in sum.iter_mut().zip(row) {
                        *s += f64::from(v);
                    }
                }
                sum.iter().map(|s| (s / n as f64) as f32).collect()
            }
        }
    }
}

/// `v / ‖v‖₂` (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut()
            .for_each(|x| *x = (f64::from(*x) / norm) as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_reads_the_right_rows_and_normalizing_gives_unit_length() {
        let rows = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(Pooling::Cls.pool(&rows, 2), vec![1.0, 2.0]);
        assert_eq!(Pooling::Last.pool(&rows, 2), vec![5.0, 6.0]);
        assert_eq!(Pooling::Mean.pool(&rows, 2), vec![3.0, 4.0]);
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut zero = vec![0.0; 3];
        normalize(&mut zero);
        assert_eq!(zero, vec![0.0; 3]);
    }
}

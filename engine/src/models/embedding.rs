//! Text embeddings from a model's final hidden states (after its output norm, as llama.cpp
//! takes them): pooled over the text's tokens and, as OpenAI, Ollama and llama.cpp's server
//! return them, scaled to unit length.

use crate::gguf::Metadata;
use crate::models::decoder::LogitsWanted;

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

    /// Which rows of a chunk of a text's tokens the pooling reads: every row (mean), the first
    /// chunk's (CLS), the last chunk's last (last token), or none.
    pub fn rows_wanted(self, first_chunk: bool, last_chunk: bool) -> LogitsWanted {
        match self {
            Pooling::Mean => LogitsWanted::All,
            Pooling::Cls if first_chunk => LogitsWanted::All,
            Pooling::Last if last_chunk => LogitsWanted::Last,
            _ => LogitsWanted::None,
        }
    }

    /// One vector from `rows` token states of `width` values each: a whole text fed as one
    /// chunk.
    pub fn pool(self, rows: &[f32], width: usize) -> Vec<f32> {
        let mut pooled = Pooled::new(self);
        pooled.add(rows, width, true, true);
        pooled.finish()
    }
}

/// A text's pooling in progress, fed chunk by chunk with the rows [`Pooling::rows_wanted`]
/// asked for.
#[derive(Debug, Clone)]
pub struct Pooled {
    pooling: Pooling,
    /// Mean pooling's running sum (in f64: long texts add thousands of rows) and row count.
    sum: Vec<f64>,
    rows: usize,
    /// CLS's first row, or the last token's row.
    picked: Vec<f32>,
}

impl Pooled {
    pub fn new(pooling: Pooling) -> Pooled {
        Pooled {
            pooling,
            sum: Vec::new(),
            rows: 0,
            picked: Vec::new(),
        }
    }

    /// Takes in one chunk's rows.
    pub fn add(&mut self, rows: &[f32], width: usize, first_chunk: bool, last_chunk: bool) {
        match self.pooling {
            Pooling::Mean => {
                self.sum.resize(width, 0.0);
                for row in rows.chunks_exact(width) {
                    for (s, &v) in self.sum.iter_mut().zip(row) {
                        *s += f64::from(v);
                    }
                    self.rows += 1;
                }
            }
            Pooling::Cls if first_chunk => self.picked = rows[..width].to_vec(),
            Pooling::Last if last_chunk => {
                self.picked = rows[rows.len() - width..].to_vec();
            }
            _ => {}
        }
    }

    /// The text's vector; the state is empty again for the next text.
    pub fn finish(&mut self) -> Vec<f32> {
        let vector = match self.pooling {
            Pooling::Mean => {
                let n = self.rows.max(1) as f64;
                self.sum.iter().map(|s| (s / n) as f32).collect()
            }
            _ => std::mem::take(&mut self.picked),
        };
        self.sum.clear();
        self.rows = 0;
        vector
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
        // Fed in chunks, the same vectors.
        for pooling in [Pooling::Mean, Pooling::Cls, Pooling::Last] {
            let mut pooled = Pooled::new(pooling);
            for (i, chunk) in rows.chunks(2).enumerate() {
                let wanted = pooling.rows_wanted(i == 0, i == 2);
                let fed = match wanted {
                    LogitsWanted::All => chunk,
                    LogitsWanted::Last => &chunk[chunk.len() - 2..],
                    LogitsWanted::None => &[][..],
                };
                pooled.add(fed, 2, i == 0, i == 2);
            }
            assert_eq!(pooled.finish(), pooling.pool(&rows, 2), "{pooling:?}");
        }
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut zero = vec![0.0; 3];
        normalize(&mut zero);
        assert_eq!(zero, vec![0.0; 3]);
    }
}

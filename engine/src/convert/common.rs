//! What every Hugging Face converter shares: its errors, `config.json` reading, and the weight
//! format of the GGUF it writes.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::convert::safetensors::{SafetensorsError, SafetensorsSet};
use crate::gguf::write::GgufWriter;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HfModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error(
        "model_type {found:?} is not supported from a Hugging Face folder yet (supported: gpt2, marian)"
    )]
    UnsupportedModelType { found: String },
    #[error("{key} = {found} is not supported for GPT-2 ({why})")]
    UnsupportedConfig {
        key: &'static str,
        found: String,
        why: &'static str,
    },
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
}

/// `config[key]` as a positive integer, or an error naming the key and the file.
pub(crate) fn positive_int(config: &Value, key: &str, path: &Path) -> Result<u64, HfModelError> {
    config[key]
        .as_u64()
        .filter(|v| *v > 0)
        .ok_or_else(|| HfModelError::BadFile {
            path: path.to_path_buf(),
            reason: format!("{key} is missing or not a positive integer"),
        })
}

/// A string setting that must be one of `allowed` (`default` when the config leaves it out).
pub(crate) fn one_of<'a>(
    config: &'a Value,
    key: &'static str,
    default: &'a str,
    allowed: &[&str],
    why: &'static str,
) -> Result<&'a str, HfModelError> {
    let value = config[key].as_str().unwrap_or(default);
    if allowed.contains(&value) {
        Ok(value)
    } else {
        Err(HfModelError::UnsupportedConfig {
            key,
            found: value.to_string(),
            why,
        })
    }
}

/// A width split into `heads` equal parts: `heads` (read from `key`) must divide it.
pub(crate) fn heads_divide(
    width: u64,
    heads: u64,
    key: &'static str,
    why: &'static str,
) -> Result<(), HfModelError> {
    if width.is_multiple_of(heads) {
        Ok(())
    } else {
        Err(HfModelError::UnsupportedConfig {
            key,
            found: heads.to_string(),
            why,
        })
    }
}

/// Tensor `name` of `weights` in f32, which must have `shape` (checked before converting).
pub(crate) fn tensor_f32(
    weights: &SafetensorsSet,
    name: &str,
    shape: &[u64],
) -> Result<Vec<f32>, HfModelError> {
    let t = weights.tensor(name)?;
    if t.shape != shape {
        return Err(HfModelError::Shape {
            name: t.name.clone(),
            found: t.shape.clone(),
            expected: shape.to_vec(),
        });
    }
    Ok(weights.to_f32(t)?)
}

pub(crate) fn read_json(path: &Path) -> Result<Value, HfModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| HfModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| HfModelError::BadFile {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// How a conversion stores weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As read, widened to f32 exactly (F16 and BF16 checkpoints included).
    #[default]
    F32,
    /// ggml's Q8_0 (8-bit, one f16 scale per 32 values): about 3.8x smaller than f32. Matrices
    /// whose rows are not a multiple of 32 stay f32; vectors (norms, biases) always do.
    Q8_0,
}

impl WeightFormat {
    /// From a name as `--quantize` takes it.
    pub fn parse(name: &str) -> Option<WeightFormat> {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "f32" | "none" => Some(WeightFormat::F32),
            "q8_0" | "q8" => Some(WeightFormat::Q8_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Q8_0 => "q8_0",
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`).
    pub(crate) fn file_type(self) -> u32 {
        match self {
            WeightFormat::F32 => 0,
            WeightFormat::Q8_0 => 7,
        }
    }

    /// Adds a `rows × cols` matrix (row-major values) to `w` in this format.
    pub(crate) fn matrix(
        self,
        w: GgufWriter,
        name: &str,
        cols: u64,
        rows: u64,
        values: &[f32],
    ) -> Result<GgufWriter, HfModelError> {
        if values.len() as u64 != rows * cols {
            return Err(HfModelError::Shape {
                name: name.to_owned(),
                found: vec![values.len() as u64],
                expected: vec![rows, cols],
            });
        }
        match self {
            WeightFormat::Q8_0 if cols.is_multiple_of(32) => {
                let blocks = crate::quant::quantize_q8_0(values).unwrap_or_default();
                Ok(w.tensor(name, &[cols, rows], crate::quant::GgmlType::Q8_0, blocks))
            }
            _ => Ok(w.tensor_f32(name, &[cols, rows], values)),
        }
    }
}

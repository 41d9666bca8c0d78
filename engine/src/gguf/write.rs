//! A small GGUF writer: builds valid files in memory for tests, the fuzzer's seed corpus and
//! synthetic models. It records where each header field starts, so tests can cut or corrupt a
//! file at exactly those boundaries.

use super::metadata::{MetaArray, MetaValue};
use crate::quant::GgmlType;

/// One tensor to write: name, ggml dims, type and its raw block bytes.
#[derive(Debug, Clone)]
pub struct TensorToWrite {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub data: Vec<u8>,
}

/// Builds a GGUF image.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorToWrite>,
}

/// Where the fields of a written file start, with a label for each.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub fields: Vec<(u64, String)>,
    /// Offsets of each tensor record's type id and data offset fields.
    pub tensor_type_offsets: Vec<u64>,
    pub tensor_offset_offsets: Vec<u64>,
    pub tensor_dim_offsets: Vec<u64>,
    /// Offsets of each metadata value's type id.
    pub value_type_offsets: Vec<u64>,
    pub data_start: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            alignment: super::DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// A writer holding all of `file`: its metadata and its tensors' bytes (a copy to change,
    /// e.g. a model under another chat template with [`GgufWriter::set_kv`]).
    pub fn copy_of(file: &super::GgufFile) -> Self {
        let mut writer = GgufWriter::new();
        for (key, value) in file.metadata().iter() {
            writer = match (key, value) {
                // The data must be laid out at the alignment the key declares.
                ("general.alignment", MetaValue::U32(a)) => writer.alignment(*a),
                _ => writer.set_kv(key, value.clone()),
            };
        }
        for info in file.tensors() {
            writer = writer.tensor(
                info.name.clone(),
                &info.dims,
                info.ggml_type,
                file.tensor_data(info).to_vec(),
            );
        }
        writer
    }

    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets `general.alignment` (written as a u32 key) and aligns the data to it.
    pub fn alignment(mut self, alignment: u32) -> Self {
        self.alignment = alignment.into();
        self.metadata
            .retain(|(k, _)| k.as_str() != "general.alignment");
        self.metadata
            .push(("general.alignment".into(), MetaValue::U32(alignment)));
        self
    }

    /// Adds a key (a key added twice is written twice, which readers refuse).
    pub fn kv(mut self, key: impl Into<String>, value: MetaValue) -> Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Sets a key, replacing any value it had.
    pub fn set_kv(mut self, key: impl Into<String>, value: MetaValue) -> Self {
        let key = key.into();
        self.metadata.retain(|(k, _)| *k != key);
        self.metadata.push((key, value));
        self
    }

    pub fn tensor(
        mut self,
        name: impl Into<String>,
        dims: &[u64],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> Self {
        self.tensors.push(TensorToWrite {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
        self
    }

    /// An f32 tensor from values.
    pub fn tensor_f32(self, name: impl Into<String>, dims: &[u64], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, data)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_with_layout().0
    }

    pub fn to_bytes_with_layout(&self) -> (Vec<u8>, Layout) {
        let mut out = Vec::new();
        let mut layout = Layout::default();
        let mark = |out: &Vec<u8>, layout: &mut Layout, label: String| {
            layout.fields.push((out.len() as u64, label));
        };
        mark(&out, &mut layout, "magic".into());
        out.extend_from_slice(b"GGUF");
        mark(&out, &mut layout, "version".into());
        out.extend_from_slice(&self.version.to_le_bytes());
        mark(&out, &mut layout, "tensor count".into());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        mark(&out, &mut layout, "kv count".into());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            mark(&out, &mut layout, format!("key {key}"));
            write_string(&mut out, key);
            layout.value_type_offsets.push(out.len() as u64);
            mark(&out, &mut layout, format!("value type of {key}"));
            out.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            mark(&out, &mut layout, format!("value of {key}"));
            write_value(&mut out, value);
        }
        // Lay the data out in order, each tensor aligned.
        // A deliberately invalid alignment (for tests) still needs a layout.
        let align = self.alignment.max(1);
        let mut data_offsets = Vec::with_capacity(self.tensors.len());
        let mut next = 0u64;
        for t in &self.tensors {
            data_offsets.push(next);
            next = (next + t.data.len() as u64).div_ceil(align) * align;
        }
        for (t, offset) in self.tensors.iter().zip(&data_offsets) {
            mark(&out, &mut layout, format!("tensor {} name", t.name));
            write_string(&mut out, &t.name);
            mark(&out, &mut layout, format!("tensor {} n_dims", t.name));
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            layout.tensor_dim_offsets.push(out.len() as u64);
            for (i, d) in t.dims.iter().enumerate() {
                mark(&out, &mut layout, format!("tensor {} dim {i}", t.name));
                out.extend_from_slice(&d.to_le_bytes());
            }
            layout.tensor_type_offsets.push(out.len() as u64);
            mark(&out, &mut layout, format!("tensor {} type", t.name));
            out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            layout.tensor_offset_offsets.push(out.len() as u64);
            mark(&out, &mut layout, format!("tensor {} offset", t.name));
            out.extend_from_slice(&offset.to_le_bytes());
        }
        let data_start = (out.len() as u64).div_ceil(align) * align;
        out.resize(data_start as usize, 0);
        layout.data_start = data_start;
        for (t, offset) in self.tensors.iter().zip(&data_offsets) {
            out.resize((data_start + offset) as usize, 0);
            mark(&out, &mut layout, format!("tensor {} data", t.name));
            out.extend_from_slice(&t.data);
        }
        (out, layout)
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.push(*v as u8),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Array(a) => write_array(out, a),
    }
}

fn write_array(out: &mut Vec<u8>, array: &MetaArray) {
    out.extend_from_slice(&(array.element_type() as u32).to_le_bytes());
    out.extend_from_slice(&(array.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr, $f:expr) => {
            for x in $v {
                $f(out, x)
            }
        };
    }
    match array {
        MetaArray::U8(v) => out.extend_from_slice(v),
        MetaArray::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        MetaArray::Bool(v) => out.extend(v.iter().map(|&x| u8::from(x))),
        MetaArray::U16(v) => each!(v, |o: &mut Vec<u8>, x: &u16| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::I16(v) => each!(v, |o: &mut Vec<u8>, x: &i16| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::U32(v) => each!(v, |o: &mut Vec<u8>, x: &u32| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::I32(v) => each!(v, |o: &mut Vec<u8>, x: &i32| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::F32(v) => each!(v, |o: &mut Vec<u8>, x: &f32| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::U64(v) => each!(v, |o: &mut Vec<u8>, x: &u64| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::I64(v) => each!(v, |o: &mut Vec<u8>, x: &i64| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::F64(v) => each!(v, |o: &mut Vec<u8>, x: &f64| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::String(v) => each!(v, |o: &mut Vec<u8>, x: &String| write_string(o, x)),
        MetaArray::Array(v) => each!(v, |o: &mut Vec<u8>, x: &MetaArray| write_array(o, x)),
    }
}

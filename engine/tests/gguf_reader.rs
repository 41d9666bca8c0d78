//! The GGUF reader against gguf-py's view of the real model files, plus round trips through
//! the writer (every value type, nested arrays, alignment, split files).

mod common;

use egpu_engine::gguf::write::GgufWriter;
use egpu_engine::gguf::{GgufFile, MetaArray, MetaValue};
use egpu_engine::quant::GgmlType;
use serde_json::Value;

/// Compares one metadata value with gguf-py's JSON rendering of it.
fn assert_value_matches(key: &str, ours: &MetaValue, theirs: &Value) {
    match ours {
        MetaValue::String(s) => assert_eq!(theirs.as_str(), Some(s.as_str()), "{key}"),
        MetaValue::Bool(b) => assert_eq!(theirs.as_bool(), Some(*b), "{key}"),
        MetaValue::F32(v) => {
            assert_eq!(theirs.as_f64().map(|t| t as f32), Some(*v), "{key}")
        }
        MetaValue::F64(v) => assert_eq!(theirs.as_f64(), Some(*v), "{key}"),
        MetaValue::Array(a) => {
            assert_eq!(theirs["len"].as_u64(), Some(a.len() as u64), "{key} length");
            let head: Vec<Value> = match a {
                MetaArray::String(v) => v.iter().take(3).map(|s| Value::from(s.as_str())).collect(),
                MetaArray::F32(v) => v.iter().take(3).map(|&x| Value::from(x as f64)).collect(),
                MetaArray::I32(v) => v.iter().take(3).map(|&x| Value::from(x)).collect(),
                MetaArray::U32(v) => v.iter().take(3).map(|&x| Value::from(x)).collect(),
                _ => return,
            };
            let theirs_head: Vec<Value> = theirs["head"].as_array().unwrap().clone();
            assert_eq!(head, theirs_head, "{key} head");
        }
        other => assert_eq!(
            other.as_i64(),
            theirs.as_i64(),
            "{key}: integer value differs"
        ),
    }
}

fn check_against_gguf_py(model: &str) {
    let file = GgufFile::open(common::model_path(model)).expect("open");
    let stem = model.trim_end_matches(".gguf");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture(&format!("gguf/{stem}.json"))).unwrap(),
    )
    .unwrap();

    let meta = reference["metadata"].as_array().unwrap();
    assert_eq!(file.metadata().len(), meta.len(), "metadata entry count");
    for (entry, (key, value)) in meta.iter().zip(file.metadata().iter()) {
        assert_eq!(entry["key"].as_str(), Some(key), "metadata order");
        assert_value_matches(key, value, &entry["value"]);
    }

    let tensors = reference["tensors"].as_array().unwrap();
    assert_eq!(file.tensors().len(), tensors.len(), "tensor count");
    for (theirs, ours) in tensors.iter().zip(file.tensors()) {
        assert_eq!(theirs["name"].as_str(), Some(ours.name.as_str()));
        let dims: Vec<u64> = theirs["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(dims, ours.dims, "{} dims", ours.name);
        assert_eq!(
            theirs["type"].as_str(),
            Some(ours.ggml_type.name()),
            "{} type",
            ours.name
        );
        assert_eq!(
            theirs["n_bytes"].as_u64(),
            Some(ours.n_bytes),
            "{} bytes",
            ours.name
        );
        assert_eq!(
            theirs["file_offset"].as_u64(),
            Some(ours.file_offset),
            "{} offset",
            ours.name
        );
        assert_eq!(file.tensor_data(ours).len() as u64, ours.n_bytes);
    }
}

#[test]
fn smollm2_matches_gguf_py() {
    check_against_gguf_py(common::SMOLLM2);
}

#[test]
fn gemma3_matches_gguf_py() {
    check_against_gguf_py(common::GEMMA3);
}

#[test]
fn tensor_data_borrows_the_mapping() {
    let file = GgufFile::open(common::model_path(common::SMOLLM2)).unwrap();
    let a = file.tensor_data(&file.tensors()[0]).as_ptr();
    let b = file.tensor_data(&file.tensors()[0]).as_ptr();
    assert_eq!(a, b, "the same tensor must come from the same mapped bytes");
    // Opening does not read the data: the process's resident set must not grow by the file size.
    // (Checked indirectly: the slices point into one contiguous mapping of the whole file.)
    let first = file.tensors().iter().map(|t| t.file_offset).min().unwrap();
    let base = file.tensor_data(
        file.tensors()
            .iter()
            .find(|t| t.file_offset == first)
            .unwrap(),
    );
    for t in file.tensors() {
        let d = file.tensor_data(t);
        assert_eq!(
            d.as_ptr() as usize - base.as_ptr() as usize,
            (t.file_offset - first) as usize,
            "{} is not a view of the mapping",
            t.name
        );
    }
}

fn every_value_type() -> GgufWriter {
    GgufWriter::new()
        .kv("general.architecture", MetaValue::String("llama".into()))
        .kv("t.u8", MetaValue::U8(250))
        .kv("t.i8", MetaValue::I8(-5))
        .kv("t.u16", MetaValue::U16(65000))
        .kv("t.i16", MetaValue::I16(-30000))
        .kv("t.u32", MetaValue::U32(4_000_000_000))
        .kv("t.i32", MetaValue::I32(-2_000_000_000))
        .kv("t.f32", MetaValue::F32(1.5))
        .kv("t.bool", MetaValue::Bool(true))
        .kv("t.string", MetaValue::String("héllo ✓".into()))
        .kv("t.u64", MetaValue::U64(u64::MAX))
        .kv("t.i64", MetaValue::I64(i64::MIN))
        .kv("t.f64", MetaValue::F64(-2.25))
        .kv("t.empty", MetaValue::Array(MetaArray::U32(vec![])))
        .kv(
            "t.strings",
            MetaValue::Array(MetaArray::String(vec!["a".into(), "".into(), "ü".into()])),
        )
        .kv(
            "t.bools",
            MetaValue::Array(MetaArray::Bool(vec![true, false])),
        )
        .kv("t.i8s", MetaValue::Array(MetaArray::I8(vec![-1, 2])))
        .kv("t.f64s", MetaValue::Array(MetaArray::F64(vec![0.5, -0.25])))
        .kv(
            "t.nested",
            MetaValue::Array(MetaArray::Array(vec![
                MetaArray::I32(vec![1, 2, 3]),
                MetaArray::String(vec!["x".into()]),
                MetaArray::Array(vec![MetaArray::U16(vec![7])]),
            ])),
        )
}

#[test]
fn every_value_type_round_trips() {
    let writer = every_value_type()
        .tensor_f32("a", &[4, 2], &[1., 2., 3., 4., 5., 6., 7., 8.])
        .tensor("q", &[64], GgmlType::Q8_0, vec![0u8; 68]);
    for version in [2, 3] {
        let bytes = writer.clone().version(version).to_bytes();
        let file = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(file.version(), version);
        let m = file.metadata();
        assert_eq!(m.get("t.u8"), Some(&MetaValue::U8(250)));
        assert_eq!(m.get("t.i16"), Some(&MetaValue::I16(-30000)));
        assert_eq!(m.get_u64("t.u64"), Some(u64::MAX));
        assert_eq!(m.get("t.i64").and_then(|v| v.as_i64()), Some(i64::MIN));
        assert_eq!(m.get_str("t.string"), Some("héllo ✓"));
        assert_eq!(m.get_bool("t.bool"), Some(true));
        assert_eq!(m.get_f32("t.f64"), Some(-2.25));
        assert_eq!(m.get_str_array("t.strings").unwrap(), ["a", "", "ü"]);
        assert_eq!(m.get_array("t.empty").map(|a| a.len()), Some(0));
        let Some(MetaArray::Array(nested)) = m.get_array("t.nested") else {
            panic!("nested array lost")
        };
        assert_eq!(nested[0], MetaArray::I32(vec![1, 2, 3]));
        assert_eq!(nested[2], MetaArray::Array(vec![MetaArray::U16(vec![7])]));
        let (info, data) = file.tensor_data_by_name("a").unwrap();
        assert_eq!(info.dims, [4, 2]);
        assert_eq!(info.rows(), (4, 2));
        assert_eq!(&data[..4], &1f32.to_le_bytes());
        assert_eq!(file.tensor("q").unwrap().n_bytes, 68);
    }
}

#[test]
fn custom_alignment_is_honoured() {
    let bytes = GgufWriter::new()
        .alignment(64)
        .tensor_f32("a", &[3], &[1., 2., 3.])
        .tensor_f32("b", &[1], &[9.])
        .to_bytes();
    let file = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_start() % 64, 0);
    let b = file.tensor("b").unwrap();
    assert_eq!(b.data_offset, 64);
    assert_eq!(file.tensor_data(b), 9f32.to_le_bytes());
}

/// A copy (`GgufWriter::copy_of`) with one key changed keeps every other key, the tensors'
/// bytes and the alignment.
#[test]
fn a_copy_with_one_key_changed_keeps_the_rest() {
    let source = every_value_type()
        .alignment(64)
        .tensor_f32("a", &[3], &[1., 2., 3.])
        .tensor_f32("b", &[1], &[9.])
        .to_bytes();
    let source = GgufFile::from_bytes(source).unwrap();
    let copy = GgufWriter::copy_of(&source)
        .set_kv(
            "tokenizer.chat_template",
            MetaValue::String("{{ x }}".into()),
        )
        .to_bytes();
    let copy = GgufFile::from_bytes(copy).unwrap();
    assert_eq!(copy.alignment(), 64);
    assert_eq!(
        copy.metadata().get_str("tokenizer.chat_template"),
        Some("{{ x }}")
    );
    for (key, value) in source.metadata().iter() {
        assert_eq!(copy.metadata().get(key), Some(value), "{key}");
    }
    for info in source.tensors() {
        let theirs = copy.tensor(&info.name).unwrap();
        assert_eq!(copy.tensor_data(theirs), source.tensor_data(info));
    }
}

#[test]
fn split_files_open_as_one_model() {
    let dir = std::env::temp_dir().join(format!("egpu-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let shard = |no: u16, tensor: &str, value: f32| {
        let mut w = GgufWriter::new()
            .kv("split.no", MetaValue::U16(no))
            .kv("split.count", MetaValue::U16(3))
            .kv("split.tensors.count", MetaValue::I32(3));
        if no == 0 {
            w = w.kv("general.architecture", MetaValue::String("llama".into()));
        }
        w.tensor_f32(tensor, &[1], &[value]).to_bytes()
    };
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let path = dir.join(format!("m-{:05}-of-00003.gguf", i + 1));
        std::fs::write(path, shard(i as u16, name, i as f32)).unwrap();
    }
    // Any shard's name opens the whole model.
    let file = GgufFile::open(dir.join("m-00002-of-00003.gguf")).unwrap();
    assert_eq!(file.shard_count(), 3);
    assert_eq!(file.metadata().architecture(), Some("llama"));
    let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let c = file.tensor("c").unwrap();
    assert_eq!(c.shard, 2);
    assert_eq!(file.tensor_data(c), 2f32.to_le_bytes());

    // A missing shard is an error naming the file.
    std::fs::remove_file(dir.join("m-00003-of-00003.gguf")).unwrap();
    let err = GgufFile::open(dir.join("m-00001-of-00003.gguf")).unwrap_err();
    assert!(err.to_string().contains("m-00003-of-00003.gguf"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One tensor of each type in each real file, dequantized by `GgufFile` and by gguf-py.
#[test]
fn real_tensors_dequantize_like_gguf_py() {
    for model in [common::SMOLLM2, common::GEMMA3] {
        let file = GgufFile::open(common::model_path(model)).unwrap();
        let stem = model.trim_end_matches(".gguf");
        let reference: Value = serde_json::from_str(
            &std::fs::read_to_string(common::fixture(&format!("gguf/{stem}.json"))).unwrap(),
        )
        .unwrap();
        let samples = reference["dequantized"].as_array().unwrap();
        assert!(samples.len() >= 3, "{model}: expected several types");
        for sample in samples {
            let name = sample["name"].as_str().unwrap();
            let ours = file.dequantize_f32(name).unwrap();
            let bits: Vec<u64> = ours
                .iter()
                .take(512)
                .map(|v| u64::from(v.to_bits()))
                .collect();
            let theirs: Vec<u64> = sample["first_bits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap())
                .collect();
            assert_eq!(bits, theirs, "{model} {name}: first values differ");
            let sum: f64 = ours.iter().map(|&v| f64::from(v)).sum();
            let want = sample["sum"].as_f64().unwrap();
            assert!(
                (sum - want).abs() <= 1e-9 * want.abs().max(1.0) * ours.len() as f64,
                "{model} {name}: sum {sum} vs {want}"
            );
            let halves = file.dequantize_f16(name).unwrap();
            assert!(halves
                .iter()
                .zip(&ours)
                .all(|(h, f)| h.to_bits() == half::f16::from_f32(*f).to_bits()));
        }
    }
}

#[test]
fn unsupported_types_are_named_with_the_tensor() {
    let bytes = GgufWriter::new()
        .tensor(
            "blk.0.ffn_up.weight",
            &[256],
            GgmlType::IQ2_XXS,
            vec![0; 66],
        )
        .to_bytes();
    let file = GgufFile::from_bytes(bytes).unwrap();
    let err = file.dequantize_f32("blk.0.ffn_up.weight").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported tensor type IQ2_XXS in tensor \"blk.0.ffn_up.weight\""
    );
    assert!(file.dequantize_f32("nope").is_err());
}

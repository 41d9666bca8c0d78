//! The safetensors reader against a file written by the reference implementation (the
//! `safetensors` Python package; `tests/fixtures/safetensors/make.py`), with the values it wrote.

use std::path::PathBuf;

use egpu_engine::convert::safetensors::{Dtype, SafetensorsFile};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/safetensors")
        .join(name)
}

#[test]
fn reads_every_tensor_the_reference_wrote() {
    let file = SafetensorsFile::open(fixture("tiny.safetensors")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny.expected.json")).unwrap())
            .unwrap();
    let expected = expected.as_object().unwrap();
    let mut names: Vec<&str> = file.tensors().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    let mut want: Vec<&str> = expected
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "__metadata__")
        .collect();
    want.sort_unstable();
    assert_eq!(names, want);

    for (name, spec) in expected.iter().filter(|(k, _)| *k != "__metadata__") {
        let tensor = file.tensor(name).unwrap();
        assert_eq!(
            tensor.dtype.name(),
            spec["dtype"].as_str().unwrap(),
            "{name}"
        );
        let shape: Vec<u64> = spec["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(tensor.shape, shape, "{name}");
        match spec.get("values") {
            Some(values) => {
                let want: Vec<f32> = values
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                // exact: every F16/BF16 value is an f32, and the JSON holds the f32 values the writer had
                assert_eq!(file.to_f32(tensor).unwrap(), want, "{name}");
            }
            None => {
                assert!(matches!(tensor.dtype, Dtype::Other(_)));
                assert!(file.to_f32(tensor).is_err(), "{name} is not a float type");
            }
        }
    }
    let meta = &expected["__metadata__"];
    assert_eq!(
        file.metadata().get("format").map(String::as_str),
        meta["format"].as_str()
    );
    assert_eq!(
        file.metadata().get("egpu").map(String::as_str),
        meta["egpu"].as_str()
    );
}

#[test]
fn a_missing_file_names_its_path() {
    let err = SafetensorsFile::open(fixture("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
}

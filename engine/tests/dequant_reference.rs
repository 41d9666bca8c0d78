//! Checks egpu's dequantization against gguf-py, bit for bit.
//!
//! The fixtures in `tests/fixtures/dequant` come from `scripts/gen_dequant_fixtures.py`: random
//! blocks of each supported type (`<TYPE>.raw`) and what gguf-py's `gguf.quants.dequantize` makes
//! of them (`<TYPE>.f32`), listed in `manifest.json` together with gguf-py's size table.

use std::fs;
use std::path::{Path, PathBuf};

use egpu_engine::quant::{
    can_dequantize, dequantize_to_f16, dequantize_to_f32, DequantError, GgmlType,
};
use half::f16;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Manifest {
    gguf_version: String,
    fixtures: Vec<Fixture>,
    ggml_quant_sizes: Vec<QuantSize>,
}

#[derive(Debug, Deserialize)]
struct Fixture {
    #[serde(rename = "type")]
    type_name: String,
    ggml_id: u32,
    n_blocks: usize,
    n_elements: usize,
    raw_file: String,
    f32_file: String,
}

#[derive(Debug, Deserialize)]
struct QuantSize {
    #[serde(rename = "type")]
    type_name: String,
    ggml_id: u32,
    block_size: usize,
    type_size: usize,
}

/// One type's fixture, loaded and checked for consistency with the manifest.
struct Reference {
    ty: GgmlType,
    raw: Vec<u8>,
    values: Vec<f32>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dequant")
}

fn manifest() -> Manifest {
    let path = fixture_dir().join("manifest.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("manifest.json does not parse")
}

fn load(fixture: &Fixture) -> Reference {
    let ty = GgmlType::from_name(&fixture.type_name)
        .unwrap_or_else(|| panic!("manifest names unknown type {}", fixture.type_name));
    assert_eq!(ty.id(), fixture.ggml_id, "{ty}: ggml id");

    let raw = fs::read(fixture_dir().join(&fixture.raw_file)).expect("reading .raw fixture");
    let f32_bytes = fs::read(fixture_dir().join(&fixture.f32_file)).expect("reading .f32 fixture");
    assert_eq!(
        raw.len(),
        fixture.n_blocks * ty.type_size(),
        "{ty}: .raw length"
    );
    assert_eq!(
        fixture.n_elements,
        fixture.n_blocks * ty.block_size(),
        "{ty}: element count"
    );
    assert_eq!(f32_bytes.len(), fixture.n_elements * 4, "{ty}: .f32 length");

    let values = f32_bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Reference { ty, raw, values }
}

fn references() -> Vec<Reference> {
    manifest().fixtures.iter().map(load).collect()
}

/// Compares bit patterns and describes the first few differences, with block and position.
fn bit_differences(ty: GgmlType, got: &[u32], want: &[u32]) -> Vec<String> {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .take(8)
        .map(|(i, (g, w))| {
            format!(
                "{ty} element {i} (block {}, index {}): got {g:#010x}, want {w:#010x}",
                i / ty.block_size(),
                i % ty.block_size()
            )
        })
        .collect()
}

#[test]
fn fixtures_cover_every_supported_type() {
    let manifest = manifest();
    assert!(!manifest.gguf_version.is_empty());
    let mut covered: Vec<GgmlType> = references().iter().map(|r| r.ty).collect();
    covered.sort();
    let mut supported: Vec<GgmlType> = GgmlType::all().filter(|&ty| can_dequantize(ty)).collect();
    supported.sort();
    assert_eq!(covered, supported);
    assert_eq!(covered.len(), 15);
}

#[test]
fn f32_output_is_bit_exact_with_gguf_py() {
    for reference in references() {
        let ty = reference.ty;
        let mut out = vec![f32::NAN; reference.values.len()];
        dequantize_to_f32(ty, &reference.raw, &mut out).unwrap();
        let got: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> = reference.values.iter().map(|x| x.to_bits()).collect();
        let diffs = bit_differences(ty, &got, &want);
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    }
}

#[test]
fn f16_output_is_the_reference_rounded_to_nearest() {
    for reference in references() {
        let ty = reference.ty;
        let mut out = vec![f16::NAN; reference.values.len()];
        dequantize_to_f16(ty, &reference.raw, &mut out).unwrap();
        let got: Vec<u32> = out.iter().map(|x| u32::from(x.to_bits())).collect();
        let want: Vec<u32> = reference
            .values
            .iter()
            .map(|&x| u32::from(f16::from_f32(x).to_bits()))
            .collect();
        let diffs = bit_differences(ty, &got, &want);
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    }
}

/// Tensors are dequantized a row at a time (embedding lookups) and blocks sit at odd addresses
/// in a file, so a run of blocks must decode the same from any offset, misaligned or not.
#[test]
fn any_run_of_blocks_decodes_alone_and_misaligned() {
    for reference in references() {
        let ty = reference.ty;
        let (block_bytes, block_elements) = (ty.type_size(), ty.block_size());
        let n_blocks = reference.raw.len() / block_bytes;
        // Runs of 1, 2 and 3 blocks starting at block 1, copied one byte past an aligned start.
        for run in 1..=3.min(n_blocks - 1) {
            let bytes = &reference.raw[block_bytes..block_bytes * (1 + run)];
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(bytes);
            let mut out = vec![0f32; run * block_elements];
            dequantize_to_f32(ty, &shifted[1..], &mut out).unwrap();
            let want = &reference.values[block_elements..block_elements * (1 + run)];
            let same = out
                .iter()
                .zip(want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "{ty}: run of {run} blocks at block 1 differs");
        }
    }
}

/// gguf-py's sizes for every type it knows must match `GgmlType`'s table, and the table must not
/// know types gguf-py does not.
#[test]
fn type_table_matches_gguf_py() {
    let sizes = manifest().ggml_quant_sizes;
    for entry in &sizes {
        let ty = GgmlType::from_id(entry.ggml_id).unwrap_or_else(|| {
            panic!(
                "gguf-py has {} (id {}), GgmlType does not",
                entry.type_name, entry.ggml_id
            )
        });
        assert_eq!(ty.name(), entry.type_name, "name of id {}", entry.ggml_id);
        assert_eq!(ty.block_size(), entry.block_size, "{ty}: block size");
        if ty == GgmlType::Q8_1 {
            // gguf-py still sizes Q8_1 for its retired two-f32 header; ggml's block_q8_1 is two
            // f16s and 32 quants. If gguf-py is ever fixed this exception must go.
            assert_eq!(
                (entry.type_size, ty.type_size()),
                (40, 36),
                "Q8_1 sizes changed"
            );
        } else {
            assert_eq!(ty.type_size(), entry.type_size, "{ty}: type size");
        }
    }
    for ty in GgmlType::all() {
        assert!(
            sizes.iter().any(|e| e.ggml_id == ty.id()),
            "{ty} is not in gguf-py's GGML_QUANT_SIZES"
        );
    }
}

#[test]
fn unsupported_types_name_themselves() {
    for ty in [
        GgmlType::IQ2_XXS,
        GgmlType::Q8_K,
        GgmlType::Q8_1,
        GgmlType::MXFP4,
    ] {
        assert!(!can_dequantize(ty));
        let data = vec![0u8; ty.type_size()];
        let mut out = vec![0f32; ty.block_size()];
        let err = dequantize_to_f32(ty, &data, &mut out).unwrap_err();
        assert!(
            matches!(err, DequantError::Unsupported(t) if t == ty),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("unsupported tensor type {}", ty.name())
        );
        let mut half_out = vec![f16::ZERO; ty.block_size()];
        let err = dequantize_to_f16(ty, &data, &mut half_out).unwrap_err();
        assert!(
            matches!(err, DequantError::Unsupported(t) if t == ty),
            "{err:?}"
        );
    }
}

#[test]
fn mismatched_lengths_are_length_errors() {
    let ty = GgmlType::Q4_K;
    let cases = [
        (143, 256), // a byte short of one block
        (145, 256), // a byte over
        (288, 256), // two blocks' bytes for one block's elements
        (144, 255), // not a whole block of elements
        (0, 256),
        (144, 0),
    ];
    for (bytes, elements) in cases {
        let data = vec![0u8; bytes];
        let mut out = vec![0f32; elements];
        match dequantize_to_f32(ty, &data, &mut out) {
            Err(DequantError::Length {
                ty: t,
                bytes: b,
                elements: e,
            }) => assert_eq!((t, b, e), (ty, bytes, elements)),
            other => panic!("{bytes} bytes, {elements} elements: {other:?}"),
        }
        let mut half_out = vec![f16::ZERO; elements];
        let err = dequantize_to_f16(ty, &data, &mut half_out).unwrap_err();
        assert!(matches!(err, DequantError::Length { .. }), "{err:?}");
        assert!(err.to_string().contains("Q4_K"), "{err}");
    }
}

/// No combination of type and lengths may panic: each call either succeeds (exactly when the
/// lengths are whole matching blocks) or returns an error.
#[test]
fn arbitrary_lengths_never_panic() {
    for ty in GgmlType::all() {
        for bytes in [0, 1, 2, 17, 18, 34, 84, 110, 144, 210, 211, 256, 512] {
            for elements in [0, 1, 16, 31, 32, 33, 64, 255, 256, 257, 512] {
                let data = vec![0xA5u8; bytes];
                let mut out = vec![0f32; elements];
                let fits = elements % ty.block_size() == 0
                    && elements / ty.block_size() * ty.type_size() == bytes;
                let result = dequantize_to_f32(ty, &data, &mut out);
                assert_eq!(
                    result.is_ok(),
                    can_dequantize(ty) && fits,
                    "{ty} {bytes} {elements}"
                );
                let mut half_out = vec![f16::ZERO; elements];
                let result = dequantize_to_f16(ty, &data, &mut half_out);
                assert_eq!(
                    result.is_ok(),
                    can_dequantize(ty) && fits,
                    "{ty} {bytes} {elements}"
                );
            }
        }
    }
}

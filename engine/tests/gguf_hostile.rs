//! The GGUF reader on hostile input: a corpus of corrupted files built from a valid one.
//! Every case must give a typed error naming what is wrong (or `Ok` where the corruption is
//! harmless) — never a panic, a hang or a huge allocation.

mod common;

use egpu_engine::gguf::write::{GgufWriter, Layout};
use egpu_engine::gguf::{GgufError, GgufFile, MetaArray, MetaValue};
use egpu_engine::quant::GgmlType;

fn sample() -> (Vec<u8>, Layout) {
    GgufWriter::new()
        .kv("general.architecture", MetaValue::String("llama".into()))
        .kv("llama.block_count", MetaValue::U32(1))
        .kv("t.f32", MetaValue::F32(0.5))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(vec![
                "<s>".into(),
                "a".into(),
                "b".into(),
            ])),
        )
        .kv(
            "t.scores",
            MetaValue::Array(MetaArray::F32(vec![0.0, -1.0, -2.0])),
        )
        .kv(
            "t.nested",
            MetaValue::Array(MetaArray::Array(vec![MetaArray::U8(vec![1, 2])])),
        )
        .tensor_f32("token_embd.weight", &[4, 3], &[0.25; 12])
        .tensor(
            "blk.0.attn_q.weight",
            &[32, 2],
            GgmlType::Q8_0,
            vec![1u8; 68],
        )
        .tensor("output_norm.weight", &[4], GgmlType::F16, vec![0u8; 8])
        .to_bytes_with_layout()
}

fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes.to_vec())
}

fn put_u32(bytes: &mut [u8], at: u64, v: u32) {
    bytes[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: u64, v: u64) {
    bytes[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn the_sample_is_valid() {
    let (bytes, _) = sample();
    let file = parse(&bytes).unwrap();
    assert_eq!(file.tensors().len(), 3);
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let (bytes, layout) = sample();
    for len in 0..bytes.len() {
        let err = parse(&bytes[..len]).expect_err("a truncated file must not parse");
        match &err {
            GgufError::BadMagic { .. } => assert!(len < 4),
            GgufError::Truncated { offset, .. } => assert!(*offset <= len as u64),
            GgufError::TensorOutOfBounds { file_len, .. } => {
                assert_eq!(*file_len, len as u64);
                assert!(len as u64 >= layout.data_start.min(len as u64));
            }
            other => panic!("truncated to {len} bytes: unexpected error {other}"),
        }
    }
    // A cut at each labelled header boundary is reported as truncation at or before the cut
    // (counts are checked against the bytes that remain, so a cut can be caught early).
    for (offset, label) in &layout.fields {
        if *offset >= layout.data_start || *offset < 8 {
            continue;
        }
        match parse(&bytes[..*offset as usize]) {
            Err(GgufError::Truncated { offset: at, .. }) => {
                assert!(at <= *offset, "cut before {label} reported at {at}")
            }
            other => panic!("cut before {label}: {other:?}"),
        }
    }
}

#[test]
fn unknown_value_type_ids_are_named() {
    let (bytes, layout) = sample();
    for &at in &layout.value_type_offsets {
        for id in [13, 14, 255, 0x8000_0000, u32::MAX] {
            let mut b = bytes.clone();
            put_u32(&mut b, at, id);
            match parse(&b) {
                Err(GgufError::UnknownValueType { offset, type_id }) => {
                    assert_eq!((offset, type_id), (at, id))
                }
                other => panic!("value type {id} at {at}: {other:?}"),
            }
        }
        // Another valid type reinterprets the bytes: any outcome but a panic is acceptable,
        // and an error must say something.
        for id in 0..13 {
            let mut b = bytes.clone();
            put_u32(&mut b, at, id);
            if let Err(e) = parse(&b) {
                assert!(!e.to_string().is_empty());
            }
        }
    }
}

#[test]
fn tensor_type_ids_flipped() {
    let (bytes, layout) = sample();
    for &at in &layout.tensor_type_offsets {
        for id in [4, 5, 31, 36, 43, 1000, u32::MAX] {
            let mut b = bytes.clone();
            put_u32(&mut b, at, id);
            match parse(&b) {
                Err(GgufError::UnknownTensorType {
                    offset, type_id, ..
                }) => {
                    assert_eq!((offset, type_id), (at, id))
                }
                other => panic!("tensor type {id}: {other:?}"),
            }
        }
        for ty in GgmlType::all() {
            let mut b = bytes.clone();
            put_u32(&mut b, at, ty.id());
            match parse(&b) {
                Ok(file) => {
                    for t in file.tensors() {
                        assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes);
                    }
                }
                Err(
                    GgufError::NotBlockMultiple { .. }
                    | GgufError::TensorOutOfBounds { .. }
                    | GgufError::TensorOverlap { .. },
                ) => {}
                Err(other) => panic!("tensor type {ty}: unexpected {other}"),
            }
        }
    }
}

#[test]
fn offsets_past_the_end_misaligned_or_overlapping() {
    let (bytes, layout) = sample();
    let len = bytes.len() as u64;
    for &at in &layout.tensor_offset_offsets {
        for off in [
            len.next_multiple_of(32),
            len.next_multiple_of(32) * 4,
            u64::MAX - 31,
            1 << 62,
        ] {
            let mut b = bytes.clone();
            put_u64(&mut b, at, off);
            assert!(
                matches!(parse(&b), Err(GgufError::TensorOutOfBounds { .. })),
                "offset {off}"
            );
        }
        let mut b = bytes.clone();
        put_u64(&mut b, at, 8);
        assert!(matches!(
            parse(&b),
            Err(GgufError::MisalignedTensor { data_offset: 8, .. })
        ));
    }
    // Point the second tensor at the first one's data.
    let mut b = bytes.clone();
    put_u64(&mut b, layout.tensor_offset_offsets[1], 0);
    assert!(matches!(parse(&b), Err(GgufError::TensorOverlap { .. })));
}

#[test]
fn huge_or_zero_dims() {
    let (bytes, layout) = sample();
    let first_dim = layout.tensor_dim_offsets[0];
    for (value, expect_overflow) in [(0u64, false), (u64::MAX, false), (1 << 63, false)] {
        let mut b = bytes.clone();
        put_u64(&mut b, first_dim, value);
        let err = parse(&b).unwrap_err();
        assert!(
            matches!(err, GgufError::BadDim { value: v, offset, .. } if v == value && offset == first_dim)
                || expect_overflow,
            "{err}"
        );
    }
    // Two dims whose product overflows i64.
    let mut b = bytes.clone();
    put_u64(&mut b, first_dim, 1 << 40);
    put_u64(&mut b, first_dim + 8, 1 << 40);
    assert!(matches!(parse(&b), Err(GgufError::SizeOverflow { .. })));
    // Large but representable: data runs past the end of the file.
    let mut b = bytes.clone();
    put_u64(&mut b, first_dim, 1 << 40);
    assert!(matches!(
        parse(&b),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    // Too many dimensions.
    for n in [5u32, 64, u32::MAX] {
        let mut b = bytes.clone();
        put_u32(&mut b, first_dim - 4, n);
        assert!(matches!(parse(&b), Err(GgufError::TooManyDims { n_dims, .. }) if n_dims == n));
    }
}

#[test]
fn huge_counts_and_lengths_allocate_nothing() {
    let (bytes, layout) = sample();
    // Tensor count and kv count.
    for (at, what) in [(8u64, "tensor"), (16, "metadata entry")] {
        for n in [u64::MAX, 1 << 40, 1 << 19] {
            let mut b = bytes.clone();
            put_u64(&mut b, at, n);
            match parse(&b) {
                Err(
                    GgufError::CountTooLarge { what: w, .. } | GgufError::Truncated { what: w, .. },
                ) => {
                    assert_eq!(w, what)
                }
                other => panic!("{what} count {n}: {other:?}"),
            }
        }
    }
    // The first key's string length.
    for n in [u64::MAX, 1 << 30, 100_000] {
        let mut b = bytes.clone();
        put_u64(&mut b, 24, n);
        assert!(matches!(
            parse(&b),
            Err(GgufError::StringTooLong { offset: 24, .. }
                | GgufError::Truncated { offset: 32, .. })
        ));
    }
    // The token array's element count (it follows the value type and element type ids).
    let (tokens_value_at, _) = layout
        .fields
        .iter()
        .find(|(_, l)| l == "value of tokenizer.ggml.tokens")
        .unwrap();
    for n in [u64::MAX, 1 << 24, 1_000_000] {
        let mut b = bytes.clone();
        put_u64(&mut b, tokens_value_at + 4, n);
        assert!(matches!(
            parse(&b),
            Err(GgufError::CountTooLarge { .. } | GgufError::Truncated { .. })
        ));
    }
}

#[test]
fn bad_headers() {
    let (bytes, _) = sample();
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(parse(&b), Err(GgufError::BadMagic { .. })));
    for (version, hint) in [(1u32, "32-bit"), (4, ""), (3u32.swap_bytes(), "big-endian")] {
        let mut b = bytes.clone();
        put_u32(&mut b, 4, version);
        let err = parse(&b).unwrap_err();
        assert!(matches!(err, GgufError::UnsupportedVersion { .. }), "{err}");
        assert!(err.to_string().contains(hint), "{err}");
    }
    assert!(matches!(parse(b"GG"), Err(GgufError::BadMagic { .. })));
    assert!(matches!(parse(b""), Err(GgufError::BadMagic { .. })));
}

#[test]
fn invalid_utf8_duplicates_alignment_and_depth() {
    // Invalid UTF-8 in a key.
    let (mut bytes, _) = sample();
    bytes[32] = 0xff;
    assert!(matches!(
        parse(&bytes),
        Err(GgufError::InvalidUtf8 { offset: 32 })
    ));

    let dup_key = GgufWriter::new()
        .kv("a", MetaValue::U8(1))
        .kv("a", MetaValue::U8(2))
        .to_bytes();
    assert!(matches!(
        parse(&dup_key),
        Err(GgufError::DuplicateKey { .. })
    ));

    let dup_tensor = GgufWriter::new()
        .tensor_f32("w", &[1], &[1.0])
        .tensor_f32("w", &[1], &[2.0])
        .to_bytes();
    assert!(matches!(
        parse(&dup_tensor),
        Err(GgufError::DuplicateTensor { .. })
    ));

    for bad in [0u32, 3, 1 << 20] {
        let b = GgufWriter::new().alignment(bad).to_bytes();
        assert!(
            matches!(parse(&b), Err(GgufError::BadAlignment { .. })),
            "{bad}"
        );
    }
    let b = GgufWriter::new()
        .kv("general.alignment", MetaValue::String("32".into()))
        .to_bytes();
    assert!(matches!(parse(&b), Err(GgufError::MetadataType { .. })));

    let mut deep = MetaArray::U8(vec![1]);
    for _ in 0..6 {
        deep = MetaArray::Array(vec![deep]);
    }
    let b = GgufWriter::new()
        .kv("deep", MetaValue::Array(deep))
        .to_bytes();
    assert!(matches!(parse(&b), Err(GgufError::ArrayTooDeep { .. })));

    let block = GgufWriter::new()
        .tensor("q", &[16], GgmlType::Q4_0, vec![0; 9])
        .to_bytes();
    assert!(matches!(
        parse(&block),
        Err(GgufError::NotBlockMultiple { .. })
    ));
}

/// Random corruption of the sample: 1–8 random bytes overwritten, 20,000 times, with a fixed
/// seed. Whatever the outcome, it must be a value, and an accepted file must be self-consistent.
#[test]
fn random_byte_corruption_never_panics() {
    let (bytes, _) = sample();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut err) = (0, 0);
    for _ in 0..20_000 {
        let mut b = bytes.clone();
        for _ in 0..(next() % 8 + 1) {
            let at = (next() % b.len() as u64) as usize;
            b[at] = next() as u8;
        }
        match parse(&b) {
            Ok(file) => {
                ok += 1;
                for t in file.tensors() {
                    assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes);
                }
            }
            Err(e) => {
                err += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    assert_eq!(ok + err, 20_000);
    assert!(
        err > 0 && ok > 0,
        "corruption should sometimes be harmless and sometimes not"
    );
}

/// The real SmolLM2 header cut short at 400 points, and its tensor table corrupted.
#[test]
fn real_file_truncated_and_corrupted() {
    let path = common::model_path(common::SMOLLM2);
    let full = GgufFile::open(&path).unwrap();
    let header_len = full.data_start() as usize;
    let bytes = std::fs::read(&path).unwrap();
    for i in 0..400 {
        let cut = header_len * i / 400;
        assert!(parse(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    // Cut inside the data section: the last tensor no longer fits.
    let cut = bytes.len() - 1;
    assert!(matches!(
        parse(&bytes[..cut]),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
}

/// Inputs the fuzzer once broke, replayed through everything the fuzz target does.
#[test]
fn fuzz_regressions() {
    let dir = common::fixture("gguf/fuzz-regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if let Ok(file) = GgufFile::from_bytes(bytes) {
            let estimate = egpu_engine::models::info::estimate_memory(&file, 4096);
            assert!(estimate.total >= estimate.weights, "{}", path.display());
        }
        n += 1;
    }
    assert!(n >= 1, "no regression inputs found in {}", dir.display());
}

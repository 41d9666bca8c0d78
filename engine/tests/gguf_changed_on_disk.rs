//! A model file changed under a loaded model: truncated in place (what `cp new.gguf
//! loaded.gguf` does first) it used to raise SIGBUS on the next read and kill the process; now
//! the read sees zeros and the file reports the change. Written in place or replaced by rename
//! is told apart too.

use egpu_engine::gguf::write::GgufWriter;
use egpu_engine::gguf::{GgufFile, MetaValue};

/// A file with one 4 MiB tensor of ones, so that its data spans many pages.
fn model_bytes() -> Vec<u8> {
    let values = vec![1.0f32; 1 << 20];
    GgufWriter::new()
        .kv("general.architecture", MetaValue::String("test".into()))
        .tensor_f32("big", &[1 << 20], &values)
        .to_bytes()
}

#[cfg(unix)]
#[test]
fn reads_of_a_truncated_file_see_zeros_and_the_change_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, model_bytes()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let info = file.tensor("big").unwrap().clone();
    let first_pass: f64 = file
        .tensor_data(&info)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
        .sum();
    assert_eq!(first_pass, (1u64 << 20) as f64);
    assert_eq!(file.changed_on_disk(), None);

    // In place, on the same inode, as cp does before it writes the new bytes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let data = file.tensor_data(&info);
    let after: f64 = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
        .sum();
    // Truncation takes every page past the new end away from the mapping: all read as zeros.
    assert_eq!(after, 0.0);
    let why = file.changed_on_disk().expect("a change");
    assert!(why.contains("m.gguf") && why.contains("truncated"), "{why}");
}

#[test]
fn a_file_written_in_place_is_reported_and_one_renamed_over_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, model_bytes()).unwrap();
    let renamed = GgufFile::open(&path).unwrap();
    // The documented way to replace a model: a new file renamed over the old path.
    let fresh = dir.path().join("m.gguf.new");
    std::fs::write(&fresh, model_bytes()).unwrap();
    std::fs::rename(&fresh, &path).unwrap();
    assert_eq!(renamed.changed_on_disk(), None);

    let written = GgufFile::open(&path).unwrap();
    let mut bytes = model_bytes();
    bytes.extend_from_slice(&[0; 64]);
    // Same inode, new length and time.
    std::fs::write(&path, &bytes).unwrap();
    let why = written.changed_on_disk().expect("a change");
    assert!(
        why.contains("modified in place") || why.contains("truncated"),
        "{why}"
    );
}

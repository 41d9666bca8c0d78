//! egpud's persisted state: the pinned models and their load options, so that a restarted
//! egpud (after a crash, a reboot, a `launchctl kickstart`) makes them resident again.
//!
//! The file is `state.json` in `--state-dir`:
//! `{"version":1,"models":[{"name","source","context_length","slots","keep_alive_ms","backend"}]}`.
//! It is rewritten whenever the set of pinned models changes, atomically: a temporary file in
//! the same folder, fsync, rename, fsync of the folder. A file that cannot be read or parsed
//! is logged and moved aside as `state.json.corrupt-<unix time>`; egpud then starts with no
//! pinned models. Nothing here ever stops the daemon: failures are logged.
//!
//! Pure persistence: what the records mean (reloading them, dropping the ones that cannot
//! come back) is the residency layer's business (`residency::pins`).

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";
pub const STATE_VERSION: u32 = 1;

/// A pinned model as persisted: what a Load needs to bring it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedModel {
    pub name: String,
    /// Canonical path of the model file.
    pub source: String,
    pub context_length: u32,
    pub slots: u32,
    /// Negative = forever; absent = egpud's default. Pinned models never expire; the value
    /// is kept so that a later unpinning could honour it.
    #[serde(default)]
    pub keep_alive_ms: Option<i64>,
    #[serde(default)]
    pub backend: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    models: Vec<PinnedModel>,
}

/// The pinned set, in memory and on disk. Every change is written through under one lock,
/// so writes never interleave and the file always holds the latest set.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    pinned: Mutex<BTreeMap<String, PinnedModel>>,
}

impl StateStore {
    /// Creates the folder (mode 0700) if missing and reads the file. A missing file is an
    /// empty set; an unreadable or corrupt one is logged and moved aside.
    pub fn open(dir: &Path) -> StateStore {
        if let Err(e) = DirBuilder::new().recursive(true).mode(0o700).create(dir) {
            tracing::error!(
                state_dir = %dir.display(),
                "cannot create the state folder: {e}; pinned models will not survive a restart"
            );
        }
        let pinned = read_state(&dir.join(STATE_FILE))
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect();
        StateStore {
            dir: dir.to_owned(),
            pinned: Mutex::new(pinned),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The persisted pinned models, by name.
    pub fn pinned(&self) -> Vec<PinnedModel> {
        self.pinned.lock().values().cloned().collect()
    }

    /// Records a pinned model (a no-op when it is recorded as is).
    pub fn remember(&self, model: PinnedModel) {
        let mut pinned = self.pinned.lock();
        if pinned.get(&model.name) == Some(&model) {
            return;
        }
        pinned.insert(model.name.clone(), model);
        self.write(&pinned);
    }

    /// Drops a model from the pinned set.
    pub fn forget(&self, name: &str) {
        let mut pinned = self.pinned.lock();
        if pinned.remove(name).is_some() {
            self.write(&pinned);
        }
    }

    /// Drops `model` only if it is still recorded exactly so (a client may have pinned
    /// another model under its name since).
    pub fn forget_exactly(&self, model: &PinnedModel) {
        let mut pinned = self.pinned.lock();
        if pinned.get(&model.name) == Some(model) {
            pinned.remove(&model.name);
            self.write(&pinned);
        }
    }

    fn write(&self, pinned: &BTreeMap<String, PinnedModel>) {
        let state = StateFile {
            version: STATE_VERSION,
            models: pinned.values().cloned().collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&state).expect("state serializes");
        bytes.push(b'\n');
        if let Err(e) = write_atomic(&self.dir, STATE_FILE, &bytes) {
            tracing::error!(
                state_file = %self.path().display(),
                "cannot save the pinned models: {e}"
            );
        }
    }
}

/// The key HTTP clients send over TCP, from `dir/name`; created (mode 0600, 192 random bits
/// from the OS) at the first start. A file that is present but empty is filled anew.
pub fn api_key(dir: &Path, name: &str) -> std::io::Result<String> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut random = [0u8; 24];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut random)?;
    let key: String = std::iter::once("egpu-".to_owned())
        .chain(random.iter().map(|b| format!("{b:02x}")))
        .collect();
    write_atomic(dir, name, format!("{key}\n").as_bytes())?;
    Ok(key)
}

/// Reads the state file; never fails: problems are logged and the file moved aside.
fn read_state(path: &Path) -> Vec<PinnedModel> {
    let problem = match std::fs::read(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Vec::new(),
        Err(e) => format!("cannot be read: {e}"),
        Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
            Ok(state) if state.version == STATE_VERSION => return state.models,
            Ok(state) => format!(
                "has version {}; this egpud reads version {STATE_VERSION}",
                state.version
            ),
            Err(e) => format!("is corrupt: {e}"),
        },
    };
    let aside = move_aside(path);
    tracing::warn!(
        state_file = %path.display(),
        moved_to = %aside.as_deref().map_or_else(|| "(could not move it)".into(), |p| p.display().to_string()),
        "the state file {problem}; starting with no pinned models"
    );
    Vec::new()
}

/// Renames a bad state file to `<name>.corrupt-<unix time>`; None if that failed.
fn move_aside(path: &Path) -> Option<PathBuf> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut name = path.file_name()?.to_os_string();
    name.push(format!(".corrupt-{now}"));
    let aside = path.with_file_name(name);
    match std::fs::rename(path, &aside) {
        Ok(()) => Some(aside),
        Err(e) => {
            tracing::error!(state_file = %path.display(), "cannot move the state file aside: {e}");
            None
        }
    }
}

/// Writes `dir/name` so that a crash at any moment leaves either the old or the new file:
/// a temporary file (mode 0600) in the same folder, fsync, rename over, fsync the folder.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, dir.join(name))?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> PinnedModel {
        PinnedModel {
            name: name.into(),
            source: format!("/models/{name}.gguf"),
            context_length: 256,
            slots: 1,
            keep_alive_ms: Some(-1),
            backend: "cpu".into(),
        }
    }

    #[test]
    fn round_trip_and_forget() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("a/state");
        let store = StateStore::open(&state_dir);
        let mode = std::fs::metadata(&state_dir).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        assert!(store.pinned().is_empty());
        store.remember(model("b"));
        store.remember(model("a"));
        let text = std::fs::read_to_string(state_dir.join(STATE_FILE)).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["models"][0]["name"], "a");
        assert_eq!(json["models"][1]["context_length"], 256);

        let again = StateStore::open(&state_dir);
        assert_eq!(again.pinned(), vec![model("a"), model("b")]);
        again.forget("a");
        let mut changed = model("b");
        changed.source = "/elsewhere.gguf".into();
        again.forget_exactly(&changed);
        assert_eq!(StateStore::open(&state_dir).pinned(), vec![model("b")]);
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(&state_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn the_api_key_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let key = api_key(dir.path(), "api-key").unwrap();
        assert!(key.starts_with("egpu-") && key.len() == 53, "{key}");
        let file = dir.path().join("api-key");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(api_key(dir.path(), "api-key").unwrap(), key);
        std::fs::write(&file, "").unwrap();
        let fresh = api_key(dir.path(), "api-key").unwrap();
        assert_ne!(fresh, key);
        assert_eq!(api_key(dir.path(), "api-key").unwrap(), fresh);
    }

    #[test]
    fn corrupt_files_are_moved_aside() {
        for bad in [
            &b"{\"version\":1,\"models\":[{\"name\":\"a\",\"sou"[..],
            b"",
            b"\xff\xfe garbage",
            b"{\"version\":99,\"models\":[]}",
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(STATE_FILE), bad).unwrap();
            let store = StateStore::open(dir.path());
            assert!(store.pinned().is_empty());
            let names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 1, "{names:?}");
            assert!(names[0].starts_with("state.json.corrupt-"), "{names:?}");
            // The next save starts a fresh file beside the one moved aside.
            store.remember(model("a"));
            assert_eq!(StateStore::open(dir.path()).pinned(), vec![model("a")]);
        }
    }
}

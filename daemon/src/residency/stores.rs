//! Other programs' model stores, read offline and never written: Ollama's, LM Studio's, and
//! GGUF files in the Hugging Face cache. A user who already has models there can name them
//! to egpud as those programs do (`llama3.1:8b`, `lmstudio-community/Qwen2.5-0.5B-GGUF`,
//! `owner/repo:file.gguf`).
//!
//! - Ollama (`$OLLAMA_MODELS`, else `~/.ollama/models`): `manifests/<host>/<namespace>/<model>/<tag>`
//!   is a JSON manifest whose layer of media type `application/vnd.ollama.image.model` names
//!   the weights blob `blobs/sha256-<hex>`. `llama3.1:8b` is host `registry.ollama.ai`,
//!   namespace `library`; a missing tag means `latest`. Only GGUF blobs are served.
//! - LM Studio (`~/.lmstudio/models`): `<publisher>/<model>/*.gguf`, named `publisher/model`
//!   when the folder holds one model file, else `publisher/model/<file name without .gguf>`
//!   (multimodal projector files, `mmproj*`, are not models).
//! - Hugging Face cache (`$HF_HUB_CACHE`, …): the `.gguf` files of a repo's snapshot, named
//!   `owner/repo:file.gguf`, and also `owner/repo` when the snapshot has exactly one.

use std::path::{Path, PathBuf};

use egpu_engine::convert::hf_cache::HfEnv;

const OLLAMA_HOST: &str = "registry.ollama.ai";
const OLLAMA_NAMESPACE: &str = "library";
const OLLAMA_MODEL_LAYER: &str = "application/vnd.ollama.image.model";

/// Where a model file was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Store {
    /// egpu's own models folder.
    ModelsFolder,
    Ollama,
    LmStudio,
    HuggingFace,
}

impl Store {
    pub fn as_str(self) -> &'static str {
        match self {
            Store::ModelsFolder => "models",
            Store::Ollama => "ollama",
            Store::LmStudio => "lmstudio",
            Store::HuggingFace => "huggingface",
        }
    }
}

/// A model file in another program's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreModel {
    pub name: String,
    pub path: PathBuf,
    pub store: Store,
}

/// The stores' folders, from the environment (None: that store has no folder here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreRoots {
    pub ollama: Option<PathBuf>,
    pub lmstudio: Option<PathBuf>,
    pub hf_hub: Option<PathBuf>,
}

impl StoreRoots {
    pub fn from_env(env: &HfEnv) -> StoreRoots {
        let ollama = std::env::var_os("OLLAMA_MODELS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| env.home.as_ref().map(|h| h.join(".ollama").join("models")));
        StoreRoots {
            ollama,
            lmstudio: env
                .home
                .as_ref()
                .map(|h| h.join(".lmstudio").join("models")),
            hf_hub: env.hub_dir(),
        }
    }

    /// Every model of every store, by store then name.
    pub fn models(&self) -> Vec<StoreModel> {
        let mut all = Vec::new();
        if let Some(root) = &self.ollama {
            all.extend(ollama_models(root));
        }
        if let Some(root) = &self.lmstudio {
            all.extend(lmstudio_models(root));
        }
        if let Some(hub) = &self.hf_hub {
            all.extend(hf_gguf_models(hub));
        }
        all
    }

    /// The model a name means in one of the stores (Ollama first, then LM Studio, then the
    /// HF cache), if any.
    pub fn resolve(&self, name: &str) -> Option<StoreModel> {
        if let Some(found) = self.ollama.as_deref().and_then(|r| ollama_resolve(r, name)) {
            return Some(found);
        }
        let by_name = |models: Vec<StoreModel>| models.into_iter().find(|m| m.name == name);
        if let Some(found) = self
            .lmstudio
            .as_deref()
            .and_then(|r| by_name(lmstudio_models(r)))
        {
            return Some(found);
        }
        self.hf_hub
            .as_deref()
            .and_then(|hub| by_name(hf_gguf_models(hub)))
    }
}

/// Whether a file starts with GGUF's magic.
fn is_gguf(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// The weights blob an Ollama manifest names, if it is a GGUF file.
fn ollama_blob(root: &Path, manifest: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(manifest).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let digest = json["layers"]
        .as_array()?
        .iter()
        .find(|l| l["mediaType"] == OLLAMA_MODEL_LAYER)?["digest"]
        .as_str()?;
    // `sha256:<hex>` is stored as `sha256-<hex>`; anything else in a digest is refused so a
    // manifest cannot point outside the blobs folder.
    let (algo, hex) = digest.split_once(':')?;
    if !algo.chars().all(|c| c.is_ascii_alphanumeric())
        || hex.is_empty()
        || !hex.chars().all(|c| c.is_ascii_hexdigit())
    {
        return None;
    }
    let blob = root.join("blobs").join(format!("{algo}-{hex}"));
    is_gguf(&blob).then_some(blob)
}

/// `[host/][namespace/]model[:tag]` to its manifest path parts.
fn ollama_parts(name: &str) -> Option<(String, String, String, String)> {
    let (path, tag) = match name.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') => (path, tag),
        _ => (name, "latest"),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (host, namespace, model) = match parts.as_slice() {
        [model] => (OLLAMA_HOST, OLLAMA_NAMESPACE, *model),
        [namespace, model] => (OLLAMA_HOST, *namespace, *model),
        [host, namespace, model] => (*host, *namespace, *model),
        _ => return None,
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    [host, namespace, model, tag]
        .iter()
        .all(|p| part_ok(p))
        .then(|| (host.into(), namespace.into(), model.into(), tag.into()))
}

/// The name Ollama shows for a manifest.
fn ollama_name(host: &str, namespace: &str, model: &str, tag: &str) -> String {
    match (host == OLLAMA_HOST, namespace == OLLAMA_NAMESPACE) {
        (true, true) => format!("{model}:{tag}"),
        (true, false) => format!("{namespace}/{model}:{tag}"),
        _ => format!("{host}/{namespace}/{model}:{tag}"),
    }
}

fn ollama_resolve(root: &Path, name: &str) -> Option<StoreModel> {
    let (host, namespace, model, tag) = ollama_parts(name)?;
    let manifest = root
        .join("manifests")
        .join(&host)
        .join(&namespace)
        .join(&model)
        .join(&tag);
    let path = ollama_blob(root, &manifest)?;
    Some(StoreModel {
        name: ollama_name(&host, &namespace, &model, &tag),
        path,
        store: Store::Ollama,
    })
}

fn ollama_models(root: &Path) -> Vec<StoreModel> {
    let manifests = root.join("manifests");
    let mut out = Vec::new();
    for host in dir_names(&manifests) {
        for namespace in dir_names(&manifests.join(&host)) {
            for model in dir_names(&manifests.join(&host).join(&namespace)) {
                let dir = manifests.join(&host).join(&namespace).join(&model);
                for tag in file_names(&dir) {
                    if let Some(path) = ollama_blob(root, &dir.join(&tag)) {
                        out.push(StoreModel {
                            name: ollama_name(&host, &namespace, &model, &tag),
                            path,
                            store: Store::Ollama,
                        });
                    }
                }
            }
        }
    }
    out
}

fn lmstudio_models(root: &Path) -> Vec<StoreModel> {
    let mut out = Vec::new();
    for publisher in dir_names(root) {
        for model in dir_names(&root.join(&publisher)) {
            let dir = root.join(&publisher).join(&model);
            let files: Vec<String> = file_names(&dir)
                .into_iter()
                .filter(|f| f.ends_with(".gguf") && !f.starts_with("mmproj"))
                .collect();
            let single = files.len() == 1;
            for file in files {
                let stem = file.trim_end_matches(".gguf");
                let name = if single {
                    format!("{publisher}/{model}")
                } else {
                    format!("{publisher}/{model}/{stem}")
                };
                out.push(StoreModel {
                    name,
                    path: dir.join(&file),
                    store: Store::LmStudio,
                });
            }
        }
    }
    out
}

/// The snapshot a cached repo's `refs/main` names, else its newest snapshot.
fn hf_snapshot(repo_dir: &Path) -> Option<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let rev = rev.trim();
        if !rev.is_empty() && rev.chars().all(|c| c.is_ascii_alphanumeric()) {
            let dir = snapshots.join(rev);
            if dir.is_dir() {
                return Some(dir);
            }
        }
    }
    dir_names(&snapshots)
        .into_iter()
        .map(|rev| snapshots.join(rev))
        .max_by_key(|dir| {
            std::fs::metadata(dir)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH)
        })
}

/// The `.gguf` files under a folder (one level of subfolders too, as repos that keep each
/// quantization in its own folder do), relative to it.
fn gguf_files_under(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = file_names(dir)
        .into_iter()
        .filter(|f| f.ends_with(".gguf"))
        .collect();
    for sub in dir_names(dir) {
        files.extend(
            file_names(&dir.join(&sub))
                .into_iter()
                .filter(|f| f.ends_with(".gguf"))
                .map(|f| format!("{sub}/{f}")),
        );
    }
    files.retain(|f| {
        let name = f.rsplit('/').next().unwrap_or(f);
        !name.starts_with("mmproj") && (!name.contains("-of-") || name.contains("-00001-of-"))
    });
    files.sort();
    files
}

fn hf_gguf_models(hub: &Path) -> Vec<StoreModel> {
    let mut out = Vec::new();
    for dir in dir_names(hub) {
        let Some(repo) = dir.strip_prefix("models--") else {
            continue;
        };
        let repo = repo.replacen("--", "/", 1);
        let Some(snapshot) = hf_snapshot(&hub.join(&dir)) else {
            continue;
        };
        let files = gguf_files_under(&snapshot);
        if let [only] = files.as_slice() {
            out.push(StoreModel {
                name: repo.clone(),
                path: snapshot.join(only),
                store: Store::HuggingFace,
            });
        }
        for file in files {
            out.push(StoreModel {
                name: format!("{repo}:{file}"),
                path: snapshot.join(&file),
                store: Store::HuggingFace,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gguf(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"GGUF\x03\x00\x00\x00rest").unwrap();
    }

    fn manifest(root: &Path, parts: &[&str], digest: &str) {
        let path = parts
            .iter()
            .fold(root.join("manifests"), |p, part| p.join(part));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let json = serde_json::json!({
            "schemaVersion": 2,
            "layers": [
                {"mediaType": "application/vnd.ollama.image.license", "digest": "sha256:11"},
                {"mediaType": OLLAMA_MODEL_LAYER, "digest": digest},
            ]
        });
        std::fs::write(path, json.to_string()).unwrap();
    }

    #[test]
    fn ollama_names_resolve_to_their_gguf_blob() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        gguf(&root.join("blobs/sha256-aa11"));
        gguf(&root.join("blobs/sha256-bb22"));
        std::fs::write(root.join("blobs/sha256-cc33"), b"not a gguf").unwrap();
        manifest(
            root,
            &[OLLAMA_HOST, "library", "llama3.1", "8b"],
            "sha256:aa11",
        );
        manifest(
            root,
            &[OLLAMA_HOST, "library", "tiny", "latest"],
            "sha256:bb22",
        );
        manifest(
            root,
            &[OLLAMA_HOST, "someone", "theirs", "q4"],
            "sha256:bb22",
        );
        manifest(
            root,
            &[OLLAMA_HOST, "library", "safet", "latest"],
            "sha256:cc33",
        );
        manifest(
            root,
            &[OLLAMA_HOST, "library", "escape", "latest"],
            "sha256:../../x",
        );

        let found = ollama_resolve(root, "llama3.1:8b").unwrap();
        assert_eq!(found.path, root.join("blobs/sha256-aa11"));
        assert_eq!(found.name, "llama3.1:8b");
        // A missing tag means latest; the full form works too.
        assert_eq!(ollama_resolve(root, "tiny").unwrap().name, "tiny:latest");
        assert_eq!(
            ollama_resolve(root, "registry.ollama.ai/library/tiny:latest")
                .unwrap()
                .path,
            root.join("blobs/sha256-bb22")
        );
        assert_eq!(
            ollama_resolve(root, "someone/theirs:q4").unwrap().name,
            "someone/theirs:q4"
        );
        // Not GGUF, a digest pointing elsewhere, a path trick, or nothing there: no model.
        for name in ["safet", "escape", "../x", "llama3.1:70b", "nope"] {
            assert_eq!(ollama_resolve(root, name), None, "{name}");
        }
        let names: Vec<String> = ollama_models(root).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["llama3.1:8b", "tiny:latest", "someone/theirs:q4"]);
    }

    #[test]
    fn lmstudio_folders_name_single_files_by_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        gguf(&root.join("pub/one/One-Q4_K_M.gguf"));
        gguf(&root.join("pub/one/mmproj-One-f16.gguf"));
        gguf(&root.join("pub/two/Two-Q4_0.gguf"));
        gguf(&root.join("pub/two/Two-Q8_0.gguf"));
        let models: Vec<(String, PathBuf)> = lmstudio_models(root)
            .into_iter()
            .map(|m| (m.name, m.path))
            .collect();
        assert_eq!(
            models,
            vec![
                ("pub/one".into(), root.join("pub/one/One-Q4_K_M.gguf")),
                (
                    "pub/two/Two-Q4_0".into(),
                    root.join("pub/two/Two-Q4_0.gguf")
                ),
                (
                    "pub/two/Two-Q8_0".into(),
                    root.join("pub/two/Two-Q8_0.gguf")
                ),
            ]
        );
    }

    #[test]
    fn hf_cache_ggufs_by_repo_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let hub = dir.path();
        let repo = hub.join("models--owner--Tiny-GGUF");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        gguf(&repo.join("snapshots/abc123/tiny-q8_0.gguf"));
        let multi = hub.join("models--owner--Multi-GGUF/snapshots/def456");
        gguf(&multi.join("m-Q4_0.gguf"));
        gguf(&multi.join("Q8/m-Q8_0-00001-of-00002.gguf"));
        gguf(&multi.join("Q8/m-Q8_0-00002-of-00002.gguf"));
        let names: Vec<String> = hf_gguf_models(hub).into_iter().map(|m| m.name).collect();
        assert_eq!(
            names,
            [
                "owner/Multi-GGUF:Q8/m-Q8_0-00001-of-00002.gguf",
                "owner/Multi-GGUF:m-Q4_0.gguf",
                "owner/Tiny-GGUF",
                "owner/Tiny-GGUF:tiny-q8_0.gguf",
            ]
        );
        let roots = StoreRoots {
            hf_hub: Some(hub.to_owned()),
            ..Default::default()
        };
        assert_eq!(
            roots.resolve("owner/Tiny-GGUF").unwrap().path,
            repo.join("snapshots/abc123/tiny-q8_0.gguf")
        );
        assert!(roots.resolve("owner/Multi-GGUF").is_none());
    }
}

//! Finding a Hugging Face model folder, offline: a path to a folder, or a repo id (`gpt2`,
//! `Helsinki-NLP/opus-mt-en-de`) looked up in the local HF hub cache. egpu never downloads; a repo
//! that is not cached is an error that says where it looked and how to fetch it.
//!
//! The cache layout is huggingface_hub's: `<hub>/models--<owner>--<name>/snapshots/<revision>/`,
//! with `refs/main` naming the revision the last download used. `<hub>` is `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` — the
//! order huggingface_hub itself uses.

use std::path::{Path, PathBuf};

/// The file every model folder has; its presence is what makes a folder a model folder.
pub const CONFIG_FILE: &str = "config.json";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HfCacheError {
    #[error("{path} is a folder without {CONFIG_FILE}: not a Hugging Face model folder")]
    NotAModelFolder { path: PathBuf },
    #[error(
        "{repo:?} is not in the Hugging Face cache (looked in {}); egpu works offline: \
         fetch it where there is network (`huggingface-cli download {repo}`) and copy the cache, \
         or pass the model folder's path",
        looked_in.display()
    )]
    NotCached { repo: String, looked_in: PathBuf },
    #[error("{repo:?} is cached in {} but has no snapshot with {CONFIG_FILE}", dir.display())]
    NoSnapshot { repo: String, dir: PathBuf },
    #[error("{given:?} is neither a folder nor a Hugging Face repo id (owner/name)")]
    NotASource { given: String },
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
}

/// The environment the lookup depends on, captured once (tests pass their own).
#[derive(Debug, Clone, Default)]
pub struct HfEnv {
    pub hf_hub_cache: Option<PathBuf>,
    pub hf_home: Option<PathBuf>,
    pub xdg_cache_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
}

impl HfEnv {
    pub fn from_process() -> HfEnv {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        HfEnv {
            hf_hub_cache: var("HF_HUB_CACHE"),
            hf_home: var("HF_HOME"),
            xdg_cache_home: var("XDG_CACHE_HOME"),
            home: var("HOME"),
        }
    }

    /// The hub cache folder, by huggingface_hub's precedence (None without any of the variables).
    pub fn hub_dir(&self) -> Option<PathBuf> {
        if let Some(dir) = &self.hf_hub_cache {
            return Some(dir.clone());
        }
        let hf_home = self
            .hf_home
            .clone()
            .or_else(|| self.xdg_cache_home.as_ref().map(|x| x.join("huggingface")))
            .or_else(|| {
                self.home
                    .as_ref()
                    .map(|h| h.join(".cache").join("huggingface"))
            })?;
        Some(hf_home.join("hub"))
    }
}

/// A repo id: `name` or `owner/name`, each part of letters, digits, `-`, `_` and `.` (not only dots).
pub fn is_repo_id(source: &str) -> bool {
    let parts: Vec<&str> = source.split('/').collect();
    let part_ok = |p: &&str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.chars().all(|c| c == '.')
    };
    (1..=2).contains(&parts.len()) && parts.iter().all(part_ok)
}

/// The model folder `source` names: an existing folder (which must hold `config.json`), else a repo
/// id resolved in the hub cache.
pub fn resolve(source: &str, env: &HfEnv) -> Result<PathBuf, HfCacheError> {
    let path = Path::new(source);
    if path.is_dir() {
        return if path.join(CONFIG_FILE).is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(HfCacheError::NotAModelFolder {
                path: path.to_path_buf(),
            })
        };
    }
    if !is_repo_id(source) {
        return Err(HfCacheError::NotASource {
            given: source.to_string(),
        });
    }
    let hub = env.hub_dir().ok_or_else(|| HfCacheError::NotCached {
        repo: source.to_string(),
        looked_in: PathBuf::from("~/.cache/huggingface/hub (HOME is not set)"),
    })?;
    // huggingface_hub names a repo's folder models--owner--name (a bare name has no owner part)
    let repo_dir = hub.join(format!("models--{}", source.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(HfCacheError::NotCached {
            repo: source.to_string(),
            looked_in: hub,
        });
    }
    snapshot(source, &repo_dir)
}

/// The snapshot `refs/main` points to, else the most recently modified snapshot with a config.
fn snapshot(repo: &str, repo_dir: &Path) -> Result<PathBuf, HfCacheError> {
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let rev = rev.trim();
        let dir = snapshots.join(rev);
        if is_repo_id(rev) && dir.join(CONFIG_FILE).is_file() {
            return Ok(dir);
        }
    }
    let io = |error| HfCacheError::Io {
        path: snapshots.clone(),
        error,
    };
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    if snapshots.is_dir() {
        for entry in std::fs::read_dir(&snapshots).map_err(io)? {
            let dir = entry.map_err(io)?.path();
            if !dir.join(CONFIG_FILE).is_file() {
                continue;
            }
            let modified = std::fs::metadata(&dir)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if best.as_ref().is_none_or(|(t, _)| modified > *t) {
                best = Some((modified, dir));
            }
        }
    }
    best.map(|(_, dir)| dir)
        .ok_or_else(|| HfCacheError::NoSnapshot {
            repo: repo.to_string(),
            dir: repo_dir.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with_hub(hub: &Path) -> HfEnv {
        HfEnv {
            hf_hub_cache: Some(hub.to_path_buf()),
            ..HfEnv::default()
        }
    }

    fn snapshot_dir(hub: &Path, folder: &str, rev: &str) -> PathBuf {
        let dir = hub.join(folder).join("snapshots").join(rev);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
        dir
    }

    #[test]
    fn hub_dir_follows_huggingface_hub_precedence() {
        let env = HfEnv {
            home: Some("/home/u".into()),
            ..HfEnv::default()
        };
        assert_eq!(
            env.hub_dir().unwrap(),
            Path::new("/home/u/.cache/huggingface/hub")
        );
        let env = HfEnv {
            xdg_cache_home: Some("/x".into()),
            ..env
        };
        assert_eq!(env.hub_dir().unwrap(), Path::new("/x/huggingface/hub"));
        let env = HfEnv {
            hf_home: Some("/hf".into()),
            ..env
        };
        assert_eq!(env.hub_dir().unwrap(), Path::new("/hf/hub"));
        let env = HfEnv {
            hf_hub_cache: Some("/cache".into()),
            ..env
        };
        assert_eq!(env.hub_dir().unwrap(), Path::new("/cache"));
        assert!(HfEnv::default().hub_dir().is_none());
    }

    #[test]
    fn repo_ids() {
        for ok in [
            "gpt2",
            "Helsinki-NLP/opus-mt-en-de",
            "openai-community/gpt2-xl",
            "a.b_c",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in ["", "/abs", "a/b/c", "..", "a/..", "a b", "owner/", "x\\y"] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn resolves_folders_and_cached_repos() {
        let hub = tempfile::tempdir().unwrap();
        let env = env_with_hub(hub.path());
        // refs/main wins over a newer snapshot
        let main = snapshot_dir(hub.path(), "models--Helsinki-NLP--opus-mt-en-de", "aaa111");
        snapshot_dir(hub.path(), "models--Helsinki-NLP--opus-mt-en-de", "bbb222");
        std::fs::create_dir_all(hub.path().join("models--Helsinki-NLP--opus-mt-en-de/refs"))
            .unwrap();
        std::fs::write(
            hub.path()
                .join("models--Helsinki-NLP--opus-mt-en-de/refs/main"),
            "aaa111\n",
        )
        .unwrap();
        assert_eq!(resolve("Helsinki-NLP/opus-mt-en-de", &env).unwrap(), main);
        // without refs/main, the one snapshot there is
        let only = snapshot_dir(hub.path(), "models--gpt2", "ccc333");
        assert_eq!(resolve("gpt2", &env).unwrap(), only);
        // a folder path is used as it is
        assert_eq!(resolve(only.to_str().unwrap(), &env).unwrap(), only);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let hub = tempfile::tempdir().unwrap();
        let env = env_with_hub(hub.path());
        let err = resolve("gpt2-xl", &env).unwrap_err().to_string();
        assert!(
            err.contains("not in the Hugging Face cache")
                && err.contains("huggingface-cli download gpt2-xl"),
            "{err}"
        );
        std::fs::create_dir_all(hub.path().join("models--gpt2/snapshots/x")).unwrap();
        assert!(resolve("gpt2", &env)
            .unwrap_err()
            .to_string()
            .contains("no snapshot"));
        assert!(resolve(hub.path().to_str().unwrap(), &env)
            .unwrap_err()
            .to_string()
            .contains("without config.json"));
        assert!(resolve("a/b/c", &env)
            .unwrap_err()
            .to_string()
            .contains("neither a folder"));
    }
}

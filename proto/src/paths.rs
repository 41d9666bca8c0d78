//! Where the tinygrad worker's Python interpreter is: one rule for egpud (which runs
//! `<python> -m egpu_worker.serve`) and for `egpuctl doctor` (which checks that same python).
//!
//! [`worker_python`] tries, in order, and records which rule matched:
//!
//! 1. [`PythonRule::Explicit`]: a path given on the command line (`--worker-python`);
//! 2. [`PythonRule::Env`]: `$EGPU_WORKER_PYTHON` ([`WORKER_PYTHON_ENV`]);
//! 3. [`PythonRule::Checkout`]: `<checkout>/worker/.venv/bin/python`, where `<checkout>` is
//!    the nearest folder above the running binary that holds `worker/pyproject.toml`, so
//!    `target/release/egpud` inside a clone uses the clone's venv (made by
//!    `scripts/setup-worker.sh`);
//! 4. [`PythonRule::DataHome`]: `$XDG_DATA_HOME/egpu/worker/.venv/bin/python`, by default
//!    `~/.local/share/egpu/worker/.venv/bin/python` (for binaries installed outside a clone).
//!
//! Rules 1 and 2 are what the user asked for: they win even when the file is missing (the
//! caller then reports it missing rather than quietly using another python). Rules 3 and 4
//! are guesses: the checkout's venv is used when it exists, else the data-home one when that
//! exists, else the checkout's (if the binary is in a clone: the fix is to run
//! `scripts/setup-worker.sh` there), else the data-home path. [`WorkerPython::exists`] says
//! whether the chosen file is there.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// Environment variable naming the worker's Python interpreter.
pub const WORKER_PYTHON_ENV: &str = "EGPU_WORKER_PYTHON";

/// The venv's interpreter, relative to a checkout (or to the data-home folder).
const VENV_PYTHON: &str = "worker/.venv/bin/python";
/// The file that marks a folder as an egpu checkout.
const CHECKOUT_MARKER: &str = "worker/pyproject.toml";

/// Which rule chose the worker's python.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PythonRule {
    /// `--worker-python PATH`.
    Explicit,
    /// `$EGPU_WORKER_PYTHON`.
    Env,
    /// `<checkout>/worker/.venv/bin/python`, the checkout found above the running binary.
    Checkout,
    /// `$XDG_DATA_HOME/egpu/worker/.venv/bin/python` (default `~/.local/share/...`).
    DataHome,
}

impl PythonRule {
    /// A short name for messages and JSON: `explicit`, `env`, `checkout`, `data-home`.
    pub fn as_str(self) -> &'static str {
        match self {
            PythonRule::Explicit => "explicit",
            PythonRule::Env => "env",
            PythonRule::Checkout => "checkout",
            PythonRule::DataHome => "data-home",
        }
    }

    /// Where the path came from, in words: `--worker-python`, `$EGPU_WORKER_PYTHON`, ...
    pub fn describe(self) -> &'static str {
        match self {
            PythonRule::Explicit => "--worker-python",
            PythonRule::Env => "$EGPU_WORKER_PYTHON",
            PythonRule::Checkout => "the checkout's worker/.venv",
            PythonRule::DataHome => "the data-home venv ($XDG_DATA_HOME, default ~/.local/share)",
        }
    }
}

impl fmt::Display for PythonRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The worker's python as [`worker_python`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPython {
    /// The interpreter (not canonicalized: a venv's `bin/python` is a symlink that must stay
    /// one for the venv to be used).
    pub path: PathBuf,
    pub rule: PythonRule,
    /// Whether `path` is a file.
    pub exists: bool,
    /// The checkout above the running binary, when there is one (for hints).
    pub checkout: Option<PathBuf>,
}

/// What [`resolve`] looks at, so that the order can be tested without touching the process.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    pub explicit: Option<PathBuf>,
    /// The value of `$EGPU_WORKER_PYTHON`.
    pub env: Option<OsString>,
    /// The running binary.
    pub exe: Option<PathBuf>,
    /// `$XDG_DATA_HOME`.
    pub xdg_data_home: Option<PathBuf>,
    /// `$HOME`.
    pub home: Option<PathBuf>,
}

impl Lookup {
    /// The process's own view: its environment and `current_exe` (canonicalized, so a
    /// symlink to `target/release/egpud` still finds the clone).
    pub fn from_process(explicit: Option<&Path>) -> Lookup {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        Lookup {
            explicit: explicit.map(Path::to_owned),
            env: var(WORKER_PYTHON_ENV),
            exe: std::env::current_exe()
                .ok()
                .map(|exe| std::fs::canonicalize(&exe).unwrap_or(exe)),
            xdg_data_home: var("XDG_DATA_HOME").map(PathBuf::from),
            home: var("HOME").map(PathBuf::from),
        }
    }
}

/// The worker's python for this process: see the module documentation for the order.
pub fn worker_python(explicit: Option<&Path>) -> WorkerPython {
    resolve(&Lookup::from_process(explicit), &|p: &Path| p.is_file())
}

/// The nearest folder at or above `start` that holds `worker/pyproject.toml`.
pub fn find_checkout(start: &Path, is_file: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| is_file(&dir.join(CHECKOUT_MARKER)))
        .map(Path::to_owned)
}

/// `$XDG_DATA_HOME/egpu/worker/.venv/bin/python`, else under `~/.local/share`; `None`
/// without either variable.
pub fn data_home_python(xdg_data_home: Option<&Path>, home: Option<&Path>) -> Option<PathBuf> {
    let data = match (xdg_data_home, home) {
        (Some(dir), _) if dir.is_absolute() => dir.to_owned(),
        (_, Some(home)) => home.join(".local/share"),
        _ => return None,
    };
    Some(data.join("egpu").join(VENV_PYTHON))
}

/// [`worker_python`] over an explicit [`Lookup`]; `is_file` tells which files exist.
pub fn resolve(lookup: &Lookup, is_file: &dyn Fn(&Path) -> bool) -> WorkerPython {
    let checkout = lookup
        .exe
        .as_deref()
        .and_then(Path::parent)
        .and_then(|dir| find_checkout(dir, is_file));
    let found = |path: PathBuf, rule: PythonRule| WorkerPython {
        exists: is_file(&path),
        path,
        rule,
        checkout: checkout.clone(),
    };
    if let Some(path) = &lookup.explicit {
        return found(path.clone(), PythonRule::Explicit);
    }
    if let Some(path) = &lookup.env {
        return found(PathBuf::from(path), PythonRule::Env);
    }
    let in_checkout = checkout.as_ref().map(|dir| dir.join(VENV_PYTHON));
    let in_data_home = data_home_python(lookup.xdg_data_home.as_deref(), lookup.home.as_deref());
    if let Some(path) = in_checkout.as_ref().filter(|p| is_file(p)) {
        return found(path.clone(), PythonRule::Checkout);
    }
    if let Some(path) = in_data_home.as_ref().filter(|p| is_file(p)) {
        return found(path.clone(), PythonRule::DataHome);
    }
    match (in_checkout, in_data_home) {
        (Some(path), _) => found(path, PythonRule::Checkout),
        (None, Some(path)) => found(path, PythonRule::DataHome),
        // Neither HOME nor XDG_DATA_HOME: a relative path that will not exist, so the caller
        // reports it missing with the rule that explains it.
        (None, None) => found(
            Path::new("~/.local/share/egpu").join(VENV_PYTHON),
            PythonRule::DataHome,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn files(paths: &[&str]) -> impl Fn(&Path) -> bool {
        let set: HashSet<PathBuf> = paths.iter().map(PathBuf::from).collect();
        move |p: &Path| set.contains(p)
    }

    fn lookup() -> Lookup {
        Lookup {
            explicit: None,
            env: None,
            exe: Some("/src/egpu/target/release/egpud".into()),
            xdg_data_home: None,
            home: Some("/home/ada".into()),
        }
    }

    const CLONE_MARKER: &str = "/src/egpu/worker/pyproject.toml";
    const CLONE_PY: &str = "/src/egpu/worker/.venv/bin/python";
    const DATA_PY: &str = "/home/ada/.local/share/egpu/worker/.venv/bin/python";

    #[test]
    fn explicit_beats_env_beats_checkout_beats_data_home() {
        let all = files(&["/opt/py", "/env/py", CLONE_MARKER, CLONE_PY, DATA_PY]);
        let mut l = lookup();
        l.explicit = Some("/opt/py".into());
        l.env = Some("/env/py".into());
        let py = resolve(&l, &all);
        assert_eq!(
            (py.path.as_path(), py.rule, py.exists),
            (Path::new("/opt/py"), PythonRule::Explicit, true)
        );
        assert_eq!(py.checkout.as_deref(), Some(Path::new("/src/egpu")));

        l.explicit = None;
        let py = resolve(&l, &all);
        assert_eq!(
            (py.path.as_path(), py.rule),
            (Path::new("/env/py"), PythonRule::Env)
        );

        l.env = None;
        let py = resolve(&l, &all);
        assert_eq!(
            (py.path.as_path(), py.rule),
            (Path::new(CLONE_PY), PythonRule::Checkout)
        );

        l.exe = Some("/usr/local/bin/egpud".into());
        let py = resolve(&l, &all);
        assert_eq!(
            (py.path.as_path(), py.rule, py.exists, py.checkout),
            (Path::new(DATA_PY), PythonRule::DataHome, true, None)
        );
    }

    #[test]
    fn asked_for_paths_win_even_when_missing() {
        let all = files(&[CLONE_MARKER, CLONE_PY]);
        let mut l = lookup();
        l.explicit = Some("/nonexistent".into());
        l.env = Some("/env/py".into());
        let py = resolve(&l, &all);
        assert_eq!(
            (py.path.as_path(), py.rule, py.exists),
            (Path::new("/nonexistent"), PythonRule::Explicit, false)
        );
        l.explicit = None;
        let py = resolve(&l, &all);
        assert_eq!((py.rule, py.exists), (PythonRule::Env, false));
    }

    #[test]
    fn a_missing_checkout_venv_falls_back_to_data_home_then_names_the_checkout() {
        // In a clone without worker/.venv, an installed data-home venv is used...
        let py = resolve(&lookup(), &files(&[CLONE_MARKER, DATA_PY]));
        assert_eq!(
            (py.path.as_path(), py.rule),
            (Path::new(DATA_PY), PythonRule::DataHome)
        );
        // ...and with neither, the checkout's path is reported (run setup-worker.sh there).
        let py = resolve(&lookup(), &files(&[CLONE_MARKER]));
        assert_eq!(
            (py.path.as_path(), py.rule, py.exists),
            (Path::new(CLONE_PY), PythonRule::Checkout, false)
        );
        // Outside a clone: the data-home path.
        let mut l = lookup();
        l.exe = Some("/usr/bin/egpud".into());
        let py = resolve(&l, &files(&[]));
        assert_eq!(
            (py.path.as_path(), py.rule, py.exists),
            (Path::new(DATA_PY), PythonRule::DataHome, false)
        );
    }

    #[test]
    fn the_nearest_checkout_above_the_binary_counts() {
        let all = files(&[
            "/a/worker/pyproject.toml",
            "/a/b/worker/pyproject.toml",
            "/a/b/worker/.venv/bin/python",
        ]);
        let mut l = lookup();
        l.exe = Some("/a/b/target/debug/deps/egpuctl".into());
        let py = resolve(&l, &all);
        assert_eq!(py.checkout.as_deref(), Some(Path::new("/a/b")));
        assert_eq!(py.path, Path::new("/a/b/worker/.venv/bin/python"));
    }

    #[test]
    fn xdg_data_home_overrides_home_when_absolute() {
        assert_eq!(
            data_home_python(Some(Path::new("/xdg")), Some(Path::new("/home/ada"))),
            Some(PathBuf::from("/xdg/egpu/worker/.venv/bin/python"))
        );
        // The XDG spec says to ignore relative values.
        assert_eq!(
            data_home_python(Some(Path::new("rel")), Some(Path::new("/home/ada"))),
            Some(PathBuf::from(DATA_PY))
        );
        assert_eq!(data_home_python(None, None), None);
        let mut l = lookup();
        l.exe = None;
        l.home = None;
        let py = resolve(&l, &files(&[]));
        assert_eq!((py.rule, py.exists), (PythonRule::DataHome, false));
    }
}

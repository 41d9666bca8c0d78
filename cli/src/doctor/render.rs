//! `doctor`'s output: lines for a person, or one JSON object.

use serde::Serialize;
use serde_json::Value;

use super::checks::{Check, Status};
use super::facts::Facts;

/// `doctor --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// No check failed.
    pub ok: bool,
    /// The DEV that was checked; `null` when tinygrad picks.
    pub dev: Option<String>,
    /// The probe's JSON (`python -m egpu_worker.probe`) when it ran.
    pub device: Option<Value>,
}

/// Human output: a header, one line per check (plus an indented `fix:` line when not ok), and
/// a summary.
pub fn render(f: &Facts, checks: &[Check], color: bool) -> String {
    let paint = |code: &str, text: &str| {
        if color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    };
    let dev = match &f.dev.dev {
        Some(dev) => format!("DEV={dev} ({})", f.dev.source),
        None => format!("DEV unset ({})", f.dev.source),
    };
    let mut out = format!(
        "egpuctl doctor: {dev}, worker python {}\n",
        f.python.path.display()
    );
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let (word, code) = match c.status {
            Status::Ok => ("ok", "32"),
            Status::Warn => ("warn", "33"),
            Status::Fail => ("FAIL", "1;31"),
            Status::Skip => ("skip", "2"),
        };
        out.push_str(&format!(
            "{}  {:width$}  {}\n",
            paint(code, &format!("{word:4}")),
            c.name,
            c.detail
        ));
        if let Some(hint) = &c.hint {
            out.push_str(&format!("{:4}  {:width$}  fix: {hint}\n", "", ""));
        }
    }
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    let (failed, warned) = (count(Status::Fail), count(Status::Warn));
    out.push_str(&match (failed, warned) {
        (0, 0) => "no problems found\n".to_owned(),
        (0, w) => format!("no failures, {w} warning(s)\n"),
        (n, w) => format!("{n} failed, {w} warning(s)\n"),
    });
    out
}

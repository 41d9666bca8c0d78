//! The shape of the code, checked: the daemon's layers import only downwards, nothing below
//! its front ends names a protocol crate, and the engine's rooms have no import cycles.
//!
//! It reads the sources (no build, no model files): every `crate::…` path, grouped or not,
//! and every `super::…` path that climbs out of a room, counts as an import of that room.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The daemon's rooms and their layers: a room may import rooms of lower layers only.
const DAEMON_LAYERS: &[(&str, u32)] = &[
    ("server", 8),
    ("config", 7),
    ("frontend", 6),
    ("core", 5),
    ("residency", 4),
    ("scheduler", 3),
    ("backend", 2),
    ("metrics", 1),
    ("state", 0),
    ("error", 0),
];

/// Layers at or below this one know no protocol.
const CORE_LAYER: u32 = 5;
const PROTOCOL_CRATES: &[&str] = &["egpu_proto", "prost", "tonic"];
/// The tinygrad worker is the daemon's other edge: its wire is the one file below the front
/// ends that speaks a protocol (the worker's, not egpu.v1), mapped to the backend's own types.
const PROTOCOL_EDGES: &[&str] = &["backend/tinygrad/wire.rs"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`, with its path relative to `dir`.
fn sources(dir: &Path) -> Vec<(String, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read source folder") {
            let path = entry.expect("folder entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).expect("under root");
                let text = std::fs::read_to_string(&path).expect("read source");
                out.push((rel.to_string_lossy().replace('\\', "/"), text));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The code without comments (whole-line comments and ` // ` tails; `unix://` in a string is
/// kept, since `//` follows a character there).
fn code(text: &str) -> String {
    text.lines()
        .map(|line| {
            if line.trim_start().starts_with("//") {
                return "";
            }
            match line.find(" //") {
                Some(at) => &line[..at],
                None => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module path of a source file: `backend/tinygrad/mod.rs` → `[backend, tinygrad]`.
fn module_path(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first identifiers of a `{…}` group (nested groups are inside a named path, so only the
/// top level matters for which rooms are named).
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut at_start = true;
    for (i, c) in s.char_indices() {
        match c {
            '{' => {
                depth += 1;
                if depth > 1 {
                    at_start = false;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => at_start = true,
            c if c.is_whitespace() => {}
            _ if depth == 1 && at_start => {
                let id = ident_at(&s[i..]);
                if !id.is_empty() {
                    heads.push(id.to_owned());
                }
                at_start = false;
            }
            _ => {}
        }
    }
    heads
}

/// The rooms (top-level modules) a file imports through `crate::` and `super::` paths.
fn imported_rooms(rel: &str, code: &str) -> BTreeSet<String> {
    let here = module_path(rel);
    let mut rooms = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if after.starts_with('{') {
            rooms.extend(group_heads(after));
        } else {
            rooms.insert(ident_at(after).to_owned());
        }
        rest = after;
    }
    // `super::` chains that climb to the crate root name a room next.
    let mut rest = code;
    while let Some(at) = rest.find("super::") {
        let preceded_by_super = rest[..at].ends_with("super::");
        let mut after = &rest[at..];
        let mut ups = 0;
        while let Some(tail) = after.strip_prefix("super::") {
            ups += 1;
            after = tail;
        }
        if !preceded_by_super && ups >= here.len() {
            if after.starts_with('{') {
                rooms.extend(group_heads(after));
            } else {
                rooms.insert(ident_at(after).to_owned());
            }
        }
        rest = &rest[at + "super::".len() * ups..];
    }
    rooms.retain(|r| !r.is_empty() && r != "self");
    rooms
}

/// room → rooms it imports, over every source file of a crate.
fn room_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in sources(src) {
        let path = module_path(&rel);
        let Some(room) = path.first() else { continue };
        let imports = imported_rooms(&rel, &code(&text));
        graph
            .entry(room.clone())
            .or_default()
            .extend(imports.into_iter().filter(|r| r != room));
    }
    graph
}

/// The strongly connected components with more than one room.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Rooms that reach each other both ways share a cycle; the graphs are tiny.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(r) = stack.pop() {
            for next in graph.get(&r).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|r| (r, reach(r))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for room in graph.keys() {
        let mut component: Vec<String> = graph
            .keys()
            .filter(|other| {
                *other != room && reaches[room].contains(*other) && reaches[*other].contains(room)
            })
            .cloned()
            .collect();
        if component.is_empty() {
            continue;
        }
        component.push(room.clone());
        component.sort();
        if !out.contains(&component) {
            out.push(component);
        }
    }
    out
}

#[test]
fn the_daemon_layers_import_only_downwards() {
    let graph = room_graph(&repo().join("daemon/src"));
    let layer: BTreeMap<&str, u32> = DAEMON_LAYERS.iter().copied().collect();
    let mut wrong = Vec::new();
    for (room, imports) in &graph {
        let Some(&own) = layer.get(room.as_str()) else {
            wrong.push(format!("{room} is not in the layer table of this test"));
            continue;
        };
        for import in imports {
            match layer.get(import.as_str()) {
                Some(&below) if below < own => {}
                Some(_) => wrong.push(format!("{room} (layer {own}) imports {import}")),
                None => wrong.push(format!("{room} imports {import}, which is not a room")),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    assert!(cycles(&graph).is_empty());
    // The check sees what it should: the front end does import the core.
    assert!(graph["frontend"].contains("core"), "{graph:?}");
}

#[test]
fn nothing_below_the_front_ends_names_a_protocol_crate() {
    let layer: BTreeMap<&str, u32> = DAEMON_LAYERS.iter().copied().collect();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (rel, text) in sources(&repo().join("daemon/src")) {
        let room = module_path(&rel).first().cloned().unwrap_or_default();
        if layer.get(room.as_str()).is_none_or(|&l| l > CORE_LAYER) {
            continue;
        }
        if PROTOCOL_EDGES.contains(&rel.as_str()) {
            continue;
        }
        checked += 1;
        let code = code(&text);
        for word in code.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
            if PROTOCOL_CRATES.contains(&word) {
                wrong.push(format!("{rel} names {word}"));
            }
        }
    }
    assert!(checked > 10, "only {checked} files checked");
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "protocol types below the front ends:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_engine_rooms_have_no_import_cycles() {
    let graph = room_graph(&repo().join("engine/src"));
    assert_eq!(cycles(&graph), Vec::<Vec<String>>::new(), "{graph:?}");
    // Attention's bodies live with the kernels: ops builds on kernels, never the reverse.
    assert!(graph["ops"].contains("kernels"), "{graph:?}");
    assert!(!graph["kernels"].contains("ops"), "{graph:?}");
}

#[test]
fn the_import_reader_sees_grouped_and_climbing_paths() {
    let code = "use crate::{a, b::{c, d}};\nuse super::super::e::F;\nlet x = crate::g::h();";
    let rooms = imported_rooms("r/s/t.rs", code);
    assert_eq!(
        rooms.into_iter().collect::<Vec<_>>(),
        vec!["a", "b", "g"],
        "super::super from r/s/t stays in room r"
    );
    let rooms = imported_rooms("r/s.rs", "use super::super::q::Z;");
    assert_eq!(rooms.into_iter().collect::<Vec<_>>(), vec!["q"]);
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("x", vec!["y"]),
        ("y", vec!["z"]),
        ("z", vec!["x"]),
        ("w", vec!["x"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&graph), vec![vec!["x", "y", "z"]]);
}

//! The crate's layers point one way. `LAYERS` lists the top-level modules of `src/` from
//! the bottom up (a folder counts as one module); a module may name only modules listed
//! before it. The same order is drawn in docs/architecture.md ("Layers"): change both
//! together, and only by moving a module down, never by letting one import upward.

use std::collections::BTreeMap;
use std::path::Path;

/// Bottom first. Leaf types → engine → control plane → application context → front doors
/// → server.
const LAYERS: &[&str] = &[
    // leaves: no crate imports but each other's, earlier ones
    "clock",
    "shutdown",
    "backoff",
    "task",
    "deadline",
    "tls",
    "spec",
    "config",
    "command",
    "metrics",
    "resp",
    "auth",
    "activity",
    // shards and placement
    "backend",
    "router",
    // the counter engine
    "counter",
    // the control plane
    "rebalance",
    "cluster",
    // the application context every front door is handed
    "context",
    "info",
    // front doors
    "connection",
    "http",
    // start-up, listeners, shutdown order; then what only drives the whole
    "server",
    "fuzzing",
];

/// Every `crate::<module>` a file names, also inside `crate::{a, b::c}` groups (comments
/// and doc comments excluded).
fn named_modules(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // The names at depth one of the group.
            let mut depth = 1;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start && depth == 1 => {
                        out.push(ident(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(after));
        }
        rest = after;
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut upward = Vec::new();
    let mut unknown = Vec::new();
    for f in &all {
        let top = top_module(&src, f);
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(&own) = rank.get(top.as_str()) else {
            unknown.push(top.clone());
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for m in named_modules(&text) {
            if m == top {
                continue;
            }
            match rank.get(m.as_str()) {
                Some(&r) if r > own => upward.push(format!(
                    "{} names crate::{m} (layer {r} > {own})",
                    f.strip_prefix(&src).unwrap().display()
                )),
                Some(_) => {}
                // A re-export at the crate root (`crate::Config`) is not a module.
                None if m.chars().next().is_some_and(|c| c.is_uppercase()) => {}
                None => unknown.push(m),
            }
        }
    }
    unknown.sort();
    unknown.dedup();
    assert!(
        unknown.is_empty(),
        "modules missing from LAYERS: {unknown:?}"
    );
    upward.sort();
    assert!(
        upward.is_empty(),
        "imports that point up:\n{}",
        upward.join("\n")
    );
}

//! The house rule of `src/`: every module imports only from the floors below it, so the
//! import graph has no cycle and data flows one way (the layout of `src/lib.rs`). Reads the
//! sources and fails naming the file, the line and the upward import.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Floors from the ground up; a module may use `crate::X` only for X on a lower floor.
const FLOORS: &[&[&str]] = &[
    &["validate"],
    &[
        "record", "device", "logging", "metrics", "store", "kafka", "dist",
    ],
    &["model", "odc", "optim"],
    &["train", "infer"],
    &["source"],
    &["sink", "checkpoint", "deadletter"],
    &["decode"],
    &["eval", "shards"],
    &["release"],
    &["topology"],
    &["config"],
    &["cmd"],
];

fn floor_of(module: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its unit tests (a test may use any floor).
fn production_lines(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut prev_cfg_test = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if prev_cfg_test && t.starts_with("mod ") && !t.ends_with(';') {
            break; // the inline `mod tests { .. }` runs to the end of the file
        }
        prev_cfg_test = t.starts_with("#[cfg(test)]");
        if t.starts_with("//") {
            continue;
        }
        out.push((i + 1, line));
    }
    out
}

/// Top-level modules named by `crate::NAME` on a line.
fn crate_paths(line: &str) -> Vec<String> {
    line.match_indices("crate::")
        .filter(|(i, _)| {
            // not `odcd_crate::` or the like
            *i == 0
                || !line[..*i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, m)| {
            line[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|s: &String| !s.is_empty())
        .collect()
}

#[test]
fn every_module_imports_only_from_lower_floors() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut edges: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap_or(file);
        let first = rel
            .components()
            .next()
            .map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_string()
            })
            .unwrap_or_default();
        if first == "main" || first == "lib" || rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let Some(own) = floor_of(&first) else {
            violations.push(format!(
                "src/{}: module `{first}` is on no floor: add it to FLOORS (and to the layout in src/lib.rs)",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for (n, line) in production_lines(&text) {
            for target in crate_paths(line) {
                if target == first {
                    continue;
                }
                edges
                    .entry(first.clone())
                    .or_default()
                    .insert(target.clone());
                match floor_of(&target) {
                    Some(f) if f < own => {}
                    _ => violations.push(format!(
                        "src/{}:{n}: `{first}` uses `crate::{target}`, which is not on a lower floor",
                        rel.display()
                    )),
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layout:\n{}",
        violations.join("\n")
    );
    // The check reads real imports: the top floor reaches the stages.
    assert!(
        edges.get("cmd").is_some_and(|e| e.contains("topology")),
        "{edges:?}"
    );
    assert!(
        edges.get("decode").is_some_and(|e| e.contains("source")),
        "{edges:?}"
    );
}

#[test]
fn the_reader_skips_unit_tests_and_comments() {
    let text =
        "use crate::a;\n// crate::b\nfn f() {}\n#[cfg(test)]\nmod tests {\n use crate::c;\n}\n";
    let paths: Vec<String> = production_lines(text)
        .into_iter()
        .flat_map(|(_, l)| crate_paths(l))
        .collect();
    assert_eq!(paths, ["a"]);
}

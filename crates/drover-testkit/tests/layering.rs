//! Each crate's Drover dependencies against the layering table in ARCHITECTURE.md, so
//! the map and the code cannot drift apart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The table's rows: crate, and the crates it may depend on.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("## Layering")
        .nth(1)
        .expect("ARCHITECTURE.md has a ## Layering section");
    let mut rows = BTreeMap::new();
    for line in section.lines().take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        if cells.len() != 2 || !cells[0].trim().starts_with("drover-") {
            continue;
        }
        let deps = cells[1]
            .split(',')
            .map(str::trim)
            .filter(|d| d.starts_with("drover-"))
            .map(String::from)
            .collect();
        rows.insert(cells[0].trim().to_string(), deps);
    }
    rows
}

/// The Drover crates in a manifest's `[dependencies]` (not dev- or build-).
fn dependencies(manifest: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut section = String::new();
    let mut deps = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section == "[dependencies]"
            && let Some(name) = line.split(['=', '.', ' ']).next()
            && name.starts_with("drover-")
        {
            deps.insert(name.to_string());
        }
    }
    deps
}

#[test]
fn every_crate_depends_only_on_what_architecture_md_allows() {
    let allowed = allowed();
    assert!(allowed.len() >= 5, "the table was not read: {allowed:?}");
    let mut crates = BTreeSet::new();
    for entry in std::fs::read_dir(root().join("crates")).unwrap() {
        let dir = entry.unwrap().path();
        let manifest = dir.join("Cargo.toml");
        if !manifest.exists() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let Some(may) = allowed.get(&name) else {
            panic!("crate {name} is not in ARCHITECTURE.md's layering table; add a row");
        };
        let uses = dependencies(&manifest);
        let extra: Vec<&String> = uses.difference(may).collect();
        assert!(
            extra.is_empty(),
            "crate {name} depends on {extra:?}, which ARCHITECTURE.md's layering table does not allow it"
        );
        crates.insert(name);
    }
    let stale: Vec<&String> = allowed.keys().filter(|k| !crates.contains(*k)).collect();
    assert!(
        stale.is_empty(),
        "the layering table lists crates that do not exist: {stale:?}"
    );
}

#[test]
fn the_cli_client_code_uses_no_server_or_agent_crate() {
    // The binary links them to run `drover server` and `drover agent`; the code that
    // talks to a server must not need them for a constant or a check.
    let src = root().join("crates/drover-cli/src");
    for file in ["client.rs", "pack.rs", "output.rs"] {
        let path = src.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        // Tests may round-trip through the agent's unpacking.
        let code = text.split("#[cfg(test)]").next().unwrap_or(&text);
        for forbidden in ["drover_agent", "drover_controller", "drover_store"] {
            assert!(
                !code.contains(forbidden),
                "{} uses {forbidden}",
                path.display()
            );
        }
    }
}

/// The top-level modules of a crate's `src` and the other top-level modules each one
/// names through `crate::` (outside its tests).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut code: BTreeMap<String, String> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let text = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
        code.entry(top).or_default().push_str(&text);
    }
    let names: BTreeSet<String> = code.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (module, text) in &code {
        let mut uses = BTreeSet::new();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            // `crate::name` or `crate::{a, b::c}`.
            let named: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .map(|s| s.trim().split("::").next().unwrap_or(""))
                    .collect(),
                None => vec![
                    rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or(""),
                ],
            };
            for n in named {
                if names.contains(n) && n != module {
                    uses.insert(n.to_string());
                }
            }
        }
        graph.insert(module.clone(), uses);
    }
    graph
}

/// Module cycles known and not yet broken, as (crate, module, module). Each is a debt,
/// named with the reason it is owed: remove it here when it is paid. There are none
/// today.
const KNOWN_CYCLES: &[(&str, &str, &str)] = &[];

#[test]
fn no_crate_has_a_module_import_cycle() {
    for entry in std::fs::read_dir(root().join("crates")).unwrap() {
        let dir = entry.unwrap().path();
        let src = dir.join("src");
        if !src.is_dir() {
            continue;
        }
        let krate = dir.file_name().unwrap().to_string_lossy().to_string();
        let graph = module_graph(&src);
        for (a, uses) in &graph {
            for b in uses {
                // A path back from b to a closes a cycle.
                let mut seen = BTreeSet::new();
                let mut todo = vec![b.clone()];
                let mut back = false;
                while let Some(m) = todo.pop() {
                    if &m == a {
                        back = true;
                        break;
                    }
                    if seen.insert(m.clone()) {
                        todo.extend(graph.get(&m).into_iter().flatten().cloned());
                    }
                }
                let known = KNOWN_CYCLES
                    .iter()
                    .any(|(k, x, y)| *k == krate && ((x == a && y == b) || (x == b && y == a)));
                assert!(
                    !back || known,
                    "{krate}: modules {a} and {b} import each other (through crate::); move what both need into a module of its own"
                );
            }
        }
    }
}

//! The layer table of the design notes, checked against the code: every `crate::X` a module of
//! `src/` names must be a layer that module may use. A new arrow is a design decision: make it
//! here, with its reason, not by accident in an import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module -> the modules it may use (besides itself, std and external crates). `bin` is
/// `src/main.rs`, which names the library as `burnrun::`.
const LAYERS: &[(&str, &[&str])] = &[
    // Thin: parse, dispatch. `comm` for `burnrun::init()` of the bench subcommand.
    (
        "bin",
        &["launcher", "train", "bench", "config", "env", "telemetry", "comm"],
    ),
    // Never burn, never comm: the launcher links no model. `names` holds the keys and file
    // prefixes it shares with the ranks.
    (
        "launcher",
        &["rendezvous", "auth", "env", "config", "telemetry", "names", "flight"],
    ),
    // The collective benchmark: a client of comm, reporting through control lines.
    ("bench", &["comm", "env", "names"]),
    // The trainer: everything below it. `names` for progress control lines to the launcher;
    // `telemetry` for the logging of a user's binary run through `train::main`.
    (
        "train",
        &[
            "telemetry",
            "parallel",
            "device",
            "data",
            "models",
            "precision",
            "compress",
            "comm",
            "config",
            "env",
            "names",
            "rng",
            "error",
            "fault",
            "flight",
        ],
    ),
    // Parallelisms over a model and groups: comm's trait and ProcessGroup, never a transport.
    // `kernels` for the codecs on the GPU (feature cuda).
    (
        "parallel",
        &["comm", "device", "compress", "precision", "config", "kernels"],
    ),
    // Codecs and the loss scaler: comm hooks, like torch's.
    ("compress", &["comm", "config"]),
    ("precision", &["comm", "config"]),
    // Model and data code knows nothing of distribution.
    ("models", &["config", "rng"]),
    ("data", &["config", "rng"]),
    // The one place that knows burn's backends.
    ("device", &["config", "env", "error"]),
    // `fault` for the injected faults at a collective (tests of the launcher's failure handling);
    // `flight` records every collective for the launcher's hang report.
    (
        "comm",
        &[
            "transport",
            "rendezvous",
            "auth",
            "env",
            "names",
            "kernels",
            "error",
            "fault",
            "flight",
        ],
    ),
    ("transport", &["auth", "names"]),
    ("rendezvous", &["auth", "names"]),
    // Leaves. `error` gathers every layer's error type into the crate's one `Error`.
    ("auth", &[]),
    ("names", &[]),
    ("rng", &[]),
    ("env", &[]),
    // Fault injection reads its plan from the environment.
    ("fault", &["env"]),
    // The flight recorder: written by the ranks (comm, train), read by the launcher.
    ("flight", &["names"]),
    // Checks values against the limits other layers set, which live in `names`.
    ("config", &["names"]),
    ("telemetry", &[]),
    // CUDA kernels compiled with NVRTC, found through the environment like NCCL.
    ("kernels", &["env"]),
    ("error", &["comm", "env", "rendezvous", "transport", "device"]),
];

/// The layer a file of `src/` belongs to: its first path component without `.rs`.
fn layer_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("a file under src/");
    let first = rel.components().next().expect("a path").as_os_str().to_string_lossy();
    match first.strip_suffix(".rs").unwrap_or(&first) {
        "main" => "bin".to_owned(),
        other => other.to_owned(),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `prefix::NAME` on code lines (comments and doc comments left out).
fn used_layers(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        for (at, _) in code.match_indices(prefix) {
            let rest = &code[at + prefix.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::{a, b}` groups: every name in the braces.
            if name.is_empty() && rest.starts_with('{') {
                let group = rest[1..].split('}').next().unwrap_or("");
                for item in group.split(',') {
                    let item: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !item.is_empty() {
                        used.insert(item);
                    }
                }
            } else if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

#[test]
fn every_module_uses_only_the_layers_the_design_allows() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let table: BTreeMap<&str, BTreeSet<&str>> = LAYERS
        .iter()
        .map(|(m, uses)| (*m, uses.iter().copied().collect()))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    for file in &files {
        let layer = layer_of(&src, file);
        if layer == "lib" {
            continue; // the crate root only declares modules and re-exports the public API
        }
        let text = std::fs::read_to_string(file).expect("read a source file");
        let prefix = if layer == "bin" { "burnrun::" } else { "crate::" };
        let Some(allowed) = table.get(layer.as_str()) else {
            violations.push(format!(
                "{}: module `{layer}` is not in the layer table",
                file.display()
            ));
            continue;
        };
        for used in used_layers(&text, prefix) {
            // Root re-exports (`crate::Error`, `burnrun::init`) are named by what they re-export.
            let used = match used.as_str() {
                "Error" => "error".to_owned(),
                "init" | "ProcessGroup" | "ReduceOp" | "DType" => "comm".to_owned(),
                _ => used,
            };
            if used != layer && !allowed.contains(used.as_str()) {
                violations.push(format!(
                    "{}: `{layer}` uses `{used}`",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports that break the layer table:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_plain_paths_and_brace_groups_but_not_comments() {
    let text = "use crate::comm::X;\nuse crate::{env, config::Y};\n// crate::launcher in a comment\nlet a = crate::models::f(); // crate::data";
    let used: Vec<String> = used_layers(text, "crate::").into_iter().collect();
    assert_eq!(used, ["comm", "config", "env", "models"]);
}

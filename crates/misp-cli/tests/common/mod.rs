//! Helpers the end-to-end tests share: running the binary from the repository root, per-test
//! scratch folders, and reading and writing the JSON a run reads and writes.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
/// The tiny random LLaVA the tests run.
pub const MODEL: &str = "fixtures/llava_chat/tiny";
pub const IMAGES: &str = "fixtures/clip/images";

/// Runs `misp` with `args` from the repository root.
pub fn misp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_misp"))
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run misp")
}

/// The stdout of a run that must succeed (its stderr in the panic otherwise).
pub fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "misp failed:\n{err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh, empty scratch folder for one test of one test file (`group`).
pub fn tmp_dir(group: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-{group}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn json_file(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Writes `rows` as JSON lines.
pub fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

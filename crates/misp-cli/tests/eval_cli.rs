//! `misp eval score-only` and `misp eval compare` as a user runs them, on the conformance
//! fixtures of `fixtures/pope/` and `fixtures/chair/`, plus the bad inputs that must fail with
//! a message naming file, line and field.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");

fn misp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_misp"))
        .args(args)
        .output()
        .expect("run misp")
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "misp failed:\n{err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "misp should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn score_only_pope_reproduces_the_fixture_metrics() {
    let dir = tmp("pope");
    let answers = format!("{FIXTURES}/pope/answers.jsonl");
    let table = ok(misp(&[
        "eval",
        "score-only",
        "--answers",
        &answers,
        "--out",
        s(&dir),
    ]));
    assert!(table.contains("| overall | 60 |"), "{table}");
    let metrics = json(&dir.join("metrics.json"));
    let want = json(Path::new(&format!("{FIXTURES}/pope/expected.json")));
    for split in ["random", "popular", "adversarial", "overall"] {
        for k in ["accuracy", "precision", "recall", "f1", "yes_ratio"] {
            let (got, want) = (
                metrics[split][k].as_f64().unwrap(),
                want[split][k].as_f64().unwrap(),
            );
            assert!((got - want).abs() < 1e-15, "{split} {k}: {got} vs {want}");
        }
        assert_eq!(metrics[split]["n"], want[split]["n"]);
    }
    let excluded = json(&dir.join("excluded.json"));
    assert_eq!(excluded["empty_answers"], 1);
    let rewritten = std::fs::read_to_string(dir.join("answers.jsonl")).unwrap();
    assert_eq!(rewritten.lines().count(), 60);
}

#[test]
fn score_only_chair_needs_annotations_and_reproduces_the_fixture() {
    let dir = tmp("chair");
    let captions = format!("{FIXTURES}/chair/captions.jsonl");
    let err = fails(misp(&[
        "eval",
        "score-only",
        "--answers",
        &captions,
        "--out",
        s(&dir),
    ]));
    assert!(err.contains("--annotations"), "{err}");
    let annotations = format!("{FIXTURES}/chair/instances.json");
    ok(misp(&[
        "eval",
        "score-only",
        "--answers",
        &captions,
        "--annotations",
        &annotations,
        "--out",
        s(&dir),
    ]));
    let metrics = json(&dir.join("metrics.json"));
    let want = json(Path::new(&format!("{FIXTURES}/chair/expected.json")));
    assert_eq!(metrics["chair"]["chair_s"], want["overall"]["CHAIRs"]);
    assert_eq!(metrics["chair"]["n"], 22);
    let audit = std::fs::read_to_string(dir.join("captions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(audit.lines().nth(1).unwrap()).unwrap();
    assert_eq!(first["hallucinated"], serde_json::json!([["cup", "cup"]]));

    // Annotations for other images: a clear message, not a smaller denominator.
    let other = dir.join("other.json");
    std::fs::write(
        &other,
        r#"{"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [], "categories": []}"#,
    )
    .unwrap();
    let err = fails(misp(&[
        "eval",
        "score-only",
        "--answers",
        &captions,
        "--annotations",
        s(&other),
        "--out",
        s(&dir),
    ]));
    assert!(
        err.contains("22 of 22 captioned images have no entry"),
        "{err}"
    );
}

#[test]
fn bad_answer_files_name_file_line_and_field() {
    let dir = tmp("bad");
    let path = dir.join("answers.jsonl");
    let row = |id: u32, label: &str| {
        format!(
            r#"{{"question_id": {id}, "split": "random", "label": "{label}", "answer": "Yes", "pred": "yes"}}"#
        )
    };
    std::fs::write(&path, format!("{}\n{}\n", row(1, "yes"), row(1, "no"))).unwrap();
    let err = fails(misp(&[
        "eval",
        "score-only",
        "--answers",
        s(&path),
        "--out",
        s(&dir),
    ]));
    assert!(
        err.contains("answers.jsonl:2: field `question_id`: 1 appears twice"),
        "{err}"
    );
    std::fs::write(&path, format!("{}\n{}\n", row(1, "yes"), row(2, "unsure"))).unwrap();
    let err = fails(misp(&[
        "eval",
        "score-only",
        "--answers",
        s(&path),
        "--out",
        s(&dir),
    ]));
    assert!(
        err.contains("answers.jsonl:2: field `label`") && err.contains("unsure"),
        "{err}"
    );
    std::fs::write(&path, "{\"question_id\": 1}\n").unwrap();
    let err = fails(misp(&[
        "eval",
        "score-only",
        "--answers",
        s(&path),
        "--out",
        s(&dir),
    ]));
    assert!(err.contains("neither a POPE answer"), "{err}");
}

#[test]
fn compare_tables_and_charts_several_runs() {
    let dir = tmp("compare");
    let (base, tuned, captions) = (dir.join("base"), dir.join("tuned"), dir.join("chair"));
    let answers = format!("{FIXTURES}/pope/answers.jsonl");
    ok(misp(&[
        "eval",
        "score-only",
        "--answers",
        &answers,
        "--out",
        s(&base),
    ]));
    // A "tuned" run: the same answers with every "no"-labelled one answered "No".
    let text = std::fs::read_to_string(&answers).unwrap();
    let better: String = text
        .lines()
        .map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            if row["label"] == "no" {
                row["answer"] = "No".into();
            }
            format!("{row}\n")
        })
        .collect();
    std::fs::create_dir_all(&tuned).unwrap();
    std::fs::write(tuned.join("answers.jsonl"), better).unwrap();
    ok(misp(&[
        "eval",
        "score-only",
        "--answers",
        s(&tuned.join("answers.jsonl")),
        "--out",
        s(&tuned),
    ]));
    ok(misp(&[
        "eval",
        "score-only",
        "--answers",
        &format!("{FIXTURES}/chair/captions.jsonl"),
        "--annotations",
        &format!("{FIXTURES}/chair/instances.json"),
        "--out",
        s(&captions),
    ]));
    let out = dir.join("cmp");
    let table = ok(misp(&[
        "eval",
        "compare",
        s(&base),
        s(&tuned),
        s(&captions),
        "--out",
        s(&out),
    ]));
    assert!(
        table.starts_with("| metric (%) | base | tuned | chair |"),
        "{table}"
    );
    assert!(
        table.contains("| overall precision | 46.67 | 100.00 | - |"),
        "{table}"
    );
    assert!(table.contains("| CHAIR_s | - | - | 50.00 |"), "{table}");
    assert_eq!(
        std::fs::read_to_string(out.join("compare.md")).unwrap(),
        table
    );
    let png = std::fs::read(out.join("compare.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));

    let err = fails(misp(&[
        "eval",
        "compare",
        s(&dir.join("nope")),
        "--out",
        s(&out),
    ]));
    assert!(err.contains("metrics.json"), "{err}");
}

//! `misp score` and `misp generate` as a user runs them, on the tiny LLaVA of
//! `fixtures/llava_chat` (whose expected values come from transformers).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-score-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn misp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_misp"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run misp")
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn expected() -> Value {
    let text = std::fs::read_to_string(root().join("fixtures/llava_chat/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn score_and_generate_write_one_row_per_input() {
    let dir = tmp("ok");
    let want = expected();
    let mut score_in = String::new();
    for (i, c) in want["score"].as_array().unwrap().iter().enumerate() {
        let row = serde_json::json!({
            "id": format!("s{i}"),
            "image": format!("fixtures/clip/images/{}", c["image"].as_str().unwrap()),
            "prompt": c["prompt"], "response": c["response"],
        });
        score_in.push_str(&format!("{row}\n"));
    }
    std::fs::write(dir.join("score.jsonl"), score_in).unwrap();
    let out = dir.join("scores.jsonl");
    let o = misp(&[
        "score",
        "--model",
        "fixtures/llava_chat/tiny",
        "--data",
        dir.join("score.jsonl").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 3);
    for (i, (r, c)) in rows
        .iter()
        .zip(want["score"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(r["id"], format!("s{i}"));
        assert_eq!(
            r["tokens"].as_u64().unwrap() as usize,
            c["response_ids"].as_array().unwrap().len()
        );
        assert!((r["logp"].as_f64().unwrap() - c["logp"].as_f64().unwrap()).abs() < 0.1);
    }
    assert!(dir.join("scores.jsonl.config.json").is_file());

    let mut gen_in = String::new();
    for (i, c) in want["generate"].as_array().unwrap().iter().enumerate() {
        let row = serde_json::json!({
            "id": i,
            "image": root().join("fixtures/clip/images").join(c["image"].as_str().unwrap()),
            "prompt": c["prompt"],
        });
        gen_in.push_str(&format!("{row}\n"));
    }
    std::fs::write(dir.join("gen.jsonl"), gen_in).unwrap();
    let out = dir.join("answers.jsonl");
    let o = misp(&[
        "generate",
        "--model",
        "fixtures/llava_chat/tiny",
        "--data",
        dir.join("gen.jsonl").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = read_jsonl(&out);
    for (r, c) in rows.iter().zip(want["generate"].as_array().unwrap()) {
        assert_eq!(r["text"], c["text"]);
    }
}

#[test]
fn bad_rows_are_errors_naming_file_line_and_id() {
    let dir = tmp("bad");
    let data = dir.join("in.jsonl");
    let cases = [
        (
            r#"{"id": "a", "image": "nope.png", "prompt": "Hi?", "response": "Yes."}"#,
            "nope.png",
        ),
        (
            r#"{"id": "b", "image": "fixtures/clip/images/hopper.jpg", "prompt": "<image> Hi?", "response": "Yes."}"#,
            "`<image>`",
        ),
        (
            r#"{"id": "c", "image": "fixtures/clip/images/hopper.jpg", "prompt": "Hi?"}"#,
            "missing field `response`",
        ),
        (
            r#"{"id": "d", "image": "fixtures/clip/images/hopper.jpg", "prompt": "Hi?", "response": "word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word"}"#,
            "longer than the model's context",
        ),
    ];
    for (row, needle) in cases {
        std::fs::write(&data, format!("{row}\n")).unwrap();
        let o = misp(&[
            "score",
            "--model",
            "fixtures/llava_chat/tiny",
            "--data",
            data.to_str().unwrap(),
            "--out",
            dir.join("o.jsonl").to_str().unwrap(),
            "--quiet",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(err.contains("in.jsonl:1"), "{err}");
    }
    assert!(!dir.join("o.jsonl").exists());
}

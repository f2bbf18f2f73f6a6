//! `misp eval hallusionbench`, `mmvp` and `amber` as a user runs them, on the tiny random LLaVA
//! of `fixtures/llava_chat/tiny` and the images of `fixtures/clip/images`. Random weights answer
//! nonsense, so these tests check the wiring, not the numbers: every output parses, questions
//! that cannot be asked are excluded and listed, the config records the run, the metrics are
//! exactly what `--answers` re-scoring recomputes from the saved answers, and `misp eval
//! compare` reads them.

use std::path::{Path, PathBuf};

use serde_json::json;

mod common;
use common::{json_file, jsonl, misp, ok, s, tmp_dir, IMAGES, MODEL, ROOT};

fn tmp(name: &str) -> PathBuf {
    tmp_dir("evalbench", name)
}

/// The model flags every run shares: short prompts (the tiny model's context is 64 positions,
/// 16 of them the image), batches of 2.
fn model_flags<'a>(out: &'a Path, max_new_tokens: &'a str) -> Vec<&'a str> {
    vec![
        "--model",
        MODEL,
        "--images",
        IMAGES,
        "--out",
        s(out),
        "--suffix",
        "",
        "--batch-size",
        "2",
        "--max-new-tokens",
        max_new_tokens,
    ]
}

#[test]
fn hallusionbench_asks_figure_questions_and_rescores_like_answers_mode() {
    let dir = tmp("hb");
    let q = |cat: &str, set: &str, fig: &str, qid: &str, gt: &str, file: Option<&str>| {
        let mut v = json!({"category": cat, "subcategory": "chart", "visual_input": if file.is_some() {"1"} else {"0"},
            "set_id": set, "figure_id": fig, "question_id": qid, "question": format!("Is it {qid}?"),
            "gt_answer_details": "", "gt_answer": gt});
        if let Some(f) = file {
            v["filename"] = json!(f);
        }
        v
    };
    let questions = dir.join("HallusionBench.json");
    let rows = json!([
        q("VD", "0", "0", "0", "1", Some("./hopper.jpg")),
        q("VD", "0", "0", "1", "0", Some("./hopper.jpg")),
        q("VD", "0", "1", "0", "0", Some("camera_gray.png")),
        q("VS", "0", "0", "0", "1", None),
        q("VS", "0", "1", "0", "1", Some("astronaut_small.png")),
        q("VS", "1", "1", "0", "0", Some("missing.png")),
    ]);
    std::fs::write(&questions, rows.to_string()).unwrap();
    let out = dir.join("run");
    let mut args = vec!["eval", "hallusionbench", "--questions", s(&questions)];
    args.extend(model_flags(&out, "4"));
    let stdout = ok(misp(&args));
    assert!(stdout.contains("| overall | 4 |"), "{stdout}");

    let answers = jsonl(&out.join("answers.jsonl"));
    assert_eq!(
        answers.len(),
        4,
        "no-figure and missing-image questions are not asked"
    );
    for a in &answers {
        let pred = a["pred"].as_str().unwrap();
        assert!(["yes", "no", "unknown"].contains(&pred), "{a}");
        assert!(a["answer"].is_string() && a["correct"].is_boolean(), "{a}");
    }
    let excluded = json_file(&out.join("excluded.json"));
    assert_eq!(excluded["no_figure"], 1);
    assert_eq!(excluded["missing_images"], 1);
    assert_eq!(excluded["excluded"][1]["filename"], "missing.png");
    let config = json_file(&out.join("config.json"));
    assert_eq!(config["command"], "eval hallusionbench");
    assert_eq!(config["max_new_tokens"], 4);
    let metrics = json_file(&out.join("metrics.json"));
    assert_eq!(metrics["overall"]["n"], 4);
    assert_eq!(metrics["VD"]["figures"], 2);
    assert!(metrics["overall"]["aAcc"].is_f64());

    let rescored = dir.join("rescored");
    ok(misp(&[
        "eval",
        "hallusionbench",
        "--answers",
        s(&out.join("answers.jsonl")),
        "--out",
        s(&rescored),
    ]));
    assert_eq!(metrics, json_file(&rescored.join("metrics.json")));
    let table = ok(misp(&[
        "eval",
        "compare",
        s(&out),
        s(&rescored),
        "--out",
        s(&dir.join("cmp")),
    ]));
    assert!(table.contains("| overall aAcc |"), "{table}");
}

#[test]
fn hallusionbench_refuses_another_benchmarks_file_before_loading_the_model() {
    let dir = tmp("hb-bad");
    let questions = dir.join("q.json");
    std::fs::write(
        &questions,
        r#"[{"question_id": 1, "image": "hopper.jpg", "text": "?", "label": "yes"}]"#,
    )
    .unwrap();
    let out = misp(&[
        "eval",
        "hallusionbench",
        "--model",
        "no/such/model",
        "--questions",
        s(&questions),
        "--images",
        IMAGES,
        "--out",
        s(&dir.join("run")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("q.json") && err.contains("missing category"),
        "{err}"
    );
    let out = misp(&["eval", "hallusionbench", "--out", s(&dir.join("run"))]);
    assert!(!out.status.success());
}

#[test]
fn mmvp_asks_every_question_with_an_image_and_rescores_like_answers_mode() {
    let dir = tmp("mmvp");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for (i, src) in [
        "hopper.jpg",
        "coffee_cmyk.jpg",
        "hopper.jpg",
        "coffee_cmyk.jpg",
        "hopper.jpg",
    ]
    .iter()
    .enumerate()
    {
        std::fs::copy(
            Path::new(ROOT).join(IMAGES).join(src),
            images.join(format!("{}.jpg", i + 1)),
        )
        .unwrap();
    }
    let questions = dir.join("Questions.csv");
    std::fs::write(
        &questions,
        "Index,Question,Options,Correct Answer,Visual Pattern\n\
         1,\"Open, or not?\",(a) Open (b) Closed,(a),state\n\
         2,\"Open, or not?\",(a) Open (b) Closed,(b),state\n\
         3,Left?,(a) Left (b) Right,(a),orientation\n\
         4,Left?,(a) Left (b) Right,(b),orientation\n\
         5,Red?,(a) Red (b) Blue,(a),color\n\
         6,Red?,(a) Red (b) Blue,(b),color\n",
    )
    .unwrap();
    let out = dir.join("run");
    let mut args = vec!["eval", "mmvp", "--questions", s(&questions)];
    let mut flags = model_flags(&out, "4");
    flags[3] = s(&images);
    args.extend(flags);
    let stdout = ok(misp(&args));
    assert!(stdout.contains("| overall | 5 |"), "{stdout}");
    let answers = jsonl(&out.join("answers.jsonl"));
    assert_eq!(answers.len(), 5, "question 6 has no image");
    for a in &answers {
        assert!(a["pred"].is_null() || a["pred"].is_string(), "{a}");
        assert!(a["correct_answer"].is_boolean(), "{a}");
    }
    let excluded = json_file(&out.join("excluded.json"));
    assert_eq!(excluded["missing_images"], 1);
    assert_eq!(excluded["excluded"][0]["image"], "6.jpg");
    assert_eq!(excluded["incomplete_pairs"], 1);
    let metrics = json_file(&out.join("metrics.json"));
    assert_eq!(metrics["overall"]["pairs"], 2);
    assert_eq!(metrics["state"]["n"], 2);
    assert_eq!(metrics["color"]["pairs"], 0);
    assert_eq!(json_file(&out.join("config.json"))["command"], "eval mmvp");
    let rescored = dir.join("rescored");
    ok(misp(&[
        "eval",
        "mmvp",
        "--answers",
        s(&out.join("answers.jsonl")),
        "--out",
        s(&rescored),
    ]));
    assert_eq!(metrics, json_file(&rescored.join("metrics.json")));
    let table = ok(misp(&[
        "eval",
        "compare",
        s(&out),
        "--out",
        s(&dir.join("cmp")),
    ]));
    assert!(table.contains("| overall pair_accuracy |"), "{table}");
}

#[test]
fn mmvp_refuses_another_benchmarks_file() {
    let dir = tmp("mmvp-bad");
    let questions = dir.join("q.csv");
    std::fs::write(&questions, "question_id,image,text,label\n1,a.jpg,?,yes\n").unwrap();
    let out = misp(&[
        "eval",
        "mmvp",
        "--model",
        "no/such/model",
        "--questions",
        s(&questions),
        "--images",
        IMAGES,
        "--out",
        s(&dir.join("run")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("q.csv:1: field `(header)`") && err.contains("Correct Answer"),
        "{err}"
    );
}

#[test]
fn amber_answers_both_kinds_and_rescores_like_answers_mode() {
    let dir = tmp("amber");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    // Images 1-7 exist; AMBER_8.jpg is missing, so description 8 and the questions on it
    // (ids 16 and 24) are excluded.
    let sources = [
        "hopper.jpg",
        "coffee_cmyk.jpg",
        "camera_gray.png",
        "chelsea_rgba.png",
    ];
    for i in 1..=7 {
        let src = Path::new(ROOT)
            .join(IMAGES)
            .join(sources[i % sources.len()]);
        std::fs::copy(src, images.join(format!("AMBER_{i}.jpg"))).unwrap();
    }
    let data = Path::new(ROOT).join("fixtures/amber/data");
    let out = dir.join("run");
    let stdout = ok(misp(&[
        "eval",
        "amber",
        "--model",
        MODEL,
        "--annotations",
        s(&data),
        "--images",
        s(&images),
        "--kind",
        "all",
        "--out",
        s(&out),
        "--batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--max-answer-tokens",
        "3",
    ]));
    assert!(stdout.contains("| descriptions | 7 |"), "{stdout}");
    assert!(stdout.contains("| discriminative | 18 |"), "{stdout}");
    let answers = jsonl(&out.join("answers.jsonl"));
    assert_eq!(answers.len(), 25);
    for a in &answers {
        let generative = a["id"].as_u64().unwrap() <= 8;
        assert_eq!(a["nouns"].is_array(), generative, "{a}");
        assert_eq!(a["pred"].is_string(), !generative, "{a}");
    }
    let excluded = json_file(&out.join("excluded.json"));
    assert_eq!(excluded["missing_images"], 3);
    let config = json_file(&out.join("config.json"));
    assert_eq!(config["command"], "eval amber");
    assert_eq!(config["max_answer_tokens"], 3);
    let metrics = json_file(&out.join("metrics.json"));
    assert_eq!(metrics["generative"]["n"], 7);
    assert!(metrics["existence"]["f1"].is_number());
    let rescored = dir.join("rescored");
    ok(misp(&[
        "eval",
        "amber",
        "--annotations",
        s(&data),
        "--answers",
        s(&out.join("answers.jsonl")),
        "--out",
        s(&rescored),
    ]));
    assert_eq!(metrics, json_file(&rescored.join("metrics.json")));
    let table = ok(misp(&[
        "eval",
        "compare",
        s(&out),
        "--out",
        s(&dir.join("cmp")),
    ]));
    assert!(table.contains("| generative chair |"), "{table}");

    // Only the descriptions.
    let gen = dir.join("gen");
    ok(misp(&[
        "eval",
        "amber",
        "--model",
        MODEL,
        "--annotations",
        s(&data),
        "--images",
        s(&images),
        "--kind",
        "generative",
        "--out",
        s(&gen),
        "--max-new-tokens",
        "4",
    ]));
    let m = json_file(&gen.join("metrics.json"));
    assert!(
        m.get("generative").is_some() && m.get("discriminative").is_none(),
        "{m}"
    );
}

#[test]
fn amber_refuses_annotations_of_another_benchmark() {
    let dir = tmp("amber-bad");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let real = Path::new(ROOT).join("fixtures/amber/data");
    std::fs::copy(real.join("relation.json"), data.join("relation.json")).unwrap();
    std::fs::copy(real.join("safe_words.txt"), data.join("safe_words.txt")).unwrap();
    std::fs::write(
        data.join("annotations.json"),
        r#"[{"id": 1, "question_id": 1, "label": "yes"}]"#,
    )
    .unwrap();
    let out = misp(&[
        "eval",
        "amber",
        "--annotations",
        s(&data),
        "--answers",
        s(&data.join("annotations.json")),
        "--out",
        s(&dir.join("run")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("annotations.json:0: field `[0].type`") && err.contains("another benchmark"),
        "{err}"
    );
}

#[test]
fn judged_runners_take_the_model_when_it_is_given() {
    // `--model` makes the optional model group present (clap derives an empty group for a
    // struct with a flattened field; ModelArgs names `--model` in it). Without that, a run
    // with --model would stop with "give --model". The fixture's images are not under
    // --images, so the run stops before any model or judge work, after recording the model
    // in its config.
    let out = tmp("mmhal-model");
    let o = misp(&[
        "eval",
        "mmhal",
        "--model",
        MODEL,
        "--questions",
        "fixtures/mmhal/response.json",
        "--images",
        IMAGES,
        "--out",
        s(&out),
        "--judge-url",
        "http://127.0.0.1:9/v1",
        "--judge-model",
        "x",
        "--judge-retries",
        "0",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("give --model"), "{err}");
    assert_eq!(json_file(&out.join("config.json"))["model"], MODEL, "{err}");
}

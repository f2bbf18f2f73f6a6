//! `misp eval pope` and `misp eval chair` as a user runs them, on the tiny random LLaVA of
//! `fixtures/llava_chat/tiny` and the images of `fixtures/clip/images`. Random weights answer
//! nonsense, so these tests check the wiring, not the numbers: every output parses, missing
//! images are excluded and listed, the config records the run, and the metrics are exactly
//! (bit for bit: the same code scores both) what `misp eval score-only` recomputes from the
//! saved answers.

use std::path::PathBuf;

use serde_json::{json, Value};

mod common;
use common::{json_file, jsonl, misp, ok, s, tmp_dir, write_jsonl, IMAGES, MODEL};

fn tmp(name: &str) -> PathBuf {
    tmp_dir("evalmodel", name)
}

#[test]
fn pope_answers_every_question_with_an_image_and_scores_like_score_only() {
    let dir = tmp("pope");
    // Short questions and no suffix: the tiny model's context is 64 positions, 16 of them the
    // image.
    let q = |id: i64, image: &str, object: &str, label: &str| json!({"question_id": id, "image": image, "text": format!("Is there a {object}?"), "label": label});
    let random = dir.join("random_val.jsonl");
    write_jsonl(
        &random,
        &[
            q(1, "hopper.jpg", "person", "yes"),
            q(2, "hopper.jpg", "dog", "no"),
            q(3, "camera_gray.png", "camera", "yes"),
            q(4, "missing.png", "cat", "no"),
        ],
    );
    let popular = dir.join("popular_val.jsonl");
    write_jsonl(
        &popular,
        &[
            q(1, "astronaut_small.png", "person", "yes"),
            q(2, "chelsea_rgba.png", "dog", "no"),
            q(3, "coffee_cmyk.jpg", "cup", "yes"),
        ],
    );
    let out = dir.join("run");
    let stdout = ok(misp(&[
        "eval",
        "pope",
        "--model",
        MODEL,
        "--questions",
        s(&random),
        s(&popular),
        "--images",
        IMAGES,
        "--out",
        s(&out),
        "--suffix",
        "",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "4",
    ]));
    assert!(stdout.contains("| overall | 6 |"), "{stdout}");

    let answers = jsonl(&out.join("answers.jsonl"));
    assert_eq!(
        answers.len(),
        6,
        "the question with a missing image is not asked"
    );
    for a in &answers {
        let pred = a["pred"].as_str().unwrap();
        assert!(pred == "yes" || pred == "no", "{a}");
        assert!(a["answer"].is_string(), "{a}");
    }
    let excluded = json_file(&out.join("excluded.json"));
    assert_eq!(excluded["missing_images"], 1);
    assert_eq!(excluded["excluded"][0]["image"], "missing.png");
    assert_eq!(excluded["excluded"][0]["split"], "random");

    let config = json_file(&out.join("config.json"));
    assert_eq!(config["command"], "eval pope");
    assert_eq!(config["model"], MODEL);
    assert_eq!(config["max_new_tokens"], 4);
    assert_eq!(config["batch_size"], 2);
    assert_eq!(config["suffix"], "");

    let metrics = json_file(&out.join("metrics.json"));
    assert_eq!(metrics["random"]["n"], 3);
    assert_eq!(metrics["popular"]["n"], 3);
    assert_eq!(metrics["overall"]["n"], 6);
    let rescored = dir.join("rescored");
    ok(misp(&[
        "eval",
        "score-only",
        "--answers",
        s(&out.join("answers.jsonl")),
        "--out",
        s(&rescored),
    ]));
    assert_eq!(metrics, json_file(&rescored.join("metrics.json")));
}

#[test]
fn chair_captions_every_annotated_image_and_scores_like_score_only() {
    let dir = tmp("chair");
    let annotations = dir.join("instances.json");
    let instances = json!({
        "images": [
            {"id": 1, "file_name": "hopper.jpg"},
            {"id": 2, "file_name": "chelsea_rgba.png"},
            {"id": 3, "file_name": "astronaut_small.png"},
            {"id": 4, "file_name": "not_there.png"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1},
            {"id": 11, "image_id": 2, "category_id": 2},
            {"id": 12, "image_id": 3, "category_id": 1},
            {"id": 13, "image_id": 4, "category_id": 3},
        ],
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 2, "name": "cat"},
            {"id": 3, "name": "dog"},
        ],
    });
    std::fs::write(&annotations, instances.to_string()).unwrap();
    let out = dir.join("run");
    let stdout = ok(misp(&[
        "eval",
        "chair",
        "--model",
        MODEL,
        "--images",
        IMAGES,
        "--annotations",
        s(&annotations),
        "--out",
        s(&out),
        "--prompt",
        "Describe it.",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
    ]));
    assert!(stdout.contains("| 3 |"), "{stdout}");

    let captions = jsonl(&out.join("captions.jsonl"));
    let images: Vec<&str> = captions
        .iter()
        .map(|c| c["image"].as_str().unwrap())
        .collect();
    assert_eq!(
        images,
        ["astronaut_small.png", "chelsea_rgba.png", "hopper.jpg"]
    );
    let excluded = json_file(&out.join("excluded.json"));
    assert_eq!(excluded["missing_images"], 1);
    assert_eq!(excluded["excluded"][0]["image"], "not_there.png");

    let config = json_file(&out.join("config.json"));
    assert_eq!(config["command"], "eval chair");
    assert_eq!(config["prompt"], "Describe it.");
    assert_eq!(config["max_new_tokens"], 12);
    assert_eq!(config["synonyms"], Value::Null);

    let metrics = json_file(&out.join("metrics.json"));
    assert_eq!(metrics["chair"]["n"], 3);
    let rescored = dir.join("rescored");
    ok(misp(&[
        "eval",
        "score-only",
        "--answers",
        s(&out.join("captions.jsonl")),
        "--annotations",
        s(&annotations),
        "--out",
        s(&rescored),
    ]));
    assert_eq!(metrics, json_file(&rescored.join("metrics.json")));
}

#[test]
fn pope_fails_on_a_bad_question_file_before_loading_the_model() {
    let dir = tmp("bad");
    let random = dir.join("random_val.jsonl");
    write_jsonl(
        &random,
        &[
            json!({"question_id": 1, "image": "hopper.jpg", "text": "Is there a dog?", "label": "maybe"}),
        ],
    );
    let out = misp(&[
        "eval",
        "pope",
        "--model",
        "no/such/model",
        "--questions",
        s(&random),
        "--images",
        IMAGES,
        "--out",
        s(&dir.join("run")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("random_val.jsonl:1: field `label`"), "{err}");
}

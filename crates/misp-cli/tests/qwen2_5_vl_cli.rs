//! The commands on a Qwen2.5-VL folder, as a user runs them: the tiny checkpoint of
//! `fixtures/qwen2_5_vl` (whose expected values come from transformers and PEFT), chosen by its
//! `config.json`'s `model_type` with no flag saying so.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{json, Value};

mod common;
use common::{json_file, jsonl, misp, ok, s, tmp_dir, write_jsonl, ROOT};

const MODEL: &str = "fixtures/qwen2_5_vl/tiny";

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

fn tmp(name: &str) -> PathBuf {
    tmp_dir("qwen-cli", name)
}

fn expected() -> Value {
    let text = std::fs::read_to_string(root().join("fixtures/qwen2_5_vl/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A fixture photo: the fixture script's own `hopper.png`, the others CLIP's.
fn image(name: &str) -> PathBuf {
    let own = root().join("fixtures/qwen2_5_vl/images").join(name);
    if own.exists() {
        own
    } else {
        root().join("fixtures/clip/images").join(name)
    }
}

/// The fixture's scored response log-prob: the sum of transformers' per-token log-probs over
/// the response ids (the last ones of each case's `key` list).
fn fixture_logp(case: &Value, key: &str) -> f64 {
    let all: Vec<f64> = case[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let n = case["response_ids"].as_array().unwrap().len();
    all[all.len() - n..].iter().sum()
}

/// The four fixture cases (four image sizes) as `misp score` input.
fn score_input(dir: &Path) -> PathBuf {
    let rows: Vec<Value> = expected()["score"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"id": format!("s{i}"), "image": image(c["image"].as_str().unwrap()),
                   "prompt": c["prompt"], "response": c["response"]})
        })
        .collect();
    let path = dir.join("score.jsonl");
    write_jsonl(&path, &rows);
    path
}

fn score(dir: &Path, adapter: Option<&Path>, out: &str) -> Vec<Value> {
    let data = score_input(dir);
    let out = dir.join(out);
    let mut args = vec![
        "score",
        "--model",
        MODEL,
        "--data",
        s(&data),
        "--out",
        s(&out),
        // Two images of different sizes per forward: rows with different image-token counts.
        "--batch-size",
        "2",
        "--quiet",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    ok(misp(&args));
    jsonl(&out)
}

fn assert_logps(rows: &[Value], key: &str) {
    let want = expected();
    let cases = want["score"].as_array().unwrap();
    assert_eq!(rows.len(), cases.len());
    for (r, c) in rows.iter().zip(cases) {
        let (got, want) = (r["logp"].as_f64().unwrap(), fixture_logp(c, key));
        assert!(
            (got - want).abs() < 1e-4,
            "{}: {key} log-prob {got} vs transformers {want}",
            c["image"]
        );
        assert_eq!(
            r["tokens"].as_u64().unwrap() as usize,
            c["response_ids"].as_array().unwrap().len()
        );
    }
}

#[test]
fn score_gives_transformers_logprobs_with_and_without_a_peft_adapter() {
    let dir = tmp("score");
    assert_logps(&score(&dir, None, "base.jsonl"), "token_logprobs");
    // The adapter PEFT saved (LoRA on the seven projections) loads and gives PEFT's numbers.
    let peft = root().join("fixtures/qwen2_5_vl/peft_saved");
    assert_logps(
        &score(&dir, Some(&peft), "peft.jsonl"),
        "peft_token_logprobs",
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn generate_gives_transformers_greedy_text() {
    let dir = tmp("generate");
    let want = expected();
    let cases = want["generate"].as_array().unwrap();
    let rows: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"id": i, "image": image(c["image"].as_str().unwrap()), "prompt": c["prompt"]}))
        .collect();
    let data = dir.join("gen.jsonl");
    write_jsonl(&data, &rows);
    let out = dir.join("answers.jsonl");
    let max_new = want["max_new_tokens"].to_string();
    ok(misp(&[
        "generate",
        "--model",
        MODEL,
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--max-new-tokens",
        &max_new,
        "--batch-size",
        "3",
        "--quiet",
    ]));
    let got = jsonl(&out);
    assert_eq!(got.len(), cases.len());
    for (r, c) in got.iter().zip(cases) {
        assert_eq!(r["text"], c["text"], "{}", c["image"]);
    }
    // The resolved config names the backbone and the template it prompted with, not LLaVA's
    // default `--template`.
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("answers.jsonl.config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["model_type"], "qwen2_5_vl");
    assert_eq!(config["template"], "the checkpoint's chat template");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn pope_runs_on_a_qwen_folder() {
    let dir = tmp("pope");
    let q = |id: i64, image: &str, object: &str, label: &str| json!({"question_id": id, "image": image, "text": format!("Is there a {object}?"), "label": label});
    let random = dir.join("random_val.jsonl");
    write_jsonl(
        &random,
        &[
            q(1, "hopper.jpg", "cat", "yes"),
            q(2, "camera_gray.png", "dog", "no"),
            q(3, "rocket_rgb16.png", "rocket", "yes"),
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
        "--images",
        "fixtures/clip/images",
        "--out",
        s(&out),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
    ]));
    assert!(stdout.contains("| overall | 3 |"), "{stdout}");
    let answers = jsonl(&out.join("answers.jsonl"));
    assert_eq!(answers.len(), 3);
    for a in &answers {
        // The tiny random model says no real word: every answer is parsed to yes or no.
        let pred = a["pred"].as_str().unwrap();
        assert!(pred == "yes" || pred == "no", "{a}");
        assert!(a["answer"].is_string(), "{a}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `misp bench memory` on Qwen2.5-VL-7B's config: the backbone from `model_type`, the image
/// tokens from smart_resize of `--image` (640 x 480 -> 34 x 46 patches -> 391 tokens, as
/// transformers' processor gives), the default sequence 391 + 124 text tokens.
#[test]
fn bench_memory_takes_a_qwen_config_and_an_image_size() {
    let config = "fixtures/model_configs/qwen2.5-vl-7b.config.json";
    let args = ["bench", "memory", "--model-config", config, "--json"];
    let stdout = ok(misp(&args));
    assert!(
        stdout.contains("qwen2_5_vl, 28 layers, hidden 3584"),
        "{stdout}"
    );
    assert!(
        stdout.contains("515 tokens (391 of a 640x480 image"),
        "{stdout}"
    );
    let json: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(json["shape"]["tokens"], 515);
    let weights = &json["persistent"][0];
    assert_eq!(weights["bytes"].as_f64().unwrap(), 8_292_166_656.0 * 2.0);
    // A square 28 x 28 photo: 56 x 56 after smart_resize (min_pixels), 4 tokens.
    let small = ok(misp(&[&args[..], &["--image", "28x28"]].concat()));
    assert!(small.contains("128 tokens (4 of a 28x28 image"), "{small}");
    for (bad, says) in [
        ("640", "expected WIDTHxHEIGHT"),
        ("0x480", "two positive pixel counts"),
        ("1x201", "aspect ratio must be smaller than 200"),
    ] {
        let out = misp(&[&args[..], &["--image", bad]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{bad}: {err}");
    }
    let dir = tmp("bench-memory");
    let other = dir.join("config.json");
    std::fs::write(&other, r#"{"model_type": "bert"}"#).unwrap();
    let out = misp(&["bench", "memory", "--model-config", s(&other)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("\"bert\"") && err.contains("qwen2_5_vl"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `eval hallusionbench`, `mmvp` and `amber` load their questions as `pope` does but each asks
/// its own prompts; on the Qwen fixture each must run, answer every askable question and write
/// metrics that re-scoring the saved answers reproduces.
#[test]
fn hallusionbench_mmvp_and_amber_run_on_a_qwen_folder() {
    let dir = tmp("benchmarks");
    // `rescore`: the flags `--answers` re-scoring needs beside the answers (AMBER's annotations).
    let run = |name: &str, input: &[&str], rescore: &[&str], images: &Path| -> PathBuf {
        let out = dir.join(name);
        let mut args = vec!["eval", name, "--model", MODEL, "--images", s(images)];
        args.extend(input);
        args.extend([
            "--out",
            s(&out),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
        ]);
        ok(misp(&args));
        let rescored = dir.join(format!("{name}-rescored"));
        let answers = out.join("answers.jsonl");
        let mut args = vec![
            "eval",
            name,
            "--answers",
            s(&answers),
            "--out",
            s(&rescored),
        ];
        args.extend(rescore);
        ok(misp(&args));
        assert_eq!(
            json_file(&out.join("metrics.json")),
            json_file(&rescored.join("metrics.json")),
            "{name}"
        );
        assert_eq!(
            json_file(&out.join("config.json"))["command"],
            format!("eval {name}")
        );
        out
    };
    let clip = root().join("fixtures/clip/images");

    let hb = |qid: &str, gt: &str, file: &str| {
        json!({"category": "VD", "subcategory": "chart", "visual_input": "1", "set_id": "0",
               "figure_id": "0", "question_id": qid, "question": format!("Is it {qid}?"),
               "gt_answer_details": "", "gt_answer": gt, "filename": file})
    };
    let questions = dir.join("HallusionBench.json");
    let rows = json!([
        hb("0", "1", "./hopper.jpg"),
        hb("1", "0", "camera_gray.png")
    ]);
    std::fs::write(&questions, rows.to_string()).unwrap();
    let out = run(
        "hallusionbench",
        &["--questions", s(&questions)],
        &[],
        &clip,
    );
    for a in jsonl(&out.join("answers.jsonl")) {
        assert!(
            ["yes", "no", "unknown"].contains(&a["pred"].as_str().unwrap()),
            "{a}"
        );
    }

    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for (i, src) in ["hopper.jpg", "rocket_rgb16.png"].iter().enumerate() {
        std::fs::copy(clip.join(src), images.join(format!("{}.jpg", i + 1))).unwrap();
    }
    let csv = dir.join("Questions.csv");
    std::fs::write(
        &csv,
        "Index,Question,Options,Correct Answer,Visual Pattern\n\
         1,Open?,(a) Open (b) Closed,(a),state\n\
         2,Open?,(a) Open (b) Closed,(b),state\n",
    )
    .unwrap();
    let out = run("mmvp", &["--questions", s(&csv)], &[], &images);
    assert_eq!(jsonl(&out.join("answers.jsonl")).len(), 2);

    let amber_images = dir.join("amber-images");
    std::fs::create_dir_all(&amber_images).unwrap();
    for i in 1..=8 {
        let src = ["hopper.jpg", "camera_gray.png", "astronaut_small.png"][i % 3];
        std::fs::copy(clip.join(src), amber_images.join(format!("AMBER_{i}.jpg"))).unwrap();
    }
    let data = root().join("fixtures/amber/data");
    let out = run(
        "amber",
        &["--annotations", s(&data), "--kind", "discriminative"],
        &["--annotations", s(&data)],
        &amber_images,
    );
    let answers = jsonl(&out.join("answers.jsonl"));
    assert!(!answers.is_empty());
    for a in &answers {
        assert!(a["pred"].is_string(), "{a}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Three records, each with two pool negatives of other sizes than its positive (so a record's
/// four sequences carry 6 to 9 image tokens), for the `misp` variant.
fn train_world(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let names = ["astronaut_small.png", "camera_gray.png", "rocket_rgb16.png"];
    let answers = [
        ("The astronaut stands.", "The dog stands."),
        ("A man with a camera.", "A cat on a sofa."),
        ("Yes, there is a rocket.", "No, there is a car."),
    ];
    let mut records = Vec::new();
    let mut negatives = Vec::new();
    for (i, (chosen, rejected)) in answers.iter().enumerate() {
        let id = format!("r{i}");
        records.push(
            json!({"id": id, "image": image(names[i]), "prompt": "What is in the image?",
                            "chosen": chosen, "rejected": rejected}),
        );
        let negs: Vec<Value> = (1..=2)
            .map(|s| {
                json!({"image": names[(i + s) % names.len()], "strategy": "misp",
                            "score": 0.5, "recon": 0.1, "l1": 0.2, "q": 0.5})
            })
            .collect();
        negatives.push(json!({"id": id, "negatives": negs}));
    }
    let data = dir.join("records.jsonl");
    write_jsonl(&data, &records);
    let neg = dir.join("negatives.jsonl");
    write_jsonl(&neg, &negatives);
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let ids: Vec<Value> = names
        .iter()
        .map(|n| json!({"id": n, "path": image(n)}))
        .collect();
    write_jsonl(&pool.join("ids.jsonl"), &ids);
    (data, neg, pool)
}

fn train(dir: &Path, out: &str, extra: &[&str]) -> Output {
    let (data, neg, pool) = train_world(dir);
    let out = dir.join(out);
    let mut args = vec![
        "train",
        "--config",
        "configs/misp.toml",
        "--model",
        MODEL,
        "--data",
        s(&data),
        "--negatives",
        s(&neg),
        "--pool",
        s(&pool),
        "--image-root",
        "/",
        "--out",
        s(&out),
        "--quiet",
    ];
    let sets = [
        "k=2",
        "epochs=1",
        "batch_size=3",
        "micro_batch_size=3",
        "lr=0.01",
        "lora_r=4",
        "lora_alpha=8",
        "warmup_ratio=0.0",
    ];
    for s in sets.iter().chain(extra) {
        args.extend(["--set", s]);
    }
    misp(&args)
}

#[test]
fn train_saves_a_peft_adapter_that_score_loads() {
    let dir = tmp("train");
    ok(train(&dir, "run", &[]));
    let run = dir.join("run");
    let metrics = jsonl(&run.join("metrics.jsonl"));
    let loss = metrics
        .iter()
        .find_map(|m| m["loss"].as_f64())
        .expect("a loss in metrics.jsonl");
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");

    // PEFT's layout for Qwen2.5-VL: its class, and the keys PEFT 0.21.2 writes for it (the
    // fixture adapter PEFT saved).
    let adapter = run.join("adapter");
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let peft_dir = root().join("fixtures/qwen2_5_vl/peft_saved");
    let theirs: Value = serde_json::from_str(
        &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["auto_mapping"], theirs["auto_mapping"]);
    assert_eq!(cfg["target_modules"], theirs["target_modules"]);
    let keys = |d: &Path| -> Vec<String> {
        let bytes = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let mut k: Vec<String> = header
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&adapter), keys(&peft_dir));

    // The trained adapter loads back and moves the log-probs off the base's.
    let base = score(&dir, None, "base.jsonl");
    let tuned = score(&dir, Some(&adapter), "tuned.jsonl");
    for (b, t) in base.iter().zip(&tuned) {
        let (b, t) = (b["logp"].as_f64().unwrap(), t["logp"].as_f64().unwrap());
        assert!(
            t.is_finite() && (t - b).abs() > 1e-6,
            "base {b} vs tuned {t}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// The first step's loss and gradient norm of a run.
fn first_step(run: &Path) -> (f64, f64) {
    let metrics = jsonl(&run.join("metrics.jsonl"));
    let m = metrics
        .iter()
        .find(|m| m["grad_norm"].as_f64().is_some())
        .expect("a step in metrics.jsonl");
    (
        m["loss"].as_f64().unwrap(),
        m["grad_norm"].as_f64().unwrap(),
    )
}

#[test]
fn memory_options_give_the_batched_step() {
    // Activation checkpointing and one sequence at a time (the layer-by-layer path, with each
    // row's multimodal RoPE tables) against one batched graph; without dropout, whose masks
    // depend on the grouping.
    let dir = tmp("pieces");
    ok(train(&dir, "batched", &["lora_dropout=0.0"]));
    ok(train(
        &dir,
        "pieces",
        &[
            "lora_dropout=0.0",
            "gradient_checkpointing=true",
            "sequence_group=1",
            "logprob_chunk=3",
        ],
    ));
    let (l0, g0) = first_step(&dir.join("batched"));
    let (l1, g1) = first_step(&dir.join("pieces"));
    assert!(g0 > 1e-6, "a zero gradient cannot tell: {g0}");
    assert!(
        (l0 - l1).abs() <= 1e-5 * (1.0 + l0.abs()),
        "loss {l0} vs {l1}"
    );
    assert!((g0 - g1).abs() <= 1e-4 * g0, "grad norm {g0} vs {g1}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn llava_only_options_are_refused_naming_the_key() {
    let dir = tmp("refuse");
    let data = score_input(&dir);
    let out = misp(&[
        "score",
        "--model",
        MODEL,
        "--data",
        s(&data),
        "--out",
        s(&dir.join("o.jsonl")),
        "--template",
        "USER: <image>\n{prompt} ASSISTANT:!",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("template"), "{err}");
    assert!(!dir.join("o.jsonl").exists());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bench_model_times_a_qwen_folder() {
    let out = ok(misp(&[
        "bench",
        "model",
        "--model",
        MODEL,
        "--batch",
        "2",
        "--seq-len",
        "40",
        "--gen-batch",
        "2",
        "--prompt-len",
        "24",
        "--new-tokens",
        "3",
        "--rank",
        "4",
        "--repeat",
        "1",
        "--json",
    ]));
    // 24 / 2 = 12 tokens for the image: a 3 x 3 square of merge units (6 x 6 patches).
    assert!(out.contains("Qwen2.5-VL: 2 layers"), "{out}");
    assert!(
        out.contains("9 image tokens of a 6 x 6 patch grid"),
        "{out}"
    );
    let json: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    // LoRA r 4 on 7 projections of 2 layers, hidden 64 (from the fixture's config.json).
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(MODEL).join("config.json")).unwrap(),
    )
    .unwrap();
    let tc = config.get("text_config").unwrap_or(&config);
    let (d, ff) = (
        tc["hidden_size"].as_u64().unwrap(),
        tc["intermediate_size"].as_u64().unwrap(),
    );
    let heads = tc["num_attention_heads"].as_u64().unwrap();
    let kv = tc["num_key_value_heads"].as_u64().unwrap() * (d / heads);
    // A: r x in, B: out x r, per projection.
    let per_layer = 4 * ((d + d) + (d + kv) + (d + kv) + (d + d) + 2 * (d + ff) + (ff + d));
    assert_eq!(json["lora_params"], 2 * per_layer);
    assert!(json["train_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["generate_tokens_per_s"].as_f64().unwrap() > 0.0);
}

/// `misp serve` on the Qwen2.5-VL folder: concurrent chat requests (one batch, two image
/// sizes) get transformers' greedy text; a request without an image is answered too.
#[test]
fn serve_answers_chat_requests_with_transformers_greedy_text() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::process::Stdio;

    struct Served(std::process::Child);
    impl Drop for Served {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_misp"))
        .args([
            "serve",
            "--model",
            MODEL,
            "--port",
            "0",
            "--image-root",
            "fixtures/clip/images",
        ])
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start misp serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _served = Served(child);
    let port: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let ask = |body: Value| -> (u16, Value) {
        let body = body.to_string();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
            .unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        let json = text.split("\r\n\r\n").nth(1).unwrap_or("");
        (status, serde_json::from_str(json).unwrap_or(Value::Null))
    };
    let want = expected();
    let cases: Vec<&Value> = want["generate"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["image"] != "hopper.png") // the fixture's own copy: not under the root
        .collect();
    assert_eq!(cases.len(), 2);
    let max = want["max_new_tokens"].as_u64().unwrap();
    let answers: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let handles: Vec<_> = cases
            .iter()
            .map(|c| {
                let body = json!({"model": "tiny", "temperature": 0, "max_tokens": max,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": c["image"]}},
                        {"type": "text", "text": c["prompt"]}]}]});
                let ask = &ask;
                sc.spawn(move || ask(body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((status, body), c) in answers.iter().zip(&cases) {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"], c["text"],
            "{}",
            c["image"]
        );
    }
    let (status, body) = ask(json!({"max_tokens": 2, "messages": [
        {"role": "user", "content": "Hello?"}]}));
    assert_eq!(status, 200, "{body}");
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );
}

/// `misp eval chair` captions with the Qwen2.5-VL folder: the caption of the fixture's photo
/// under the fixture's prompt is transformers' greedy text.
#[test]
fn chair_captions_are_transformers_greedy_text() {
    let dir = tmp("chair");
    let want = expected();
    let case = want["generate"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["image"] == "astronaut_small.png")
        .unwrap();
    let annotations = dir.join("instances.json");
    let instances = json!({
        "images": [{"id": 1, "file_name": "astronaut_small.png"},
                   {"id": 2, "file_name": "camera_gray.png"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1},
                        {"id": 11, "image_id": 2, "category_id": 1}],
        "categories": [{"id": 1, "name": "person"}],
    });
    std::fs::write(&annotations, instances.to_string()).unwrap();
    let out = dir.join("run");
    let max = want["max_new_tokens"].to_string();
    ok(misp(&[
        "eval",
        "chair",
        "--model",
        MODEL,
        "--images",
        "fixtures/clip/images",
        "--annotations",
        s(&annotations),
        "--out",
        s(&out),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        &max,
        "--batch-size",
        "2",
    ]));
    let captions = jsonl(&out.join("captions.jsonl"));
    assert_eq!(captions.len(), 2);
    let astronaut = captions
        .iter()
        .find(|c| c["image"] == "astronaut_small.png")
        .unwrap();
    assert_eq!(astronaut["caption"], case["text"]);
    std::fs::remove_dir_all(dir).ok();
}

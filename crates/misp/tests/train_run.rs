//! `misp::train` end to end on the tiny LLaVA of `fixtures/llava_chat` (random weights, a real
//! tokenizer with `<image>`): learning happens, resume equals an uninterrupted run, uniform-q
//! importance sampling equals the exact gradient in a full step, every shipped config runs,
//! and bad inputs are named.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use misp::kernels::{Kernels, ThreadKernels};
use misp::train::{train, TrainConfig, TrainInputs};
use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const IMAGES: [&str; 5] = [
    "hopper.jpg",
    "astronaut_small.png",
    "camera_gray.png",
    "coffee_cmyk.jpg",
    "rocket_rgb16.png",
];

/// Records (TRL JSONL), a pool folder with ids.jsonl, and a negatives file whose negatives carry
/// `strategies` in turn (synthetic ones with a seed, pool ones with a uniform q).
fn world(dir: &Path, strategies: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let img_dir = dir.join("images");
    std::fs::create_dir_all(&img_dir).unwrap();
    for name in IMAGES {
        std::fs::copy(
            root().join("fixtures/clip/images").join(name),
            img_dir.join(name),
        )
        .unwrap();
    }
    let answers = [
        ("A red circle.", "A blue square."),
        ("The astronaut stands.", "The dog stands."),
        ("There are two cats.", "There is a car."),
        ("The car is green.", "The car is red."),
        ("A flag on the moon.", "A dog on the sofa."),
        ("Yes, there is a table.", "No, there is not."),
    ];
    let mut records = String::new();
    let mut negatives = String::new();
    for (i, (chosen, rejected)) in answers.iter().enumerate() {
        let id = format!("r{i}");
        let image = IMAGES[i % IMAGES.len()];
        records.push_str(&format!(
            "{}\n",
            json!({"id": id, "image": format!("images/{image}"), "prompt": "What is in the image?",
                   "chosen": chosen, "rejected": rejected})
        ));
        let negs: Vec<Value> = strategies
            .iter()
            .enumerate()
            .map(|(s, strat)| match *strat {
                "crop" | "noise" => json!({"image": *strat, "strategy": strat, "score": null,
                    "recon": null, "l1": null, "q": null, "seed": 1000 + i * 10 + s}),
                _ => json!({"image": IMAGES[(i + s + 1) % IMAGES.len()], "strategy": strat,
                    "score": 0.5, "recon": 0.1, "l1": 0.2, "q": 0.25}),
            })
            .collect();
        negatives.push_str(&format!("{}\n", json!({"id": id, "negatives": negs})));
    }
    let data = dir.join("records.jsonl");
    std::fs::write(&data, records).unwrap();
    let neg = dir.join("negatives.jsonl");
    std::fs::write(&neg, negatives).unwrap();
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let ids: String = IMAGES
        .iter()
        .map(|n| format!("{}\n", json!({"id": n, "path": img_dir.join(n)})))
        .collect();
    std::fs::write(pool.join("ids.jsonl"), ids).unwrap();
    (data, neg, pool)
}

fn tiny_cfg(extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        "lr=0.01",
        "batch_size=4",
        "micro_batch_size=2",
        "epochs=2",
        "lora_r=4",
        "lora_alpha=8",
        "lora_dropout=0.1",
        "k=2",
        "checkpoint_every=2",
        "warmup_ratio=0.0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &sets).unwrap()
}

fn inputs(dir: &Path, data: &Path, neg: &Path, pool: &Path, out: &str) -> TrainInputs {
    TrainInputs {
        device: Device::Cpu,
        model: root().join("fixtures/llava_chat/tiny"),
        data: data.to_path_buf(),
        negatives: Some(neg.to_path_buf()),
        pool: Some(pool.to_path_buf()),
        image_root: None,
        out: dir.join(out),
        resume: false,
        progress: false,
        stop_after: None,
    }
}

fn adapter(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

fn max_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, t)| {
            (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn a_few_steps_learn_and_touch_only_lora_tensors() {
    let dir = tmp("learn");
    let (data, neg, pool) = world(&dir, &["misp", "misp"]);
    let cfg = tiny_cfg(&["epochs=6", "lora_dropout=0.0"]);
    let s = train(&cfg, &inputs(&dir, &data, &neg, &pool, "out")).unwrap();
    assert_eq!(s.records, 6);
    assert_eq!(s.steps, 12);
    let get = |i: usize, k: &str| s.metrics[i][k].as_f64().unwrap();
    let first = (get(0, "loss") + get(1, "loss")) / 2.0;
    let last = (get(10, "loss") + get(11, "loss")) / 2.0;
    assert!(last < first - 0.05, "loss {first} -> {last}");
    let acc_first = get(0, "rewards/img_accuracies") + get(1, "rewards/img_accuracies");
    let acc_last = get(10, "rewards/img_accuracies") + get(11, "rewards/img_accuracies");
    assert!(
        acc_last > acc_first,
        "img accuracy {acc_first} -> {acc_last}"
    );
    // The adapter holds LoRA tensors only, and training moved B away from its zero init.
    let a = adapter(&dir.join("out/adapter"));
    assert_eq!(a.len(), 2 * 7 * 2);
    assert!(a
        .keys()
        .all(|k| k.contains(".lora_A.") || k.contains(".lora_B.")));
    let b_norm: f32 = a
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, t)| {
            t.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(b_norm > 0.0);
    for f in [
        "config.toml",
        "metrics.jsonl",
        "report.md",
        "loss.png",
        "skipped.jsonl",
    ] {
        assert!(dir.join("out").join(f).is_file(), "{f}");
    }
    let lines = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12);
    let row: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in [
        "loss",
        "loss/img",
        "loss/text",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "rewards/img_negatives",
        "rewards/img_accuracies",
        "is/ess",
        "is/max_weight",
        "grad_norm",
        "lr",
        "tokens_per_s",
    ] {
        assert!(row.get(key).is_some(), "{key}");
    }
    // A second epoch skips the reference pass: its cache holds every record.
    let cache = std::fs::read_dir(dir.join("out/reference"))
        .unwrap()
        .count();
    assert_eq!(cache, 1);
}

#[test]
fn resume_after_a_kill_equals_the_uninterrupted_run() {
    resume_after_a_kill_equals_the_uninterrupted_run_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn resume_after_a_kill_equals_the_uninterrupted_run_on_the_generic_path() {
    resume_after_a_kill_equals_the_uninterrupted_run_with(Kernels::Generic);
}

fn resume_after_a_kill_equals_the_uninterrupted_run_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let dir = tmp(&format!("resume-{kernels:?}"));
    let (data, neg, pool) = world(&dir, &["misp", "misp"]);
    let cfg = tiny_cfg(&["epochs=3", "checkpoint_every=1"]);
    train(&cfg, &inputs(&dir, &data, &neg, &pool, "whole")).unwrap();
    let mut killed = inputs(&dir, &data, &neg, &pool, "split");
    killed.stop_after = Some(3);
    let err = train(&cfg, &killed).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    // Without --resume the folder is refused; with other settings too.
    let again = inputs(&dir, &data, &neg, &pool, "split");
    assert!(train(&cfg, &again)
        .unwrap_err()
        .to_string()
        .contains("--resume"));
    let mut resumed = again.clone();
    resumed.resume = true;
    let other = tiny_cfg(&["epochs=3", "checkpoint_every=1", "lr=0.02"]);
    let e = train(&other, &resumed).unwrap_err().to_string();
    assert!(e.contains("lr"), "{e}");
    let s = train(&cfg, &resumed).unwrap();
    assert_eq!(s.steps, 6);
    let a = adapter(&dir.join("whole/adapter"));
    let b = adapter(&dir.join("split/adapter"));
    assert_eq!(max_diff(&a, &b), 0.0);
    let lines = |p: &str| {
        std::fs::read_to_string(dir.join(p))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(lines("split/metrics.jsonl"), 6);
    // Two checkpoints kept.
    assert_eq!(
        std::fs::read_dir(dir.join("split/checkpoints"))
            .unwrap()
            .count(),
        2
    );
}

#[test]
fn uniform_q_importance_sampling_equals_the_exact_gradient_in_a_full_step() {
    uniform_q_importance_sampling_equals_the_exact_gradient_in_a_full_step_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn uniform_q_importance_sampling_equals_the_exact_gradient_in_a_full_step_on_the_generic_path() {
    uniform_q_importance_sampling_equals_the_exact_gradient_in_a_full_step_with(Kernels::Generic);
}

fn uniform_q_importance_sampling_equals_the_exact_gradient_in_a_full_step_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let dir = tmp(&format!("is-{kernels:?}"));
    let (data, neg, pool) = world(&dir, &["misp", "misp"]);
    let is = tiny_cfg(&[
        "importance_sampling=true",
        "max_steps=1",
        "lora_dropout=0.0",
    ]);
    let exact = tiny_cfg(&[
        "importance_sampling=false",
        "max_steps=1",
        "lora_dropout=0.0",
    ]);
    train(&is, &inputs(&dir, &data, &neg, &pool, "is")).unwrap();
    train(&exact, &inputs(&dir, &data, &neg, &pool, "exact")).unwrap();
    let a = adapter(&dir.join("is/adapter"));
    let b = adapter(&dir.join("exact/adapter"));
    assert!(max_diff(&a, &b) < 1e-6, "{}", max_diff(&a, &b));
    // And a non-uniform q does change the step (the test can fail).
    let text = std::fs::read_to_string(&neg)
        .unwrap()
        .replace("\"q\":0.25", "\"q\":0.9");
    let skewed = dir.join("skewed.jsonl");
    let mut t2 = String::new();
    for (i, l) in text.lines().enumerate() {
        // Make the two negatives' q differ.
        t2.push_str(&l.replacen("0.9", if i % 2 == 0 { "0.05" } else { "0.9" }, 1));
        t2.push('\n');
    }
    std::fs::write(&skewed, t2).unwrap();
    train(&is, &inputs(&dir, &data, &skewed, &pool, "skewed")).unwrap();
    let c = adapter(&dir.join("skewed/adapter"));
    assert!(max_diff(&a, &c) > 1e-6);
}

#[test]
fn every_shipped_config_runs() {
    let dir = tmp("configs");
    let mut names: Vec<PathBuf> = std::fs::read_dir(root().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    for path in names {
        let base = TrainConfig::load(Some(&path), &[]).unwrap();
        let k = base.k.min(3).to_string();
        let sets: Vec<String> = [
            "batch_size=4",
            "micro_batch_size=2",
            "max_steps=1",
            "lora_r=4",
            "lora_alpha=8",
            "checkpoint_every=0",
            &format!("k={k}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cfg = TrainConfig::load(Some(&path), &sets).unwrap();
        let strategies: Vec<&str> = if cfg.expect_strategies.is_empty() {
            vec!["misp"; cfg.k]
        } else {
            (0..cfg.k)
                .map(|i| cfg.expect_strategies[i.min(cfg.expect_strategies.len() - 1)].as_str())
                .collect()
        };
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let sub = dir.join(&name);
        std::fs::create_dir_all(&sub).unwrap();
        let (data, neg, pool) = world(&sub, &strategies);
        let s = train(&cfg, &inputs(&sub, &data, &neg, &pool, "out"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.steps, 1, "{name}");
        let loss = s.metrics[0]["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{name}: loss {loss}");
        let img = s.metrics[0]["loss/img"].as_f64().unwrap();
        assert_eq!(img == 0.0, !cfg.uses_images(), "{name}: image term {img}");
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = tmp("bad");
    let (data, neg, pool) = world(&dir, &["misp", "misp"]);
    let cfg = tiny_cfg(&["max_steps=1"]);
    // A negatives file for other records.
    let other = dir.join("other.jsonl");
    std::fs::write(
        &other,
        std::fs::read_to_string(&neg).unwrap().replace("\"r", "\"x"),
    )
    .unwrap();
    let e = train(&cfg, &inputs(&dir, &data, &other, &pool, "o1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("other records"), "{e}");
    // Negatives of another strategy than the variant expects.
    let strict = tiny_cfg(&["max_steps=1", "expect_strategies=[\"random\"]"]);
    let e = train(&strict, &inputs(&dir, &data, &neg, &pool, "o2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("random") && e.contains("misp"), "{e}");
    // No --negatives for a file variant.
    let mut no_neg = inputs(&dir, &data, &neg, &pool, "o3");
    no_neg.negatives = None;
    let e = train(&cfg, &no_neg).unwrap_err().to_string();
    assert!(e.contains("--negatives"), "{e}");
    // Records missing from the negatives file: trained on the text term, or skipped.
    let partial = dir.join("partial.jsonl");
    let text: String = std::fs::read_to_string(&neg)
        .unwrap()
        .lines()
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&partial, text).unwrap();
    let s = train(&cfg, &inputs(&dir, &data, &partial, &pool, "o4")).unwrap();
    assert_eq!((s.records, s.skipped), (6, 0));
    let skip = tiny_cfg(&["max_steps=1", "missing_negatives=\"skip\""]);
    let s = train(&skip, &inputs(&dir, &data, &partial, &pool, "o5")).unwrap();
    assert_eq!((s.records, s.skipped), (3, 3));
    // An unreadable positive image: the record is skipped and listed.
    std::fs::write(dir.join("images/hopper.jpg"), b"not an image").unwrap();
    let s = train(&cfg, &inputs(&dir, &data, &neg, &pool, "o6")).unwrap();
    assert!(s.skipped >= 1);
    let listed = std::fs::read_to_string(dir.join("o6/skipped.jsonl")).unwrap();
    assert!(listed.contains("unreadable image"), "{listed}");
}

#[test]
fn a_non_finite_step_is_refused_and_the_adapter_stays_finite() {
    let dir = tmp("nan");
    let (data, neg, pool) = world(&dir, &["misp", "misp"]);
    let cfg = tiny_cfg(&["epochs=2", "checkpoint_every=0"]);
    let mut first = inputs(&dir, &data, &neg, &pool, "out");
    first.stop_after = Some(1);
    assert!(train(&cfg, &first).is_err());
    // Poison one record's cached reference value: 1e308 overflows to inf in f32, so every step
    // that holds record r0 has a non-finite loss.
    let cache_dir = dir.join("out/reference");
    let file = std::fs::read_dir(&cache_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut cache: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let entries = cache["entries"].as_object_mut().unwrap();
    assert!(
        entries.contains_key("r0"),
        "first step must have cached r0: {entries:?}"
    );
    entries.get_mut("r0").unwrap()["chosen"] = json!(1e308);
    std::fs::write(&file, serde_json::to_string(&cache).unwrap()).unwrap();
    let mut resumed = inputs(&dir, &data, &neg, &pool, "out");
    resumed.resume = true;
    let s = train(&cfg, &resumed).unwrap();
    assert!(s.refused_steps >= 1, "no step refused");
    let refused: Vec<&serde_json::Map<String, Value>> = s
        .metrics
        .iter()
        .filter(|r| r.get("refused").is_some())
        .collect();
    assert_eq!(refused.len(), s.refused_steps);
    let a = adapter(&dir.join("out/adapter"));
    for (k, t) in &a {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{k} is not finite");
    }
}

/// A copy of the fixture LLaVA whose `lm_head` is NaN: every log-prob it gives is NaN.
fn nan_model(dir: &Path) -> PathBuf {
    let src = root().join("fixtures/llava_chat/tiny");
    let dst = dir.join("nan-model");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    let file = dst.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let head = t["language_model.lm_head.weight"].clone();
    let nan = (head.ones_like().unwrap() * f64::NAN).unwrap();
    t.insert("language_model.lm_head.weight".into(), nan);
    candle_core::safetensors::save(&t, &file).unwrap();
    dst
}

#[test]
fn resume_with_other_inputs_is_refused_naming_them() {
    let dir = tmp("resume-inputs");
    let (data, neg, pool) = world(&dir, &["misp", "misp"]);
    let cfg = tiny_cfg(&["epochs=2", "checkpoint_every=1"]);
    let mut first = inputs(&dir, &data, &neg, &pool, "out");
    first.stop_after = Some(1);
    assert!(train(&cfg, &first).is_err());
    let edited = |from: &Path, name: &str, a: &str, b: &str| {
        let p = dir.join(name);
        std::fs::write(&p, std::fs::read_to_string(from).unwrap().replace(a, b)).unwrap();
        p
    };
    let data2 = edited(&data, "records2.jsonl", "A red circle.", "A red disc.");
    let neg2 = edited(&neg, "negatives2.jsonl", "\"q\":0.25", "\"q\":0.5");
    let resume = |data: &Path, neg: &Path| {
        let mut r = inputs(&dir, data, neg, &pool, "out");
        r.resume = true;
        train(&cfg, &r)
    };
    let e = resume(&data2, &neg).unwrap_err().to_string();
    assert!(e.contains("--data") && !e.contains("--negatives"), "{e}");
    let e = resume(&data, &neg2).unwrap_err().to_string();
    assert!(e.contains("--negatives") && !e.contains("--data"), "{e}");
    // The run's own inputs resume as before.
    assert_eq!(resume(&data, &neg).unwrap().steps, 4);
}

#[test]
fn a_run_whose_every_step_is_refused_fails_and_logs_refusals_as_such() {
    let dir = tmp("all-refused");
    let (data, neg, pool) = world(&dir, &["misp", "misp"]);
    let cfg = tiny_cfg(&["epochs=1"]);
    let mut inp = inputs(&dir, &data, &neg, &pool, "out");
    inp.model = nan_model(&dir);
    let e = train(&cfg, &inp).unwrap_err().to_string();
    assert!(e.contains("every one of the 2 steps was refused"), "{e}");
    assert!(!dir.join("out/adapter").exists());
    let rows: Vec<Value> = std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r["refused"], json!(true), "{r}");
        assert!(r.get("loss").is_none(), "a refused step has no loss: {r}");
        assert!(r["refused_reason"].as_str().unwrap().contains("non-finite"));
    }
}

#[test]
fn absolute_image_paths_say_which_flag_admits_them() {
    let dir = tmp("abs-paths");
    let (data, neg, pool) = world(&dir, &["misp", "misp"]);
    // The same records with absolute image paths, in a folder of their own.
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let abs = sub.join("records.jsonl");
    let images = dir.join("images").to_string_lossy().into_owned();
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&abs, text.replace("\"images/", &format!("\"{images}/"))).unwrap();
    let cfg = tiny_cfg(&["max_steps=1"]);
    let e = train(&cfg, &inputs(&dir, &abs, &neg, &pool, "o1"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no usable records")
            && e.contains("6 x image path escapes the dataset root")
            && e.contains("--image-root")
            && e.contains("(id r0)"),
        "{e}"
    );
    let listed = std::fs::read_to_string(dir.join("o1/skipped.jsonl")).unwrap();
    assert_eq!(listed.lines().count(), 6, "{listed}");
    // Admitted by a root that holds them.
    let mut rooted = inputs(&dir, &abs, &neg, &pool, "o2");
    rooted.image_root = Some(dir.clone());
    assert_eq!(train(&cfg, &rooted).unwrap().records, 6);
}

#[test]
fn memory_settings_train_to_the_same_adapter() {
    let dir = tmp("memory");
    let (data, neg, pool) = world(&dir, &["misp", "misp"]);
    let base = ["epochs=1", "lora_dropout=0.0"];
    train(&tiny_cfg(&base), &inputs(&dir, &data, &neg, &pool, "plain")).unwrap();
    let want = adapter(&dir.join("plain/adapter"));
    for (name, extra) in [
        ("ckpt", "gradient_checkpointing=true"),
        ("group", "sequence_group=1"),
        ("chunk", "logprob_chunk=2"),
    ] {
        let mut sets = base.to_vec();
        sets.push(extra);
        if name == "ckpt" {
            sets.push("sequence_group=2");
        }
        train(&tiny_cfg(&sets), &inputs(&dir, &data, &neg, &pool, name)).unwrap();
        let got = adapter(&dir.join(name).join("adapter"));
        let diff = max_diff(&got, &want);
        // f32 sums in another order: the same step to rounding.
        assert!(diff < 1e-5, "{extra}: {diff}");
    }
    // With dropout on, a run in pieces resumes to the adapter of its uninterrupted twin.
    let cfg = tiny_cfg(&[
        "epochs=2",
        "checkpoint_every=1",
        "gradient_checkpointing=true",
        "sequence_group=2",
    ]);
    train(&cfg, &inputs(&dir, &data, &neg, &pool, "whole")).unwrap();
    let mut killed = inputs(&dir, &data, &neg, &pool, "split");
    killed.stop_after = Some(2);
    assert!(train(&cfg, &killed).is_err());
    let mut resumed = inputs(&dir, &data, &neg, &pool, "split");
    resumed.resume = true;
    train(&cfg, &resumed).unwrap();
    let (a, b) = (
        adapter(&dir.join("whole/adapter")),
        adapter(&dir.join("split/adapter")),
    );
    assert_eq!(max_diff(&a, &b), 0.0);
}

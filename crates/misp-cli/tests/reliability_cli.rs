//! Bad inputs and interrupted or concurrent runs, as a demanding user produces them: sharded
//! embedding in every order, damaged part files, SAE resume after each epoch, resumes on other
//! inputs, outputs that are not files, NaN models, checkpoints that do not match their config,
//! output file modes, and error texts that say each cause once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use misp::embeddings::{EmbeddingMeta, PoolEmbeddings, RecordEmbeddings, StoreDType};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_misp"));
    c.args(args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

fn misp(args: &[&str]) -> Output {
    cmd(args).output().expect("run misp")
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "misp failed:\n{err}");
    err
}

fn fails(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "misp should have failed:\n{err}");
    err
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-rel-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The six fixture photographs copied `copies` times each under distinct names.
fn images(dir: &Path, copies: usize) -> PathBuf {
    let out = dir.join("images");
    std::fs::create_dir_all(&out).unwrap();
    let src = root().join("fixtures/clip/images");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        for c in 0..copies {
            std::fs::copy(&p, out.join(format!("{c}-{name}"))).unwrap();
        }
    }
    out
}

fn embed_pool(images: &Path, out: &Path, extra: &[&str]) -> Command {
    let clip = s(&root().join("fixtures/clip/tiny"));
    let base = [
        "embed",
        "pool",
        "--clip",
        &clip,
        "--images",
        &s(images),
        "--out",
        &s(out),
        "--chunk-size",
        "2",
        "--quiet",
    ];
    cmd(&[&base[..], extra].concat())
}

fn store_bytes(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join("embeddings.safetensors")).unwrap(),
        std::fs::read(dir.join("ids.jsonl")).unwrap(),
    )
}

#[test]
fn shards_merge_in_any_order_and_a_killed_shard_reruns() {
    let dir = tmp("shards");
    let imgs = images(&dir, 2);
    let whole = dir.join("whole");
    ok(embed_pool(&imgs, &whole, &[]).output().unwrap());
    let want = store_bytes(&whole);

    // Sequential, in both orders: the second shard finds the manifest the first wrote.
    for (name, order) in [("seq01", ["0/2", "1/2"]), ("seq10", ["1/2", "0/2"])] {
        let out = dir.join(name);
        let first = ok(embed_pool(&imgs, &out, &["--shard", order[0]])
            .output()
            .unwrap());
        assert!(first.contains("parts still pending"), "{first}");
        let second = ok(embed_pool(&imgs, &out, &["--shard", order[1]])
            .output()
            .unwrap());
        assert!(second.contains("store complete"), "{second}");
        assert_eq!(store_bytes(&out), want, "{name}");
        // A shard re-run after the merge has nothing to do.
        ok(embed_pool(&imgs, &out, &["--shard", order[0]])
            .output()
            .unwrap());
        assert_eq!(store_bytes(&out), want, "{name} re-run");
    }

    // Concurrent shards.
    let out = dir.join("concurrent");
    let a = embed_pool(&imgs, &out, &["--shard", "0/3"])
        .spawn()
        .unwrap();
    let b = embed_pool(&imgs, &out, &["--shard", "1/3"])
        .spawn()
        .unwrap();
    let c = embed_pool(&imgs, &out, &["--shard", "2/3"])
        .spawn()
        .unwrap();
    for child in [a, b, c] {
        ok(child.wait_with_output().unwrap());
    }
    assert_eq!(store_bytes(&out), want, "concurrent");

    // A killed shard: its last part's tensor never landed, a temporary file was left behind.
    let out = dir.join("killed");
    ok(embed_pool(&imgs, &out, &["--shard", "0/2"])
        .output()
        .unwrap());
    let parts = out.join("parts");
    std::fs::remove_file(parts.join("part-000001.safetensors")).unwrap();
    std::fs::write(parts.join(".part-000001.safetensors.tmp-1"), b"half").unwrap();
    let rerun = ok(embed_pool(&imgs, &out, &["--shard", "0/2"])
        .output()
        .unwrap());
    assert!(rerun.contains("2 parts reused"), "{rerun}");
    ok(embed_pool(&imgs, &out, &["--shard", "1/2"])
        .output()
        .unwrap());
    assert_eq!(store_bytes(&out), want, "killed");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn damaged_parts_are_rebuilt_and_concurrent_unsharded_runs_do_not_collide() {
    let dir = tmp("parts");
    let imgs = images(&dir, 2);
    let whole = dir.join("whole");
    ok(embed_pool(&imgs, &whole, &[]).output().unwrap());
    let want = store_bytes(&whole);

    let out = dir.join("damaged");
    ok(embed_pool(&imgs, &out, &["--shard", "0/2"])
        .output()
        .unwrap());
    let parts = out.join("parts");
    // Part 0: garbage ids; part 1: a NaN in its tensor; part 2: one id row too few.
    std::fs::write(parts.join("part-000000.ids.jsonl"), b"garbage\n").unwrap();
    let t = parts.join("part-000001.safetensors");
    let mut map = candle_core::safetensors::load(&t, &candle_core::Device::Cpu).unwrap();
    let nan = (map["images"].ones_like().unwrap() * f64::NAN).unwrap();
    map.insert("images".into(), nan);
    candle_core::safetensors::save(&map, &t).unwrap();
    let ids = std::fs::read_to_string(parts.join("part-000002.ids.jsonl")).unwrap();
    let first: String = ids.lines().take(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(parts.join("part-000002.ids.jsonl"), first).unwrap();
    let err = ok(embed_pool(&imgs, &out, &["--shard", "0/2"])
        .output()
        .unwrap());
    for part in ["part-000000", "part-000001", "part-000002"] {
        assert!(err.contains(part), "the rebuilt {part} is named:\n{err}");
    }
    ok(embed_pool(&imgs, &out, &["--shard", "1/2"])
        .output()
        .unwrap());
    assert_eq!(store_bytes(&out), want, "damaged parts rebuilt");

    // Two unsharded runs at once: both finish, or one says another holds the folder; never a
    // stray folder or a half-merged store.
    let out = dir.join("twice");
    let a = embed_pool(&imgs, &out, &[]).spawn().unwrap();
    let b = embed_pool(&imgs, &out, &[]).spawn().unwrap();
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    for o in &outs {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() || err.contains("another misp embed"),
            "{err}"
        );
        assert!(!err.contains("still pending"), "{err}");
    }
    assert!(outs.iter().any(|o| o.status.success()));
    assert_eq!(store_bytes(&out), want, "concurrent unsharded");
    assert!(!out.join("parts").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn nothing_usable_says_why_and_keeps_the_list() {
    let dir = tmp("nothing");
    let imgs = images(&dir, 1);
    let sub = dir.join("data");
    std::fs::create_dir_all(&sub).unwrap();
    let mut lines = String::new();
    for (i, e) in std::fs::read_dir(&imgs).unwrap().take(4).enumerate() {
        let p = e.unwrap().path();
        let row = serde_json::json!({"id": format!("r{i}"), "image": p, "prompt": "What?",
            "chosen": "A.", "rejected": "B."});
        lines.push_str(&format!("{row}\n"));
    }
    let data = sub.join("records.jsonl");
    std::fs::write(&data, lines).unwrap();
    let clip = s(&root().join("fixtures/clip/tiny"));
    let out = dir.join("rec");
    let args = [
        "embed",
        "records",
        "--clip",
        &clip,
        "--data",
        &s(&data),
        "--out",
        &s(&out),
        "--quiet",
    ];
    let err = fails(misp(&args));
    assert!(
        err.contains("4 x image path escapes the dataset root")
            && err.contains("--image-root")
            && err.contains("(id r0)"),
        "{err}"
    );
    let listed = std::fs::read_to_string(out.join("skipped.jsonl")).unwrap();
    assert_eq!(listed.lines().count(), 4, "{listed}");
    // Admitted under a root that holds them.
    let root_arg = s(&dir);
    let err = ok(misp(&[&args[..], &["--image-root", &root_arg]].concat()));
    assert!(err.contains("4 embedded"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Pool and records stores of random unit rows (`d` 8).
fn synthetic_stores(dir: &Path, seed: u64) {
    let d = 8;
    let unit = |n: usize, seed: u64| -> Vec<f32> {
        let mut st = seed | 1;
        let mut v: Vec<f32> = (0..n * d)
            .map(|_| {
                st ^= st << 13;
                st ^= st >> 7;
                st ^= st << 17;
                (st % 1000) as f32 / 1000.0 - 0.5
            })
            .collect();
        for row in v.chunks_mut(d) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= n);
        }
        v
    };
    let meta = EmbeddingMeta {
        clip_model: "synthetic".into(),
        dim: d,
        normalized: true,
    };
    let ids: Vec<String> = (0..60).map(|i| format!("img{i}")).collect();
    let paths: Vec<String> = ids.iter().map(|i| format!("{i}.jpg")).collect();
    let pool = unit(60, seed);
    PoolEmbeddings::write(
        &dir.join("pool"),
        &meta,
        &ids,
        &paths,
        &pool,
        StoreDType::F32,
    )
    .unwrap();
    let rids: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    RecordEmbeddings::write(
        &dir.join("rec"),
        &meta,
        &rids,
        &unit(12, seed + 1),
        &unit(12, seed + 2),
        StoreDType::F32,
    )
    .unwrap();
}

fn sae_train(dir: &Path, out: &str, epochs: &str) -> Output {
    misp(&[
        "sae",
        "train",
        "--pool",
        &s(&dir.join("pool")),
        "--records",
        &s(&dir.join("rec")),
        "--out",
        &s(&dir.join(out)),
        "--candidates",
        "knn:8",
        "--epochs",
        epochs,
        "--hidden",
        "8",
        "--batch-records",
        "4",
        "--quiet",
    ])
}

#[test]
fn sae_resumes_after_every_epoch_to_the_uninterrupted_weights() {
    let dir = tmp("sae");
    synthetic_stores(&dir, 11);
    ok(sae_train(&dir, "straight", "3"));
    for e in ["1", "2", "3"] {
        ok(sae_train(&dir, "resumed", e));
    }
    let bytes = |p: &str| std::fs::read(dir.join(p).join("model.safetensors")).unwrap();
    assert_eq!(bytes("straight"), bytes("resumed"));

    // Output modes: the safetensors files are as readable as the JSON beside them.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let json = mode(dir.join("resumed/config.json"));
        assert_eq!(mode(dir.join("resumed/model.safetensors")), json);
        assert_eq!(mode(dir.join("resumed/train_state.safetensors")), json);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn mining_refuses_other_inputs_and_outputs_that_are_not_files() {
    let dir = tmp("mine");
    synthetic_stores(&dir, 21);
    let other = dir.join("other");
    synthetic_stores(&other, 31);
    let mine = |pool: &Path, out: &Path| {
        misp(&[
            "mine",
            "--strategy",
            "random",
            "--pool",
            &s(pool),
            "--records",
            &s(&dir.join("rec")),
            "--out",
            &s(out),
            "--quiet",
        ])
    };
    let neg = dir.join("neg.jsonl");
    ok(mine(&dir.join("pool"), &neg));
    let before = std::fs::read(&neg).unwrap();
    let err = fails(mine(&other.join("pool"), &neg));
    assert!(
        err.contains("other inputs") && err.contains("pool"),
        "{err}"
    );
    assert_eq!(std::fs::read(&neg).unwrap(), before, "nothing mixed in");
    // The same inputs resume (nothing left to do).
    let err = ok(mine(&dir.join("pool"), &neg));
    assert!(err.contains("0 records written, 12 already there"), "{err}");

    #[cfg(unix)]
    {
        let start = std::time::Instant::now();
        let err = fails(mine(&dir.join("pool"), Path::new("/dev/full")));
        assert!(err.contains("not a regular file"), "{err}");
        assert!(start.elapsed().as_secs() < 60);
        let err = fails(mine(&dir.join("pool"), &dir));
        assert!(err.contains("not a regular file"), "{err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A copy of the fixture LLaVA for editing.
fn model_copy(dir: &Path, name: &str) -> PathBuf {
    let src = root().join("fixtures/llava_chat/tiny");
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn edit_weights(
    model: &Path,
    f: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let file = model.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &file).unwrap();
}

fn score_rows(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for (i, img) in ["hopper.jpg", "camera_gray.png"].iter().enumerate() {
        let row = serde_json::json!({"id": format!("s{i}"), "image": format!("fixtures/clip/images/{img}"),
            "prompt": "What is this?", "response": "A picture."});
        text.push_str(&format!("{row}\n"));
    }
    let p = dir.join("in.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn score(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let base = [
        "score",
        "--model",
        &s(model),
        "--data",
        &s(data),
        "--out",
        &s(out),
        "--quiet",
    ];
    misp(&[&base[..], extra].concat())
}

#[test]
fn a_nan_model_fails_scoring_naming_the_rows() {
    let dir = tmp("nan-score");
    let model = model_copy(&dir, "nan");
    edit_weights(&model, |t| {
        let head = t["language_model.lm_head.weight"].clone();
        let nan = (head.ones_like().unwrap() * f64::NAN).unwrap();
        t.insert("language_model.lm_head.weight".into(), nan);
    });
    let data = score_rows(&dir);
    let out = dir.join("scores.jsonl");
    let err = fails(score(&model, &data, &out, &[]));
    assert!(
        err.contains("2 of 2 rows have a non-finite log-prob") && err.contains("s0, s1"),
        "{err}"
    );
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.contains("\"logp\":null"), "{written}");
    ok(score(&model, &data, &out, &["--keep-going"]));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn checkpoints_that_do_not_match_their_config_are_refused() {
    let dir = tmp("mismatch");
    let data = score_rows(&dir);
    let out = dir.join("scores.jsonl");

    // config.json with one text layer fewer than the weights.
    let fewer = model_copy(&dir, "fewer");
    let cfg_path = fewer.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = fails(score(&fewer, &data, &out, &[]));
    assert!(
        err.contains("language_model.model.layers.1.mlp.down_proj.weight")
            && err.contains("not in the model its config.json describes"),
        "{err}"
    );

    // An unknown extra tensor.
    let extra = model_copy(&dir, "extra");
    edit_weights(&extra, |t| {
        let x = candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu);
        t.insert("language_model.model.mystery.weight".into(), x.unwrap());
    });
    let err = fails(score(&extra, &data, &out, &[]));
    assert!(err.contains("language_model.model.mystery.weight"), "{err}");

    // A corrupt weights file: the cause is said once.
    let corrupt = model_copy(&dir, "corrupt");
    let file = corrupt.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(score(&corrupt, &data, &out, &[]));
    let line = err.lines().find(|l| l.starts_with("misp: error")).unwrap();
    let last = line.rsplit(": ").next().unwrap();
    assert_eq!(line.matches(last).count(), 1, "{line}");

    // A broken adapter: the error names the adapter's files.
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), b"{not json").unwrap();
    let model = root().join("fixtures/llava_chat/tiny");
    let err = fails(score(&model, &data, &out, &["--adapter", &s(&adapter)]));
    assert!(
        err.contains(&s(&adapter.join("adapter_config.json"))),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

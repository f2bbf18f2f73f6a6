//! The `misp` binary as a user runs it: help, config errors, and `sae train` -> `mine` on a
//! small synthetic pool.

use std::path::{Path, PathBuf};
use std::process::Command;

use misp::embeddings::{EmbeddingMeta, PoolEmbeddings, RecordEmbeddings, StoreDType};

fn misp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_misp"))
        .args(args)
        .output()
        .expect("run misp")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n * d)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 1000) as f32 / 1000.0 - 0.5
        })
        .collect()
}

fn write_world(dir: &Path, d: usize) {
    let meta = EmbeddingMeta {
        clip_model: "synthetic".into(),
        dim: d,
        normalized: false,
    };
    let ids: Vec<String> = (0..60).map(|i| format!("img{i}")).collect();
    let paths: Vec<String> = ids.iter().map(|i| format!("{i}.jpg")).collect();
    PoolEmbeddings::write(
        &dir.join("pool"),
        &meta,
        &ids,
        &paths,
        &rows(60, d, 3),
        StoreDType::F16,
    )
    .unwrap();
    let rids: Vec<String> = (0..9).map(|i| format!("r{i}")).collect();
    RecordEmbeddings::write(
        &dir.join("rec"),
        &meta,
        &rids,
        &rows(9, d, 5),
        &rows(9, d, 7),
        StoreDType::F32,
    )
    .unwrap();
}

#[test]
fn help_lists_every_stage() {
    let out = misp(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "embed", "sae", "mine", "score", "train", "eval", "world", "demo", "bench",
    ] {
        assert!(
            text.contains(&format!("  {cmd} ")),
            "--help lacks {cmd}:\n{text}"
        );
    }
}

#[test]
fn train_with_a_bad_config_names_the_key() {
    let dir = tmp("badcfg");
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, "betta = 0.3\n").unwrap();
    let out = misp(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--model",
        "m",
        "--data",
        "d.jsonl",
        "--out",
        dir.join("o").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("betta") && err.contains("run.toml"), "{err}");
}

#[test]
fn sae_train_then_mine_from_the_command_line() {
    let dir = tmp("e2e");
    write_world(&dir, 6);
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    let out = misp(&[
        "sae",
        "train",
        "--pool",
        &p("pool"),
        "--records",
        &p("rec"),
        "--out",
        &p("sae"),
        "--candidates",
        "knn:12",
        "--epochs",
        "2",
        "--hidden",
        "5",
        "--batch-records",
        "3",
        "--lr",
        "0.01",
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "model.safetensors",
        "config.json",
        "metrics.jsonl",
        "run.json",
    ] {
        assert!(dir.join("sae").join(f).exists(), "missing sae/{f}");
    }
    let metrics = std::fs::read_to_string(dir.join("sae/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);

    let (pool, rec, sae) = (p("pool"), p("rec"), p("sae"));
    let mine = |extra: &[&str]| {
        let mut args = vec![
            "mine",
            "--pool",
            &pool,
            "--records",
            &rec,
            "--sae",
            &sae,
            "--candidates",
            "knn:12",
            // Random synthetic embeddings: there is little for an SAE to learn here; this test
            // is about the chain (the refusal of an untrained SAE is checked below).
            "--allow-untrained-sae",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        misp(&args)
    };
    let neg = p("neg.jsonl");
    let out = mine(&["--out", &neg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&neg).unwrap();
    assert_eq!(text.lines().count(), 9);
    assert!(String::from_utf8_lossy(&out.stderr).contains("9 records written"));
    // A second run finds everything done and changes nothing.
    let out = mine(&["--out", &neg]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 records written, 9 already there"));
    assert_eq!(std::fs::read_to_string(&neg).unwrap(), text);

    // An SAE that never trained (no epochs, no summary) is refused unless allowed.
    let out = misp(&[
        "sae",
        "train",
        "--pool",
        &pool,
        "--records",
        &rec,
        "--out",
        &p("sae0"),
        "--candidates",
        "knn:12",
        "--epochs",
        "0",
        "--hidden",
        "5",
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let strict = |extra: &[&str]| {
        let sae0 = p("sae0");
        let out0 = p("neg0.jsonl");
        let mut args = vec![
            "mine",
            "--pool",
            &pool,
            "--records",
            &rec,
            "--sae",
            &sae0,
            "--candidates",
            "knn:12",
            "--out",
            &out0,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        misp(&args)
    };
    let out = strict(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--allow-untrained-sae"),
        "{err}"
    );
    assert!(strict(&["--allow-untrained-sae"]).status.success());

    // Bad input: an unknown strategy and a K above the candidate set are one-line errors.
    let out = mine(&["--out", &p("x.jsonl"), "--strategy", "hard"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown strategy part"),
        "{err}"
    );
    let out = mine(&["--out", &p("y.jsonl"), "--k", "13"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has only 12"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_conformance_passes_on_the_fixture_and_fails_on_a_changed_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llava");
    let fixture = root.to_str().unwrap();
    let o = misp(&["bench", "conformance", "--fixture", fixture]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("pass:"), "{out}");
    let o = misp(&[
        "bench",
        "conformance",
        "--fixture",
        fixture,
        "--dtype",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The same checkpoint with one expected log-prob moved by 0.01: the command must fail.
    let dir = tmp("conformance");
    std::fs::create_dir_all(dir.join("tiny")).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(root.join("tiny").join(f), dir.join("tiny").join(f)).unwrap();
    }
    let text = std::fs::read_to_string(root.join("expected.json")).unwrap();
    let mut e: serde_json::Value = serde_json::from_str(&text).unwrap();
    let v = e["token_logprobs"][0][5].as_f64().unwrap();
    e["token_logprobs"][0][5] = serde_json::json!(v + 0.01);
    std::fs::write(dir.join("expected.json"), e.to_string()).unwrap();
    let o = misp(&["bench", "conformance", "--fixture", dir.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("FAIL:"));
    std::fs::remove_dir_all(&dir).ok();
}

/// The worst per-token difference `bench conformance` printed ("max abs diff X,").
fn worst_diff(stdout: &str) -> f64 {
    let rest = stdout.split("max abs diff ").nth(1).expect(stdout);
    rest.split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect(stdout)
}

/// The Qwen2.5-VL fixture's log-probs: within 1e-4 of transformers in f32 and, in bf16, within
/// the command's 0.25 and within twice transformers' own bf16 error on the same inputs
/// (`bf16.json`), on both kernel paths. bf16 must really be in force: its worst difference is
/// far above f32's, and a tolerance under it fails the command.
#[test]
fn bench_conformance_checks_qwen2_5_vl_in_f32_and_bf16_on_both_kernel_paths() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2_5_vl");
    let fixture = root.to_str().unwrap();
    for kernels in ["fused", "generic"] {
        let mut worst = [0.0; 2];
        for (i, dtype) in ["f32", "bf16"].into_iter().enumerate() {
            let args = [
                "bench",
                "conformance",
                "--fixture",
                fixture,
                "--dtype",
                dtype,
                "--kernels",
                kernels,
            ];
            let o = misp(&args);
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && out.starts_with("pass:"),
                "{kernels} {dtype}: {out}{}",
                String::from_utf8_lossy(&o.stderr)
            );
            worst[i] = worst_diff(&out);
        }
        assert!(worst[0] < 1e-4, "{kernels}: f32 worst {}", worst[0]);
        let own: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("bf16.json")).unwrap())
                .unwrap();
        let own = own["worst_vs_f32"].as_f64().unwrap();
        assert!(
            worst[1] <= 2.0 * own,
            "{kernels}: bf16 worst {} vs transformers' own bf16 {own}",
            worst[1]
        );
        assert!(
            worst[1] > 10.0 * worst[0].max(1e-6),
            "{kernels}: bf16 worst {} is not above f32's {}: is bf16 in force?",
            worst[1],
            worst[0]
        );
        let tight = format!("{:e}", worst[1] / 2.0);
        let o = misp(&[
            "bench",
            "conformance",
            "--fixture",
            fixture,
            "--dtype",
            "bf16",
            "--kernels",
            kernels,
            "--tolerance",
            &tight,
        ]);
        assert!(!o.status.success(), "{kernels}: tolerance {tight} passed");
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("FAIL:"));
    }
}

/// `bench model --image-size` sets the Qwen2.5-VL image (rounded down to whole 28 px merge
/// units), refuses one whose tokens do not fit the sequences, and is refused for LLaVA, whose
/// image size is its config's.
#[test]
fn bench_model_image_size_sets_the_qwen_image() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let qwen = fixtures.join("qwen2_5_vl/tiny");
    let args = |model: &Path, size: &str| -> Vec<String> {
        [
            "bench",
            "model",
            "--model",
            model.to_str().unwrap(),
            "--batch",
            "1",
            "--seq-len",
            "24",
            "--gen-batch",
            "1",
            "--prompt-len",
            "20",
            "--new-tokens",
            "2",
            "--rank",
            "2",
            "--repeat",
            "1",
            "--image-size",
            size,
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |a: Vec<String>| misp(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // 83 px: two 28 px merge units a side (4 x 4 patches), 4 image tokens.
    let o = run(args(&qwen, "83"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("4 image tokens of a 4 x 4 patch grid"),
        "{out}"
    );
    // 5 x 5 merge units = 25 image tokens do not fit a 20-token prompt.
    let o = run(args(&qwen, "140"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("need at least 27"),
        "{err}"
    );
    let o = run(args(&fixtures.join("llava/tiny"), "56"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--image-size"), "{err}");
}

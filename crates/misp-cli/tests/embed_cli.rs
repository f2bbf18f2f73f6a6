//! `misp embed` as a user runs it, on the tiny CLIP checkpoint of `fixtures/clip/` and its real
//! photographs: pool and records stores, skipped inputs, shards sharing one output, resumption,
//! and the whole stage-1 chain (embed -> sae train -> mine) on what it wrote.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use misp::embeddings::{PoolEmbeddings, RecordEmbeddings};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/clip");

fn misp(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_misp"))
        .args(args)
        .output()
        .expect("run misp");
    out
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "misp failed:\n{err}");
    err
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-embed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A pool folder: the six fixture photographs (one in a sub-folder), a truncated JPEG and an
/// empty file.
fn pool_folder(dir: &Path) -> PathBuf {
    let pool = dir.join("images");
    std::fs::create_dir_all(pool.join("sub")).unwrap();
    for entry in std::fs::read_dir(Path::new(FIXTURE).join("images")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        let to = if name.to_string_lossy().starts_with("hopper") {
            pool.join("sub").join(name)
        } else {
            pool.join(name)
        };
        std::fs::copy(&p, to).unwrap();
    }
    let jpeg = std::fs::read(Path::new(FIXTURE).join("images/hopper.jpg")).unwrap();
    std::fs::write(pool.join("truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(pool.join("empty.png"), b"").unwrap();
    pool
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn pool_store_with_skips_shards_and_resume() {
    let dir = tmp("pool");
    let images = pool_folder(&dir);
    let clip = format!("{FIXTURE}/tiny");
    let full = dir.join("full");
    let err = ok(misp(&[
        "embed",
        "pool",
        "--clip",
        &clip,
        "--images",
        &s(&images),
        "--out",
        &s(&full),
        "--chunk-size",
        "3",
        "--quiet",
    ]));
    assert!(err.contains("6 embedded, 2 skipped"), "{err}");
    let pool = PoolEmbeddings::load(&full).unwrap();
    assert_eq!(pool.len(), 6);
    assert_eq!(pool.meta.dim, 24);
    assert!(pool.meta.normalized);
    for i in 0..pool.len() {
        let norm: f32 = pool.row(i).iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row {i} norm {norm}");
    }
    let skipped = std::fs::read_to_string(full.join("skipped.jsonl")).unwrap();
    assert_eq!(skipped.lines().count(), 2, "{skipped}");
    assert!(
        skipped.contains("truncated.jpg") && skipped.contains("empty.png"),
        "{skipped}"
    );
    assert!(
        !full.join("parts").exists(),
        "parts are removed after the merge"
    );

    // Two shards into one folder: the first leaves the store unfinished, the second merges.
    let sharded = dir.join("sharded");
    let common = [
        "embed",
        "pool",
        "--clip",
        &clip,
        "--images",
        &s(&images),
        "--out",
        &s(&sharded),
        "--chunk-size",
        "3",
        "--quiet",
    ];
    let err = ok(misp(&[&common[..], &["--shard", "1/2"]].concat()));
    assert!(err.contains("parts still pending"), "{err}");
    assert!(!sharded.join("meta.json").exists());
    // Resumption: the unsharded run reuses the two parts (chunks 1 and 2 of 3) the shard wrote.
    let err = ok(misp(&common));
    assert!(
        err.contains("3 embedded, 2 skipped") && err.contains("2 parts reused"),
        "{err}"
    );
    let again = PoolEmbeddings::load(&sharded).unwrap();
    assert_eq!(again.ids, pool.ids);
    assert_eq!(
        again.embeds, pool.embeds,
        "same embeddings whatever the sharding"
    );

    // Another checkpoint into the same folder is refused.
    let out = misp(&[
        "embed",
        "pool",
        "--clip",
        &format!("{FIXTURE}/tiny-legacy"),
        "--images",
        &s(&images),
        "--out",
        &s(&full),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("other inputs"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn records_then_sae_then_mine() {
    let dir = tmp("records");
    let images = pool_folder(&dir);
    let clip = format!("{FIXTURE}/tiny");
    // TRL-style records: image paths relative to the file; one record's image is missing.
    let names = [
        "astronaut_small.png",
        "camera_gray.png",
        "chelsea_rgba.png",
        "coffee_cmyk.jpg",
        "sub/hopper.jpg",
        "missing.jpg",
    ];
    let mut lines = String::new();
    for (i, n) in names.iter().enumerate() {
        let row = serde_json::json!({
            "id": format!("q{i}"), "image": format!("images/{n}"),
            "prompt": format!("What is in picture number {i}?"), "chosen": "A photo.", "rejected": "A dog."
        });
        lines.push_str(&format!("{row}\n"));
    }
    std::fs::write(dir.join("records.jsonl"), lines).unwrap();
    let rec = dir.join("rec");
    ok(misp(&[
        "embed",
        "records",
        "--clip",
        &clip,
        "--data",
        &s(&dir.join("records.jsonl")),
        "--out",
        &s(&rec),
        "--dtype",
        "f16",
        "--quiet",
    ]));
    let records = RecordEmbeddings::load(&rec).unwrap();
    assert_eq!(records.ids, vec!["q0", "q1", "q2", "q3", "q4"]);
    let skipped = std::fs::read_to_string(rec.join("skipped.jsonl")).unwrap();
    assert!(skipped.contains("q5"), "{skipped}");

    // The positive of q1 equals the pool's embedding of the same photograph (f16 rounding).
    let pool_dir = dir.join("pool");
    ok(misp(&[
        "embed",
        "pool",
        "--clip",
        &clip,
        "--images",
        &s(&images),
        "--out",
        &s(&pool_dir),
        "--quiet",
    ]));
    let pool = PoolEmbeddings::load(&pool_dir).unwrap();
    let row = pool
        .paths
        .iter()
        .position(|p| p.ends_with("camera_gray.png"))
        .unwrap();
    let diff = pool
        .row(row)
        .iter()
        .zip(records.positive(1))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 2e-3, "pool vs record embedding of one image: {diff}");

    // Stage 1 on what stage 0 wrote.
    let sae = dir.join("sae");
    ok(misp(&[
        "sae",
        "train",
        "--pool",
        &s(&pool_dir),
        "--records",
        &s(&rec),
        "--out",
        &s(&sae),
        "--candidates",
        "knn:4",
        "--epochs",
        "1",
        "--hidden",
        "8",
        "--quiet",
    ]));
    let neg = dir.join("neg.jsonl");
    ok(misp(&[
        "mine",
        "--pool",
        &s(&pool_dir),
        "--records",
        &s(&rec),
        "--sae",
        &s(&sae),
        "--out",
        &s(&neg),
        "--candidates",
        "knn:4",
        "--k",
        "2",
        // Five records and one epoch: the chain is under test, not what the SAE learns.
        "--allow-untrained-sae",
        "--quiet",
    ]));
    assert_eq!(std::fs::read_to_string(&neg).unwrap().lines().count(), 5);
    std::fs::remove_dir_all(dir).unwrap();
}

use super::*;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-emb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn meta(dim: usize) -> EmbeddingMeta {
    EmbeddingMeta {
        clip_model: "tiny-clip".into(),
        dim,
        normalized: true,
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("img{i}")).collect()
}

#[test]
fn pool_round_trip_in_f16_and_f32() {
    let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.25).collect();
    for dtype in [StoreDType::F16, StoreDType::F32] {
        let dir = tmp(&format!("rt{dtype:?}"));
        let paths: Vec<String> = (0..4).map(|i| format!("a/{i}.png")).collect();
        PoolEmbeddings::write(&dir, &meta(3), &ids(4), &paths, &data, dtype).unwrap();
        let pool = PoolEmbeddings::load(&dir).unwrap();
        assert_eq!(pool.embeds, data, "quarters are exact in f16 too");
        assert_eq!(pool.paths[2], "a/2.png");
        assert_eq!(pool.row(1), &[0.75, 1.0, 1.25]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn duplicate_ids_name_the_line() {
    let dir = tmp("dup");
    let mut names = ids(3);
    names[2] = "img0".into();
    RecordEmbeddings::write(
        &dir,
        &meta(2),
        &names,
        &[0.0; 6],
        &[0.0; 6],
        StoreDType::F32,
    )
    .unwrap();
    let err = RecordEmbeddings::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("ids.jsonl:3") && err.contains("duplicate id \"img0\""),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shape_mismatch_with_meta_is_an_error_naming_the_tensor() {
    let dir = tmp("shape");
    PoolEmbeddings::write(
        &dir,
        &meta(3),
        &ids(2),
        &["".into(), "".into()],
        &[0.0; 6],
        StoreDType::F32,
    )
    .unwrap();
    files::write_json_atomic(&dir.join(META_FILE), &meta(4)).unwrap();
    let err = PoolEmbeddings::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("image_embeds") && err.contains("[2, 4]"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn non_finite_rows_are_listed_not_fatal() {
    let dir = tmp("nan");
    let mut prompts = [0.6f32, 0.8].repeat(4);
    prompts[5] = f32::NAN;
    let mut positives = [0.6f32, 0.8].repeat(4);
    positives[0] = f32::INFINITY;
    positives[5] = f32::NAN;
    RecordEmbeddings::write(
        &dir,
        &meta(2),
        &ids(4),
        &prompts,
        &positives,
        StoreDType::F32,
    )
    .unwrap();
    let recs = RecordEmbeddings::load(&dir).unwrap();
    let rows: Vec<usize> = recs.invalid_rows.iter().map(|r| r.row).collect();
    assert_eq!(rows, vec![0, 2]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn rows_that_are_not_unit_norm_in_a_normalised_store_are_listed() {
    let dir = tmp("zero-norm");
    let mut embeds = [0.6f32, 0.8].repeat(3);
    embeds[2] = 0.0; // row 1: the zero vector
    embeds[3] = 0.0;
    embeds[4] = 0.3; // row 2: norm 0.5
    embeds[5] = 0.4;
    let paths: Vec<String> = (0..3).map(|i| format!("{i}.png")).collect();
    PoolEmbeddings::write(&dir, &meta(2), &ids(3), &paths, &embeds, StoreDType::F32).unwrap();
    let pool = PoolEmbeddings::load(&dir).unwrap();
    let bad: Vec<(usize, &str)> = pool
        .invalid_rows
        .iter()
        .map(|r| (r.row, r.reason))
        .collect();
    assert_eq!(bad, vec![(1, "not unit-norm"), (2, "not unit-norm")]);
    // The same rows in a store that does not claim normalisation are fine.
    let raw = EmbeddingMeta {
        normalized: false,
        ..meta(2)
    };
    PoolEmbeddings::write(&dir, &raw, &ids(3), &paths, &embeds, StoreDType::F32).unwrap();
    assert!(PoolEmbeddings::load(&dir).unwrap().invalid_rows.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn empty_pool_and_missing_files_are_clear_errors() {
    let dir = tmp("empty");
    PoolEmbeddings::write(&dir, &meta(2), &[], &[], &[], StoreDType::F32).unwrap();
    let err = PoolEmbeddings::load(&dir).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
    let err = PoolEmbeddings::load(&dir.join("nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("meta.json"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn incompatible_stores_are_rejected() {
    let (a, b) = (tmp("ca"), tmp("cb"));
    PoolEmbeddings::write(
        &a,
        &meta(2),
        &ids(1),
        &["".into()],
        &[0.0; 2],
        StoreDType::F32,
    )
    .unwrap();
    RecordEmbeddings::write(&b, &meta(3), &ids(1), &[0.0; 3], &[0.0; 3], StoreDType::F32).unwrap();
    let pool = PoolEmbeddings::load(&a).unwrap();
    let recs = RecordEmbeddings::load(&b).unwrap();
    let err = check_compatible(&pool, &recs).unwrap_err().to_string();
    assert!(err.contains("dim 3") && err.contains("dim 2"), "{err}");
    std::fs::remove_dir_all(a).unwrap();
    std::fs::remove_dir_all(b).unwrap();
}

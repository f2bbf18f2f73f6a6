//! Conformance of misp's LLaVA with transformers.
//!
//! The fixture `fixtures/llava/` is made by `fixtures/llava/make_fixture.py` (transformers 5.24,
//! torch 2.15 CPU; versions in `expected.json`): a tiny random `LlavaForConditionalGeneration`
//! (CLIP vision tower with 16 patches, GELU projector, LLaMA with GQA) saved by `save_pretrained`
//! — which in transformers 5.24 writes the legacy layout `language_model.model.*`,
//! `language_model.lm_head`, `vision_tower.*`, `multi_modal_projector.*` — a right-padded batch
//! with each `<image>` already expanded to 16 image tokens, random pixels, and transformers'
//! per-token log-probs. The test also loads a copy renamed to the nested layout
//! (`model.language_model.*`, `lm_head`, `model.vision_tower.*`, `model.multi_modal_projector.*`).
//!
//! Tolerance: max abs diff 1e-4 (misp's conformance bound; both sides compute in f32).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use misp::checkpoint::TensorProblem;
use misp::kernels::{Kernels, ThreadKernels};
use misp::model::llava::{token_logprobs, Llava};
use misp::model::ModelError;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    keys: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    pixels: Vec<Vec<Vec<Vec<f32>>>>,
    token_logprobs: Vec<Vec<f32>>,
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llava")
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn inputs(e: &Expected) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids = Tensor::new(e.input_ids.clone(), &dev).unwrap();
    let mask = Tensor::new(e.attention_mask.clone(), &dev).unwrap();
    let flat: Vec<f32> = e
        .pixels
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .copied()
        .collect();
    let s = e.pixels[0][0].len();
    let pixels = Tensor::from_vec(flat, (e.pixels.len(), 3, s, s), &dev).unwrap();
    (ids, mask, pixels)
}

/// transformers 5's nested name of a legacy key.
fn nested(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        format!("model.language_model.{rest}")
    } else if let Some(rest) = name.strip_prefix("language_model.lm_head.") {
        format!("lm_head.{rest}")
    } else {
        format!("model.{name}")
    }
}

/// A copy of the fixture checkpoint in `dir` with every key renamed by `rename`.
fn renamed_copy(tag: &str, rename: impl Fn(&str) -> String) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-llava-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("tiny/config.json"), dir.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(fixture().join("tiny/model.safetensors"), &Device::Cpu)
            .unwrap();
    let tensors: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (rename(&k), v)).collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

fn worst_logprob_diff(model: &Llava, e: &Expected) -> f32 {
    let (ids, mask, pixels) = inputs(e);
    let logits = model.forward(&ids, &mask, &pixels).unwrap();
    let lp: Vec<Vec<f32>> = token_logprobs(&logits, &ids).unwrap().to_vec2().unwrap();
    let mut worst = 0f32;
    for (b, row) in lp.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            if e.attention_mask[b][t + 1] == 1 {
                worst = worst.max((v - e.token_logprobs[b][t]).abs());
            }
        }
    }
    // Far from uniform (ln 100 = 4.6), so every module matters.
    assert!(lp[0].iter().any(|v| (v + 4.6).abs() > 1.0));
    worst
}

#[test]
fn legacy_layout_matches_transformers() {
    legacy_layout_matches_transformers_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn legacy_layout_matches_transformers_on_the_generic_path() {
    legacy_layout_matches_transformers_with(Kernels::Generic);
}

fn legacy_layout_matches_transformers_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let e = expected();
    assert!(e
        .keys
        .iter()
        .any(|k| k.starts_with("language_model.model.")));
    let model = Llava::load_dir(&fixture().join("tiny"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config().image_tokens(), 16);
    let worst = worst_logprob_diff(&model, &e);
    eprintln!("legacy layout: per-token log-prob max abs diff {worst:e}");
    assert!(worst <= 1e-4, "{worst}");
    // The image features matter: other pixels give other log-probs after the image.
    let (ids, mask, pixels) = inputs(&e);
    let a = model.forward(&ids, &mask, &pixels).unwrap();
    let b = model
        .forward(&ids, &mask, &(pixels * 0.0).unwrap())
        .unwrap();
    let d: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d > 1e-2, "pixels barely change the logits: {d}");
}

#[test]
fn nested_layout_matches_transformers() {
    nested_layout_matches_transformers_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn nested_layout_matches_transformers_on_the_generic_path() {
    nested_layout_matches_transformers_with(Kernels::Generic);
}

fn nested_layout_matches_transformers_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let e = expected();
    let dir = renamed_copy(&format!("nested-{kernels:?}"), nested);
    let model = Llava::load_dir(&dir, DType::F32, &Device::Cpu);
    std::fs::remove_dir_all(&dir).ok();
    let worst = worst_logprob_diff(&model.unwrap(), &e);
    eprintln!("nested layout: per-token log-prob max abs diff {worst:e}");
    assert!(worst <= 1e-4, "{worst}");
}

#[test]
fn vision_model_infix_layout_matches_transformers() {
    // llava-hf checkpoints nest the tower as `CLIPVisionModel`: `vision_tower.vision_model.*`.
    let e = expected();
    let dir = renamed_copy("infix", |k| match k.strip_prefix("vision_tower.") {
        Some(rest) => nested(&format!("vision_tower.vision_model.{rest}")),
        None => nested(k),
    });
    let model = Llava::load_dir(&dir, DType::F32, &Device::Cpu);
    std::fs::remove_dir_all(&dir).ok();
    let worst = worst_logprob_diff(&model.unwrap(), &e);
    assert!(worst <= 1e-4, "{worst}");
}

#[test]
fn missing_tensors_are_all_listed() {
    let dir = renamed_copy("missing", |k| k.replace("linear_2", "linear_x"));
    let err = Llava::load_dir(&dir, DType::F32, &Device::Cpu).unwrap_err();
    std::fs::remove_dir_all(&dir).ok();
    match err {
        ModelError::Tensors { problems, .. } => {
            // The renamed pair is missing under its name and unexpected under the other.
            let missing = problems
                .iter()
                .filter(
                    |p| matches!(p, TensorProblem::Missing { name } if name.contains("linear_2")),
                )
                .count();
            let unexpected = problems
                .iter()
                .filter(|p| matches!(p, TensorProblem::Unexpected { name } if name.contains("linear_x")))
                .count();
            assert_eq!(
                (missing, unexpected, problems.len()),
                (2, 2, 4),
                "{problems:?}"
            );
        }
        other => panic!("expected a tensor error, got {other}"),
    }
}

#[test]
fn image_token_count_must_match_features() {
    let e = expected();
    let model = Llava::load_dir(&fixture().join("tiny"), DType::F32, &Device::Cpu).unwrap();
    let (ids, mask, pixels) = inputs(&e);
    // One image for two rows of image tokens.
    let err = model
        .forward(&ids, &mask, &pixels.narrow(0, 0, 1).unwrap())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::Input {
                field: "input_ids",
                ..
            }
        ),
        "{err}"
    );
    // One image token too few.
    let mut short = e.input_ids.clone();
    let img = model.config().image_token_index;
    let pos = short[0].iter().position(|&i| i == img).unwrap();
    short[0][pos] = 5;
    let short = Tensor::new(short, &Device::Cpu).unwrap();
    let err = model.forward(&short, &mask, &pixels).unwrap_err();
    assert!(err.to_string().contains("31 image tokens"), "{err}");
}

#[test]
fn sequence_logprobs_sum_the_token_logprobs() {
    let e = expected();
    let model = Llava::load_dir(&fixture().join("tiny"), DType::F32, &Device::Cpu).unwrap();
    let (ids, mask, pixels) = inputs(&e);
    let (sum, count) = model
        .sequence_logprobs(&ids, &mask, &pixels, &mask)
        .unwrap();
    let sum: Vec<f32> = sum.to_vec1().unwrap();
    let count: Vec<f32> = count.to_vec1().unwrap();
    for (b, m) in e.attention_mask.iter().enumerate() {
        let n = m.iter().filter(|&&v| v == 1).count();
        assert_eq!(count[b], (n - 1) as f32);
        let want: f32 = e.token_logprobs[b][..n - 1].iter().sum();
        assert!(
            (sum[b] - want).abs() < 1e-3,
            "row {b}: {} vs {want}",
            sum[b]
        );
    }
}

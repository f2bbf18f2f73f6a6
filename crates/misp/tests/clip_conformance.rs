//! Conformance of misp's CLIP and its image preprocessing with transformers.
//!
//! The fixture `fixtures/clip/` is made by `fixtures/clip/make_fixture.py` (transformers 5.24,
//! torch 2.15 CPU, Pillow 13; versions in `expected.json`): a tiny random `CLIPModel` in HF
//! layout twice (`tiny`: pooling at the first EOS; `tiny-legacy`: `eos_token_id == 2`, pooling
//! at `argmax(input_ids)`), a CLIP-style BPE tokenizer, six small real photographs (RGB JPEG,
//! grayscale, RGBA, CMYK JPEG, 16-bit RGB, one upscaled) and what transformers computes for them.
//!
//! Tolerances: pixels by mean absolute difference at most 0.01 (misp's conformance bound). The resampler
//! is a bit-exact port of PIL's, so PNG inputs differ only by the f32 rounding of the
//! normalisation (~1e-7); JPEG inputs differ by the decoders (libjpeg-turbo in PIL, zune-jpeg
//! here), a few 1e-3. Embeddings by cosine at least 0.9999 (misp's conformance bound; both sides compute
//! in f32, so what remains is summation order). Token ids exactly.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use misp::model::clip::image_processor::{ImageDecodeError, ImageProcessor};
use misp::model::clip::{ClipModel, ClipTokenizer, TensorProblem};
use misp::model::ModelError;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    versions: serde_json::Value,
    images: Vec<ExpectedImage>,
    prompts: Vec<String>,
    untruncated_lengths: Vec<usize>,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    text_embeds: std::collections::HashMap<String, Vec<Vec<f32>>>,
    variants: std::collections::HashMap<String, Vec<f32>>,
}

#[derive(Deserialize)]
struct ExpectedImage {
    file: String,
    pil_mode: String,
    pixels: Vec<f32>,
    image_embeds: Vec<f32>,
    hidden_states_m2_rows_0_5: Vec<Vec<f32>>,
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/clip")
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn load(name: &str) -> ClipModel {
    ClipModel::load(&fixture().join(name), DType::F32, &Device::Cpu).expect("checkpoint loads")
}

#[test]
fn pixels_match_clip_image_processor() {
    let exp = expected();
    let dir = fixture().join("tiny");
    let proc = ImageProcessor::from_checkpoint(&dir, 32).unwrap();
    let mut worst = 0f64;
    for im in &exp.images {
        let img = proc
            .decode_file(&fixture().join("images").join(&im.file))
            .unwrap();
        let ours = proc.pixels(&img);
        assert_eq!(ours.len(), im.pixels.len(), "{}", im.file);
        let mean = ours
            .iter()
            .zip(&im.pixels)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>()
            / ours.len() as f64;
        let max = ours
            .iter()
            .zip(&im.pixels)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{} ({}): mean abs diff {mean:.2e}, max {max:.2e}",
            im.file, im.pil_mode
        );
        assert!(
            mean <= 0.01,
            "{}: mean abs pixel difference {mean}",
            im.file
        );
        worst = worst.max(mean);
    }
    eprintln!(
        "versions {}; worst mean abs pixel diff {worst:.2e}",
        exp.versions
    );
}

fn mean_abs(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn padded_crop_and_expand_to_square_match_their_references() {
    let exp = expected();
    let mut proc = ImageProcessor::from_checkpoint(&fixture().join("tiny"), 32).unwrap();
    let img = proc
        .decode_file(&fixture().join("images/chelsea_rgba.png"))
        .unwrap();
    // Crop larger than the resized image on one axis: transformers' zero padding.
    let mut crop = proc.clone();
    crop.shortest_edge = 24;
    crop.crop = (40, 30);
    let d = mean_abs(&crop.pixels(&img), &exp.variants["crop_40x30_of_24"]);
    eprintln!("padded crop: mean abs diff {d:.2e}");
    assert!(d <= 0.01, "padded crop: {d}");
    // LLaVA-1.5's expand2square with PIL, then transformers' processor.
    proc.pad_to_square = true;
    let d = mean_abs(&proc.pixels(&img), &exp.variants["pad_to_square"]);
    eprintln!("pad to square: mean abs diff {d:.2e}");
    assert!(d <= 0.01, "pad to square: {d}");
}

/// The expected pixel tensors of all images as one `[B, 3, 32, 32]` batch.
fn reference_pixels(exp: &Expected) -> Tensor {
    let flat: Vec<f32> = exp.images.iter().flat_map(|i| i.pixels.clone()).collect();
    Tensor::from_vec(flat, (exp.images.len(), 3, 32, 32), &Device::Cpu).unwrap()
}

#[test]
fn image_embeddings_match_transformers() {
    let exp = expected();
    let model = load("tiny");
    assert_eq!(model.image_size(), 32);
    // Model alone: transformers' own pixel tensors in.
    let emb = model.embed_images(&reference_pixels(&exp)).unwrap();
    let emb = emb.to_vec2::<f32>().unwrap();
    // Whole pipeline: files decoded and preprocessed by misp.
    let proc = ImageProcessor::from_checkpoint(&fixture().join("tiny"), 32).unwrap();
    let ours: Vec<f32> = exp
        .images
        .iter()
        .flat_map(|i| {
            let img = proc
                .decode_file(&fixture().join("images").join(&i.file))
                .unwrap();
            proc.pixels(&img)
        })
        .collect();
    let ours = Tensor::from_vec(ours, (exp.images.len(), 3, 32, 32), &Device::Cpu).unwrap();
    let pipe = model.embed_images(&ours).unwrap().to_vec2::<f32>().unwrap();
    for (i, im) in exp.images.iter().enumerate() {
        let c_model = cosine(&emb[i], &im.image_embeds);
        let c_pipe = cosine(&pipe[i], &im.image_embeds);
        eprintln!(
            "{}: cosine model {c_model:.8}, pipeline {c_pipe:.8}",
            im.file
        );
        assert!(c_model >= 0.9999, "{}: cosine {c_model}", im.file);
        assert!(c_pipe >= 0.9999, "{}: pipeline cosine {c_pipe}", im.file);
        let norm: f32 = emb[i].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "not L2-normalised: {norm}");
    }
}

#[test]
fn vision_hidden_states_match_transformers() {
    let exp = expected();
    let model = load("tiny");
    let layers = model.config.vision_config.num_hidden_layers;
    // hidden_states[-2] of transformers is the output of layer `layers - 1`.
    let h = model
        .vision_hidden_states(&reference_pixels(&exp), layers - 1)
        .unwrap();
    assert_eq!(h.dims(), &[exp.images.len(), 17, 48]);
    for (i, im) in exp.images.iter().enumerate() {
        for (r, row) in [0usize, 5].iter().enumerate() {
            let ours = h
                .get(i)
                .unwrap()
                .get(*row)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let max = ours
                .iter()
                .zip(&im.hidden_states_m2_rows_0_5[r])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-4, "{} row {row}: max abs diff {max}", im.file);
        }
    }
    assert!(model
        .vision_hidden_states(&reference_pixels(&exp), layers + 1)
        .is_err());
}

#[test]
fn tokens_match_clip_tokenizer() {
    let exp = expected();
    let tok = ClipTokenizer::load(&fixture().join("tiny")).unwrap();
    let prompts: Vec<&str> = exp.prompts.iter().map(String::as_str).collect();
    let t = tok.encode(&prompts).unwrap();
    assert_eq!(t.ids.to_vec2::<u32>().unwrap(), exp.input_ids);
    assert_eq!(
        t.attention_mask.to_vec2::<u32>().unwrap(),
        exp.attention_mask
    );
    let long = exp.untruncated_lengths.iter().filter(|&&n| n > 77).count();
    assert_eq!(long, 1, "the fixture has one prompt over 77 tokens");
    assert_eq!(t.truncated, long);
    assert_eq!(t.ids.dims(), &[prompts.len(), 77]);
    let short = tok.encode(&prompts[..1]).unwrap();
    assert_eq!(short.truncated, 0);
    assert_eq!(short.ids.dims()[1], exp.untruncated_lengths[0]);
}

#[test]
fn text_embeddings_match_transformers_under_both_pooling_rules() {
    let exp = expected();
    let prompts: Vec<&str> = exp.prompts.iter().map(String::as_str).collect();
    for name in ["tiny", "tiny-legacy"] {
        let dir = fixture().join(name);
        let model = ClipModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let tokens = ClipTokenizer::load(&dir).unwrap().encode(&prompts).unwrap();
        let emb = model
            .embed_texts(&tokens)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, want) in exp.text_embeds[name].iter().enumerate() {
            let c = cosine(&emb[i], want);
            eprintln!("{name} prompt {i}: cosine {c:.8}");
            assert!(c >= 0.9999, "{name} prompt {i}: cosine {c}");
        }
    }
    // The two rules pool at different tokens here, so the fixture does tell them apart.
    let a = &exp.text_embeds["tiny"][0];
    let b = &exp.text_embeds["tiny-legacy"][0];
    assert!(cosine(a, b) < 0.999);
}

#[test]
fn half_precision_stays_close() {
    let exp = expected();
    let dir = fixture().join("tiny");
    let pixels = reference_pixels(&exp);
    for dtype in [DType::BF16, DType::F16] {
        let model = ClipModel::load(&dir, dtype, &Device::Cpu).unwrap();
        let emb = model.embed_images(&pixels).unwrap();
        assert_eq!(emb.dtype(), DType::F32);
        let emb = emb.to_vec2::<f32>().unwrap();
        for (i, im) in exp.images.iter().enumerate() {
            let c = cosine(&emb[i], &im.image_embeds);
            // bf16 keeps 8 mantissa bits: ~0.4% relative error per weight.
            assert!(c >= 0.99, "{dtype:?} {}: cosine {c}", im.file);
        }
    }
}

#[test]
fn gradients_reach_the_pixels_through_the_tower() {
    let exp = expected();
    let model = load("tiny");
    let pixels = Var::from_tensor(&reference_pixels(&exp).narrow(0, 0, 2).unwrap()).unwrap();
    let h = model
        .vision_hidden_states(
            pixels.as_tensor(),
            model.config.vision_config.num_hidden_layers,
        )
        .unwrap();
    let loss = h.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(pixels.as_tensor())
        .expect("pixels get a gradient");
    let norm = g
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
}

#[test]
fn missing_and_misshaped_tensors_are_all_listed() {
    let src = fixture().join("tiny");
    let dir = std::env::temp_dir().join(format!("misp-clip-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors
        .remove("text_model.final_layer_norm.weight")
        .unwrap();
    tensors.insert(
        "visual_projection.weight".into(),
        Tensor::zeros((24, 47), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = ClipModel::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    std::fs::remove_dir_all(&dir).ok();
    let ModelError::Tensors { path, problems } = err else {
        panic!("expected a tensor error, got {msg}");
    };
    assert!(path.ends_with("model.safetensors"), "{msg}");
    assert_eq!(problems.len(), 2, "{msg}");
    assert!(problems.contains(&TensorProblem::Missing {
        name: "text_model.final_layer_norm.weight".into()
    }));
    assert!(problems.iter().any(|p| matches!(p,
        TensorProblem::Shape { name, got, expected, .. }
            if name == "visual_projection.weight" && got == &[24, 47] && expected == &[24, 48])));
    assert!(msg.contains("text_model.final_layer_norm.weight") && msg.contains("[24, 47]"));
}

#[test]
fn checkpoint_without_weights_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("misp-clip-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("tiny/config.json"), dir.join("config.json")).unwrap();
    let err = ClipModel::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    std::fs::remove_dir_all(&dir).ok();
    assert!(matches!(err, ModelError::NoWeights { .. }), "{err}");
}

#[test]
fn decode_errors_are_classified() {
    let proc = ImageProcessor::clip_default(32);
    let reason = |bytes: &[u8]| -> &'static str {
        proc.decode(bytes)
            .map(|_| "ok")
            .unwrap_or_else(|e| e.reason())
    };
    let jpeg = std::fs::read(fixture().join("images/hopper.jpg")).unwrap();
    let png = std::fs::read(fixture().join("images/chelsea_rgba.png")).unwrap();
    assert_eq!(reason(&jpeg), "ok");
    assert_eq!(reason(&jpeg[..jpeg.len() / 2]), "truncated");
    assert_eq!(reason(&png[..png.len() / 2]), "truncated");
    assert_eq!(reason(b""), "empty");
    assert_eq!(reason(b"this is a caption, not an image\n"), "not-an-image");
    let mut corrupt = png.clone();
    for b in &mut corrupt[100..400] {
        *b ^= 0x5A;
    }
    assert_eq!(reason(&corrupt), "corrupt");
    let missing = proc.decode_file(&fixture().join("images/no-such-file.jpg"));
    assert!(matches!(missing, Err(ImageDecodeError::Missing(_))));
}

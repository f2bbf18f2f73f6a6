//! misp's Qwen2.5-VL against transformers (`fixtures/qwen2_5_vl/make_fixtures.py`): the image
//! processor's pixels and grids, per-token log-probs, batches mixing image sizes.

use std::path::{Path, PathBuf};

use misp::model::qwen2_5_vl::image_processor::QwenImageProcessor;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture() -> PathBuf {
    root().join("fixtures/qwen2_5_vl")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The photos the fixture used: its own PNGs, then the CLIP fixture's.
fn image(name: &str) -> PathBuf {
    let own = fixture().join("images").join(name);
    if own.exists() {
        own
    } else {
        root().join("fixtures/clip/images").join(name)
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// Pixels and grids of both processor layouts (transformers 5's processor_config.json and the
/// hub's preprocessor_config.json) against `Qwen2VLImageProcessorPil`.
#[test]
fn pixel_values_and_grids_match_transformers() {
    let want = expected();
    for dir in [fixture().join("tiny"), fixture().join("hub")] {
        let p = QwenImageProcessor::from_dir(&dir).unwrap();
        assert_eq!(
            (p.min_pixels, p.max_pixels),
            (3136, 7840),
            "{}",
            dir.display()
        );
        for case in want["images"].as_array().unwrap() {
            let name = case["image"].as_str().unwrap();
            let img = p.decode_file(&image(name)).unwrap();
            let got = p.patches(&img).unwrap();
            let grid = usizes(&case["image_grid_thw"]);
            assert_eq!(vec![1, got.grid_h, got.grid_w], grid, "{name}");
            let shape = usizes(&case["shape"]);
            assert_eq!(got.pixels.len(), shape[0] * shape[1], "{name}");
            assert_eq!(p.patch_dim(), shape[1]);
            let stride = case["stride"].as_u64().unwrap() as usize;
            let strided: Vec<f64> = got
                .pixels
                .iter()
                .step_by(stride)
                .map(|&v| v as f64)
                .collect();
            let want_strided = floats(&case["strided"]);
            assert_eq!(strided.len(), want_strided.len(), "{name}");
            for (i, (a, b)) in strided.iter().zip(&want_strided).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{name}: value {} is {a}, want {b}",
                    i * stride
                );
            }
            for (i, (a, b)) in got
                .pixels
                .iter()
                .zip(floats(&case["first_patch"]))
                .enumerate()
            {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "{name}: first patch [{i}] {a} vs {b}"
                );
            }
            let sum: f64 = got.pixels.iter().map(|&v| v as f64).sum();
            let sum_sq: f64 = got.pixels.iter().map(|&v| (v as f64).powi(2)).sum();
            let n = got.pixels.len() as f64;
            let (ws, wq) = (
                case["sum"].as_f64().unwrap(),
                case["sum_sq"].as_f64().unwrap(),
            );
            assert!(
                (sum - ws).abs() < 1e-4 * n.sqrt().max(1.0),
                "{name}: sum {sum} vs {ws}"
            );
            assert!(
                (sum_sq - wq).abs() < 1e-5 * wq.abs().max(1.0),
                "{name}: sum_sq {sum_sq} vs {wq}"
            );
        }
    }
}

//! misp's Qwen2.5-VL against transformers (`fixtures/qwen2_5_vl/make_fixtures.py`): the image
//! processor's pixels and grids, per-token log-probs, batches mixing image sizes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use misp::kernels::{Kernels, ThreadKernels};
use misp::model::llama::token_logprobs;
use misp::model::qwen2_5_vl::image_processor::{ImagePatches, QwenImageProcessor};
use misp::model::qwen2_5_vl::Qwen2_5Vl;
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
            check_pixels(&p, case);
        }
    }
}

/// Images below one 28 x 28 merge unit (`make_small_images.py`): scaled up as transformers
/// scales them, under the fixture's bounds and transformers' defaults; the aspect ratio
/// transformers refuses, refused with its message.
#[test]
fn images_smaller_than_a_merge_unit_are_resized_as_transformers_does() {
    let text = std::fs::read_to_string(fixture().join("small_images.json")).unwrap();
    let want: Value = serde_json::from_str(&text).unwrap();
    for bounds in want["bounds"].as_array().unwrap() {
        let p = QwenImageProcessor {
            min_pixels: bounds["min_pixels"].as_u64().unwrap() as usize,
            max_pixels: bounds["max_pixels"].as_u64().unwrap() as usize,
            ..QwenImageProcessor::default()
        };
        for case in bounds["images"].as_array().unwrap() {
            let (w, h) = (
                case["width"].as_u64().unwrap(),
                case["height"].as_u64().unwrap(),
            );
            assert!(w < 28 || h < 28, "{case}");
            check_pixels(&p, case);
        }
    }
    let refused = &want["refused"];
    let (w, h) = (
        refused["width"].as_u64().unwrap() as u32,
        refused["height"].as_u64().unwrap() as u32,
    );
    let img = image::RgbImage::new(w, h);
    let e = QwenImageProcessor::default().patches(&img).unwrap_err();
    assert_eq!(e, refused["message"].as_str().unwrap());
}

/// One photo's patches against the fixture's summary of transformers' pixel values: grid,
/// shape, every `stride`-th value, the first patch when recorded, sum and sum of squares.
fn check_pixels(p: &QwenImageProcessor, case: &Value) {
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
    let first_patch = case.get("first_patch").map(floats).unwrap_or_default();
    for (i, (a, b)) in got.pixels.iter().zip(first_patch).enumerate() {
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

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn model(dir: &Path) -> Qwen2_5Vl {
    Qwen2_5Vl::load_dir(dir, DType::F32, &Device::Cpu).unwrap()
}

fn patches(p: &QwenImageProcessor, name: &str) -> ImagePatches {
    p.patches(&p.decode_file(&image(name)).unwrap()).unwrap()
}

/// Per-token log-probs `log p(ids[t] | ids[<t])`, `t >= 1`, of each row (its own length).
fn logprobs(m: &Qwen2_5Vl, rows: &[Vec<u32>], images: &[&ImagePatches], pad: u32) -> Vec<Vec<f64>> {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, width - r.len()))
                .collect()
        })
        .collect();
    let mask: Vec<Vec<bool>> = rows
        .iter()
        .map(|r| (0..width).map(|t| t < r.len()).collect())
        .collect();
    let imgs: Vec<Vec<&ImagePatches>> = images.iter().map(|i| vec![*i]).collect();
    let logits = m.forward(&ids, &mask, &imgs, &Device::Cpu).unwrap();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let labels = Tensor::from_vec(flat, (rows.len(), width), &Device::Cpu).unwrap();
    let lp: Vec<Vec<f32>> = token_logprobs(&logits, &labels).unwrap().to_vec2().unwrap();
    lp.into_iter()
        .zip(rows)
        .map(|(l, r)| l[..r.len() - 1].iter().map(|&v| v as f64).collect())
        .collect()
}

fn close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (t, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() < tol,
            "{what}: token {} log-prob {a} vs {b}",
            t + 1
        );
    }
}

/// Multimodal RoPE positions and every token's log-prob (prompt, image tokens, response and
/// `<|im_end|>`) within 1e-4 of transformers, for four image sizes.
#[test]
fn positions_and_logprobs_match_transformers() {
    positions_and_logprobs_match_transformers_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn positions_and_logprobs_match_transformers_on_the_generic_path() {
    positions_and_logprobs_match_transformers_with(Kernels::Generic);
}

fn positions_and_logprobs_match_transformers_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let dir = fixture().join("tiny");
    let m = model(&dir);
    let p = QwenImageProcessor::from_dir(&dir).unwrap();
    let want = expected();
    for case in want["score"].as_array().unwrap() {
        let name = case["image"].as_str().unwrap();
        let img = patches(&p, name);
        let ids: Vec<u32> = [u32s(&case["prompt_ids"]), u32s(&case["response_ids"])].concat();
        let mask = vec![true; ids.len()];
        let pos = m
            .mrope_positions(&ids, &mask, &[(img.grid_h, img.grid_w)])
            .unwrap();
        for (axis, want_axis) in case["position_ids"].as_array().unwrap().iter().enumerate() {
            let w: Vec<i64> = want_axis
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            assert_eq!(pos.axes[axis], w, "{name}: position axis {axis}");
        }
        let got = &logprobs(&m, std::slice::from_ref(&ids), &[&img], 0)[0];
        close(got, &floats(&case["token_logprobs"]), 1e-4, name);
    }
}

/// The same log-probs from a checkpoint in transformers 5's module names (`model.visual.*`,
/// `model.language_model.*`): the fixture's tensors renamed into one file.
#[test]
fn nested_key_layout_loads_to_the_same_logprobs() {
    let src = fixture().join("tiny");
    let tmp = std::env::temp_dir().join(format!("misp-qwen-nested-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut all = std::collections::HashMap::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            for (k, v) in candle_core::safetensors::load(&path, &Device::Cpu).unwrap() {
                let k = if let Some(r) = k.strip_prefix("visual.") {
                    format!("model.visual.{r}")
                } else if let Some(r) = k.strip_prefix("model.") {
                    format!("model.language_model.{r}")
                } else {
                    k
                };
                all.insert(k, v);
            }
        }
    }
    assert!(all.contains_key("model.visual.merger.ln_q.weight"));
    candle_core::safetensors::save(&all, tmp.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let m = model(&tmp);
    let p = QwenImageProcessor::from_dir(&src).unwrap();
    let case = &expected()["score"][2];
    let img = patches(&p, case["image"].as_str().unwrap());
    let ids: Vec<u32> = [u32s(&case["prompt_ids"]), u32s(&case["response_ids"])].concat();
    let got = &logprobs(&m, &[ids], &[&img], 0)[0];
    close(got, &floats(&case["token_logprobs"]), 1e-4, "nested layout");
    std::fs::remove_dir_all(&tmp).ok();
}

/// A right-padded batch of two image sizes (36 and 24 patches, 9 and 6 image tokens) gives
/// each row the log-probs it has alone.
#[test]
fn batch_mixing_image_sizes_equals_each_sample_alone() {
    let dir = fixture().join("tiny");
    let m = model(&dir);
    let p = QwenImageProcessor::from_dir(&dir).unwrap();
    let want = expected();
    let cases = [&want["score"][1], &want["score"][3]];
    let imgs: Vec<ImagePatches> = cases
        .iter()
        .map(|c| patches(&p, c["image"].as_str().unwrap()))
        .collect();
    assert_ne!(imgs[0].patches(), imgs[1].patches());
    let rows: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| [u32s(&c["prompt_ids"]), u32s(&c["response_ids"])].concat())
        .collect();
    let pad = want["special_ids"]["<|endoftext|>"].as_u64().unwrap() as u32;
    let batch = logprobs(&m, &rows, &[&imgs[0], &imgs[1]], pad);
    for (i, row) in rows.iter().enumerate() {
        let alone = &logprobs(&m, std::slice::from_ref(row), &[&imgs[i]], pad)[0];
        close(&batch[i], alone, 1e-5, "batch vs alone");
    }
}

/// Greedy tokens of a left-padded batch of three image sizes equal transformers' `generate`.
#[test]
fn greedy_generation_matches_transformers() {
    let dir = fixture().join("tiny");
    let m = model(&dir);
    let p = QwenImageProcessor::from_dir(&dir).unwrap();
    let want = expected();
    let ids = &want["special_ids"];
    let eos = [
        ids["<|im_end|>"].as_u64().unwrap() as u32,
        ids["<|endoftext|>"].as_u64().unwrap() as u32,
    ];
    let cases = want["generate"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| u32s(&c["prompt_ids"])).collect();
    let imgs: Vec<ImagePatches> = cases
        .iter()
        .map(|c| patches(&p, c["image"].as_str().unwrap()))
        .collect();
    let images: Vec<Vec<&ImagePatches>> = imgs.iter().map(|i| vec![i]).collect();
    let max_new = want["max_new_tokens"].as_u64().unwrap() as usize;
    let got = m
        .greedy(&prompts, &images, &eos, eos[1], max_new, &Device::Cpu)
        .unwrap();
    for (g, c) in got.iter().zip(cases) {
        assert_eq!(g, &u32s(&c["new_ids"]), "{}", c["image"]);
    }
}

/// PEFT's adapter (LoRA on the language model's seven projections) loads onto misp's model and
/// gives PEFT's log-probs; saved back by misp it is the same file for PEFT: the same keys,
/// shapes and values, and a config naming the same base class and targets.
#[test]
fn peft_adapter_loads_with_peft_logprobs_and_saves_in_peft_layout() {
    use misp::model::adapter::{load_peft_adapter_into, save_peft_adapter_of, PeftBase};
    let dir = fixture().join("tiny");
    let mut m = model(&dir);
    let peft_dir = fixture().join("peft_saved");
    let cfg = load_peft_adapter_into(&peft_dir, m.language_model_mut()).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
    assert_eq!(m.language_model().lora_layers().len(), 14);
    let p = QwenImageProcessor::from_dir(&dir).unwrap();
    let want = expected();
    for case in want["score"].as_array().unwrap() {
        let name = case["image"].as_str().unwrap();
        let img = patches(&p, name);
        let ids: Vec<u32> = [u32s(&case["prompt_ids"]), u32s(&case["response_ids"])].concat();
        let got = &logprobs(&m, &[ids], &[&img], 0)[0];
        close(got, &floats(&case["peft_token_logprobs"]), 1e-4, name);
    }

    let out = std::env::temp_dir().join(format!("misp-qwen-peft-{}", std::process::id()));
    save_peft_adapter_of(&out, m.language_model(), &cfg, "tiny", PeftBase::QWEN2_5_VL).unwrap();
    let file = "adapter_model.safetensors";
    let ours = candle_core::safetensors::load(out.join(file), &Device::Cpu).unwrap();
    let theirs = candle_core::safetensors::load(peft_dir.join(file), &Device::Cpu).unwrap();
    let mut keys: Vec<_> = ours.keys().collect();
    keys.sort();
    let mut want_keys: Vec<_> = theirs.keys().collect();
    want_keys.sort();
    assert_eq!(keys, want_keys);
    for (k, t) in &ours {
        let diff: f32 = (t - &theirs[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0, "{k}");
    }
    let read = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (ours, theirs) = (read(&out), read(&peft_dir));
    for key in [
        "auto_mapping",
        "target_modules",
        "r",
        "lora_alpha",
        "peft_type",
    ] {
        assert_eq!(ours[key], theirs[key], "adapter_config.json `{key}`");
    }
    std::fs::remove_dir_all(&out).ok();
}

/// The seed of the committed `misp_saved/` adapter.
const MISP_SEED: u64 = 21;

/// The adapter misp writes to `misp_saved/`: LoRA r 4 / alpha 8 on the seven projections,
/// initialised from [`MISP_SEED`], every `B` then drawn in `[-0.3, 0.3)` from the same seed (a
/// fresh `B = 0` adapter would leave the log-probs unchanged and prove nothing).
fn misp_adapter() -> (Qwen2_5Vl, misp::model::lora::LoraConfig) {
    use misp::model::lora::{init_rng, LoraConfig};
    use rand::Rng;
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        ..LoraConfig::default()
    };
    let mut m = model(&fixture().join("tiny"));
    let mut rng = init_rng(MISP_SEED);
    let lm = m.language_model_mut();
    lm.attach_lora(&cfg, &mut rng).unwrap();
    for b in lm.trainable_vars().iter().skip(1).step_by(2) {
        let v: Vec<f32> = (0..b.elem_count())
            .map(|_| rng.random_range(-0.3f32..0.3))
            .collect();
        b.set(&Tensor::from_vec(v, b.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    (m, cfg)
}

fn save_misp_adapter(dir: &Path) {
    use misp::model::adapter::{save_peft_adapter_of, PeftBase};
    let (m, cfg) = misp_adapter();
    save_peft_adapter_of(
        dir,
        m.language_model(),
        &cfg,
        "../tiny",
        PeftBase::QWEN2_5_VL,
    )
    .unwrap();
}

/// misp's adapter file as PEFT reads it: `check_misp_saved.py` loads the committed
/// `misp_saved/` with `PeftModel.from_pretrained` on transformers' model (no missing or
/// unexpected keys, the 14 projections wrapped, every tensor as in the file) and records PEFT's
/// per-token log-probs in `misp_saved.json`. Here: the adapter is what misp writes today (same
/// tensors, same config), and misp with it gives PEFT's log-probs within 1e-4.
#[test]
fn misp_saved_adapter_loads_in_peft_with_the_same_logprobs() {
    use misp::model::adapter::{load_peft_adapter_into, WEIGHTS_FILE};
    let committed = fixture().join("misp_saved");
    let fresh = std::env::temp_dir().join(format!("misp-qwen-saved-{}", std::process::id()));
    save_misp_adapter(&fresh);
    let a = candle_core::safetensors::load(fresh.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(committed.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut keys: Vec<_> = a.keys().collect();
    keys.sort();
    let mut committed_keys: Vec<_> = b.keys().collect();
    committed_keys.sort();
    assert_eq!(keys, committed_keys);
    for k in keys {
        let x: Vec<f32> = a[k].flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{k} differs from the committed misp_saved");
    }
    let config = |d: &Path| std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
    assert_eq!(config(&fresh), config(&committed), "adapter_config.json");
    std::fs::remove_dir_all(&fresh).ok();

    let text = std::fs::read_to_string(fixture().join("misp_saved.json")).unwrap();
    let peft: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(peft["wrapped_modules"].as_array().unwrap().len(), 14);
    let mut m = model(&fixture().join("tiny"));
    load_peft_adapter_into(&committed, m.language_model_mut()).unwrap();
    let p = QwenImageProcessor::from_dir(&fixture().join("tiny")).unwrap();
    let want = expected();
    let cases = want["score"].as_array().unwrap();
    let recorded = peft["token_logprobs"].as_array().unwrap();
    assert_eq!(recorded.len(), cases.len());
    for (case, peft_lp) in cases.iter().zip(recorded) {
        let name = case["image"].as_str().unwrap();
        let img = patches(&p, name);
        let ids: Vec<u32> = [u32s(&case["prompt_ids"]), u32s(&case["response_ids"])].concat();
        let got = &logprobs(&m, &[ids], &[&img], 0)[0];
        close(got, &floats(peft_lp), 1e-4, name);
        // The adapter moves the log-probs well past the tolerance: it is really applied.
        let base = floats(&case["token_logprobs"]);
        let moved = got
            .iter()
            .zip(&base)
            .fold(0f64, |w, (a, b)| w.max((a - b).abs()));
        assert!(
            moved > 1e-2,
            "{name}: the adapter moved log-probs by {moved}"
        );
    }
}

/// Writes `fixtures/qwen2_5_vl/misp_saved/` for `check_misp_saved.py`. Run it, then the
/// script, whenever misp's adapter format or initialisation changes:
/// `cargo test -p misp --test qwen2_5_vl_conformance -- --ignored write_misp_saved`.
#[test]
#[ignore]
fn write_misp_saved() {
    let dir = fixture().join("misp_saved");
    save_misp_adapter(&dir);
    eprintln!("wrote {} with seed {MISP_SEED}", dir.display());
}

/// The chat template rendered and tokenised as `apply_chat_template` + the processor, responses
/// scored with `<|im_end|>`, generations decoded as the tokenizer decodes them, and the hub's
/// `chat_template.json` read as well as transformers 5's `chat_template.jinja`.
#[test]
fn chat_template_ids_and_decoding_match_transformers() {
    use misp::model::qwen2_5_vl::processor::QwenProcessor;
    use misp::model::qwen2_5_vl::Qwen2_5VlConfig;
    let dir = fixture().join("tiny");
    let cfg = Qwen2_5VlConfig::from_dir(&dir).unwrap();
    let proc = QwenProcessor::from_dir(&dir, &cfg).unwrap();
    let want = expected();
    let special = &want["special_ids"];
    let id = |k: &str| special[k].as_u64().unwrap() as u32;
    assert_eq!(proc.eos(), id("<|im_end|>"));
    assert_eq!(proc.pad(), id("<|endoftext|>"));
    assert_eq!(proc.stop(), &[id("<|im_end|>"), id("<|endoftext|>")]);
    for case in want["score"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            QwenProcessor::render(prompt),
            case["text"].as_str().unwrap()
        );
        let n = case["image_tokens"].as_u64().unwrap() as usize;
        assert_eq!(
            proc.prompt_ids(prompt, n).unwrap(),
            u32s(&case["prompt_ids"]),
            "{prompt}"
        );
        let response = case["response"].as_str().unwrap();
        assert_eq!(
            proc.response_ids(response).unwrap(),
            u32s(&case["response_ids"])
        );
    }
    for case in want["generate"].as_array().unwrap() {
        assert_eq!(
            proc.decode(&u32s(&case["new_ids"])).unwrap(),
            case["text"].as_str().unwrap()
        );
    }
    assert!(proc.prompt_ids("<|image_pad|> twice", 4).is_err());

    // The hub's layout: chat_template.json; another template is refused, naming its file.
    let tmp = std::env::temp_dir().join(format!("misp-qwen-template-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        std::fs::copy(dir.join(f), tmp.join(f)).unwrap();
    }
    std::fs::copy(
        fixture().join("hub/chat_template.json"),
        tmp.join("chat_template.json"),
    )
    .unwrap();
    assert!(QwenProcessor::from_dir(&tmp, &cfg).is_ok());
    std::fs::write(
        tmp.join("chat_template.json"),
        r#"{"chat_template": "{{ messages }}"}"#,
    )
    .unwrap();
    let err = QwenProcessor::from_dir(&tmp, &cfg).unwrap_err().to_string();
    assert!(
        err.contains("chat_template.json") && err.contains("not Qwen2.5-VL's"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).ok();
}

/// A Qwen2.5-VL folder given to the LLaVA path (the commands) is refused naming its
/// `model_type`, not with a serde error about some field; a LLaVA folder is refused by the
/// Qwen2.5-VL loader the same way.
#[test]
fn other_architectures_are_named() {
    use misp::model::llava::LlavaConfig;
    use misp::model::qwen2_5_vl::Qwen2_5VlConfig;
    let err = LlavaConfig::from_dir(&fixture().join("tiny"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("\"qwen2_5_vl\""),
        "{err}"
    );
    let err = Qwen2_5VlConfig::from_dir(&root().join("fixtures/llava/tiny"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("\"llava\""),
        "{err}"
    );
}

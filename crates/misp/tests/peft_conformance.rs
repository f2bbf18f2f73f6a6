//! Conformance of misp's PEFT adapter files with peft, in both directions.
//!
//! The fixture `fixtures/peft/` is made by `fixtures/peft/make_fixture.py` (peft 0.21.2,
//! transformers 5.24, torch 2.15 CPU; versions in `expected.json`) on the tiny LLaVA of
//! `fixtures/llava/` and its input batch:
//! - `peft_saved/`: a LoRA (r 4, alpha 8, the seven language-model projections, B random) made
//!   by `get_peft_model` and written by `save_pretrained`, with peft's per-token log-probs;
//! - `misp_saved/`: the adapter [`write_misp_fixture`] writes (seeded, so reproducible here),
//!   loaded by `PeftModel.from_pretrained`, which the script checks wrapped exactly the 14
//!   language-model projections, with peft's per-token log-probs for it.
//!
//! Tolerance: max abs diff 1e-4 on per-token log-probs (misp's conformance bound; both sides compute
//! in f32, and `fixtures/llava` already shows the base models agree to well under it).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use misp::kernels::{Kernels, ThreadKernels};
use misp::model::adapter::{load_peft_adapter, save_peft_adapter, WEIGHTS_FILE};
use misp::model::llava::{token_logprobs, Llava};
use misp::model::lora::{init_rng, LoraConfig};
use rand::{Rng, SeedableRng};
use serde::Deserialize;

#[derive(Deserialize)]
struct Batch {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    pixels: Vec<Vec<Vec<Vec<f32>>>>,
}

#[derive(Deserialize)]
struct Expected {
    peft_saved: Recorded,
    misp_saved: Recorded,
}

#[derive(Deserialize)]
struct Recorded {
    wrapped_modules: Vec<String>,
    token_logprobs: Vec<Vec<f32>>,
}

/// The seed of the committed `misp_saved` adapter.
const MISP_SEED: u64 = 20;
/// What misp records as the adapter's base, relative to the repository root.
const BASE: &str = "fixtures/llava/tiny";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixtures().join("peft/expected.json")).unwrap();
    serde_json::from_str(&text).expect("peft/expected.json parses")
}

fn tiny() -> Llava {
    Llava::load_dir(&fixtures().join("llava/tiny"), DType::F32, &Device::Cpu).unwrap()
}

/// The fixture's LoRA settings; dropout is recorded but inactive at evaluation.
fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.05,
        ..LoraConfig::default()
    }
}

/// The misp adapter of the fixture: `A` from [`init_rng`]`(seed)` as training starts, and `B`
/// uniform in [-0.5, 0.5) from a second seeded generator, so the adapter changes the outputs
/// (B = 0 would test nothing).
fn misp_adapter(seed: u64) -> Llava {
    let mut m = tiny();
    m.language_model_mut()
        .attach_lora(&lora_config(), &mut init_rng(seed))
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1));
    for (_, l) in m.language_model().lora_layers() {
        let b = &l.lora().unwrap().b;
        let v: Vec<f32> = (0..b.elem_count())
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        b.set(&Tensor::from_vec(v, b.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    m
}

/// Per-token log-probs of the `fixtures/llava` batch, `log p(ids[t+1] | ..=t)`, and whether
/// each position is a real (unpadded) label.
fn logprobs(m: &Llava) -> (Vec<Vec<f32>>, Vec<Vec<bool>>) {
    let text = std::fs::read_to_string(fixtures().join("llava/expected.json")).unwrap();
    let e: Batch = serde_json::from_str(&text).unwrap();
    let dev = Device::Cpu;
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
    let ids = Tensor::new(e.input_ids.clone(), &dev).unwrap();
    let mask = Tensor::new(e.attention_mask.clone(), &dev).unwrap();
    let logits = m.forward(&ids, &mask, &pixels).unwrap();
    let lp = token_logprobs(&logits, &ids).unwrap().to_vec2().unwrap();
    let real = e
        .attention_mask
        .iter()
        .map(|row| row[1..].iter().map(|&v| v == 1).collect())
        .collect();
    (lp, real)
}

/// Max abs difference over the real label positions.
fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>], real: &[Vec<bool>]) -> f32 {
    assert_eq!((a.len(), b.len()), (real.len(), real.len()));
    let mut worst = 0f32;
    for ((x, y), r) in a.iter().zip(b).zip(real) {
        assert_eq!((x.len(), y.len()), (r.len(), r.len()));
        for ((x, y), r) in x.iter().zip(y).zip(r) {
            if *r {
                worst = worst.max((x - y).abs());
            }
        }
    }
    worst
}

/// The 14 projections misp adapts, as PEFT names the wrapped modules.
fn language_model_projections() -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..2 {
        for p in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        ]
        .into_iter()
        .chain(["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
        {
            out.push(format!(
                "base_model.model.model.language_model.layers.{i}.{p}"
            ));
        }
    }
    out.sort();
    out
}

/// Checks `adapted` against `recorded` and that the adapter moves the log-probs off the base's.
fn assert_matches(tag: &str, adapted: &Llava, recorded: &Recorded) {
    let (got, real) = logprobs(adapted);
    let want = &recorded.token_logprobs;
    let worst = max_diff(&got, want, &real);
    let base = max_diff(&logprobs(&tiny()).0, want, &real);
    eprintln!("{tag}: per-token log-prob max abs diff {worst:e} (base model vs adapted: {base:e})");
    assert!(worst <= 1e-4, "{tag}: {worst}");
    assert!(
        base > 1e-2,
        "{tag}: the adapter barely moves the log-probs ({base})"
    );
    let mut wrapped = recorded.wrapped_modules.clone();
    wrapped.sort();
    assert_eq!(
        wrapped,
        language_model_projections(),
        "{tag}: peft wrapped other modules"
    );
}

#[test]
fn misp_loads_peft_saved_and_matches_peft() {
    misp_loads_peft_saved_and_matches_peft_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn misp_loads_peft_saved_and_matches_peft_on_the_generic_path() {
    misp_loads_peft_saved_and_matches_peft_with(Kernels::Generic);
}

fn misp_loads_peft_saved_and_matches_peft_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let e = expected();
    let mut m = tiny();
    let cfg = load_peft_adapter(&fixtures().join("peft/peft_saved"), &mut m).unwrap();
    assert_eq!(cfg.r, 4);
    assert_eq!(cfg.lora_alpha, 8.0);
    assert_eq!(cfg.target_modules, LoraConfig::default().target_modules);
    assert_eq!(m.language_model().lora_layers().len(), 14);
    assert_matches("peft_saved", &m, &e.peft_saved);
}

#[test]
fn misp_saved_is_reproducible_and_peft_agrees() {
    misp_saved_is_reproducible_and_peft_agrees_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn misp_saved_is_reproducible_and_peft_agrees_on_the_generic_path() {
    misp_saved_is_reproducible_and_peft_agrees_with(Kernels::Generic);
}

fn misp_saved_is_reproducible_and_peft_agrees_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let e = expected();
    let committed = fixtures().join("peft/misp_saved");
    // One folder per kernel path: the two tests run in parallel and each removes its own.
    let dir = std::env::temp_dir().join(format!("misp-peft-{}-{kernels:?}", std::process::id()));
    save_peft_adapter(&dir, &misp_adapter(MISP_SEED), &lora_config(), BASE).unwrap();
    let fresh = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let config_fresh = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let old = candle_core::safetensors::load(committed.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut keys: Vec<_> = fresh.keys().collect();
    keys.sort();
    let mut old_keys: Vec<_> = old.keys().collect();
    old_keys.sort();
    assert_eq!(keys, old_keys);
    for k in keys {
        let (a, b) = (&fresh[k], &old[k]);
        assert_eq!(a.dims(), b.dims(), "{k}");
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{k} differs from the committed misp_saved");
    }
    let config_old = std::fs::read_to_string(committed.join("adapter_config.json")).unwrap();
    assert_eq!(config_fresh, config_old, "adapter_config.json differs");

    let mut m = tiny();
    load_peft_adapter(&committed, &mut m).unwrap();
    assert_matches("misp_saved", &m, &e.misp_saved);
}

/// Writes `fixtures/peft/misp_saved/` for `make_fixture.py` to load with peft. Run it, then the
/// script, whenever misp's adapter format or initialisation changes:
/// `cargo test -p misp --test peft_conformance -- --ignored write_misp_fixture`.
#[test]
#[ignore]
fn write_misp_fixture() {
    let dir = fixtures().join("peft/misp_saved");
    save_peft_adapter(&dir, &misp_adapter(MISP_SEED), &lora_config(), BASE).unwrap();
    eprintln!("wrote {} with seed {MISP_SEED}", dir.display());
}

//! LLaVA + LoRA as the trainer uses it: gradients reach every adapter variable and
//! the projector through the image-token path and agree with finite differences; a fresh
//! adapter, the enable switch and right padding leave log-probs exactly where they belong; bf16
//! weights score close to f32 and generate.
//!
//! Models: the tiny checkpoint of `fixtures/llava_chat/tiny` (2 LLaMA layers, hidden 32, vocab
//! 100, 16 image tokens per 32 px image; made by `fixtures/llava_chat/make_fixture.py`), loaded
//! through [`Vlm`] for the f32 / bf16 tests, and the same weights cast to f64 and built in memory
//! with `VarBuilder::from_tensors` for the finite-difference checks.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use misp::kernels::{Kernels, ThreadKernels};
use misp::model::llava::{Llava, LlavaConfig};
use misp::model::lora::{init_rng, LoraConfig};
use misp::model::vlm::{PreparedPrompt, PreparedScore, Vlm, VlmOptions};
use rand::{Rng, SeedableRng};

mod common;
use common::{clip_image as image, lora_cfg, root, GradSums};

fn checkpoint() -> PathBuf {
    root().join("fixtures/llava_chat/tiny")
}

fn load_vlm(dtype: DType) -> Vlm {
    let opts = VlmOptions {
        dtype,
        ..VlmOptions::default()
    };
    Vlm::load(&checkpoint(), None, &opts).unwrap()
}

/// Sets every `B` (the odd entries of `trainable_vars`) to seeded values in `[-0.2, 0.2)`:
/// with `B = 0` the gradient of `A` is zero by construction and the adapter does nothing.
fn randomise_b(vars: &[Var], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for b in vars.iter().skip(1).step_by(2) {
        let v: Vec<f64> = (0..b.elem_count())
            .map(|_| rng.random_range(-0.2..0.2))
            .collect();
        let t = Tensor::from_vec(v, b.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(b.dtype())
            .unwrap();
        b.set(&t).unwrap();
    }
}

/// Three scored items of different lengths (prompt and response), from the fixture images;
/// the fixture's context is 64 tokens, 16 of them the image's.
fn items(vlm: &Vlm) -> Vec<PreparedScore> {
    [
        ("hopper.jpg", "What is in the image?", "A red circle."),
        (
            "astronaut_small.png",
            "Describe the scene.",
            "The astronaut stands on the moon.",
        ),
        ("coffee_cmyk.jpg", "How many cats?", "Two."),
    ]
    .iter()
    .map(|(i, p, r)| vlm.prepare_score(&image(i), p, r).unwrap())
    .collect()
}

fn scores(vlm: &Vlm, items: &[PreparedScore]) -> Vec<f64> {
    vlm.score_prepared(items)
        .unwrap()
        .into_iter()
        .map(|(lp, _)| lp)
        .collect()
}

/// The summed log-prob of a scored batch: what DPO's loss is built from.
fn batch_logp(vlm: &Vlm, items: &[PreparedScore]) -> Tensor {
    let pixels: Vec<&[f32]> = items.iter().map(|i| i.pixels.as_slice()).collect();
    let pixels = vlm.pixel_tensor(&pixels).unwrap();
    let refs: Vec<&PreparedScore> = items.iter().collect();
    let (lp, _) = vlm.logprobs(&refs, Some(&pixels)).unwrap();
    lp.sum_all().unwrap()
}

#[test]
fn every_lora_variable_gets_a_nonzero_gradient_from_a_scored_batch() {
    every_lora_variable_gets_a_nonzero_gradient_from_a_scored_batch_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn every_lora_variable_gets_a_nonzero_gradient_from_a_scored_batch_on_the_generic_path() {
    every_lora_variable_gets_a_nonzero_gradient_from_a_scored_batch_with(Kernels::Generic);
}

fn every_lora_variable_gets_a_nonzero_gradient_from_a_scored_batch_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let mut vlm = load_vlm(DType::F32);
    let lm = vlm.language_model_mut();
    lm.attach_lora(&LoraConfig::default(), &mut init_rng(1))
        .unwrap();
    let vars = lm.trainable_vars();
    let layers = lm.config().num_hidden_layers;
    assert_eq!(vars.len(), 2 * 7 * layers, "A and B of 7 targets per layer");
    randomise_b(&vars, 2);
    let items = items(&vlm);
    let grads = batch_logp(&vlm, &items).backward().unwrap();
    let names: Vec<String> = vlm
        .language_model()
        .lora_layers()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for (i, v) in vars.iter().enumerate() {
        let which = format!("{} {}", names[i / 2], ["A", "B"][i % 2]);
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("{which} has no gradient"));
        let n: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0, "{which} has a zero gradient");
    }
}

/// The fixture's weights in f64, legacy key names, with the names in `as_vars` wrapped as
/// [`Var`]s (returned in that order) so gradients can be asked of them.
fn f64_llava(as_vars: &[&str]) -> (Llava, Vec<Var>) {
    let dir = checkpoint();
    let config = LlavaConfig::from_dir(&dir).unwrap();
    let raw = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors: HashMap<String, Tensor> = raw
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F64).unwrap()))
        .collect();
    let vars: Vec<Var> = as_vars
        .iter()
        .map(|name| {
            let var = Var::from_tensor(&tensors[*name]).unwrap();
            tensors.insert(name.to_string(), var.as_tensor().clone());
            var
        })
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu);
    (Llava::load(vb, config).unwrap(), vars)
}

/// Two sequences of BOS, 16 image tokens and text (the last five labelled), with their images:
/// deterministic smooth pixels, so no file decoding is involved.
fn f64_batch(model: &Llava) -> (Tensor, Tensor, Tensor, Tensor) {
    let cfg = model.config();
    let (n, img) = (cfg.image_tokens(), cfg.image_token_index);
    let text: [&[u32]; 2] = [&[12, 40, 7, 33, 51, 8, 2], &[60, 5, 17, 88, 23, 41, 2]];
    let mut ids = Vec::new();
    for t in text {
        ids.push(1u32);
        ids.extend(std::iter::repeat_n(img, n));
        ids.extend_from_slice(t);
    }
    let len = 1 + n + 7;
    let dev = Device::Cpu;
    let ids = Tensor::from_vec(ids, (2, len), &dev).unwrap();
    let mask = Tensor::ones((2, len), DType::U8, &dev).unwrap();
    let labels: Vec<f64> = (0..2)
        .flat_map(|_| (0..len).map(|i| if i + 5 >= len { 1.0 } else { 0.0 }))
        .collect();
    let labels = Tensor::from_vec(labels, (2, len), &dev).unwrap();
    let s = cfg.vision_config.image_size;
    let pixels = (Tensor::arange(0u32, (2 * 3 * s * s) as u32, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        * 0.37)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((2, 3, s, s))
        .unwrap();
    (ids, mask, pixels, labels)
}

/// Checks autograd's derivative of the summed log-prob against central differences at
/// `coords` (`(var index, flat index)`); returns the worst relative error. In f64 with
/// `eps = 1e-5` the truncation error is ~eps^2 and rounding ~1e-16 / eps, so agreement to 1e-6
/// relative is what a correct gradient gives and a wrong one cannot (measured worst: 2e-8 on
/// LoRA coordinates, 1.3e-7 on the projector's).
fn worst_fd_error(model: &Llava, vars: &[Var], coords: &[(usize, usize)]) -> f64 {
    let (ids, mask, pixels, labels) = f64_batch(model);
    // The batch must actually go through the image path.
    let img = model.config().image_token_index;
    let flat: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    assert!(flat.contains(&img));
    let f = || {
        let (lp, _) = model
            .sequence_logprobs(&ids, &mask, &pixels, &labels)
            .unwrap();
        lp.sum_all().unwrap()
    };
    let grads = f().backward().unwrap();
    let eps = 1e-5;
    let mut worst = 0f64;
    for &(vi, at) in coords {
        let v = &vars[vi];
        let g: Vec<f64> = grads
            .get(v)
            .unwrap_or_else(|| panic!("var {vi} has no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig = v.as_tensor().copy().unwrap();
        let mut vals: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let mut value_at = |delta: f64| {
            let saved = vals[at];
            vals[at] += delta;
            v.set(&Tensor::from_slice(&vals, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            vals[at] = saved;
            f().to_scalar::<f64>().unwrap()
        };
        let fd = (value_at(eps) - value_at(-eps)) / (2.0 * eps);
        v.set(&orig).unwrap();
        let rel = (fd - g[at]).abs() / fd.abs().max(1e-3);
        eprintln!(
            "var {vi}[{at}]: autograd {:e}, finite difference {fd:e}, relative {rel:e}",
            g[at]
        );
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn lora_gradients_match_finite_differences_through_image_tokens_in_f64() {
    lora_gradients_match_finite_differences_through_image_tokens_in_f64_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn lora_gradients_match_finite_differences_through_image_tokens_in_f64_on_the_generic_path() {
    lora_gradients_match_finite_differences_through_image_tokens_in_f64_with(Kernels::Generic);
}

fn lora_gradients_match_finite_differences_through_image_tokens_in_f64_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let (mut model, _) = f64_llava(&[]);
    let lm = model.language_model_mut();
    lm.attach_lora(&lora_cfg(), &mut init_rng(5)).unwrap();
    let vars = lm.trainable_vars();
    assert!(vars.iter().all(|v| v.dtype() == DType::F64));
    randomise_b(&vars, 6);
    // Entries of A and B of layer 0's q_proj and v_proj and layer 1's o_proj, of layer 1's
    // gate_proj A and down_proj B (`trainable_vars` order: 14 per layer, A then B per target).
    let coords = [
        (0, 3),
        (1, 5),
        (4, 17),
        (5, 2),
        (20, 9),
        (21, 30),
        (22, 7),
        (27, 11),
    ];
    let worst = worst_fd_error(&model, &vars, &coords);
    assert!(worst < 1e-6, "worst relative error {worst:e}");
}

#[test]
fn projector_gradients_match_finite_differences_in_f64() {
    let names = [
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_1.bias",
        "multi_modal_projector.linear_2.weight",
        "multi_modal_projector.linear_2.bias",
    ];
    let (model, vars) = f64_llava(&names);
    // Every projector tensor receives a gradient, and it is not zero.
    let (ids, mask, pixels, labels) = f64_batch(&model);
    let (lp, _) = model
        .sequence_logprobs(&ids, &mask, &pixels, &labels)
        .unwrap();
    let grads = lp.sum_all().unwrap().backward().unwrap();
    for (name, v) in names.iter().zip(&vars) {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let n: f64 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0, "{name} has a zero gradient");
    }
    let coords = [(0, 0), (0, 77), (1, 5), (2, 100), (2, 1000), (3, 31)];
    let worst = worst_fd_error(&model, &vars, &coords);
    assert!(worst < 1e-6, "worst relative error {worst:e}");
}

#[test]
fn fresh_adapter_and_switch_leave_logprobs_exactly() {
    let mut vlm = load_vlm(DType::F32);
    let items = items(&vlm);
    let base = scores(&vlm, &items);
    vlm.language_model_mut()
        .attach_lora(&LoraConfig::default(), &mut init_rng(7))
        .unwrap();
    // B = 0: W x + (alpha / r) B A x adds exact zeros.
    assert_eq!(
        scores(&vlm, &items),
        base,
        "a fresh adapter changed log-probs"
    );
    let lm = vlm.language_model();
    randomise_b(&lm.trainable_vars(), 8);
    let adapted = scores(&vlm, &items);
    assert!(
        adapted.iter().zip(&base).all(|(a, b)| a != b),
        "a non-zero B left a log-prob unchanged: {adapted:?} vs {base:?}"
    );
    let switch = lm.lora_switch();
    switch.set_enabled(false);
    assert_eq!(
        scores(&vlm, &items),
        base,
        "disabled adapter is not the base"
    );
    switch.set_enabled(true);
    assert_eq!(scores(&vlm, &items), adapted, "re-enabled adapter differs");
}

#[test]
fn right_padding_does_not_change_a_sequence_logprob() {
    let mut vlm = load_vlm(DType::F32);
    let lm = vlm.language_model_mut();
    lm.attach_lora(&lora_cfg(), &mut init_rng(9)).unwrap();
    randomise_b(&lm.trainable_vars(), 10);
    let items = items(&vlm);
    let lens: Vec<usize> = items
        .iter()
        .map(|i| i.prompt_ids.len() + i.response_ids.len())
        .collect();
    assert!(lens.iter().max() > lens.iter().min(), "lengths {lens:?}");
    let batched = scores(&vlm, &items);
    for (item, b) in items.iter().zip(&batched) {
        let alone = scores(&vlm, std::slice::from_ref(item))[0];
        // Same arithmetic on a different matrix width: f32 summation order may differ a little.
        assert!(
            (alone - b).abs() <= 1e-5 * alone.abs().max(1.0),
            "padded {b} vs alone {alone}"
        );
    }
}

#[test]
fn bf16_scores_near_f32_and_generates() {
    let f32_vlm = load_vlm(DType::F32);
    let mut bf16_vlm = load_vlm(DType::BF16);
    let items = items(&f32_vlm);
    let want = scores(&f32_vlm, &items);
    let got = scores(&bf16_vlm, &items);
    // bf16 keeps 8 significant bits (~0.4 % per weight); a sum of a dozen token log-probs
    // through two layers lands well inside 5 %.
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 0.05 * w.abs(),
            "bf16 {g} vs f32 {w} (all: {got:?} vs {want:?})"
        );
    }
    let prompts: Vec<PreparedPrompt> = [
        ("hopper.jpg", "What is in the image?"),
        ("camera_gray.png", "Is there a dog in the picture?"),
    ]
    .iter()
    .map(|(i, p)| bf16_vlm.prepare_prompt(&image(i), p).unwrap())
    .collect();
    let out = bf16_vlm.generate_ids(&prompts, 8).unwrap();
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|r| !r.is_empty() && r.len() <= 8), "{out:?}");
    // An f32 adapter over the bf16 base (the 7B training setup) scores and generates too.
    let lm = bf16_vlm.language_model_mut();
    lm.attach_lora(&lora_cfg(), &mut init_rng(11)).unwrap();
    assert!(lm.trainable_vars().iter().all(|v| v.dtype() == DType::F32));
    randomise_b(&lm.trainable_vars(), 12);
    assert!(scores(&bf16_vlm, &items).iter().all(|s| s.is_finite()));
    bf16_vlm.generate_prepared(&prompts, 8).unwrap();
}

/// Gradients of `sum_s c_s log p_s` with respect to the adapters, computed in pieces as the
/// trainer's memory settings do ([`misp::model::llama::DetachedForward`]): per group of
/// sequences, without a graph first, then the head's gradient `chunk` rows at a time, then the
/// layers' through one graph or recomputed one at a time (`checkpointing`).
fn pieces_grads(
    model: &Llava,
    vars: &[Var],
    coef: &[f64],
    group: usize,
    checkpointing: bool,
    chunk: usize,
) -> Vec<Vec<f64>> {
    use misp::model::llava::Scored;
    let (ids, mask, pixels, labels) = f64_batch(model);
    let lm = model.language_model();
    let b = ids.dim(0).unwrap();
    let mut sums = GradSums::new(vars.len());
    for first in (0..b).step_by(group) {
        let n = group.min(b - first);
        let ids_g = ids.narrow(0, first, n).unwrap();
        let mask_g = mask.narrow(0, first, n).unwrap();
        let embeds = model
            .input_embeds(&ids_g, &pixels.narrow(0, first, n).unwrap())
            .unwrap();
        let fwd = lm
            .forward_detached(&embeds, &mask_g, checkpointing)
            .unwrap();
        let scored = Scored::new(&ids_g, &labels.narrow(0, first, n).unwrap()).unwrap();
        let c = Tensor::from_slice(&coef[first..first + n], n, &Device::Cpu).unwrap();
        let grad_h = lm.head_backward(&fwd.hidden, &scored, &c, chunk).unwrap();
        lm.backward_from(&fwd, &grad_h, |grads| sums.add(grads, vars))
            .unwrap();
    }
    sums.into_vecs()
}

#[test]
fn gradients_in_pieces_equal_the_batched_step_in_f64() {
    pieces_equal_batched_with(Kernels::Fused);
}

#[test]
fn gradients_in_pieces_equal_the_batched_step_in_f64_on_the_generic_path() {
    pieces_equal_batched_with(Kernels::Generic);
}

fn pieces_equal_batched_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let (mut model, _) = f64_llava(&[]);
    let lm = model.language_model_mut();
    lm.attach_lora(&lora_cfg(), &mut init_rng(7)).unwrap();
    let vars = lm.trainable_vars();
    randomise_b(&vars, 8);
    let coef = [0.7, -1.3];
    // The batched step: one graph over both sequences, one backward.
    let (ids, mask, pixels, labels) = f64_batch(&model);
    let (lp, _) = model
        .sequence_logprobs(&ids, &mask, &pixels, &labels)
        .unwrap();
    let c = Tensor::from_slice(&coef, 2, &Device::Cpu).unwrap();
    let grads = (lp * c).unwrap().sum_all().unwrap().backward().unwrap();
    let want: Vec<Vec<f64>> = vars
        .iter()
        .map(|v| {
            grads
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let scale = want.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
    assert!(scale > 0.0);
    for (group, checkpointing, chunk) in [
        (2, false, 0),
        (1, false, 0),
        (2, true, 0),
        (1, true, 0),
        (2, false, 3),
        (1, true, 2),
    ] {
        let got = pieces_grads(&model, &vars, &coef, group, checkpointing, chunk);
        let worst = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-9 * scale,
            "group {group}, checkpointing {checkpointing}, chunk {chunk}: worst {worst:e} of {scale:e}"
        );
    }
}

#[test]
fn a_recomputed_layer_draws_the_dropout_masks_of_its_first_pass() {
    // With dropout on, the pieces' gradient is still the gradient of the first pass's loss:
    // recomputing a layer under the same seed must give the same output bit for bit.
    let (mut model, _) = f64_llava(&[]);
    let cfg = LoraConfig {
        lora_dropout: 0.3,
        ..lora_cfg()
    };
    let lm = model.language_model_mut();
    lm.attach_lora(&cfg, &mut init_rng(9)).unwrap();
    randomise_b(&lm.trainable_vars(), 10);
    let switch = lm.lora_switch().clone();
    switch.set_training(true);
    let (ids, mask, pixels, _) = f64_batch(&model);
    let embeds = model.input_embeds(&ids, &pixels).unwrap();
    let lm = model.language_model();
    switch.set_dropout_seed(42);
    let a = lm.forward_detached(&embeds, &mask, true).unwrap().hidden;
    switch.set_dropout_seed(42);
    let b = lm.hidden_states(&embeds, &mask).unwrap();
    assert_eq!(
        (a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
    switch.set_dropout_seed(43);
    let c = lm.hidden_states(&embeds, &mask).unwrap();
    let moved = (c - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        moved > 0.0,
        "another seed draws other masks (dropout is on)"
    );
    switch.set_training(false);
}

//! Training gradients of misp's Qwen2.5-VL (the tiny checkpoint of `fixtures/qwen2_5_vl/`, in
//! f64), with LoRA on the language model's seven projections (PEFT's module names):
//! - autograd's gradient of a sum of response log-probs against central finite differences;
//! - the trainer's memory-saving path (forward without a graph, the head's gradient in chunks,
//!   the layers' backward through one graph or recomputed layer by layer) against one batched
//!   graph, for a batch whose two rows have images of different sizes, so different
//!   image-token counts and multimodal RoPE positions.
//!
//! Both on the fused CPU kernels and on candle's ordinary ops (`--kernels generic`).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use misp::kernels::{Kernels, ThreadKernels};
use misp::model::llama::{sequence_logprobs, Scored};
use misp::model::lora::init_rng;
use misp::model::qwen2_5_vl::image_processor::{ImagePatches, QwenImageProcessor};
use misp::model::qwen2_5_vl::Qwen2_5Vl;
use rand::{Rng, SeedableRng};
use serde_json::Value;

mod common;
use common::{lora_cfg, GradSums};

fn fixture() -> PathBuf {
    common::root().join("fixtures/qwen2_5_vl")
}

/// The photos the fixture used: its own PNGs, then the CLIP fixture's.
fn image(name: &str) -> PathBuf {
    let own = fixture().join("images").join(name);
    if own.exists() {
        own
    } else {
        common::clip_image(name)
    }
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The tiny checkpoint in f64 with fresh adapters, every `B` (odd entries of
/// `trainable_vars`) set to seeded values in `[-0.2, 0.2)`: with `B = 0` the gradient of `A`
/// is zero by construction.
fn f64_qwen(seed: u64) -> (Qwen2_5Vl, Vec<Var>) {
    let mut m = Qwen2_5Vl::load_dir(&fixture().join("tiny"), DType::F64, &Device::Cpu).unwrap();
    let lm = m.language_model_mut();
    lm.attach_lora(&lora_cfg(), &mut init_rng(seed)).unwrap();
    let vars = lm.trainable_vars();
    assert_eq!(
        vars.len(),
        2 * 7 * 2,
        "A and B of 7 projections in 2 layers"
    );
    assert!(vars.iter().all(|v| v.dtype() == DType::F64));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    for b in vars.iter().skip(1).step_by(2) {
        let v: Vec<f64> = (0..b.elem_count())
            .map(|_| rng.random_range(-0.2..0.2))
            .collect();
        b.set(&Tensor::from_vec(v, b.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    (m, vars)
}

/// Scoring samples: chat-template prompt ids with the image's tokens, response ids ending in
/// `<|im_end|>` (the ones the fixture recorded from transformers' processor), the image.
struct Sample {
    ids: Vec<u32>,
    response: usize,
    image: ImagePatches,
}

/// The fixture's camera (9 image tokens) and hopper (6) samples.
fn samples() -> Vec<Sample> {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    let want: Value = serde_json::from_str(&text).unwrap();
    let p = QwenImageProcessor::from_dir(&fixture().join("tiny")).unwrap();
    [1, 3]
        .iter()
        .map(|&i| {
            let case = &want["score"][i];
            let response = u32s(&case["response_ids"]);
            let img = p
                .decode_file(&image(case["image"].as_str().unwrap()))
                .unwrap();
            Sample {
                ids: [u32s(&case["prompt_ids"]), response.clone()].concat(),
                response: response.len(),
                image: p.patches(&img).unwrap(),
            }
        })
        .collect()
}

/// A right-padded batch of `rows`: ids, token mask, label mask (1 on each response and its
/// `<|im_end|>`), as host rows and as tensors.
struct Batch<'a> {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<bool>>,
    images: Vec<Vec<&'a ImagePatches>>,
    ids_t: Tensor,
    labels_t: Tensor,
}

fn batch<'a>(rows: &[&'a Sample]) -> Batch<'a> {
    let width = rows.iter().map(|s| s.ids.len()).max().unwrap();
    let pad = 400; // `<|endoftext|>`: padding is masked, its id never read.
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|s| {
            let mut r = s.ids.clone();
            r.resize(width, pad);
            r
        })
        .collect();
    let mask: Vec<Vec<bool>> = rows
        .iter()
        .map(|s| (0..width).map(|t| t < s.ids.len()).collect())
        .collect();
    let labels: Vec<f64> = rows
        .iter()
        .flat_map(|s| {
            let (n, first) = (s.ids.len(), s.ids.len() - s.response);
            (0..width).map(move |t| if t >= first && t < n { 1.0 } else { 0.0 })
        })
        .collect();
    let dev = Device::Cpu;
    let b = rows.len();
    Batch {
        ids_t: Tensor::from_vec(ids.concat(), (b, width), &dev).unwrap(),
        labels_t: Tensor::from_vec(labels, (b, width), &dev).unwrap(),
        images: rows.iter().map(|s| vec![&s.image]).collect(),
        ids,
        mask,
    }
}

/// Summed response log-probs `[B]` of one batched forward with a graph.
fn batched_logprobs(m: &Qwen2_5Vl, b: &Batch) -> Tensor {
    let logits = m.forward(&b.ids, &b.mask, &b.images, &Device::Cpu).unwrap();
    assert_eq!(logits.dtype(), DType::F64);
    sequence_logprobs(&logits, &b.ids_t, &b.labels_t).unwrap().0
}

fn grads_of(grads: &candle_core::backprop::GradStore, vars: &[Var]) -> Vec<Vec<f64>> {
    vars.iter()
        .map(|v| {
            grads
                .get(v)
                .expect("every adapter variable gets a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

#[test]
fn lora_gradients_match_finite_differences_in_f64() {
    lora_gradients_match_finite_differences_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn lora_gradients_match_finite_differences_in_f64_on_the_generic_path() {
    lora_gradients_match_finite_differences_with(Kernels::Generic);
}

/// Central differences with `eps = 1e-5` in f64: truncation ~eps^2, rounding ~1e-16 / eps, so
/// a correct gradient agrees to 1e-6 relative and a wrong one cannot.
fn lora_gradients_match_finite_differences_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let (m, vars) = f64_qwen(5);
    let samples = samples();
    let b = batch(&samples.iter().collect::<Vec<_>>());
    let f = || batched_logprobs(&m, &b).sum_all().unwrap();
    let grads = grads_of(&f().backward().unwrap(), &vars);
    // `trainable_vars` order: 14 per layer, A then B of q, k, v, o, gate, up, down. Entries of
    // layer 0's q (A, B), k (B) and v (A, B), layer 1's o (A, B), gate (A) and down (B).
    let coords = [
        (0, 3),
        (1, 5),
        (3, 11),
        (4, 17),
        (5, 2),
        (20, 9),
        (21, 30),
        (22, 7),
        (27, 11),
    ];
    let eps = 1e-5;
    let mut worst = 0f64;
    for (vi, at) in coords {
        let v = &vars[vi];
        let orig = v.as_tensor().copy().unwrap();
        let vals: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let value_at = |delta: f64| {
            let mut moved = vals.clone();
            moved[at] += delta;
            v.set(&Tensor::from_vec(moved, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            f().to_scalar::<f64>().unwrap()
        };
        let fd = (value_at(eps) - value_at(-eps)) / (2.0 * eps);
        v.set(&orig).unwrap();
        let g = grads[vi][at];
        let rel = (fd - g).abs() / fd.abs().max(1e-3);
        eprintln!("var {vi}[{at}]: autograd {g:e}, finite difference {fd:e}, relative {rel:e}");
        worst = worst.max(rel);
    }
    assert!(worst < 1e-6, "worst relative error {worst:e}");
}

/// Gradients of `sum_s c_s log p_s` with respect to the adapters as the trainer's memory
/// settings compute them: per group of sequences (each group padded to its own width), the
/// model's [`Qwen2_5Vl::lm_inputs`] (multimodal RoPE tables), a forward without a graph, the
/// head's gradient `chunk` rows at a time, then the layers' backward through one graph or
/// recomputed one at a time (`checkpointing`). Also returns the log-probs of that forward.
fn pieces(
    m: &Qwen2_5Vl,
    vars: &[Var],
    samples: &[Sample],
    coef: &[f64],
    group: usize,
    checkpointing: bool,
    chunk: usize,
) -> (Vec<Vec<f64>>, Vec<f64>) {
    let lm = m.language_model();
    let mut sums = GradSums::new(vars.len());
    let mut lps = Vec::new();
    for first in (0..samples.len()).step_by(group) {
        let n = group.min(samples.len() - first);
        let rows: Vec<&Sample> = samples[first..first + n].iter().collect();
        let b = batch(&rows);
        let x = m
            .lm_inputs(&b.ids, &b.mask, &b.images, &Device::Cpu)
            .unwrap();
        let fwd = lm
            .forward_detached_with_rope(&x.embeds, &x.mask, Some(&x.rope), checkpointing)
            .unwrap();
        let scored = Scored::new(&b.ids_t, &b.labels_t).unwrap();
        let lp: Vec<f64> = lm
            .scored_logprobs(&fwd.hidden, &scored, chunk)
            .unwrap()
            .to_vec1()
            .unwrap();
        lps.extend(lp);
        let c = Tensor::from_slice(&coef[first..first + n], n, &Device::Cpu).unwrap();
        let grad_h = lm.head_backward(&fwd.hidden, &scored, &c, chunk).unwrap();
        lm.backward_from(&fwd, &grad_h, |grads| sums.add(grads, vars))
            .unwrap();
    }
    (sums.into_vecs(), lps)
}

#[test]
fn gradients_in_pieces_equal_the_batched_step_in_f64() {
    pieces_equal_batched_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn gradients_in_pieces_equal_the_batched_step_in_f64_on_the_generic_path() {
    pieces_equal_batched_with(Kernels::Generic);
}

fn pieces_equal_batched_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let (m, vars) = f64_qwen(7);
    let samples = samples();
    assert_ne!(samples[0].image.patches(), samples[1].image.patches());
    let coef = [0.7, -1.3];
    // The batched step: one graph over both sequences, one backward.
    let b = batch(&samples.iter().collect::<Vec<_>>());
    let lp = batched_logprobs(&m, &b);
    let want_lp: Vec<f64> = lp.to_vec1().unwrap();
    let c = Tensor::from_slice(&coef, 2, &Device::Cpu).unwrap();
    let want = grads_of(
        &(lp * c).unwrap().sum_all().unwrap().backward().unwrap(),
        &vars,
    );
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
        let what = format!("group {group}, checkpointing {checkpointing}, chunk {chunk}");
        let (got, lps) = pieces(&m, &vars, &samples, &coef, group, checkpointing, chunk);
        for (a, w) in lps.iter().zip(&want_lp) {
            assert!(
                (a - w).abs() <= 1e-10 * w.abs().max(1.0),
                "{what}: log-prob {a} vs {w}"
            );
        }
        let worst = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{what}: worst {worst:e} of {scale:e}");
        assert!(
            worst <= 1e-9 * scale,
            "{what}: worst {worst:e} of {scale:e}"
        );
    }
}

/// Without the multimodal tables (positions `0..T`, LLaVA's) the pieces path scores the rows
/// differently: the tables are what the comparison above exercises.
#[test]
fn the_pieces_path_depends_on_the_rope_tables() {
    let (m, _) = f64_qwen(7);
    let samples = samples();
    let b = batch(&samples.iter().collect::<Vec<_>>());
    let x = m
        .lm_inputs(&b.ids, &b.mask, &b.images, &Device::Cpu)
        .unwrap();
    let lm = m.language_model();
    let scored = Scored::new(&b.ids_t, &b.labels_t).unwrap();
    let score = |rope| -> Vec<f64> {
        let fwd = lm
            .forward_detached_with_rope(&x.embeds, &x.mask, rope, false)
            .unwrap();
        lm.scored_logprobs(&fwd.hidden, &scored, 0)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (with, without) = (score(Some(&x.rope)), score(None));
    let want: Vec<f64> = batched_logprobs(&m, &b).to_vec1().unwrap();
    for ((a, p), w) in with.iter().zip(&without).zip(&want) {
        assert!((a - w).abs() < 1e-10, "{a} vs {w}");
        assert!(
            (p - w).abs() > 1e-6,
            "plain positions gave {p}, multimodal {w}"
        );
    }
}

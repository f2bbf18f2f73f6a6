//! Conformance of misp's LLaMA with transformers, and LoRA's gradients.
//!
//! The fixture `fixtures/llama/` is made by `fixtures/llama/make_fixture.py` (transformers 5.24,
//! torch 2.15 CPU; versions in `expected.json`): a tiny random `LlamaForCausalLM` with GQA
//! (4 query heads, 2 key/value heads) in HF layout, a right-padded batch and transformers'
//! per-token log-probs.
//!
//! Tolerances: log-probs and logits by max abs diff 1e-4 (misp's conformance bound; both sides compute
//! in f32, what remains is summation order, observed ~1e-6). Finite differences in f64 with
//! central steps of 1e-5: relative error 1e-5 (truncation error ~eps^2, rounding ~1e-11).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use misp::model::llama::{sequence_logprobs, token_logprobs, Llama, TensorProblem};
use misp::model::lora::{init_rng, LoraConfig};
use misp::model::ModelError;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    token_logprobs: Vec<Vec<f32>>,
    logits_0: Vec<Vec<f32>>,
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llama")
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn batch(e: &Expected) -> (Tensor, Tensor) {
    let ids = Tensor::new(e.input_ids.clone(), &Device::Cpu).unwrap();
    let mask = Tensor::new(e.attention_mask.clone(), &Device::Cpu).unwrap();
    (ids, mask)
}

fn load(dtype: DType) -> Llama {
    Llama::load_dir(&fixture().join("tiny"), dtype, &Device::Cpu).expect("fixture loads")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn per_token_logprobs_and_logits_match_transformers() {
    let e = expected();
    let model = load(DType::F32);
    assert_eq!(model.config().rope_theta(), 10000.0);
    assert_eq!(model.config().kv_heads(), 2);
    let (ids, mask) = batch(&e);
    let logits = model.forward(&ids, &mask).unwrap();
    let lp: Vec<Vec<f32>> = token_logprobs(&logits, &ids).unwrap().to_vec2().unwrap();
    let mut worst = 0f32;
    let mut compared = 0;
    for (b, row) in lp.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            // Only real next tokens: padded positions are masked by every caller.
            if e.attention_mask[b][t + 1] == 1 {
                worst = worst.max((v - e.token_logprobs[b][t]).abs());
                compared += 1;
            }
        }
    }
    eprintln!("per-token log-prob max abs diff {worst:e} over {compared} tokens");
    assert!(worst <= 1e-4, "log-prob diff {worst}");
    let want = Tensor::new(e.logits_0.clone(), &Device::Cpu).unwrap();
    let d = max_abs(&logits.get(0).unwrap(), &want);
    eprintln!("logits of sequence 0 max abs diff {d:e}");
    assert!(d <= 1e-4);
    // The log-probs are far from uniform (ln 100 = 4.6), so every module matters.
    assert!(lp[0].iter().any(|v| (v + 4.6).abs() > 1.0));
}

#[test]
fn padding_does_not_change_a_sequence_logprob() {
    let e = expected();
    let model = load(DType::F32);
    let (ids, mask) = batch(&e);
    let logits = model.forward(&ids, &mask).unwrap();
    let (sum, count) = sequence_logprobs(&logits, &ids, &mask).unwrap();
    let sum: Vec<f32> = sum.to_vec1().unwrap();
    let count: Vec<f32> = count.to_vec1().unwrap();
    for (b, m) in e.attention_mask.iter().enumerate() {
        let n = m.iter().filter(|&&v| v == 1).count();
        let alone = Tensor::new(&e.input_ids[b][..n], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let ones = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        let l = model.forward(&alone, &ones).unwrap();
        let (s, c) = sequence_logprobs(&l, &alone, &ones).unwrap();
        let s: f32 = s.get(0).unwrap().to_scalar().unwrap();
        assert_eq!(count[b], (n - 1) as f32);
        assert_eq!(
            c.get(0).unwrap().to_scalar::<f32>().unwrap(),
            (n - 1) as f32
        );
        assert!((s - sum[b]).abs() < 1e-4, "row {b}: {s} vs {}", sum[b]);
        let want: f32 = e.token_logprobs[b][..n - 1].iter().sum();
        assert!(
            (s - want).abs() < 1e-4,
            "row {b}: {s} vs transformers {want}"
        );
    }
}

#[test]
fn missing_and_misshaped_tensors_are_all_listed() {
    let dir = std::env::temp_dir().join(format!("misp-llama-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("tiny/config.json"), dir.join("config.json")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(fixture().join("tiny/model.safetensors"), &Device::Cpu)
            .unwrap();
    tensors.remove("lm_head.weight").unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    tensors.insert(
        "model.norm.weight".into(),
        Tensor::zeros(31, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = Llama::load_dir(&dir, DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    std::fs::remove_dir_all(&dir).ok();
    let ModelError::Tensors { problems, .. } = err else {
        panic!("expected a tensor error, got {msg}");
    };
    assert_eq!(problems.len(), 3, "{msg}");
    for key in ["lm_head.weight", "model.layers.1.mlp.up_proj.weight"] {
        assert!(
            problems.contains(&TensorProblem::Missing { name: key.into() }),
            "{msg}"
        );
    }
    assert!(
        msg.contains("`model.norm.weight` has shape [31], expected [32]"),
        "{msg}"
    );
}

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        ..LoraConfig::default()
    }
}

/// Sets every `B` to small random values so gradients reach every `A` too.
fn randomise_b(model: &Llama) {
    let dev = Device::Cpu;
    for (i, v) in model.trainable_vars().iter().enumerate() {
        if i % 2 == 1 {
            let t = Tensor::randn(0f64, 0.1, v.dims(), &dev)
                .unwrap()
                .to_dtype(v.dtype())
                .unwrap();
            v.set(&t).unwrap();
        }
    }
}

#[test]
fn lora_with_zero_b_is_the_base_and_the_switch_round_trips() {
    let e = expected();
    let mut model = load(DType::F32);
    let (ids, mask) = batch(&e);
    let base = model.forward(&ids, &mask).unwrap();
    model
        .attach_lora(&LoraConfig::default(), &mut init_rng(0))
        .unwrap();
    // r 64 on 7 projections of 2 layers: A and B each.
    assert_eq!(model.trainable_vars().len(), 2 * 7 * 2);
    assert_eq!(model.lora_layers().len(), 14);
    assert_eq!(max_abs(&model.forward(&ids, &mask).unwrap(), &base), 0.0);
    randomise_b(&model);
    let on = model.forward(&ids, &mask).unwrap();
    assert!(max_abs(&on, &base) > 1e-3);
    model.lora_switch().set_enabled(false);
    assert_eq!(max_abs(&model.forward(&ids, &mask).unwrap(), &base), 0.0);
    model.lora_switch().set_enabled(true);
    assert_eq!(max_abs(&model.forward(&ids, &mask).unwrap(), &on), 0.0);
}

fn loss(model: &Llama, ids: &Tensor, mask: &Tensor) -> Tensor {
    let logits = model.forward(ids, mask).unwrap();
    let (sum, _) = sequence_logprobs(&logits, ids, mask).unwrap();
    sum.sum_all().unwrap()
}

#[test]
fn every_lora_var_gets_a_nonzero_gradient() {
    let e = expected();
    let mut model = load(DType::F32);
    model.attach_lora(&lora_cfg(), &mut init_rng(3)).unwrap();
    randomise_b(&model);
    let (ids, mask) = batch(&e);
    let grads = loss(&model, &ids, &mask).backward().unwrap();
    for (i, v) in model.trainable_vars().iter().enumerate() {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("var {i} has no gradient"));
        let n: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0, "var {i} has a zero gradient");
    }
}

#[test]
fn lora_gradient_matches_finite_differences_in_f64() {
    let e = expected();
    let mut model = load(DType::F64);
    model.attach_lora(&lora_cfg(), &mut init_rng(5)).unwrap();
    randomise_b(&model);
    let (ids, mask) = batch(&e);
    let grads = loss(&model, &ids, &mask).backward().unwrap();
    let vars: Vec<Var> = model.trainable_vars();
    let eps = 1e-5;
    let mut worst = 0f64;
    // A and B of the first layer's q_proj, of the last layer's down_proj, and of a middle one.
    for (vi, flat) in [(0usize, 3usize), (1, 5), (6, 7), (9, 2), (26, 11), (27, 1)] {
        let v = &vars[vi];
        let g: Vec<f64> = grads
            .get(v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig = v.as_tensor().copy().unwrap();
        let mut vals: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let at = |vals: &[f64]| {
            v.set(&Tensor::from_slice(vals, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&model, &ids, &mask).to_scalar::<f64>().unwrap()
        };
        vals[flat] += eps;
        let up = at(&vals);
        vals[flat] -= 2.0 * eps;
        let down = at(&vals);
        v.set(&orig).unwrap();
        let fd = (up - down) / (2.0 * eps);
        let rel = (fd - g[flat]).abs() / fd.abs().max(1e-3);
        eprintln!(
            "var {vi}[{flat}]: autograd {:e}, finite diff {fd:e}, rel {rel:e}",
            g[flat]
        );
        worst = worst.max(rel);
    }
    assert!(worst < 1e-5, "worst relative error {worst}");
}

/// The cached forward (generation's path) against the uncached one on an unpadded batch: every
/// position's logits, and the last-position-only variant greedy decoding uses, split into a
/// prompt pass and a one-token step.
#[test]
fn cached_forward_and_its_last_position_match_the_full_forward() {
    let model = load(DType::F32);
    let e = expected();
    let (ids, _) = batch(&e);
    let (b, t) = ids.dims2().unwrap();
    let ones = Tensor::ones((b, t), DType::U8, &Device::Cpu).unwrap();
    let full = model.forward(&ids, &ones).unwrap();
    let embeds = model.embed_tokens(&ids).unwrap();
    let mut cache = model.new_cache(b);
    let cached = model.forward_cached(&embeds, &ones, &mut cache).unwrap();
    assert!(max_abs(&full, &cached) < 1e-4);
    let mut cache = model.new_cache(b);
    let prompt = embeds.narrow(1, 0, t - 1).unwrap();
    let first = model
        .forward_cached_last(&prompt, &ones.narrow(1, 0, t - 1).unwrap(), &mut cache)
        .unwrap();
    assert_eq!(first.dims(), [b, 1, full.dim(2).unwrap()]);
    assert!(max_abs(&first, &full.narrow(1, t - 2, 1).unwrap()) < 1e-4);
    let step = model
        .forward_cached_last(
            &embeds.narrow(1, t - 1, 1).unwrap(),
            &ones.narrow(1, t - 1, 1).unwrap(),
            &mut cache,
        )
        .unwrap();
    assert!(max_abs(&step, &full.narrow(1, t - 1, 1).unwrap()) < 1e-4);
}

/// Logits `[1, 1, V]` of `prompt` decoded alone, then after each of `steps` fed one at a time.
fn decoded_alone(model: &Llama, prompt: &[u32], steps: &[u32]) -> Vec<Tensor> {
    let dev = Device::Cpu;
    let mut cache = model.new_cache(1);
    let ids = Tensor::new(vec![prompt.to_vec()], &dev).unwrap();
    let ones = Tensor::ones((1, prompt.len()), DType::U8, &dev).unwrap();
    let embeds = model.embed_tokens(&ids).unwrap();
    let mut out = vec![model
        .forward_cached_last(&embeds, &ones, &mut cache)
        .unwrap()];
    for &tok in steps {
        out.push(step(model, &mut cache, &[tok]));
    }
    out
}

/// One cached step feeding `tokens[i]` to row `i`: `[B, 1, V]`.
fn step(model: &Llama, cache: &mut misp::model::llama::KvCache, tokens: &[u32]) -> Tensor {
    let dev = Device::Cpu;
    let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), &dev).unwrap();
    let ones = Tensor::ones((tokens.len(), 1), DType::U8, &dev).unwrap();
    model
        .forward_cached_last(&model.embed_tokens(&ids).unwrap(), &ones, cache)
        .unwrap()
}

fn row(logits: &Tensor, i: usize) -> Tensor {
    logits.narrow(0, i, 1).unwrap()
}

/// Continuous batching's cache operations: a row decoded in a batch that other rows joined
/// (of other lengths, left-padded differently) and left (reordered, the common padding
/// trimmed) gets the logits it gets decoded alone.
#[test]
fn a_row_decoded_in_a_merged_and_trimmed_batch_matches_the_row_alone() {
    let model = load(DType::F32);
    let dev = Device::Cpu;
    let (a, b, c) = (
        vec![1u32, 11, 64, 95, 15],
        vec![1u32, 32, 89, 61, 83, 69, 7, 8, 9],
        vec![1u32, 39, 50],
    );
    let (sa, sb, sc) = ([5u32, 17, 23, 42, 8], [3u32, 44, 60], [71u32, 2, 90]);
    let (ra, rb, rc) = (
        decoded_alone(&model, &a, &sa),
        decoded_alone(&model, &b, &sb),
        decoded_alone(&model, &c, &sc),
    );
    let close = |got: &Tensor, want: &Tensor, what: &str| {
        let d = max_abs(got, want);
        assert!(d < 1e-4, "{what}: max |diff| {d}");
    };

    // Row a runs alone for a step: its cache now holds one more position than its prompt.
    let mut running = model.new_cache(1);
    let ids = Tensor::new(vec![a.clone()], &dev).unwrap();
    let ones = Tensor::ones((1, a.len()), DType::U8, &dev).unwrap();
    let first = model
        .forward_cached_last(&model.embed_tokens(&ids).unwrap(), &ones, &mut running)
        .unwrap();
    close(&first, &ra[0], "a's prompt");
    close(&step(&model, &mut running, &[sa[0]]), &ra[1], "a, step 1");

    // b and c are prefilled together (c left-padded to b's 9 positions), then join a's 6.
    let mut joining = model.new_cache(2);
    let padded = vec![b.clone(), [vec![0; b.len() - c.len()], c.clone()].concat()];
    let mask: Vec<Vec<u8>> = padded
        .iter()
        .zip([b.len(), c.len()])
        .map(|(p, n)| (0..p.len()).map(|t| u8::from(t >= p.len() - n)).collect())
        .collect();
    let logits = model
        .forward_cached_last(
            &model
                .embed_tokens(&Tensor::new(padded, &dev).unwrap())
                .unwrap(),
            &Tensor::new(mask, &dev).unwrap(),
            &mut joining,
        )
        .unwrap();
    close(&row(&logits, 0), &rb[0], "b's prompt");
    close(&row(&logits, 1), &rc[0], "c's prompt");
    running.append_rows(joining).unwrap();
    assert_eq!(running.rows(), 3);
    let logits = step(&model, &mut running, &[sa[1], sb[0], sc[0]]);
    close(&row(&logits, 0), &ra[2], "a, step 2, merged");
    close(&row(&logits, 1), &rb[1], "b, step 1, merged");
    close(&row(&logits, 2), &rc[1], "c, step 1, merged");

    // b leaves; c and a go on, in that order (their leading padding columns are dropped).
    running.keep_rows(&[2, 0]).unwrap();
    assert_eq!(running.rows(), 2);
    let logits = step(&model, &mut running, &[sc[1], sa[2]]);
    close(&row(&logits, 0), &rc[2], "c, step 2, after b left");
    close(&row(&logits, 1), &ra[3], "a, step 3, after b left");
    // d, shorter than the running rows, joins them (now the joining rows are padded).
    let d = [1u32, 45];
    let sd = [12u32];
    let rd = decoded_alone(&model, &d, &sd);
    let mut joining = model.new_cache(1);
    let ones = Tensor::ones((1, d.len()), DType::U8, &dev).unwrap();
    let ids = Tensor::new(vec![d.to_vec()], &dev).unwrap();
    let first = model
        .forward_cached_last(&model.embed_tokens(&ids).unwrap(), &ones, &mut joining)
        .unwrap();
    close(&first, &rd[0], "d's prompt");
    running.append_rows(joining).unwrap();
    let logits = step(&model, &mut running, &[sc[2], sa[3], sd[0]]);
    close(&row(&logits, 0), &rc[3], "c, step 3, after d joined");
    close(&row(&logits, 2), &rd[1], "d, step 1, joined");
    // a and c leave; d alone in the batch.
    running.keep_rows(&[2]).unwrap();
    assert_eq!(running.rows(), 1);

    assert!(running.keep_rows(&[1]).is_err(), "a row the cache lacks");
}

//! `misp bench model`: the LoRA model's speed figures (LoRA forward + backward and greedy
//! generation tokens/s, peak RSS), on one checkpoint: LLaVA or Qwen2.5-VL, as its
//! `config.json`'s `model_type` says.
//!
//! 1. A LoRA training step's forward + backward: an unpadded batch of `--batch`
//!    sequences of `--seq-len` tokens (BOS, the image's tokens, random text), each with its own
//!    image, the summed response log-prob differentiated into every LoRA `A` and `B` (dropout on,
//!    as the trainer runs it). No optimiser step: that is the same elementwise work everywhere.
//! 2. Greedy generation with the KV cache: `--gen-batch` prompts of `--prompt-len` tokens,
//!    exactly `--new-tokens` new tokens each (no EOS can stop a row, so every implementation
//!    compared does the same work).
//!
//! Inputs are synthetic (random ids and pixels): the time does not depend on the values, and
//! no tokenizer is needed. Every figure is the fastest of `--repeat` runs after one warm-up.
//! `bench/lora_step_vs_transformers.py` runs this against transformers + peft on the same
//! checkpoint and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use misp::model::generate::greedy;
use misp::model::llama::Llama;
use misp::model::llava::Llava;
use misp::model::lora::{init_rng, LoraConfig};
use misp::model::qwen2_5_vl::image_processor::ImagePatches;
use misp::model::qwen2_5_vl::Qwen2_5Vl;
use misp::model::vlm::{model_type, qwen_item_logprobs, PreparedScore};
use rand::{Rng, SeedableRng};

#[derive(Args)]
pub struct BenchModelArgs {
    /// HF checkpoint folder (config.json + safetensors): LLaVA or Qwen2.5-VL.
    #[arg(long)]
    model: PathBuf,
    /// Sequences of the training step (DPO with K = 3 negatives scores K + 2 = 5).
    #[arg(long, default_value_t = 5)]
    batch: usize,
    /// Tokens of each training sequence, image tokens included.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Rows of the generation batch.
    #[arg(long, default_value_t = 5)]
    gen_batch: usize,
    /// Prompt tokens of each generation row, image tokens included.
    #[arg(long, default_value_t = 96)]
    prompt_len: usize,
    /// New tokens generated per row.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// LoRA rank (alpha is twice the rank, as docs/design.md §4's r 64 / alpha 128).
    #[arg(long, default_value_t = 64)]
    rank: usize,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f32,
    /// Qwen2.5-VL: each image's side in pixels, rounded down to whole merge units (224 with
    /// patch 14 and merge 2: 64 image tokens) [default: the largest square whose tokens fill
    /// at most half of the shorter of --seq-len and --prompt-len].
    #[arg(long)]
    image_size: Option<usize>,
    /// Base weights' dtype: f32 or bf16 (LoRA stays f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed runs of each measurement after the warm-up (the fastest is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also print the figures as one JSON line (what the comparison script reads).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: crate::runtime::RuntimeArgs,
}

/// Seconds of the fastest of `repeat` runs of `f`, after one untimed warm-up run (first-touch
/// allocations and thread-pool start-up are not what is being measured).
fn time_min(repeat: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// `len` ids: BOS, `image_tokens` image placeholders, then random text ids that are neither
/// special (0..3) nor the image token.
fn sequence(rng: &mut impl Rng, len: usize, image_tokens: usize, img: u32, vocab: u32) -> Vec<u32> {
    let mut ids = Vec::with_capacity(len);
    ids.push(1);
    ids.extend(std::iter::repeat_n(img, image_tokens));
    while ids.len() < len {
        let t = rng.random_range(3..vocab);
        if t != img {
            ids.push(t);
        }
    }
    ids
}

fn random_pixels(rng: &mut impl Rng, n: usize, size: usize) -> anyhow::Result<Tensor> {
    let v: Vec<f32> = (0..n * 3 * size * size)
        .map(|_| rng.random_range(-1.5f32..1.5))
        .collect();
    // Host pixels; the model moves them to its device.
    Ok(Tensor::from_vec(v, (n, 3, size, size), &Device::Cpu)?)
}

pub fn run(a: BenchModelArgs) -> anyhow::Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => anyhow::bail!("--dtype {other:?}: expected f32, bf16 or f16"),
    };
    let dev = a.runtime.apply()?;
    let lora = LoraConfig {
        r: a.rank,
        lora_alpha: 2.0 * a.rank as f64,
        lora_dropout: a.lora_dropout,
        ..LoraConfig::default()
    };
    if model_type(&a.model)? == "qwen2_5_vl" {
        bench_qwen(&a, dtype, &dev, &lora)
    } else {
        if a.image_size.is_some() {
            anyhow::bail!("--image-size: LLaVA's image size is its config's `image_size`");
        }
        bench_llava(&a, dtype, &dev, &lora)
    }
}

/// `--seq-len` and `--prompt-len` must hold a first token, the image's tokens and some text.
fn check_lengths(a: &BenchModelArgs, n_img: usize) -> anyhow::Result<()> {
    let min_len = n_img + 2;
    if a.seq_len < min_len || a.prompt_len < min_len {
        anyhow::bail!(
            "--seq-len {} / --prompt-len {}: need at least {min_len} (BOS, {n_img} image tokens, text)",
            a.seq_len,
            a.prompt_len
        );
    }
    Ok(())
}

/// 0/1 weights `[b, t]` marking the second half of each sequence: the scored response.
fn second_half(b: usize, t: usize) -> Vec<f32> {
    (0..b)
        .flat_map(|_| (0..t).map(move |i| if i >= t / 2 { 1.0 } else { 0.0 }))
        .collect()
}

fn bench_llava(
    a: &BenchModelArgs,
    dtype: DType,
    dev: &Device,
    lora: &LoraConfig,
) -> anyhow::Result<()> {
    let mut model = Llava::load_dir(&a.model, dtype, dev)
        .with_context(|| format!("loading {}", a.model.display()))?;
    model
        .language_model_mut()
        .attach_lora(lora, &mut init_rng(a.seed))?;
    let cfg = model.config().clone();
    let (n_img, img) = (cfg.image_tokens(), cfg.image_token_index);
    let vocab = cfg.text_config.vocab_size as u32;
    let size = cfg.vision_config.image_size;
    check_lengths(a, n_img)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);

    let (b, t) = (a.batch, a.seq_len);
    let ids: Vec<u32> = (0..b)
        .flat_map(|_| sequence(&mut rng, t, n_img, img, vocab))
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), dev)?;
    let mask = Tensor::ones((b, t), DType::U8, dev)?;
    let labels = Tensor::from_vec(second_half(b, t), (b, t), dev)?;
    let pixels = random_pixels(&mut rng, b, size)?;
    let prompts: Vec<Vec<u32>> = (0..a.gen_batch)
        .map(|_| sequence(&mut rng, a.prompt_len, n_img, img, vocab))
        .collect();
    let gen_pixels = random_pixels(&mut rng, a.gen_batch, size)?;

    let figures = measure(
        a,
        model.language_model(),
        || Ok(model.sequence_logprobs(&ids, &mask, &pixels, &labels)?.0),
        || Ok(greedy(&model, &prompts, &gen_pixels, &[], 0, a.new_tokens)?),
    )?;
    let tc = &cfg.text_config;
    report(
        a,
        &format!(
            "{} layers, hidden {}, {n_img} image tokens",
            tc.num_hidden_layers, tc.hidden_size
        ),
        figures,
    );
    Ok(())
}

/// Each sequence's image is a square of random patches: `--image-size` pixels a side (rounded
/// down to whole merge units), or else the largest square of merge units that fills at most
/// half of the shorter of `--seq-len` and `--prompt-len`.
fn bench_qwen(
    a: &BenchModelArgs,
    dtype: DType,
    dev: &Device,
    lora: &LoraConfig,
) -> anyhow::Result<()> {
    let mut model = Qwen2_5Vl::load_dir(&a.model, dtype, dev)
        .with_context(|| format!("loading {}", a.model.display()))?;
    model
        .language_model_mut()
        .attach_lora(lora, &mut init_rng(a.seed))?;
    let cfg = model.config().clone();
    let (img, vocab) = (cfg.image_token_id, cfg.text.vocab_size as u32);
    let merge = cfg.vision.spatial_merge_size;
    let side = match a.image_size {
        Some(px) => px / (cfg.vision.patch_size * merge),
        None => ((a.seq_len.min(a.prompt_len) / 2) as f64).sqrt().floor() as usize,
    };
    if side == 0 {
        anyhow::bail!(
            "no room for an image: --image-size needs at least one {0} x {0} merge unit, \
             --seq-len / --prompt-len at least 2 tokens",
            cfg.vision.patch_size * merge
        );
    }
    let n_img = side * side;
    check_lengths(a, n_img)?;
    let grid = side * merge;
    let patch_values = grid * grid * cfg.vision.patch_dim();
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let image = |rng: &mut rand::rngs::StdRng| ImagePatches {
        pixels: (0..patch_values)
            .map(|_| rng.random_range(-1.5f32..1.5))
            .collect(),
        grid_h: grid,
        grid_w: grid,
    };

    let (b, t) = (a.batch, a.seq_len);
    let items: Vec<PreparedScore> = (0..b)
        .map(|_| {
            let mut ids = sequence(&mut rng, t, n_img, img, vocab);
            let response = ids.split_off(t / 2);
            PreparedScore {
                prompt_ids: ids,
                response_ids: response,
                pixels: image(&mut rng).pixels,
                grid: Some((grid, grid)),
            }
        })
        .collect();
    let refs: Vec<&PreparedScore> = items.iter().collect();
    let prompts: Vec<Vec<u32>> = (0..a.gen_batch)
        .map(|_| sequence(&mut rng, a.prompt_len, n_img, img, vocab))
        .collect();
    let patches: Vec<ImagePatches> = (0..a.gen_batch).map(|_| image(&mut rng)).collect();
    let images: Vec<Vec<&ImagePatches>> = patches.iter().map(|p| vec![p]).collect();

    let figures = measure(
        a,
        model.language_model(),
        || Ok(qwen_item_logprobs(&model, &refs, 0, dev)?.0),
        || Ok(model.greedy(&prompts, &images, &[], 0, a.new_tokens, dev)?),
    )?;
    let tc = &cfg.text;
    report(
        a,
        &format!(
            "Qwen2.5-VL: {} layers, hidden {}, {n_img} image tokens of a {grid} x {grid} patch grid",
            tc.num_hidden_layers, tc.hidden_size
        ),
        figures,
    );
    Ok(())
}

/// The timing skeleton every backbone shares. `step`: a training forward of the batch, each
/// sequence's summed response log-prob (with its graph); `generate`: one greedy run, each row's
/// new ids.
fn measure(
    a: &BenchModelArgs,
    lm: &Llama,
    step: impl Fn() -> anyhow::Result<Tensor>,
    generate: impl Fn() -> anyhow::Result<Vec<Vec<u32>>>,
) -> anyhow::Result<Figures> {
    let vars = lm.trainable_vars();
    let lora_params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let switch = lm.lora_switch().clone();

    // 1. Forward + backward, dropout on as the trainer runs it.
    switch.set_training(true);
    // One instrumented step first: what the autograd graph holds once the forward is done
    // (every intermediate stays referenced by the loss until backward) and the peak of the
    // whole step, both above the resident set before it. This is what bench/README.md's 7B
    // activation estimate is checked against.
    let before = misp::rss::current_mib();
    let load_peak = misp::rss::peak_mib();
    let peak_reset = misp::rss::reset_peak();
    let (graph_mib, step_peak_mib) = {
        let loss = step()?.sum_all()?;
        let after_forward = misp::rss::current_mib();
        let _grads = loss.backward()?;
        let peak = misp::rss::peak_mib().filter(|_| peak_reset);
        (
            before.zip(after_forward).map(|(b, a)| a - b),
            before.zip(peak).map(|(b, p)| p - b),
        )
    };
    let mut n = 0u64;
    let t_step = time_min(a.repeat, || {
        n += 1;
        switch.set_dropout_seed(n);
        let grads = step()?.sum_all()?.backward()?;
        for v in &vars {
            grads
                .get(v)
                .context("a LoRA variable received no gradient")?;
        }
        Ok(())
    })?;
    switch.set_training(false);

    // 2. Greedy generation; the backbones are given no EOS, so no row stops early.
    let t_gen = time_min(a.repeat, || {
        let out = generate()?;
        if out.iter().any(|r| r.len() != a.new_tokens) {
            anyhow::bail!("a row stopped before {} new tokens", a.new_tokens);
        }
        Ok(())
    })?;
    Ok(Figures {
        t_step,
        train_tokens: a.batch * a.seq_len,
        t_gen,
        graph_mib,
        step_peak_mib,
        load_peak,
        lora_params,
    })
}

/// What one run measured.
struct Figures {
    t_step: f64,
    train_tokens: usize,
    t_gen: f64,
    graph_mib: Option<f64>,
    step_peak_mib: Option<f64>,
    /// Peak RSS up to the end of loading.
    load_peak: Option<f64>,
    lora_params: usize,
}

/// Prints the figures (`shape`: the model's size in words), and one JSON line with `--json`.
fn report(a: &BenchModelArgs, shape: &str, f: Figures) {
    let Figures {
        t_step,
        train_tokens,
        t_gen,
        graph_mib,
        step_peak_mib,
        load_peak,
        lora_params,
    } = f;
    let (b, t) = (a.batch, a.seq_len);
    let train_tps = train_tokens as f64 / t_step;
    let gen_tps = (a.gen_batch * a.new_tokens) as f64 / t_gen;
    // The whole process's peak: loading's (read before the reset) or the runs' since.
    let peak = match (load_peak, misp::rss::peak_mib()) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "misp bench model: {} ({shape}), {} weights, \
         LoRA r {} on 7 targets ({lora_params} params), {threads} threads",
        a.model.display(),
        a.dtype,
        a.rank
    );
    println!(
        "forward+backward  batch {b} x {t} tokens        {t_step:.4} s  {train_tps:.1} tokens/s"
    );
    println!(
        "greedy generate   batch {} x {} new (prompt {})  {t_gen:.4} s  {gen_tps:.1} tokens/s",
        a.gen_batch, a.new_tokens, a.prompt_len
    );
    let mib = |v: Option<f64>| v.map_or("unavailable".into(), |m| format!("{m:.1} MiB"));
    println!(
        "first step: graph kept after forward {}, step peak {} (above the RSS before it)",
        mib(graph_mib),
        mib(step_peak_mib)
    );
    println!("peak RSS (VmHWM, whole process)  {}", mib(peak));
    if a.json {
        let j = serde_json::json!({
            "train_seconds": t_step,
            "train_tokens_per_s": train_tps,
            "generate_seconds": t_gen,
            "generate_tokens_per_s": gen_tps,
            "peak_rss_mib": peak,
            "graph_kept_mib": graph_mib,
            "step_peak_mib": step_peak_mib,
            "lora_params": lora_params,
        });
        println!("{j}");
    }
}

//! `misp bench conformance`: misp's LLaVA against transformers' per-token log-probs on a
//! fixture (`fixtures/llava/`, made by its `make_fixture.py`), on any device and dtype, with
//! the binary a user runs. The test suite checks the same fixture on the CPU in f32; this
//! command is how a CUDA build is checked on a GPU machine, where there is no Rust toolchain
//! to run the tests (`bench/gpu/check.sh`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use clap::{Args, ValueEnum};
use misp::model::llava::{token_logprobs, Llava};
use serde::Deserialize;

use crate::runtime::RuntimeArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
pub struct BenchConformanceArgs {
    /// A LLaVA fixture folder: `tiny/` (the checkpoint) and `expected.json` (input ids,
    /// attention mask, pixels and transformers' per-token log-probs).
    #[arg(long, default_value = "fixtures/llava")]
    fixture: PathBuf,
    /// Weights' and activations' dtype (the fixture's reference is f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// Largest admitted per-token log-prob difference [default: 1e-4 in f32, 0.1 in bf16 /
    /// f16, whose 8- and 11-bit mantissas round every product].
    #[arg(long)]
    tolerance: Option<f32>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Deserialize)]
struct Expected {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    pixels: Vec<Vec<Vec<Vec<f32>>>>,
    token_logprobs: Vec<Vec<f32>>,
}

pub fn run(args: BenchConformanceArgs) -> anyhow::Result<()> {
    let device = args.runtime.apply()?;
    let (dtype, default_tol) = match args.dtype {
        Dtype::F32 => (DType::F32, 1e-4),
        Dtype::Bf16 => (DType::BF16, 0.1),
        Dtype::F16 => (DType::F16, 0.1),
    };
    let tolerance = args.tolerance.unwrap_or(default_tol);
    let path = args.fixture.join("expected.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let e: Expected =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let Some(side) = e.pixels.first().and_then(|c| c.first()).map(|p| p.len()) else {
        bail!("{}: `pixels` is empty", path.display());
    };
    let flat: Vec<f32> = e
        .pixels
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .copied()
        .collect();
    let pixels =
        Tensor::from_vec(flat, (e.pixels.len(), 3, side, side), &device)?.to_dtype(dtype)?;
    let ids = Tensor::new(e.input_ids.clone(), &device)?;
    let mask = Tensor::new(e.attention_mask.clone(), &device)?;
    let model = Llava::load_dir(&args.fixture.join("tiny"), dtype, &device)
        .with_context(|| format!("loading {}", args.fixture.join("tiny").display()))?;
    let logits = model.forward(&ids, &mask, &pixels)?;
    let lp: Vec<Vec<f32>> = token_logprobs(&logits, &ids)?
        .to_dtype(DType::F32)?
        .to_vec2()?;
    let (mut worst, mut sum, mut n) = (0f32, 0f64, 0usize);
    for (b, row) in lp.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            if e.attention_mask[b].get(t + 1) == Some(&1) {
                let d = (v - e.token_logprobs[b][t]).abs();
                worst = worst.max(if d.is_nan() { f32::INFINITY } else { d });
                sum += d as f64;
                n += 1;
            }
        }
    }
    let verdict = if worst <= tolerance { "pass" } else { "FAIL" };
    println!(
        "{verdict}: {} on {} ({:?}, {:?} kernels): per-token log-probs vs transformers over {n} tokens: max abs diff {worst:.3e}, mean {:.3e} (tolerance {tolerance:e})",
        args.fixture.display(),
        misp::device::name(&device),
        args.dtype,
        misp::kernels::kernels(),
        sum / n.max(1) as f64,
    );
    if worst > tolerance {
        bail!("log-probs differ from transformers by {worst:e} > {tolerance:e}");
    }
    Ok(())
}

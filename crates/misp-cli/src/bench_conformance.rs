//! `misp bench conformance`: misp's per-token log-probs against transformers' on a fixture,
//! on any device and dtype, with the binary a user runs: LLaVA (`fixtures/llava/`, made by its
//! `make_fixture.py`) or Qwen2.5-VL (`fixtures/qwen2_5_vl/`, its `make_fixtures.py`: four photos
//! of different sizes, each a prompt and response through the chat template), as the fixture
//! checkpoint's `model_type` says. The test suite checks the same fixture on the CPU in f32; this
//! command is how a CUDA build is checked on a GPU machine, where there is no Rust toolchain
//! to run the tests (`bench/gpu/check.sh`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use clap::{Args, ValueEnum};
use misp::model::llama::token_logprobs;
use misp::model::llava::Llava;
use misp::model::qwen2_5_vl::image_processor::QwenImageProcessor;
use misp::model::qwen2_5_vl::Qwen2_5Vl;
use misp::model::vlm::model_type;
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
    /// A fixture folder: `tiny/` (the checkpoint) and `expected.json` (LLaVA: input ids,
    /// attention mask, pixels and transformers' per-token log-probs; Qwen2.5-VL: per photo the
    /// prompt and response ids and transformers' per-token log-probs, the photos in `images/`
    /// or the CLIP fixture's `../clip/images/`).
    #[arg(long, default_value = "fixtures/llava")]
    fixture: PathBuf,
    /// Weights' and activations' dtype (the fixture's reference is f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// Largest admitted per-token log-prob difference [default: 1e-4 in f32; in bf16 / f16,
    /// whose 8- and 11-bit mantissas round every product, 0.1 for LLaVA and 0.25 for the
    /// Qwen2.5-VL fixture, whose wider weights move more: transformers' own bf16 run is 0.112
    /// from its f32 there (`bf16.json`, made by `make_bf16_reference.py`)].
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
    let qwen = model_type(&args.fixture.join("tiny"))? == "qwen2_5_vl";
    let (dtype, default_tol) = match (args.dtype, qwen) {
        (Dtype::F32, _) => (DType::F32, 1e-4),
        (Dtype::Bf16, false) => (DType::BF16, 0.1),
        (Dtype::F16, false) => (DType::F16, 0.1),
        (Dtype::Bf16, true) => (DType::BF16, 0.25),
        (Dtype::F16, true) => (DType::F16, 0.25),
    };
    let tolerance = args.tolerance.unwrap_or(default_tol);
    let Diffs { worst, sum, n } = if qwen {
        qwen_diffs(&args.fixture, dtype, &device)?
    } else {
        llava_diffs(&args.fixture, dtype, &device)?
    };
    let verdict = if worst <= tolerance { "pass" } else { "FAIL" };
    println!(
        "{verdict}: {} on {} ({:?}, {:?} kernels): per-token log-probs vs transformers over {n} tokens: max abs diff {worst:.3e}, mean {:.3e} (tolerance {tolerance:e})",
        args.fixture.display(),
        misp::device::name(&device),
        args.dtype,
        misp::kernels::kernels(),
        sum / n.max(1) as f64,
    );
    if dtype == DType::BF16 {
        if let Some(r) = reference_bf16(&args.fixture)? {
            println!(
                "for scale: transformers' own bf16 run is {:.3e} (worst) / {:.3e} (mean) from its f32 on this fixture",
                r.worst_vs_f32, r.mean_vs_f32
            );
        }
    }
    if worst > tolerance {
        bail!("log-probs differ from transformers by {worst:e} > {tolerance:e}");
    }
    Ok(())
}

/// `bf16.json` of a fixture that has one: transformers' own bf16 error.
#[derive(Deserialize)]
struct ReferenceBf16 {
    worst_vs_f32: f32,
    mean_vs_f32: f32,
}

fn reference_bf16(fixture: &Path) -> anyhow::Result<Option<ReferenceBf16>> {
    let path = fixture.join("bf16.json");
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let r = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(r))
}

/// Running worst and sum of absolute differences; a NaN counts as infinitely far.
#[derive(Default)]
struct Diffs {
    worst: f32,
    sum: f64,
    n: usize,
}

impl Diffs {
    fn add(&mut self, got: f32, want: f32) {
        let d = (got - want).abs();
        self.worst = self.worst.max(if d.is_nan() { f32::INFINITY } else { d });
        self.sum += d as f64;
        self.n += 1;
    }
}

fn read_expected<T: serde::de::DeserializeOwned>(fixture: &Path) -> anyhow::Result<T> {
    let path = fixture.join("expected.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn llava_diffs(
    fixture: &Path,
    dtype: DType,
    device: &candle_core::Device,
) -> anyhow::Result<Diffs> {
    let path = fixture.join("expected.json");
    let e: Expected = read_expected(fixture)?;
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
        Tensor::from_vec(flat, (e.pixels.len(), 3, side, side), device)?.to_dtype(dtype)?;
    let ids = Tensor::new(e.input_ids.clone(), device)?;
    let mask = Tensor::new(e.attention_mask.clone(), device)?;
    let tiny = fixture.join("tiny");
    let model = Llava::load_dir(&tiny, dtype, device)
        .with_context(|| format!("loading {}", tiny.display()))?;
    let logits = model.forward(&ids, &mask, &pixels)?;
    let lp: Vec<Vec<f32>> = token_logprobs(&logits, &ids)?
        .to_dtype(DType::F32)?
        .to_vec2()?;
    let mut d = Diffs::default();
    for (b, row) in lp.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            if e.attention_mask[b].get(t + 1) == Some(&1) {
                d.add(*v, e.token_logprobs[b][t]);
            }
        }
    }
    Ok(d)
}

/// One scored photo of the Qwen2.5-VL fixture.
#[derive(Deserialize)]
struct QwenCase {
    image: String,
    prompt_ids: Vec<u32>,
    response_ids: Vec<u32>,
    /// `log p(ids[t] | ids[<t])` for every `t >= 1` of prompt + response.
    token_logprobs: Vec<f32>,
}

#[derive(Deserialize)]
struct QwenExpected {
    score: Vec<QwenCase>,
}

/// Each photo of the Qwen2.5-VL fixture through the fixture's own processor and the model,
/// one sequence at a time, as transformers scored it.
fn qwen_diffs(fixture: &Path, dtype: DType, device: &candle_core::Device) -> anyhow::Result<Diffs> {
    let e: QwenExpected = read_expected(fixture)?;
    let tiny = fixture.join("tiny");
    let model = Qwen2_5Vl::load_dir(&tiny, dtype, device)
        .with_context(|| format!("loading {}", tiny.display()))?;
    let processor = QwenImageProcessor::from_dir(&tiny)
        .with_context(|| format!("reading the image processor of {}", tiny.display()))?;
    let mut d = Diffs::default();
    for case in &e.score {
        // The fixture keeps the photos it made; the others are the CLIP fixture's.
        let own = fixture.join("images").join(&case.image);
        let path = if own.exists() {
            own
        } else {
            fixture.join("../clip/images").join(&case.image)
        };
        let rgb = processor
            .decode_file(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let patches = processor
            .patches(&rgb)
            .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
        let ids = [case.prompt_ids.as_slice(), &case.response_ids].concat();
        if case.token_logprobs.len() + 1 != ids.len() {
            bail!(
                "{}: {}: {} token_logprobs for {} ids (expected one fewer)",
                fixture.join("expected.json").display(),
                case.image,
                case.token_logprobs.len(),
                ids.len()
            );
        }
        let logits = model.forward(
            std::slice::from_ref(&ids),
            &[vec![true; ids.len()]],
            &[vec![&patches]],
            device,
        )?;
        let labels = Tensor::new(vec![ids.clone()], device)?;
        let lp: Vec<Vec<f32>> = token_logprobs(&logits, &labels)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        for (got, want) in lp[0].iter().zip(&case.token_logprobs) {
            d.add(*got, *want);
        }
    }
    Ok(d)
}

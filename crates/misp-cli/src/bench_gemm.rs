//! `misp bench gemm`: the bf16 products of a frozen linear layer (`x W^T` forward, `g W` for
//! the input's gradient) on misp's AVX-512 BF16 kernel against candle's matmul (which widens
//! bf16 to f32), on a 7B layer's shapes by default. `bench/memory/gemm_vs_torch.py` runs it
//! next to `torch.matmul` on the same shapes. Threads: `RAYON_NUM_THREADS` (every core by
//! default), as for every command.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use misp::kernels::{bf16_gemm, input_grad, linear};

#[derive(Args)]
pub struct BenchGemmArgs {
    /// Rows of the activations (a 7B-width DPO step: 5 sequences, 3510 tokens).
    #[arg(long, default_value_t = 3510)]
    tokens: usize,
    /// Weights as IN x OUT, comma-separated [default: a LLaMA-7B layer's: q/k/v/o, gate/up,
    /// down].
    #[arg(long, default_value = "4096x4096,4096x11008,11008x4096")]
    shapes: String,
    /// Timed repetitions of each product (the fastest and the median are reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print one JSON line per product as well.
    #[arg(long)]
    json: bool,
}

fn parse_shapes(s: &str) -> anyhow::Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|one| {
            let (i, o) = one
                .trim()
                .split_once('x')
                .with_context(|| format!("--shapes: {one:?} is not IN x OUT"))?;
            let i: usize = i.parse().with_context(|| format!("--shapes: {one:?}"))?;
            let o: usize = o.parse().with_context(|| format!("--shapes: {one:?}"))?;
            if i == 0 || o == 0 {
                bail!("--shapes: {one:?} has a zero dimension");
            }
            Ok((i, o))
        })
        .collect()
}

/// One way of taking a product, timed by [`time`].
type Product<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;

/// Deterministic values in [-1, 1) as a bf16 tensor.
fn values(shape: (usize, usize), seed: u64) -> anyhow::Result<Tensor> {
    let mut s = seed;
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::BF16)?)
}

/// Seconds of each of `repeat` runs of `f`, and its last result.
fn time(
    repeat: usize,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> anyhow::Result<(Vec<f64>, Tensor)> {
    let mut secs = Vec::with_capacity(repeat);
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let y = f()?;
        secs.push(t.elapsed().as_secs_f64());
        last = Some(y);
    }
    secs.sort_by(f64::total_cmp);
    Ok((secs, last.expect("at least one run")))
}

/// Largest |a - b| over the largest |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let s = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / s.max(f32::MIN_POSITIVE))
}

pub fn run(a: BenchGemmArgs) -> anyhow::Result<()> {
    let shapes = parse_shapes(&a.shapes)?;
    let supported = bf16_gemm::supported();
    if !supported {
        eprintln!("note: this CPU has no AVX-512 BF16; only candle's matmul is timed");
    }
    println!(
        "bf16 products, {} rows, {} threads, {} runs each (fastest / median s, GFLOP/s of the fastest)",
        a.tokens,
        candle_core::utils::get_num_threads(),
        a.repeat
    );
    println!(
        "{:<12} {:<9} {:>20} {:>20} {:>8} {:>10}",
        "weight", "product", "candle matmul", "misp bf16 kernel", "speedup", "rel diff"
    );
    for (inp, out) in shapes {
        let x = values((a.tokens, inp), 1)?;
        let g = values((a.tokens, out), 2)?;
        let w = values((out, inp), 3)?;
        let flops = 2.0 * a.tokens as f64 * inp as f64 * out as f64;
        let products: [(&str, Product, Product); 2] = [
            (
                "x W^T",
                Box::new(|| x.matmul(&w.t()?)),
                Box::new(|| linear(&x, &w)),
            ),
            (
                "g W",
                Box::new(|| g.matmul(&w)),
                Box::new(|| input_grad(&g, &w)),
            ),
        ];
        for (name, candle, misp) in products {
            bf16_gemm::set_enabled(false);
            let (c, yc) = time(a.repeat, candle)?;
            bf16_gemm::set_enabled(true);
            let m = if supported {
                Some(time(a.repeat, misp)?)
            } else {
                None
            };
            let med = |s: &[f64]| s[s.len() / 2];
            let cell =
                |s: &[f64]| format!("{:.3} / {:.3} ({:.0})", s[0], med(s), flops / s[0] / 1e9);
            let (mcell, speedup, diff) = match &m {
                Some((s, ym)) => (
                    cell(s),
                    format!("{:.2}x", c[0] / s[0]),
                    format!("{:.1e}", rel_diff(ym, &yc)?),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            println!(
                "{:<12} {:<9} {:>20} {:>20} {:>8} {:>10}",
                format!("{inp}x{out}"),
                name,
                cell(&c),
                mcell,
                speedup,
                diff
            );
            if a.json {
                let row = serde_json::json!({
                    "tokens": a.tokens, "in": inp, "out": out, "product": name,
                    "threads": candle_core::utils::get_num_threads(),
                    "candle_s": c, "misp_s": m.as_ref().map(|(s, _)| s.clone()),
                });
                println!("{row}");
            }
        }
    }
    Ok(())
}

//! `--device` and `--kernels`: where a command's models run and on which implementation, shared
//! by every command that runs a model (embed, score, generate, eval, train, world pretrain,
//! bench model) and passed on by `demo`.

use anyhow::Context;
use candle_core::Device;
use clap::{Args, ValueEnum};
use misp::kernels::{set_kernels, Kernels};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelsArg {
    /// misp's CPU kernels with their written-out backward passes (CPU only).
    Fused,
    /// candle's ordinary ops, composed: the path a GPU runs, also on the CPU.
    Generic,
}

#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Where the model runs: cpu, cuda or cuda:N [default: $MISP_DEVICE, else cpu]. CUDA needs
    /// a binary built with `--features cuda`.
    #[arg(long)]
    pub device: Option<String>,
    /// Kernels of the model's element-wise, attention and LoRA stretches [default: fused on
    /// the CPU, generic on a GPU].
    #[arg(long, value_enum)]
    pub kernels: Option<KernelsArg>,
}

impl RuntimeArgs {
    /// Resolves the device and puts the kernels in force for this process. `--kernels fused`
    /// on a GPU falls back to the generic path, said once.
    pub fn apply(&self) -> anyhow::Result<Device> {
        let device =
            misp::device::resolve(self.device.as_deref()).context("choosing the device")?;
        let kernels = match (self.kernels, device.is_cpu()) {
            (Some(KernelsArg::Generic), _) => Kernels::Generic,
            (Some(KernelsArg::Fused), false) => {
                eprintln!(
                    "note: --kernels fused runs on the CPU only; {} runs the generic path",
                    misp::device::name(&device)
                );
                Kernels::Generic
            }
            (_, true) => Kernels::Fused,
            (None, false) => Kernels::Generic,
        };
        set_kernels(kernels);
        // candle's CPU matmul asks for its thread count on every call and, unless
        // RAYON_NUM_THREADS is set, finds it by parsing /proc/cpuinfo each time: a quarter of
        // the CPU time of `misp serve` on a small model (perf). Setting candle's own count once,
        // before any model thread starts, keeps its choice and drops the re-reads.
        if device.is_cpu() && std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let threads = candle_core::utils::get_num_threads();
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
        // candle splits element-wise ops of 64K elements or more (autograd's gradient sums,
        // mostly) over a pool of its own, beside misp's rayon pool, and the calling thread
        // spins until the pool's workers are done. On two shared cores a worker waiting for a
        // core left the caller spinning: a third of the LoRA step's samples (perf), and the
        // step 1.4-2x slower than with the ops on the calling thread (bench/README.md). The
        // products run on misp's own pool either way. CANDLE_NUM_THREADS, if set, decides.
        if device.is_cpu() && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        Ok(device)
    }

    /// The flags as given, to pass on to a child `misp` (the demo).
    pub fn to_flags(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(d) = &self.device {
            out.extend(["--device".to_string(), d.clone()]);
        }
        if let Some(k) = self.kernels {
            let name = match k {
                KernelsArg::Fused => "fused",
                KernelsArg::Generic => "generic",
            };
            out.extend(["--kernels".to_string(), name.to_string()]);
        }
        out
    }
}

//! LoRA adapters (PEFT's `LoraLayer` for `nn.Linear`): `y = W x + (alpha / r) * B A x`.
//!
//! Stage: train / eval. The base weight `W [out, in]` is a plain tensor (frozen, possibly bf16,
//! never copied); `A [r, in]` and `B [out, r]` are f32 [`Var`]s (f64 over an f64 base), `A` drawn as PEFT's
//! `kaiming_uniform_(a = sqrt(5))`, i.e. `U(-1/sqrt(in), 1/sqrt(in))`, and `B` zero, so a fresh
//! adapter leaves the model unchanged. Dropout acts on the LoRA input path only, and only while
//! the shared [`LoraSwitch`] says training. Disabling the switch gives the base model exactly:
//! DPO's reference policy without a second copy of the weights.
//!
//! Reads and writes nothing; saving adapters in PEFT layout builds on [`LoraLinear::lora`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::kernels::lora_branch::lora_branch;
use crate::kernels::{fusable, linear, lora_step};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Which projections get adapters and how (PEFT's `LoraConfig` fields of the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    /// Module names as PEFT's `target_modules`: `q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj`.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 64,
            lora_alpha: 128.0,
            lora_dropout: 0.05,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl LoraConfig {
    /// `alpha / r`, the factor on `B A x`.
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }
}

#[derive(Debug)]
struct SwitchState {
    enabled: AtomicBool,
    training: AtomicBool,
    /// Seed of this forward's dropout masks, and how many masks were drawn from it: masks are
    /// a function of (seed, draw number), so a resumed run draws the ones the uninterrupted
    /// run drew (candle's own dropout uses an unseedable thread RNG).
    dropout_seed: AtomicU64,
    dropout_draws: AtomicU64,
    /// Whether forwards record a graph through the adapters (off for a forward whose backward
    /// comes later, from kept inputs: `Llama::forward_detached`).
    grad: AtomicBool,
}

/// Run-time state shared by every adapter of a model: enabled (policy) or disabled (reference
/// policy), and training (dropout on) or not. Clones share the state.
#[derive(Debug, Clone)]
pub struct LoraSwitch(Arc<SwitchState>);

impl Default for LoraSwitch {
    /// Enabled, not training.
    fn default() -> Self {
        Self(Arc::new(SwitchState {
            enabled: AtomicBool::new(true),
            training: AtomicBool::new(false),
            dropout_seed: AtomicU64::new(0),
            dropout_draws: AtomicU64::new(0),
            grad: AtomicBool::new(true),
        }))
    }
}

impl LoraSwitch {
    pub fn set_enabled(&self, on: bool) {
        self.0.enabled.store(on, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.0.enabled.load(Ordering::Relaxed)
    }

    pub fn set_training(&self, on: bool) {
        self.0.training.store(on, Ordering::Relaxed);
    }

    pub fn training(&self) -> bool {
        self.0.training.load(Ordering::Relaxed)
    }

    /// Seeds the dropout masks of the forwards that follow (the trainer calls this once per
    /// micro-batch with a seed derived from the run seed and the step).
    pub fn set_dropout_seed(&self, seed: u64) {
        self.0.dropout_seed.store(seed, Ordering::Relaxed);
        self.0.dropout_draws.store(0, Ordering::Relaxed);
    }

    /// Records (or not) a graph through the adapters in the forwards that follow.
    pub fn set_grad(&self, on: bool) {
        self.0.grad.store(on, Ordering::Relaxed);
    }

    pub fn grad(&self) -> bool {
        self.0.grad.load(Ordering::Relaxed)
    }

    /// The seed set by [`Self::set_dropout_seed`].
    pub fn dropout_seed(&self) -> u64 {
        self.0.dropout_seed.load(Ordering::Relaxed)
    }

    /// Starts decoder layer `layer`'s masks: they are numbered from `layer << 32`, so a layer's
    /// masks depend on the seed and the layer alone, not on what ran before it. A layer run
    /// again (activation checkpointing's recompute, or a streamed step's second pass) under
    /// the same seed draws the same masks.
    pub fn begin_layer(&self, layer: usize) {
        self.0
            .dropout_draws
            .store((layer as u64) << 32, Ordering::Relaxed);
    }

    /// The seed of the next dropout mask.
    fn next_mask_seed(&self) -> u64 {
        let n = self.0.dropout_draws.fetch_add(1, Ordering::Relaxed);
        crate::files::splitmix64(
            self.0.dropout_seed.load(Ordering::Relaxed) ^ crate::files::splitmix64(n),
        )
    }
}

/// The trainable pair of one adapted projection.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `lora_A.weight`, `[r, in]`.
    pub a: Var,
    /// `lora_B.weight`, `[out, r]`.
    pub b: Var,
    scaling: f64,
    dropout: f32,
    switch: LoraSwitch,
}

impl Lora {
    /// `x W^T + s (drop(x) A^T) B^T` as *one* autograd node over `(x, A, B)`.
    ///
    /// Why: written in candle ops this is about ten graph nodes (reshapes, dropout, two
    /// matmuls, scaling, add), and candle's backward gives every node a zero-filled gradient
    /// buffer plus an add; over seven projections per layer that bookkeeping cost more than the
    /// matmuls. The node ([`lora_step`]) runs the products on gemm directly and its backward is the chain
    /// rule written out.
    /// With `grad` off the adapter enters as constants (detached) and no graph is recorded; the
    /// node still computes the same output with the same dropout masks.
    fn train_forward(&self, x: &Tensor, w: &Tensor, grad: bool) -> candle_core::Result<Tensor> {
        let dropout = (self.dropout > 0.0).then(|| (self.dropout, self.switch.next_mask_seed()));
        let (a, b) = if grad {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        };
        let x = if grad { x.clone() } else { x.detach() };
        lora_step::lora_step(&x, w, &a, &b, self.scaling, dropout)
    }
}

/// A linear layer (`x W^T`, plus a frozen bias where the checkpoint has one: Qwen2's q, k, v)
/// with an optional LoRA adapter. As in PEFT, the adapter's output adds to the base layer's
/// output, bias included.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Lora>,
}

impl LoraLinear {
    /// The frozen base layer alone; `weight` is `[out, in]` as `nn.Linear` stores it.
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight,
            bias: None,
            lora: None,
        }
    }

    /// The frozen base layer with a bias `[out]`.
    pub fn with_bias(weight: Tensor, bias: Tensor) -> Self {
        Self {
            weight,
            bias: Some(bias),
            lora: None,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Attaches a fresh f32 adapter: `A ~ U(-1/sqrt(in), 1/sqrt(in))` from `rng`, `B = 0`.
    pub fn attach<R: Rng>(
        &mut self,
        cfg: &LoraConfig,
        switch: &LoraSwitch,
        rng: &mut R,
    ) -> candle_core::Result<()> {
        let (out, inp) = self.weight.dims2()?;
        if cfg.r == 0 {
            candle_core::bail!("LoRA rank r must be positive");
        }
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let dev = self.weight.device();
        let dtype = adapter_dtype(self.weight.dtype());
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), dev)?.to_dtype(dtype)?)?;
        let b = Var::zeros((out, cfg.r), dtype, dev)?;
        self.set_lora(a, b, cfg, switch)
    }

    /// Attaches given adapter values (a loaded adapter, or a test's), checked against the base
    /// shape.
    pub fn set_lora(
        &mut self,
        a: Var,
        b: Var,
        cfg: &LoraConfig,
        switch: &LoraSwitch,
    ) -> candle_core::Result<()> {
        let (out, inp) = self.weight.dims2()?;
        if a.dims() != [cfg.r, inp] || b.dims() != [out, cfg.r] {
            candle_core::bail!(
                "LoRA shapes A {:?}, B {:?} do not fit a [{out}, {inp}] layer with r {}",
                a.dims(),
                b.dims(),
                cfg.r
            );
        }
        self.lora = Some(Lora {
            a,
            b,
            scaling: cfg.scaling(),
            dropout: cfg.lora_dropout,
            switch: switch.clone(),
        });
        Ok(())
    }

    /// `x [.., in] -> [.., out]` in `x`'s dtype; the LoRA path runs in f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.forward_without_bias(x)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        }
    }

    fn forward_without_bias(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(l) = self.lora.as_ref().filter(|l| l.switch.enabled()) else {
            return linear(x, &self.weight);
        };
        let grad = l.switch.grad();
        if l.switch.training()
            && fusable(x)
            && x.dtype() == l.a.dtype()
            && !self.weight.is_variable()
        {
            // The node computes `x W^T` itself.
            return l.train_forward(x, &self.weight, grad);
        }
        let dropout = (l.switch.training() && l.dropout > 0.0)
            .then(|| (l.dropout, l.switch.next_mask_seed()));
        // Without gradients the adapter's values enter as constants: no graph is recorded.
        let (a, b) = if grad {
            (l.a.as_tensor().clone(), l.b.as_tensor().clone())
        } else {
            (l.a.as_tensor().detach(), l.b.as_tensor().detach())
        };
        if !self.weight.is_variable() {
            // One node that keeps `x A^T` only (no f32 copy of `x`, no mask): every device
            // and dtype, and the CPU's bf16 (module docs of `lora_branch`).
            return lora_branch(x, &self.weight, &a, &b, l.scaling, dropout);
        }
        // A trained base weight (the world's pretraining trains the whole LLaMA): the plain
        // composition, whose graph gives the weight its gradient.
        let base = linear(x, &self.weight)?;
        let mut h = x.to_dtype(l.a.dtype())?;
        if let Some((p, seed)) = dropout {
            h = lora_step::dropout(&h, p, seed)?;
        }
        let delta = linear(&linear(&h, &a)?, &b)?;
        base + (delta * l.scaling)?.to_dtype(x.dtype())?
    }

    /// The adapter's variables, `[A, B]`, or none.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.lora
            .iter()
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect()
    }
}

/// Adapters are f32 over f32 / bf16 / f16 bases, f64 over f64 ones (finite-difference checks).
fn adapter_dtype(base: DType) -> DType {
    if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// A seeded generator for adapter initialisation, so a run's initial adapter is reproducible.
pub fn init_rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn layer() -> (LoraLinear, LoraSwitch, LoraConfig) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let mut l = LoraLinear::new(w);
        let cfg = LoraConfig {
            r: 3,
            lora_alpha: 6.0,
            lora_dropout: 0.0,
            ..LoraConfig::default()
        };
        let sw = LoraSwitch::default();
        l.attach(&cfg, &sw, &mut init_rng(1)).unwrap();
        (l, sw, cfg)
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
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
    fn fresh_adapter_is_identity_and_a_is_kaiming_uniform() {
        let (l, _, _) = layer();
        let x = Tensor::randn(0f32, 1.0, (2, 4, 5), &Device::Cpu).unwrap();
        let base = LoraLinear::new(l.weight().clone()).forward(&x).unwrap();
        assert_eq!(max_abs(&l.forward(&x).unwrap(), &base), 0.0);
        let a: Vec<f32> = l
            .lora()
            .unwrap()
            .a
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let bound = 1.0 / 5f32.sqrt();
        assert!(a.iter().all(|v| v.abs() < bound));
        assert!(a.iter().any(|v| v.abs() > bound / 2.0));
    }

    #[test]
    fn forward_is_w_x_plus_scaled_b_a_x_and_switch_round_trips() {
        let (l, sw, _) = layer();
        let lo = l.lora().unwrap();
        lo.b.set(&Tensor::randn(0f32, 1.0, (6, 3), &Device::Cpu).unwrap())
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 5), &Device::Cpu).unwrap();
        let wx = x.matmul(&l.weight().t().unwrap()).unwrap();
        let bax = x
            .matmul(&lo.a.t().unwrap())
            .unwrap()
            .matmul(&lo.b.t().unwrap())
            .unwrap();
        let want = (&wx + (bax * 2.0).unwrap()).unwrap();
        assert!(max_abs(&l.forward(&x).unwrap(), &want) < 1e-5);
        sw.set_enabled(false);
        assert_eq!(max_abs(&l.forward(&x).unwrap(), &wx), 0.0);
        sw.set_enabled(true);
        assert_eq!(max_abs(&l.forward(&x).unwrap(), &want), 0.0);
    }

    #[test]
    fn dropout_only_while_training_and_only_on_the_lora_path() {
        let (l, sw, mut cfg) = layer();
        cfg.lora_dropout = 0.5;
        let lo = l.lora().unwrap().clone();
        let mut l = LoraLinear::new(l.weight().clone());
        l.set_lora(lo.a.clone(), lo.b.clone(), &cfg, &sw).unwrap();
        let x = Tensor::randn(0f32, 1.0, (8, 5), &Device::Cpu).unwrap();
        let eval = l.forward(&x).unwrap();
        sw.set_training(true);
        // B = 0: dropout on the LoRA input cannot touch the output.
        assert_eq!(max_abs(&l.forward(&x).unwrap(), &eval), 0.0);
        lo.b.set(&Tensor::ones((6, 3), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let train = l.forward(&x).unwrap();
        sw.set_training(false);
        let eval = l.forward(&x).unwrap();
        assert!(max_abs(&train, &eval) > 0.0);
        assert_eq!(max_abs(&l.forward(&x).unwrap(), &eval), 0.0);
    }

    /// Gradients of `sum(c * layer(x))` for `x`, `A`, `B`.
    fn grads(l: &LoraLinear, x: &Tensor, c: &Tensor, sw: &LoraSwitch) -> Vec<Tensor> {
        sw.set_dropout_seed(7);
        let xv = Var::from_tensor(x).unwrap();
        let lo = l.lora().unwrap();
        let g = (l.forward(xv.as_tensor()).unwrap() * c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        [xv.as_tensor(), lo.a.as_tensor(), lo.b.as_tensor()]
            .iter()
            .map(|t| g.get(t).unwrap().clone())
            .collect()
    }

    fn layer64(dropout: f32) -> (LoraLinear, LoraSwitch) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (6, 5), &dev).unwrap();
        let mut l = LoraLinear::new(w);
        let cfg = LoraConfig {
            r: 3,
            lora_alpha: 6.0,
            lora_dropout: dropout,
            ..LoraConfig::default()
        };
        let sw = LoraSwitch::default();
        l.attach(&cfg, &sw, &mut init_rng(1)).unwrap();
        let b = Tensor::randn(0f64, 1.0, (6, 3), &dev).unwrap();
        l.lora().unwrap().b.set(&b).unwrap();
        (l, sw)
    }

    #[test]
    fn training_node_matches_the_plain_graph_and_finite_differences() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (2, 4, 5), &dev).unwrap();
        let c = Tensor::randn(0f64, 1.0, (2, 4, 6), &dev).unwrap();
        // Without dropout, training (one node) and eval (plain ops) are the same function.
        let (l, sw) = layer64(0.0);
        let plain = grads(&l, &x, &c, &sw);
        sw.set_training(true);
        let node = grads(&l, &x, &c, &sw);
        for (p, n) in plain.iter().zip(&node) {
            let d = (p - n)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
        }
        // With dropout (the same seeded mask every forward), against central differences.
        let (l, sw) = layer64(0.5);
        sw.set_training(true);
        let g = grads(&l, &x, &c, &sw);
        let lo = l.lora().unwrap().clone();
        let loss = |l: &LoraLinear, x: &Tensor| -> f64 {
            sw.set_dropout_seed(7);
            (l.forward(x).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let h = 1e-6;
        for (which, grad) in g.iter().enumerate() {
            let base = [&x, lo.a.as_tensor(), lo.b.as_tensor()][which]
                .copy()
                .unwrap();
            let flat: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
            let gv: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                gv.iter().any(|v| v.abs() > 1e-3),
                "zero gradient for input {which}"
            );
            for i in 0..flat.len() {
                let at = |d: f64| {
                    let mut v = flat.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, base.dims(), &dev).unwrap();
                    match which {
                        0 => loss(&l, &t),
                        1 => {
                            lo.a.set(&t).unwrap();
                            let r = loss(&l, &x);
                            lo.a.set(&base).unwrap();
                            r
                        }
                        _ => {
                            lo.b.set(&t).unwrap();
                            let r = loss(&l, &x);
                            lo.b.set(&base).unwrap();
                            r
                        }
                    }
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (fd - gv[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "input {which} [{i}]: {fd} vs {}",
                    gv[i]
                );
            }
        }
    }

    #[test]
    fn rejects_mismatched_adapter() {
        let (mut l, sw, cfg) = layer();
        let a = Var::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        let b = Var::zeros((6, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(l.set_lora(a, b, &cfg, &sw).is_err());
    }
}

//! Optimisation for every trainer of the project (LoRA DPO, SAE-free full-parameter pretraining
//! of the ShapesWorld models): AdamW as PyTorch's `torch.optim.AdamW`, global-norm gradient
//! clipping, gradient accumulation, and transformers' cosine schedule with linear warmup.
//!
//! Why not `candle_nn::AdamW`: its moment estimates are private, so a checkpoint could not hold
//! them and `--resume` would not continue to the same weights as an uninterrupted run. Here the
//! state is plain tensors that [`AdamW::state`] / [`AdamW::load_state`] move in and out of a
//! safetensors checkpoint.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// AdamW hyper-parameters (PyTorch defaults except the learning rate).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// `torch.optim.AdamW` over a fixed list of variables; state in f32 (f64 for f64 variables).
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    pub config: AdamWConfig,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> candle_core::Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        let v = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            config,
        })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Optimiser steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with `grads[i]` the gradient of `vars[i]` (`None`: no gradient, variable and
    /// its moments untouched, as PyTorch skips parameters whose `.grad` is `None`). Returns
    /// `false`, changing nothing (not even the step count), when the update would make a
    /// variable or a moment non-finite: finite gradients can still overflow a moment, and a
    /// NaN adapter must not replace the last good one.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> candle_core::Result<bool> {
        if grads.len() != self.vars.len() {
            candle_core::bail!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            );
        }
        // Two passes over the variables: the first only sums the new values (one host read for
        // the whole check, and no second copy of every variable held), the second applies them.
        let t = (self.step + 1) as i32;
        let mut total: Option<Tensor> = None;
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let (p, m, v) = self.updated(i, g, lr, t)?;
            let s = (p.sum_all()? + m.sum_all()?)?.add(&v.sum_all()?)?;
            let s = s.to_dtype(DType::F64)?;
            total = Some(match total {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
        if let Some(total) = total {
            if !total.to_scalar::<f64>()?.is_finite() {
                return Ok(false);
            }
        }
        self.step += 1;
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let (p, m, v) = self.updated(i, g, lr, t)?;
            self.vars[i].set(&p)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(true)
    }

    /// Variable `i`'s new value and moments after step `t` with gradient `g`.
    fn updated(
        &self,
        i: usize,
        g: &Tensor,
        lr: f64,
        t: i32,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let var = &self.vars[i];
        let g = g.to_dtype(var.dtype())?;
        let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let p = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
        let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
        let update = ((&m / bc1)? / denom)?;
        Ok(((p - (update * lr)?)?, m, v))
    }

    /// The state as named tensors (`m.{i}`, `v.{i}`, `step`), for a checkpoint.
    pub fn state(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.insert(format!("m.{i}"), m.clone());
            out.insert(format!("v.{i}"), v.clone());
        }
        // u64 steps fit an f64 exactly far beyond any run length.
        let dev = self.vars.first().map(|v| v.device().clone());
        let dev = dev.unwrap_or(candle_core::Device::Cpu);
        out.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], &dev)?.to_dtype(DType::F64)?,
        );
        Ok(out)
    }

    /// Restores [`Self::state`]; every tensor must be present with its variable's shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<(), String> {
        let get = |k: &str, like: &Tensor| -> Result<Tensor, String> {
            let t = state.get(k).ok_or_else(|| format!("missing `{k}`"))?;
            if t.dims() != like.dims() {
                return Err(format!(
                    "`{k}` has shape {:?}, expected {:?}",
                    t.dims(),
                    like.dims()
                ));
            }
            t.to_dtype(like.dtype()).map_err(|e| e.to_string())
        };
        let mut m = Vec::with_capacity(self.vars.len());
        let mut v = Vec::with_capacity(self.vars.len());
        for (i, var) in self.vars.iter().enumerate() {
            m.push(get(&format!("m.{i}"), var.as_tensor())?);
            v.push(get(&format!("v.{i}"), var.as_tensor())?);
        }
        let step = state
            .get("step")
            .ok_or("missing `step`")?
            .to_dtype(DType::F64)
            .and_then(|s| s.flatten_all()?.to_vec1::<f64>())
            .map_err(|e| e.to_string())?;
        self.m = m;
        self.v = v;
        self.step = step.first().copied().unwrap_or(0.0) as u64;
        Ok(())
    }
}

/// Sums gradients of several backward passes (micro-batches) per variable.
#[derive(Debug)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(n: usize) -> Self {
        Self {
            sums: vec![None; n],
        }
    }

    /// Adds `grads` of `vars` (the same list every call).
    pub fn add(&mut self, vars: &[Var], grads: &GradStore) -> candle_core::Result<()> {
        for (sum, var) in self.sums.iter_mut().zip(vars) {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                *sum = Some(match sum.take() {
                    None => g,
                    Some(s) => (s + g)?,
                });
            }
        }
        Ok(())
    }

    /// Adds gradients already in variable order (one entry per variable, `None`: no gradient).
    pub fn add_sums(&mut self, grads: Vec<Option<Tensor>>) -> candle_core::Result<()> {
        for (sum, g) in self.sums.iter_mut().zip(grads) {
            if let Some(g) = g {
                *sum = Some(match sum.take() {
                    None => g,
                    Some(s) => (s + g)?,
                });
            }
        }
        Ok(())
    }

    /// The sums, leaving the accumulator empty.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        let n = self.sums.len();
        std::mem::replace(&mut self.sums, vec![None; n])
    }
}

/// Global L2 norm of all gradients.
pub fn grad_norm(grads: &[Option<Tensor>]) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `max_norm / (norm + 1e-6)` when
/// the global norm exceeds `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> candle_core::Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// transformers' `get_cosine_schedule_with_warmup` (half a cosine): the learning-rate factor
/// at optimiser step `step` (0-based) of `total`, with `warmup` linear warm-up steps.
pub fn cosine_with_warmup(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_the_pytorch_update_by_hand() {
        // One parameter, two steps, values computed with torch.optim.AdamW's formula.
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f64, -2.0], &dev).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![p.clone()], cfg).unwrap();
        let g = Tensor::new(&[0.5f64, -1.0], &dev).unwrap();
        opt.step(&[Some(g.clone())], 0.1).unwrap();
        opt.step(&[Some(g)], 0.1).unwrap();
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            for (i, gi) in [0.5f64, -1.0].iter().enumerate() {
                want[i] *= 1.0 - 0.1 * 0.5;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                want[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f64> = p.as_tensor().to_vec1().unwrap();
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn an_update_that_is_not_finite_changes_nothing() {
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
        assert!(opt.step(&[Some(g.clone())], 0.1).unwrap());
        let (before, state) = (
            p.as_tensor().to_vec1::<f32>().unwrap(),
            opt.state().unwrap(),
        );
        // A finite gradient whose square overflows f32: the second moment becomes inf.
        let huge = Tensor::new(&[3e38f32, 1.0], &dev).unwrap();
        assert!(!opt.step(&[Some(huge)], 0.1).unwrap());
        assert!(!opt.step(&[Some(g.clone())], f64::NAN).unwrap());
        assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), before);
        assert_eq!(opt.steps(), 1);
        let after = opt.state().unwrap();
        for (k, t) in &state {
            let same = (t - &after[k]).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(
                same.to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
                0.0,
                "{k}"
            );
        }
        assert!(opt.step(&[Some(g)], 0.1).unwrap());
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let dev = Device::Cpu;
        let run = |split: bool| -> Vec<f32> {
            let p = Var::new(&[0.3f32, 0.7, -0.2], &dev).unwrap();
            let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
            for s in 0..6 {
                if split && s == 3 {
                    let state = opt.state().unwrap();
                    let mut fresh = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
                    fresh.load_state(&state).unwrap();
                    opt = fresh;
                }
                let g = (p.as_tensor() * (s as f64 + 1.0)).unwrap();
                opt.step(&[Some(g)], 0.01).unwrap();
            }
            p.as_tensor().to_vec1().unwrap()
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn clipping_scales_to_max_norm_and_schedule_has_its_shape() {
        let dev = Device::Cpu;
        let mut g = vec![Some(Tensor::new(&[3.0f32, 4.0], &dev).unwrap()), None];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((grad_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        assert_eq!(cosine_with_warmup(0, 10, 100), 0.0);
        assert!((cosine_with_warmup(5, 10, 100) - 0.5).abs() < 1e-12);
        assert!((cosine_with_warmup(10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_with_warmup(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(cosine_with_warmup(100, 10, 100).abs() < 1e-12);
    }
}

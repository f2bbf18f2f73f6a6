//! Helpers the model tests share: fixture paths, the small adapter the training tests attach,
//! and the adapter gradients summed over the pieces of a step.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use misp::model::lora::LoraConfig;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A photo of `fixtures/clip/images`.
pub fn clip_image(name: &str) -> PathBuf {
    root().join("fixtures/clip/images").join(name)
}

/// PEFT's seven targets (the default) at r 4, alpha 8, no dropout: small so the tests stay
/// fast; the code path is the same as r 64.
pub fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        ..LoraConfig::default()
    }
}

/// Each variable's gradient summed over the backward passes of a step's pieces.
pub struct GradSums(Vec<Option<Tensor>>);

impl GradSums {
    pub fn new(vars: usize) -> Self {
        Self(vec![None; vars])
    }

    /// Adds one piece's gradients of `vars` (in the order `new` counted them).
    pub fn add(&mut self, grads: &GradStore, vars: &[Var]) -> candle_core::Result<()> {
        for (sum, v) in self.0.iter_mut().zip(vars) {
            if let Some(g) = grads.get(v.as_tensor()) {
                *sum = Some(match sum.take() {
                    None => g.clone(),
                    Some(s) => (s + g)?,
                });
            }
        }
        Ok(())
    }

    /// The sums, flattened; every variable must have had a gradient.
    pub fn into_vecs(self) -> Vec<Vec<f64>> {
        self.0
            .into_iter()
            .map(|g| {
                g.expect("every variable gets a gradient")
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    }
}

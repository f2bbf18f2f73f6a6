//! Qwen2.5-VL's vision tower as transformers' `Qwen2_5_VisionTransformerPretrainedModel`, at
//! inference (misp trains LoRA on the language model only; the tower is frozen).
//!
//! Keys under `visual.`: `patch_embed.proj` (a Conv3d whose kernel equals its stride: a linear
//! map of each flattened `[3, temporal, patch, patch]` patch), `blocks.N.{norm1, attn.qkv,
//! attn.proj, norm2, mlp.{gate,up,down}_proj}`, `merger.{ln_q, mlp.0, mlp.2}`.
//!
//! One image at a time (attention never crosses images):
//! 1. patches (in the processor's merge-block order) -> patch embedding;
//! 2. 2-D rotary angles: the first quarter of each head's frequencies rotate by the patch's row,
//!    the second by its column, the same again for the second half (`rotate_half` pairs);
//! 3. reorder merge units into windows of `window_size / merge / patch` merge units a side,
//!    row-major over windows and inside each (windows at the right and bottom edges are cut);
//! 4. blocks: RMSNorm, attention (inside each window, or over the whole image in
//!    `fullatt_block_indexes`), RMSNorm, SwiGLU MLP with biases;
//! 5. merger: RMSNorm, each merge unit's `merge^2` patches concatenated, Linear, GELU (erf),
//!    Linear; back to row-major merge-unit order: one language-model token per merge unit.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::kernels::{self, Linear};

/// `rope_parameters` of the vision config (`rope_type` "axial").
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VisionRope {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

/// `vision_config` of a Qwen2.5-VL `config.json` (transformers' `Qwen2_5_VLVisionConfig`
/// defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub hidden_act: String,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub window_size: usize,
    pub out_hidden_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub rope_parameters: Option<VisionRope>,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            depth: 32,
            hidden_size: 3584,
            hidden_act: "silu".into(),
            intermediate_size: 3420,
            num_heads: 16,
            in_channels: 3,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            window_size: 112,
            out_hidden_size: 3584,
            fullatt_block_indexes: vec![7, 15, 23, 31],
            rope_parameters: None,
        }
    }
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Values of one flattened patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Window side in merge units.
    pub fn window_units(&self) -> usize {
        self.window_size / self.spatial_merge_size.max(1) / self.patch_size.max(1)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(10000.0)
    }

    /// What this implementation does not cover, as a list.
    pub fn problems(&self) -> Vec<String> {
        let mut bad = Vec::new();
        if self.hidden_act != "silu" {
            bad.push(format!(
                "vision hidden_act {:?} (only \"silu\")",
                self.hidden_act
            ));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            bad.push(format!(
                "vision hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size, self.num_heads
            ));
        } else if !self.head_dim().is_multiple_of(4) {
            bad.push(format!(
                "vision head_dim {} is not a multiple of 4 (2-D rotary)",
                self.head_dim()
            ));
        }
        if self.window_units() == 0 {
            bad.push(format!(
                "window_size {} is smaller than one merge unit",
                self.window_size
            ));
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_ref())
        {
            if t != "axial" && t != "default" {
                bad.push(format!("vision rope_type {t:?} (only \"axial\")"));
            }
        }
        if let Some(&i) = self
            .fullatt_block_indexes
            .iter()
            .find(|&&i| i >= self.depth)
        {
            bad.push(format!(
                "fullatt_block_indexes names block {i} of {}",
                self.depth
            ));
        }
        bad
    }
}

/// `Qwen2_5_VLRMSNorm` (eps 1e-6 in the tower).
#[derive(Debug, Clone)]
struct RmsNorm(Tensor);

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize) -> candle_core::Result<Self> {
        Ok(Self(vb.get(dim, "weight")?))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kernels::rms_norm(x, &self.0, 1e-6)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: RmsNorm,
    qkv: Linear,
    proj: Linear,
    norm2: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Block {
    fn load(vb: VarBuilder, c: &VisionConfig) -> candle_core::Result<Self> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        let attn = vb.pp("attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            norm1: RmsNorm::load(vb.pp("norm1"), d)?,
            qkv: Linear::load(attn.pp("qkv"), d, 3 * d)?,
            proj: Linear::load(attn.pp("proj"), d, d)?,
            norm2: RmsNorm::load(vb.pp("norm2"), d)?,
            gate_proj: Linear::load(mlp.pp("gate_proj"), d, i)?,
            up_proj: Linear::load(mlp.pp("up_proj"), d, i)?,
            down_proj: Linear::load(mlp.pp("down_proj"), i, d)?,
        })
    }

    /// `x [N, D]` in window order; `segments`: `(start, len)` runs of rows that attend to each
    /// other.
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        heads: usize,
        segments: &[(usize, usize)],
    ) -> candle_core::Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (x + self
            .proj
            .forward(&self.attention(&h, rope, heads, segments)?)?)?;
        let h = self.norm2.forward(&x)?;
        let m = kernels::swiglu(&self.gate_proj.forward(&h)?, &self.up_proj.forward(&h)?)?;
        &x + self.down_proj.forward(&m)?
    }

    fn attention(
        &self,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        heads: usize,
        segments: &[(usize, usize)],
    ) -> candle_core::Result<Tensor> {
        let (n, d) = x.dims2()?;
        let hd = d / heads;
        let qkv = self.qkv.forward(x)?.reshape((n, 3, heads, hd))?;
        let part = |i: usize| -> candle_core::Result<Tensor> {
            // `[N, heads, hd]`; RoPE in f32 as transformers computes it.
            let y = qkv.narrow(1, i, 1)?.squeeze(1)?;
            y.to_dtype(DType::F32)
        };
        let rot = |y: &Tensor| -> candle_core::Result<Tensor> {
            let y1 = y.narrow(D::Minus1, 0, hd / 2)?;
            let y2 = y.narrow(D::Minus1, hd / 2, hd / 2)?;
            let r = Tensor::cat(&[&y2.neg()?, &y1], D::Minus1)?;
            y.broadcast_mul(cos)? + r.broadcast_mul(sin)?
        };
        let dt = x.dtype();
        let q = rot(&part(0)?)?
            .to_dtype(dt)?
            .transpose(0, 1)?
            .contiguous()?;
        let k = rot(&part(1)?)?
            .to_dtype(dt)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = part(2)?.to_dtype(dt)?.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(segments.len());
        for &(start, len) in segments {
            let (qs, ks, vs) = (
                q.narrow(1, start, len)?,
                k.narrow(1, start, len)?,
                v.narrow(1, start, len)?,
            );
            let scores = (qs.matmul(&ks.t()?)? * scale)?.to_dtype(DType::F32)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dt)?;
            outs.push(probs.matmul(&vs)?);
        }
        Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, d))
    }
}

/// The vision tower.
#[derive(Debug, Clone)]
pub struct VisionTower {
    patch_embed: Tensor,
    blocks: Vec<Block>,
    ln_q: RmsNorm,
    mlp0: Linear,
    mlp2: Linear,
    config: VisionConfig,
}

impl VisionTower {
    /// From `vb` at `visual`.
    pub fn load(vb: VarBuilder, config: VisionConfig) -> candle_core::Result<Self> {
        let problems = config.problems();
        if !problems.is_empty() {
            candle_core::bail!(
                "unsupported Qwen2.5-VL vision config: {}",
                problems.join("; ")
            );
        }
        let c = &config;
        let patch_embed = vb.pp("patch_embed").pp("proj").get(
            (
                c.hidden_size,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ),
            "weight",
        )?;
        let patch_embed = patch_embed.reshape((c.hidden_size, c.patch_dim()))?;
        let blocks = (0..c.depth)
            .map(|i| Block::load(vb.pp("blocks").pp(i), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let merger = vb.pp("merger");
        let unit = c.hidden_size * c.spatial_merge_size * c.spatial_merge_size;
        Ok(Self {
            patch_embed,
            blocks,
            ln_q: RmsNorm::load(merger.pp("ln_q"), c.hidden_size)?,
            mlp0: Linear::load(merger.pp("mlp").pp("0"), unit, unit)?,
            mlp2: Linear::load(merger.pp("mlp").pp("2"), unit, c.out_hidden_size)?,
            config,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// One image's language-model embeddings `[grid_h * grid_w / merge^2, out_hidden_size]`,
    /// row-major over merge units, from its flattened patches `[grid_h * grid_w, patch_dim]`.
    pub fn forward(
        &self,
        patches: &Tensor,
        grid_h: usize,
        grid_w: usize,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let m = c.spatial_merge_size;
        let n = grid_h * grid_w;
        if !grid_h.is_multiple_of(m)
            || !grid_w.is_multiple_of(m)
            || patches.dims() != [n, c.patch_dim()]
        {
            candle_core::bail!(
                "vision input: patches {:?} for a {grid_h} x {grid_w} grid of {}-value patches (merge {m})",
                patches.dims(),
                c.patch_dim()
            );
        }
        let dev = patches.device();
        let dtype = self.patch_embed.dtype();
        let x = patches.to_dtype(dtype)?.matmul(&self.patch_embed.t()?)?;
        let (order, windows) = window_order(grid_h / m, grid_w / m, c.window_units());
        let unit = m * m;
        let rows: Vec<u32> = order
            .iter()
            .flat_map(|&u| (0..unit).map(move |k| (u * unit + k) as u32))
            .collect();
        let rows = Tensor::from_vec(rows, n, dev)?;
        let x = x.index_select(&rows, 0)?;
        let (cos, sin) = self.rope(grid_h, grid_w, dev)?;
        let rope = (
            cos.index_select(&rows, 0)?.unsqueeze(1)?,
            sin.index_select(&rows, 0)?.unsqueeze(1)?,
        );
        let mut start = 0;
        let window_segments: Vec<(usize, usize)> = windows
            .iter()
            .map(|&units| {
                let s = (start, units * unit);
                start += units * unit;
                s
            })
            .collect();
        let full = [(0, n)];
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let segments: &[(usize, usize)] = if c.fullatt_block_indexes.contains(&i) {
                &full
            } else {
                &window_segments
            };
            x = block.forward(&x, &rope, c.num_heads, segments)?;
        }
        let merged = self
            .ln_q
            .forward(&x)?
            .reshape((n / unit, unit * c.hidden_size))?;
        let merged = self
            .mlp2
            .forward(&self.mlp0.forward(&merged)?.gelu_erf()?)?;
        // Back to row-major merge units: window position j holds unit order[j].
        let mut back = vec![0u32; order.len()];
        for (j, &u) in order.iter().enumerate() {
            back[u] = j as u32;
        }
        merged.index_select(&Tensor::from_vec(back, order.len(), dev)?, 0)
    }

    /// `cos, sin [N, head_dim]` (f32) of each patch in the processor's order (merge block by
    /// merge block): angles `row * inv` on the first quarter, `col * inv` on the second, twice.
    fn rope(
        &self,
        grid_h: usize,
        grid_w: usize,
        dev: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let c = &self.config;
        let (m, hd) = (c.spatial_merge_size, c.head_dim());
        let spatial = hd / 2;
        let theta = c.rope_theta();
        let inv: Vec<f32> = (0..spatial / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / spatial as f64)) as f32)
            .collect();
        let n_w = grid_w / m;
        let n = grid_h * grid_w;
        let (mut cos, mut sin) = (Vec::with_capacity(n * hd), Vec::with_capacity(n * hd));
        let mut angles = vec![0f32; spatial];
        for r in 0..n {
            let (block, within) = (r / (m * m), r % (m * m));
            let (bh, bw) = (block / n_w, block % n_w);
            let (h, w) = (bh * m + within / m, bw * m + within % m);
            for (i, &f) in inv.iter().enumerate() {
                angles[i] = h as f32 * f;
                angles[spatial / 2 + i] = w as f32 * f;
            }
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, hd), dev)?,
            Tensor::from_vec(sin, (n, hd), dev)?,
        ))
    }
}

/// Merge units (row-major index over an `h x w` grid) in window order, and the number of units
/// in each non-empty window: windows of `side x side` units, row-major, cut at the edges (as
/// transformers' `get_vision_window_index`).
pub fn window_order(h: usize, w: usize, side: usize) -> (Vec<usize>, Vec<usize>) {
    let mut order = Vec::with_capacity(h * w);
    let mut sizes = Vec::new();
    for wy in (0..h).step_by(side) {
        for wx in (0..w).step_by(side) {
            let before = order.len();
            for y in wy..(wy + side).min(h) {
                for x in wx..(wx + side).min(w) {
                    order.push(y * w + x);
                }
            }
            sizes.push(order.len() - before);
        }
    }
    (order, sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_unit_once_in_transformers_order() {
        // A 3 x 3 grid of merge units, windows of 2: [0 1 3 4], [2 5], [6 7], [8].
        let (order, sizes) = window_order(3, 3, 2);
        assert_eq!(order, vec![0, 1, 3, 4, 2, 5, 6, 7, 8]);
        assert_eq!(sizes, vec![4, 2, 2, 1]);
        let (order, sizes) = window_order(2, 4, 4);
        assert_eq!(order, (0..8).collect::<Vec<_>>());
        assert_eq!(sizes, vec![8]);
    }
}

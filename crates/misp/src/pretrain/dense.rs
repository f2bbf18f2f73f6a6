//! Dense per-cell supervision of the CLIP's vision tower, trained alongside the contrastive loss.
//!
//! Stage: world pretrain. Why it exists (diagnostics in `bench/world_grounding/`): a
//! contrastive CLIP this small separates a batch by colour and position alone and never puts
//! *shape* into its patch tokens (probe at the base rate). A LLaVA trained on such a tower
//! cannot learn shape through its LLM either: attention has to route the question to the right
//! image token before a shape feature can be learned there, and neither gets a gradient until the
//! other exists (shape 0.18-0.25 on "What is in the {cell}?", colour 1.00). A real LLaVA does not
//! have this problem because its CLIP already encodes objects. Dense supervision gives the tiny
//! tower what web-scale contrastive training gives a real one: every patch token of the layer
//! LLaVA reads (`hidden_states[-2]`) predicts the shape and the colour of the clearly visible
//! object in its grid cell ("none" for an empty cell or a hidden object) and its cell's index
//! (so attention can find it). Measured in torch on the 48 px world: shape 0.83 per cell, and a
//! LLaVA on that tower, frozen, names the asked cell's shape at 0.72 (0.18 before).
//!
//! The heads are linear maps from the tower's width, trained with it and then dropped: neither
//! checkpoint has them.

use candle_core::{Device, Tensor, D};

use rand::rngs::StdRng;

use super::init::{Builder, Params};
use crate::model::clip::ClipModel;
use crate::world::scene::{Colour, Scene, Shape, Visibility};

/// The 3x3 grid of every world scene.
pub const GRID_CELLS: usize = 9;

/// What each patch token of one image is trained to predict, in patch order (row-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellTargets {
    /// A [`Shape::index`], or `Shape::ALL.len()` for "no clearly visible object".
    pub shape: Vec<u32>,
    /// A [`Colour::index`], or `Colour::ALL.len()` for none.
    pub colour: Vec<u32>,
}

/// The grid cell (0..9, row-major) that holds the centre of each of the `grid x grid` patches.
/// With a 48 px image and 16 px patches, patch and cell coincide.
pub fn patch_cells(grid: usize) -> Vec<u32> {
    let cell_of = |i: usize| ((2 * i + 1) * 3 / (2 * grid)).min(2) as u32;
    (0..grid * grid)
        .map(|p| cell_of(p / grid) * 3 + cell_of(p % grid))
        .collect()
}

/// The targets of `scene`'s image cut into `grid x grid` patches. Hidden objects (faint, tiny,
/// occluded) count as "none": the tower cannot see them, and the world's text names them on
/// purpose (the co-occurrence prior is the hallucination the method should remove).
pub fn cell_targets(scene: &Scene, grid: usize) -> CellTargets {
    let mut shape = [Shape::ALL.len() as u32; GRID_CELLS];
    let mut colour = [Colour::ALL.len() as u32; GRID_CELLS];
    for o in &scene.objects {
        if o.visibility == Visibility::Clear {
            let c = o.cell as usize;
            shape[c] = o.shape.index() as u32;
            colour[c] = o.colour.index() as u32;
        }
    }
    let cells = patch_cells(grid);
    CellTargets {
        shape: cells.iter().map(|&c| shape[c as usize]).collect(),
        colour: cells.iter().map(|&c| colour[c as usize]).collect(),
    }
}

/// The three heads' output sizes, in the order of [`head_names`].
pub fn head_sizes() -> [usize; 3] {
    [Shape::ALL.len() + 1, Colour::ALL.len() + 1, GRID_CELLS]
}

/// Parameter-name prefixes of the heads (kept out of every checkpoint).
pub const HEAD_NAMES: [&str; 3] = ["dense.shape", "dense.colour", "dense.cell"];

/// The dense objective of one training run.
#[derive(Debug)]
pub struct DenseTask {
    /// `dense.{shape,colour,cell}.{weight,bias}` ([`dense_head_params`]).
    pub heads: Params,
    /// Targets by pixel-table index.
    pub targets: Vec<CellTargets>,
    /// Multiplies the dense loss before it is added to the contrastive one.
    pub weight: f64,
    /// Which `hidden_states[layer]` the heads read: the one the LLaVA's projector reads.
    pub layer: usize,
}

/// One batch's dense loss (the sum of the three cross-entropies, each a mean over all patches),
/// the shape accuracy over patches whose cell holds a clearly visible object, and how many such
/// patches there were. A sum, not a mean: the shape term is the one that matters and the hard
/// one (most cells are empty, the cell index is learned within a few steps).
pub fn dense_loss(
    model: &ClipModel,
    task: &DenseTask,
    pixels: &Tensor,
    images: &[usize],
) -> Result<(Tensor, f64, usize), super::PretrainError> {
    let h = model.vision_hidden_states(pixels, task.layer)?;
    let (b, tokens, d) = h.dims3()?;
    let patches = tokens - 1;
    let x = h.narrow(1, 1, patches)?.reshape((b * patches, d))?;
    let grid = (patches as f64).sqrt().round() as usize;
    let cells = patch_cells(grid);
    let device: &Device = x.device();
    let labels: [Vec<u32>; 3] = [
        images
            .iter()
            .flat_map(|&i| task.targets[i].shape.iter().copied())
            .collect(),
        images
            .iter()
            .flat_map(|&i| task.targets[i].colour.iter().copied())
            .collect(),
        images.iter().flat_map(|_| cells.iter().copied()).collect(),
    ];
    let mut total: Option<Tensor> = None;
    let (mut shape_accuracy, mut objects) = (f64::NAN, 0);
    for (k, name) in HEAD_NAMES.iter().enumerate() {
        let w = head_var(&task.heads, &format!("{name}.weight"))?;
        let bias = head_var(&task.heads, &format!("{name}.bias"))?;
        let logits = x.matmul(&w.t()?)?.broadcast_add(&bias)?;
        let y = Tensor::new(labels[k].as_slice(), device)?;
        let ce = candle_nn::loss::cross_entropy(&logits, &y)?;
        if k == 0 {
            let none = Shape::ALL.len() as u32;
            let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            let (hit, n) = pred
                .iter()
                .zip(&labels[0])
                .filter(|(_, &t)| t != none)
                .fold((0usize, 0usize), |(h, n), (p, t)| {
                    (h + usize::from(p == t), n + 1)
                });
            if n > 0 {
                shape_accuracy = hit as f64 / n as f64;
            }
            objects = n;
        }
        total = Some(match total {
            None => ce,
            Some(t) => (t + ce)?,
        });
    }
    let loss = total.ok_or_else(|| super::PretrainError::Config("no dense heads".into()))?;
    Ok((loss, shape_accuracy, objects))
}

/// Shape accuracy of the trained heads on the visible objects of images the tower never trained
/// on: `pixels` with their `targets`, in the table's order.
pub fn heldout_shape_accuracy(
    model: &ClipModel,
    task: &DenseTask,
    pixels: &super::PixelTable,
    targets: Vec<CellTargets>,
) -> Result<f64, super::PretrainError> {
    let held = DenseTask {
        heads: task.heads.clone(),
        targets,
        weight: task.weight,
        layer: task.layer,
    };
    let (mut hit, mut n) = (0.0, 0usize);
    let all: Vec<usize> = (0..held.targets.len()).collect();
    for chunk in all.chunks(64) {
        let px = pixels.batch(chunk, model.device())?;
        let (_, acc, objects) = dense_loss(model, &held, &px, chunk)?;
        if objects > 0 {
            hit += acc * objects as f64;
            n += objects;
        }
    }
    Ok(if n == 0 { f64::NAN } else { hit / n as f64 })
}

fn head_var(heads: &Params, name: &str) -> Result<Tensor, super::PretrainError> {
    heads
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_tensor().clone())
        .ok_or_else(|| super::PretrainError::Config(format!("dense head `{name}` missing")))
}

/// The dense heads: a linear map (`N(0, 0.02)` weight, zero bias) from the
/// tower's width `d` to each of [`head_sizes`], named `dense.*`.
pub fn dense_head_params(
    d: usize,
    rng: &mut StdRng,
    device: &Device,
) -> candle_core::Result<Params> {
    let mut b = Builder::new(rng, device);
    for (name, out) in HEAD_NAMES.iter().zip(head_sizes()) {
        b.linear(name, d, out, true)?;
    }
    Ok(b.out)
}

//! The rank-one factorisation of the SAE: codes, reconstruction error, and the loss of Eq. 11
//! with its hand-written gradient, all without a `d^2` vector per pair.
//!
//! Shapes: `R` records in a batch, record `r` with `n_r` candidates, `N = sum_r n_r` pairs,
//! `U` the `[N, d]` stack of `u_i = s (p_r - v_i)`, `T` the `[R, d]` prompts. Per record the
//! projection `[A; C; (B t)^T]` (`[2H + 1, d]`, [`prompt_projections`]) turns its pairs into one
//! GEMM `U_r [A; C; Bt]^T`: columns `0..H` are the encoder pre-activations (before `b_e`), `H..2H`
//! the cross terms `P_ij = u_i^T D_j t_r`, and the last `u_i^T B t_r`.
//!
//! Gradient of `L = (1/N) sum_i ||x_i - x_hat_i||^2 + gamma sum_j KL(rho || rho_hat_j)`
//! (derivation: `dL/dx_hat_i = (2/N) R_i` with the residual `R_i = x_hat_i - x_i`):
//!
//! ```text
//! dL/dz_ij  = (2/N) (G z_i + g - P_i)_j + gamma (-rho/rho_hat_j + (1-rho)/(1-rho_hat_j)) / N
//! delta_ij  = dL/dz_ij z_ij (1 - z_ij)                       (through the sigmoid)
//! dL/db_e   = sum_i delta_i
//! dL/dE_j   = sum_i delta_ij u_i t_r^T = sum_r (Delta_r^T U_r)[j] (x) t_r
//! dL/dD_j   = (2/N) sum_i z_ij R_i
//!           = (2/N) [ (S D)_j + s_j B - sum_r (Z_r^T U_r)[j] (x) t_r ],  S = Z^T Z, s = Z^T 1
//! dL/dB     = (2/N) sum_i R_i = (2/N) [ sum_j s_j D_j + N B - sum_r (sum_{i in r} u_i) (x) t_r ]
//! ```
//!
//! (`(x)` the outer product). The factor of the first line is `2/N`, not `4/N`: the
//! reconstruction error is quadratic in `z` with Hessian `2G`. The two sums over records share
//! one GEMM `[2 H d, R] x [R, d]`, so a step costs about four `H d^2 R` GEMMs' worth (the two
//! projections and the two outer-product sums), two `H^2 d^2` (`G = D D^T` and `S D`) and
//! `4 N d H` for the pairs.

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor, WithDType};

use super::data::TrainingSet;
use super::{CandidateCodes, Result, Sae, SaeError};

/// A latent "fires" on a pair when `z` exceeds twice its target mean activation `rho` (capped
/// at 0.5). Sigmoid latents are never exactly 0, so L0 needs a threshold; the KL term of Eq. 11
/// holds every latent's *mean* at `rho`, and a trained SAE spreads each latent around it (on
/// the ShapesWorld embeddings: per-latent std ~0.03 around 0.05, none ever near 0.5), so the
/// usual 0.5 is never reached and says nothing. At `2 rho` an untrained latent, which sits at
/// `rho` for every input, never fires (dead), and a trained one fires on the pairs it codes
/// for. Used by mean L0, the dead fraction and the firing histogram.
pub fn firing_threshold(rho: f64) -> f64 {
    (2.0 * rho).min(0.5)
}

/// `rho_hat` is clamped into `[RHO_HAT_MIN, 1 - RHO_HAT_MIN]` inside the KL term so that a
/// latent that is dead (or saturated) over a whole batch gives a large but finite loss. The
/// gradient is evaluated at the clamped value: outside the range it keeps pushing the latent
/// back, where the exact derivative of the clamped function would be 0.
pub(crate) const RHO_HAT_MIN: f64 = 1e-6;

/// The parameters in their internal layout (module docs of [`super`]).
#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// `[H, d, d]`, `E_j` = row `j` of `encoder.weight` reshaped.
    pub encoder: Tensor,
    /// `[H]`.
    pub encoder_bias: Tensor,
    /// `[H, d, d]`, `D_j` = column `j` of `decoder.weight` reshaped.
    pub decoder: Tensor,
    /// `[d, d]`, `B` = `decoder.bias` reshaped.
    pub decoder_bias: Tensor,
}

impl Params {
    /// `(H, d)`.
    pub fn dims(&self) -> (usize, usize) {
        let dims = self.encoder.dims();
        (dims[0], dims[1])
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Params> {
        Ok(Params {
            encoder: self.encoder.to_dtype(dtype)?,
            encoder_bias: self.encoder_bias.to_dtype(dtype)?,
            decoder: self.decoder.to_dtype(dtype)?,
            decoder_bias: self.decoder_bias.to_dtype(dtype)?,
        })
    }
}

/// The decoder's input-independent quantities: `G = W_d^T W_d` (`[H, H]`, as a tensor for the
/// `Z G` GEMM), `g = W_d^T b_d` and `||b_d||^2` (in `f64`).
#[derive(Debug, Clone)]
pub(crate) struct DecoderGram {
    pub gram: Tensor,
    pub g: Vec<f64>,
    pub bias_sq: f64,
}

impl DecoderGram {
    /// One `H^2 d^2` GEMM (about 19 GFLOP at `d = 768`): once per model, or once per step in
    /// training.
    pub fn new(params: &Params) -> Result<Self> {
        let (h, d) = params.dims();
        let d_flat = params.decoder.reshape((h, d * d))?;
        let gram = d_flat.matmul(&d_flat.t()?)?;
        let b_col = params.decoder_bias.reshape((d * d, 1))?;
        let g = host_f64(&d_flat.matmul(&b_col)?)?;
        let bias_sq = host_f64(&params.decoder_bias)?.iter().map(|b| b * b).sum();
        Ok(Self { gram, g, bias_sq })
    }
}

/// `[R, 2H + 1, d]`: for each prompt `t_r` (a row of `prompts` `[R, d]`) the rows
/// `A = [E_j t]_j`, `C = [D_j t]_j` and `(B t)^T`. Two `H d^2 R` GEMMs, computed as
/// `[H d, d] x [d, R]` (the orientation the CPU GEMM runs fastest) and transposed after.
pub(crate) fn prompt_projections(params: &Params, prompts: &Tensor) -> Result<Tensor> {
    let (h, d) = params.dims();
    let r = prompts.dim(0)?;
    let t_cols = prompts.t()?;
    // (E_j t)[a] = sum_c E_j[a, c] t[c]: row (j, a) of the [H d, d] view against t.
    let project = |w: &Tensor| -> Result<Tensor> {
        Ok(w.reshape((h * d, d))?
            .matmul(&t_cols)?
            .t()?
            .reshape((r, h, d))?)
    };
    let a = project(&params.encoder)?;
    let c = project(&params.decoder)?;
    let bt = prompts
        .matmul(&params.decoder_bias.t()?)?
        .reshape((r, 1, d))?;
    Ok(Tensor::cat(&[a, c, bt], 1)?)
}

/// Per-pair quantities of a block of rows that share one prompt, on the host in `f64`.
pub(crate) struct RowCodes {
    pub n: usize,
    pub h: usize,
    /// The GEMM output `U [A; C; Bt]^T`, `n x (2H + 1)`.
    pub y: Vec<f64>,
    /// `z`, `n x H`, rounded to the model's dtype (so host sums see the tensor's values).
    pub z: Vec<f64>,
    /// `Z G`, `n x H`.
    pub zg: Vec<f64>,
    /// `||x_i - x_hat_i||^2` and `||z_i||_1`.
    pub recon: Vec<f64>,
    pub l1: Vec<f64>,
}

impl RowCodes {
    /// `P_ij = u_i^T D_j t`.
    pub fn cross(&self, i: usize, j: usize) -> f64 {
        self.y[i * (2 * self.h + 1) + self.h + j]
    }
}

/// The factorised forward pass of rows `u` `[n, d]` against one prompt: `proj_t` is that
/// prompt's projection transposed (`[d, 2H + 1]`), `unorm2` the `||u_i||^2`, `tnorm2 = ||t||^2`.
pub(crate) fn forward_rows(
    u: &Tensor,
    unorm2: &[f64],
    tnorm2: f64,
    proj_t: &Tensor,
    encoder_bias: &[f64],
    gram: &DecoderGram,
) -> Result<RowCodes> {
    let h = encoder_bias.len();
    let n = u.dim(0)?;
    let width = 2 * h + 1;
    let dtype = u.dtype();
    let y = host_f64(&u.matmul(proj_t)?)?;
    let mut z = vec![0.0; n * h];
    for (z_row, y_row) in z.chunks_exact_mut(h).zip(y.chunks_exact(width)) {
        for ((zj, yj), bj) in z_row.iter_mut().zip(y_row).zip(encoder_bias) {
            *zj = round_to(dtype, sigmoid(yj + bj));
        }
    }
    let z_tensor = tensor_from_host(&z, (n, h), dtype)?;
    let zg = host_f64(&z_tensor.matmul(&gram.gram)?)?;
    let mut recon = Vec::with_capacity(n);
    let mut l1 = Vec::with_capacity(n);
    for i in 0..n {
        let (zi, gi) = (&z[i * h..(i + 1) * h], &zg[i * h..(i + 1) * h]);
        let yi = &y[i * width..(i + 1) * width];
        let (mut cross, mut quad, mut lin, mut sum) = (0.0, 0.0, 0.0, 0.0);
        for j in 0..h {
            cross += zi[j] * yi[h + j];
            quad += zi[j] * gi[j];
            lin += zi[j] * gram.g[j];
            sum += zi[j];
        }
        let ubt = yi[2 * h];
        recon.push(unorm2[i] * tnorm2 - 2.0 * cross - 2.0 * ubt + quad + 2.0 * lin + gram.bias_sq);
        l1.push(sum);
    }
    Ok(RowCodes {
        n,
        h,
        y,
        z,
        zg,
        recon,
        l1,
    })
}

/// [`Sae::encode_candidates_chunked`] after its input checks.
pub(crate) fn encode_candidates(
    sae: &Sae,
    positive: &[f32],
    prompt: &[f32],
    candidates: &[f32],
    chunk_rows: usize,
) -> Result<CandidateCodes> {
    let h = sae.config.hidden;
    let n = candidates.len() / sae.config.d;
    let mut out = CandidateCodes {
        recon: Vec::with_capacity(n),
        l1: Vec::with_capacity(n),
        z: Vec::with_capacity(n * h),
        hidden: h,
    };
    encode_chunks(sae, positive, prompt, candidates, chunk_rows, |codes| {
        out.recon.extend_from_slice(&codes.recon);
        out.l1.extend_from_slice(&codes.l1);
        out.z.extend(codes.z.iter().map(|&z| z as f32));
    })?;
    Ok(out)
}

/// The factorised forward pass of one record's candidates, `chunk_rows` at a time, handing
/// each chunk's [`RowCodes`] to `sink` (the tests keep `z` in `f64`, scoring rounds it).
pub(crate) fn encode_chunks(
    sae: &Sae,
    positive: &[f32],
    prompt: &[f32],
    candidates: &[f32],
    chunk_rows: usize,
    mut sink: impl FnMut(&RowCodes),
) -> Result<()> {
    let d = sae.config.d;
    let dtype = sae.dtype();
    let t = tensor_from_f32(prompt, (1, d), dtype)?;
    let proj_t = prompt_projections(&sae.params, &t)?
        .get(0)?
        .t()?
        .contiguous()?;
    let tnorm2: f64 = prompt.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let encoder_bias = host_f64(&sae.params.encoder_bias)?;
    for (c, chunk) in candidates.chunks(chunk_rows * d).enumerate() {
        let rows: Vec<&[f32]> = chunk.chunks_exact(d).collect();
        let rows = build_u(positive, &rows, sae.config.input_scale, dtype, |i| {
            ("candidates", c * chunk_rows + i)
        })?;
        let codes = forward_rows(
            &rows.u,
            &rows.norms,
            tnorm2,
            &proj_t,
            &encoder_bias,
            &sae.gram,
        )?;
        sink(&codes);
    }
    Ok(())
}

/// The rows `u_i = s (p - v_i)` of one record.
pub(crate) struct URows {
    /// `[n, d]` in the model's dtype.
    pub u: Tensor,
    /// `||u_i||^2` and `sum_i u_i`, summed in `f64` from the rounded entries.
    pub norms: Vec<f64>,
    pub sum: Vec<f64>,
}

/// [`URows`] for the candidate rows `v_i`; `name_row(i)` names row `i` in an error.
pub(crate) fn build_u(
    positive: &[f32],
    rows: &[&[f32]],
    scale: f64,
    dtype: DType,
    name_row: impl Fn(usize) -> (&'static str, usize),
) -> Result<URows> {
    fn fill<T: WithDType>(
        positive: &[f32],
        rows: &[&[f32]],
        scale: f64,
        name_row: impl Fn(usize) -> (&'static str, usize),
    ) -> Result<URows> {
        let d = positive.len();
        let p: Vec<f64> = positive.iter().map(|&x| f64::from(x)).collect();
        let mut buf: Vec<T> = vec![T::zero(); rows.len() * d];
        let mut norms = Vec::with_capacity(rows.len());
        let mut sum = vec![0.0; d];
        let mut u64s = vec![0.0; d];
        for (i, (v, out)) in rows.iter().zip(buf.chunks_exact_mut(d)).enumerate() {
            for (((u, o), &pa), &va) in u64s.iter_mut().zip(out.iter_mut()).zip(&p).zip(*v) {
                *o = T::from_f64(scale * (pa - f64::from(va)));
                *u = o.to_f64();
            }
            // Four partial sums: independent chains the CPU can overlap.
            let mut acc = [0.0f64; 4];
            for quad in u64s.chunks(4) {
                for (a, &u) in acc.iter_mut().zip(quad) {
                    *a += u * u;
                }
            }
            let norm = (acc[0] + acc[1]) + (acc[2] + acc[3]);
            if !norm.is_finite() {
                let (field, row) = name_row(i);
                return Err(SaeError::NonFiniteInput { field, row });
            }
            sum.iter_mut().zip(&u64s).for_each(|(s, &u)| *s += u);
            norms.push(norm);
        }
        let u = Tensor::from_vec(buf, (rows.len(), d), &Device::Cpu)?;
        Ok(URows { u, norms, sum })
    }
    match dtype {
        DType::F64 => fill::<f64>(positive, rows, scale, name_row),
        _ => fill::<f32>(positive, rows, scale, name_row),
    }
}

/// A batch of records with their pairs, in the model's dtype.
pub(crate) struct Batch {
    /// `[R, d]` prompts `t_r`.
    pub prompts: Tensor,
    /// `[N, d]` the `u_i`, record after record.
    pub u: Tensor,
    /// Record `r` owns rows `offsets[r]..offsets[r + 1]` of `u`.
    pub offsets: Vec<usize>,
    pub unorm2: Vec<f64>,
    pub tnorm2: Vec<f64>,
    /// `[R, d]` `sum_{i in r} u_i`.
    pub usum: Tensor,
}

impl Batch {
    /// Gathers the pairs of `records` (indices into `data`; records without candidates are
    /// left out). Fails on a candidate index outside the pool or a batch without pairs.
    pub fn build(
        data: &TrainingSet<'_>,
        records: &[usize],
        scale: f64,
        dtype: DType,
    ) -> Result<Batch> {
        let d = data.d;
        let pool_rows = data.pool.len() / d;
        if let Some(&r) = records.iter().find(|&&r| r >= data.records()) {
            return Err(SaeError::Data(format!(
                "record index {r} is out of range ({} records)",
                data.records()
            )));
        }
        let records: Vec<usize> = records
            .iter()
            .copied()
            .filter(|&r| !data.candidates[r].is_empty())
            .collect();
        if records.is_empty() {
            return Err(SaeError::Data(
                "a batch has no (record, candidate) pair".into(),
            ));
        }
        let mut prompts = Vec::with_capacity(records.len() * d);
        let mut offsets = vec![0];
        let mut tnorm2 = Vec::with_capacity(records.len());
        let mut u_parts = Vec::with_capacity(records.len());
        let mut unorm2 = Vec::new();
        let mut usum = Vec::with_capacity(records.len() * d);
        for &r in &records {
            let t = &data.prompts[r * d..(r + 1) * d];
            prompts.extend_from_slice(t);
            tnorm2.push(t.iter().map(|&x| f64::from(x) * f64::from(x)).sum());
            let mut rows = Vec::with_capacity(data.candidates[r].len());
            for &idx in &data.candidates[r] {
                let i = idx as usize;
                if i >= pool_rows {
                    return Err(SaeError::CandidateIndex {
                        record: r,
                        index: idx,
                        pool: pool_rows,
                    });
                }
                rows.push(&data.pool[i * d..(i + 1) * d]);
            }
            let positive = &data.positives[r * d..(r + 1) * d];
            let cands = &data.candidates[r];
            let built = build_u(positive, &rows, scale, dtype, |i| {
                ("pool", cands[i] as usize)
            })?;
            usum.extend(built.sum);
            offsets.push(offsets.last().copied().unwrap_or(0) + rows.len());
            unorm2.extend(built.norms);
            u_parts.push(built.u);
        }
        let r = records.len();
        Ok(Batch {
            prompts: tensor_from_f32(&prompts, (r, d), dtype)?,
            u: Tensor::cat(&u_parts, 0)?,
            offsets,
            unorm2,
            tnorm2,
            usum: tensor_from_host(&usum, (r, d), dtype)?,
        })
    }

    pub fn records(&self) -> usize {
        self.tnorm2.len()
    }

    pub fn pairs(&self) -> usize {
        self.unorm2.len()
    }
}

/// The loss of Eq. 11 on one batch.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BatchLoss {
    /// `recon + gamma * kl`.
    pub loss: f64,
    /// Mean over the batch's pairs of `||x_i - x_hat_i||^2`.
    pub recon: f64,
    /// `sum_j KL(rho || rho_hat_j)` (without `gamma`), `rho_hat` the batch mean of `z`.
    pub kl: f64,
    /// Number of (record, candidate) pairs.
    pub pairs: usize,
}

/// Gradients of the Eq. 11 loss, each shaped like its parameter in the internal layout.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// `[H, d, d]`: `dL/dE_j`.
    pub encoder: Tensor,
    /// `[H]`.
    pub encoder_bias: Tensor,
    /// `[H, d, d]`: `dL/dD_j`.
    pub decoder: Tensor,
    /// `[d, d]`: `dL/dB`.
    pub decoder_bias: Tensor,
}

/// Everything the trainer logs about one batch.
#[derive(Debug, Clone)]
pub(crate) struct BatchStats {
    pub pairs: usize,
    pub loss: f64,
    pub recon_sum: f64,
    pub kl: f64,
    /// `sum_i z_ij`, per latent.
    pub z_sum: Vec<f64>,
    /// Pairs with `z_ij >` [`firing_threshold`], per latent.
    pub fired: Vec<u64>,
}

impl BatchStats {
    pub fn loss(&self) -> BatchLoss {
        BatchLoss {
            loss: self.loss,
            recon: self.recon_sum / self.pairs as f64,
            kl: self.kl,
            pairs: self.pairs,
        }
    }
}

/// `KL(rho || q)` of two Bernoulli means, `q` clamped (see [`RHO_HAT_MIN`]).
pub(crate) fn kl_bernoulli(rho: f64, q: f64) -> f64 {
    let q = q.clamp(RHO_HAT_MIN, 1.0 - RHO_HAT_MIN);
    rho * (rho / q).ln() + (1.0 - rho) * ((1.0 - rho) / (1.0 - q)).ln()
}

/// `d KL(rho || q) / dq` at the clamped `q`.
fn kl_bernoulli_grad(rho: f64, q: f64) -> f64 {
    let q = q.clamp(RHO_HAT_MIN, 1.0 - RHO_HAT_MIN);
    -rho / q + (1.0 - rho) / (1.0 - q)
}

/// `sum_i ||x_i - x_hat_i||^2` over the pairs of `batch`, forward only: the held-out
/// reconstruction of the trainer's stopping rule.
pub(crate) fn reconstruction(params: &Params, gram: &DecoderGram, batch: &Batch) -> Result<f64> {
    let proj = prompt_projections(params, &batch.prompts)?;
    let encoder_bias = host_f64(&params.encoder_bias)?;
    let mut recon = 0.0;
    for r in 0..batch.records() {
        let (lo, hi) = (batch.offsets[r], batch.offsets[r + 1]);
        let codes = forward_rows(
            &batch.u.narrow(0, lo, hi - lo)?,
            &batch.unorm2[lo..hi],
            batch.tnorm2[r],
            &proj.get(r)?.t()?,
            &encoder_bias,
            gram,
        )?;
        recon += codes.recon.iter().sum::<f64>();
    }
    Ok(recon)
}

/// Eq. 11 on `batch` and its gradient (module docs for the formulas).
pub(crate) fn loss_and_grads(
    params: &Params,
    gram: &DecoderGram,
    gamma: f64,
    rho: f64,
    batch: &Batch,
) -> Result<(BatchStats, Gradients)> {
    let (h, d) = params.dims();
    let dtype = params.encoder.dtype();
    let (r_count, n) = (batch.records(), batch.pairs());
    let nf = n as f64;

    // Forward, record by record: one [n_r, d] x [d, 2H + 1] GEMM each.
    let proj = prompt_projections(params, &batch.prompts)?;
    let encoder_bias = host_f64(&params.encoder_bias)?;
    let mut codes = Vec::with_capacity(r_count);
    for r in 0..r_count {
        let (lo, hi) = (batch.offsets[r], batch.offsets[r + 1]);
        let proj_t = proj.get(r)?.t()?;
        codes.push(forward_rows(
            &batch.u.narrow(0, lo, hi - lo)?,
            &batch.unorm2[lo..hi],
            batch.tnorm2[r],
            &proj_t,
            &encoder_bias,
            gram,
        )?);
    }

    // Loss of Eq. 11 and the batch activation statistics.
    let mut recon_sum = 0.0;
    let mut z_sum = vec![0.0; h];
    let mut fired = vec![0u64; h];
    let threshold = firing_threshold(rho);
    for c in &codes {
        recon_sum += c.recon.iter().sum::<f64>();
        for z_row in c.z.chunks_exact(h) {
            for j in 0..h {
                z_sum[j] += z_row[j];
                fired[j] += u64::from(z_row[j] > threshold);
            }
        }
    }
    let rho_hat: Vec<f64> = z_sum.iter().map(|s| s / nf).collect();
    let kl: f64 = rho_hat.iter().map(|&q| kl_bernoulli(rho, q)).sum();
    let stats = BatchStats {
        pairs: n,
        loss: recon_sum / nf + gamma * kl,
        recon_sum,
        kl,
        z_sum: z_sum.clone(),
        fired,
    };

    // dL/dz and delta = dL/dpre, stored next to z as one [N, 2H] tensor [Z | Delta].
    let kl_grad: Vec<f64> = rho_hat
        .iter()
        .map(|&q| gamma * kl_bernoulli_grad(rho, q) / nf)
        .collect();
    let two_over_n = 2.0 / nf;
    let mut zd = Vec::with_capacity(n * 2 * h);
    let mut grad_encoder_bias = vec![0.0; h];
    for c in &codes {
        for i in 0..c.n {
            let zi = &c.z[i * h..(i + 1) * h];
            let gi = &c.zg[i * h..(i + 1) * h];
            zd.extend_from_slice(zi);
            for j in 0..h {
                let dz = two_over_n * (gi[j] + gram.g[j] - c.cross(i, j)) + kl_grad[j];
                let delta = round_to(dtype, dz * zi[j] * (1.0 - zi[j]));
                grad_encoder_bias[j] += delta;
                zd.push(delta);
            }
        }
    }
    let zd = tensor_from_host(&zd, (n, 2 * h), dtype)?;

    // Per record [Z_r | Delta_r]^T U_r: rows 0..H are Z_r^T U_r, rows H..2H Delta_r^T U_r.
    let mut per_record = Vec::with_capacity(r_count);
    for r in 0..r_count {
        let (lo, hi) = (batch.offsets[r], batch.offsets[r + 1]);
        let zd_r = zd.narrow(0, lo, hi - lo)?;
        per_record.push(zd_r.t()?.matmul(&batch.u.narrow(0, lo, hi - lo)?)?);
    }
    let per_record = Tensor::stack(&per_record, 0)?.reshape((r_count, 2 * h * d))?;
    // sum_r M_r[j, a] t_r[c] for M = Z^T U (decoder, rows 0..H) and Delta^T U (encoder, rows
    // H..2H), both in one [2 H d, R] x [R, d] GEMM.
    let outer_sums = per_record
        .t()?
        .matmul(&batch.prompts)?
        .reshape((2 * h, d, d))?;
    let zt_u_t = outer_sums.narrow(0, 0, h)?.reshape((h, d * d))?;
    let grad_encoder = outer_sums.narrow(0, h, h)?;

    let z = zd.narrow(1, 0, h)?;
    let s_mat = z.t()?.matmul(&z)?; // S = Z^T Z
    let s_col = tensor_from_host(&z_sum, (h, 1), dtype)?;
    let d_flat = params.decoder.reshape((h, d * d))?;
    let b_flat = params.decoder_bias.reshape((1, d * d))?;
    // (2/N) (S D + s B - sum_r Z_r^T U_r t_r^T), combined in place in one pass over S D.
    let grad_decoder = s_mat.matmul(&d_flat)?;
    grad_decoder.inplace_op1(&DecoderGradCombine {
        zt_u_t: &zt_u_t,
        bias: &params.decoder_bias,
        s: &z_sum,
        scale: two_over_n,
    })?;
    let grad_decoder = grad_decoder.reshape((h, d, d))?;

    let usum_t = batch
        .usum
        .t()?
        .matmul(&batch.prompts)?
        .reshape((1, d * d))?;
    let grad_decoder_bias = ((s_col.t()?.matmul(&d_flat)? + (b_flat * nf)?)? - usum_t)?;
    let grad_decoder_bias = (grad_decoder_bias * two_over_n)?.reshape((d, d))?;

    let grads = Gradients {
        encoder: grad_encoder,
        encoder_bias: tensor_from_host(&grad_encoder_bias, h, dtype)?,
        decoder: grad_decoder,
        decoder_bias: grad_decoder_bias,
    };
    Ok((stats, grads))
}

/// `out <- scale * (out + s_j B - Q)` on the `[H, d^2]` product `out = S D`, row `j` at a time:
/// the decoder gradient without three temporary `H d^2` tensors.
struct DecoderGradCombine<'a> {
    /// `[H, d^2]`, `sum_r (Z_r^T U_r)[j] (x) t_r`.
    zt_u_t: &'a Tensor,
    /// `[d, d]`, `B`.
    bias: &'a Tensor,
    /// `s_j = sum_i z_ij`.
    s: &'a [f64],
    scale: f64,
}

impl DecoderGradCombine<'_> {
    fn apply<T: WithDType>(&self, out: &mut [T]) -> candle_core::Result<()> {
        with_cpu_slice(self.zt_u_t, |q: &[T]| {
            with_cpu_slice(self.bias, |b: &[T]| {
                let dd = b.len();
                if out.len() != q.len() || out.len() != dd * self.s.len() {
                    candle_core::bail!("decoder gradient: operand sizes disagree");
                }
                let rows = |out: &mut [T], q: &[T], s: &[f64]| {
                    for ((o_row, q_row), &sj) in out.chunks_mut(dd).zip(q.chunks(dd)).zip(s) {
                        for ((o, &qk), &bk) in o_row.iter_mut().zip(q_row).zip(b) {
                            let v = o.to_f64() + sj * bk.to_f64() - qk.to_f64();
                            *o = T::from_f64(self.scale * v);
                        }
                    }
                };
                let half = self.s.len().div_ceil(2);
                let (o1, o2) = out.split_at_mut(half * dd);
                let (q1, q2) = q.split_at(half * dd);
                let (s1, s2) = self.s.split_at(half);
                std::thread::scope(|scope| {
                    scope.spawn(|| rows(o1, q1, s1));
                    rows(o2, q2, s2);
                });
                Ok(())
            })?
        })?
    }
}

impl InplaceOp1 for DecoderGradCombine<'_> {
    fn name(&self) -> &'static str {
        "sae-decoder-grad"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (lo, hi) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("S D is not contiguous".into()))?;
        match storage {
            CpuStorage::F32(v) => self.apply(&mut v[lo..hi]),
            CpuStorage::F64(v) => self.apply(&mut v[lo..hi]),
            _ => candle_core::bail!("the SAE runs in f32 or f64"),
        }
    }
}

/// Runs `f` on the contiguous CPU data of `t` (no copy).
pub(crate) fn with_cpu_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("the SAE runs on the CPU device")
    };
    let (lo, hi) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("tensor is not contiguous".into()))?;
    Ok(f(&cpu.as_slice::<T>()?[lo..hi]))
}

/// Numerically safe logistic function: `exp(-x)` may overflow to `inf`, giving exactly 0.
pub(crate) fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `x` rounded to the precision of `dtype` (`f32` or `f64`), as `f64`.
fn round_to(dtype: DType, x: f64) -> f64 {
    if dtype == DType::F32 {
        f64::from(x as f32)
    } else {
        x
    }
}

/// Any float tensor's values, flattened, as `f64`.
pub(crate) fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// A CPU tensor of `dtype` holding `f64` host values.
pub(crate) fn tensor_from_host<S: Into<candle_core::Shape>>(
    values: &[f64],
    shape: S,
    dtype: DType,
) -> Result<Tensor> {
    let t = match dtype {
        DType::F64 => Tensor::from_slice(values, shape, &Device::Cpu)?,
        _ => {
            let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?
        }
    };
    Ok(t)
}

/// A CPU tensor of `dtype` holding `f32` host values.
pub(crate) fn tensor_from_f32<S: Into<candle_core::Shape>>(
    values: &[f32],
    shape: S,
    dtype: DType,
) -> Result<Tensor> {
    Ok(Tensor::from_slice(values, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

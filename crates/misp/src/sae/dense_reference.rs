//! Dense reference of the SAE: builds every `x_i = vec(u_i t^T)` (`d^2` entries per pair) and
//! runs the encoder, decoder and Eq. 11 loss as the plain `nn.Linear` algebra, with gradients
//! by candle autograd.
//!
//! Stages: none. This is the oracle of the factorised path's tests and the "dense" column of
//! `misp bench mine`; mining and training never call it. It costs `O(N H d^2)` time (about 130
//! MFLOP per pair at `d = 512`) and holds `chunk x d^2` values at a time.

use candle_core::{DType, Tensor, Var};

use super::data::TrainingSet;
use super::factor::{self, host_f64, Batch, BatchLoss, Gradients, RHO_HAT_MIN};
use super::{check_record_inputs, CandidateCodes, Result, Sae};

/// Rows per chunk that keep the dense `x` (and its `f64` residual) near 256 MiB at `d = 768`.
pub const DENSE_CHUNK_ROWS: usize = 48;

/// `1 / (1 + exp(-x))` from differentiable primitives.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// `x_i = vec(u_i t^T)` for the rows `u` `[n, d]` and one prompt `t` `[d]`: `[n, d^2]`.
fn outer_rows(u: &Tensor, t: &Tensor) -> Result<Tensor> {
    let (n, d) = u.dims2()?;
    Ok(u.reshape((n, d, 1))?
        .broadcast_mul(&t.reshape((1, 1, d))?)?
        .reshape((n, d * d))?)
}

/// The codes of [`Sae::encode_candidates`], computed densely in the SAE's dtype (the
/// reconstruction residual is summed in `f64`), `chunk_rows` candidates at a time
/// ([`DENSE_CHUNK_ROWS`] suits `d = 768`).
pub fn encode_candidates(
    sae: &Sae,
    positive: &[f32],
    prompt: &[f32],
    candidates: &[f32],
    chunk_rows: usize,
) -> Result<CandidateCodes> {
    let mut out = CandidateCodes {
        recon: Vec::new(),
        l1: Vec::new(),
        z: Vec::new(),
        hidden: sae.config.hidden,
    };
    encode_chunks(
        sae,
        positive,
        prompt,
        candidates,
        chunk_rows,
        |recon, l1, z| {
            out.recon.extend(recon);
            out.l1.extend(l1);
            out.z.extend(z.into_iter().map(|v| v as f32));
        },
    )?;
    Ok(out)
}

/// The dense forward pass, handing each chunk's `(recon, l1, z)` (all `f64`, `z` row-major) to
/// `sink`.
pub(crate) fn encode_chunks(
    sae: &Sae,
    positive: &[f32],
    prompt: &[f32],
    candidates: &[f32],
    chunk_rows: usize,
    mut sink: impl FnMut(Vec<f64>, Vec<f64>, Vec<f64>),
) -> Result<()> {
    let (h, d) = sae.params.dims();
    check_record_inputs(d, positive, prompt, candidates)?;
    let dtype = sae.dtype();
    let t = factor::tensor_from_f32(prompt, d, dtype)?;
    let w_enc = sae.params.encoder.reshape((h, d * d))?;
    let w_dec_t = sae.params.decoder.reshape((h, d * d))?; // decoder.weight^T
    let b_dec = sae.params.decoder_bias.reshape((1, d * d))?;
    let chunk_rows = chunk_rows.max(1);
    for (c, chunk) in candidates.chunks(chunk_rows * d).enumerate() {
        let rows: Vec<&[f32]> = chunk.chunks_exact(d).collect();
        let u = factor::build_u(positive, &rows, sae.config.input_scale, dtype, |i| {
            ("candidates", c * chunk_rows + i)
        })?
        .u;
        let x = outer_rows(&u, &t)?;
        let z = sigmoid(
            &x.matmul(&w_enc.t()?)?
                .broadcast_add(&sae.params.encoder_bias)?,
        )?;
        let x_hat = z.matmul(&w_dec_t)?.broadcast_add(&b_dec)?;
        let residual = (x - x_hat)?.to_dtype(DType::F64)?;
        let z64 = z.to_dtype(DType::F64)?;
        sink(
            host_f64(&residual.sqr()?.sum(1)?)?,
            host_f64(&z64.sum(1)?)?,
            host_f64(&z64)?,
        );
    }
    Ok(())
}

/// The loss of Eq. 11 on the pairs of `records` (one batch) and its gradient with respect to
/// every parameter, from the dense `x` and candle autograd. Same contract as
/// [`Sae::loss_and_grads`].
pub fn loss_and_grads(
    sae: &Sae,
    data: &TrainingSet<'_>,
    records: &[usize],
) -> Result<(BatchLoss, Gradients)> {
    data.validate()?;
    let (h, d) = sae.params.dims();
    let dtype = sae.dtype();
    let (gamma, rho) = (sae.config.gamma, sae.config.rho);
    let batch = Batch::build(data, records, sae.config.input_scale, dtype)?;
    let mut xs = Vec::with_capacity(batch.records());
    for r in 0..batch.records() {
        let (lo, hi) = (batch.offsets[r], batch.offsets[r + 1]);
        xs.push(outer_rows(
            &batch.u.narrow(0, lo, hi - lo)?,
            &batch.prompts.get(r)?,
        )?);
    }
    let x = Tensor::cat(&xs, 0)?;

    let w_enc = Var::from_tensor(&sae.params.encoder.reshape((h, d * d))?)?;
    let b_enc = Var::from_tensor(&sae.params.encoder_bias)?;
    let w_dec_t = Var::from_tensor(&sae.params.decoder.reshape((h, d * d))?)?;
    let b_dec = Var::from_tensor(&sae.params.decoder_bias.reshape(d * d)?)?;

    let z = sigmoid(&x.matmul(&w_enc.t()?)?.broadcast_add(&b_enc)?)?;
    let x_hat = z.matmul(&w_dec_t)?.broadcast_add(&b_dec)?;
    let recon = (&x - x_hat)?.sqr()?.sum(1)?;
    let recon_mean = recon.mean(0)?;
    let q = z.mean(0)?.clamp(RHO_HAT_MIN, 1.0 - RHO_HAT_MIN)?;
    // KL(rho || q) = rho ln(rho / q) + (1 - rho) ln((1 - rho) / (1 - q))
    let kl_on = ((q.recip()? * rho)?.log()? * rho)?;
    let kl_off = (((q.neg()? + 1.0)?.recip()? * (1.0 - rho))?.log()? * (1.0 - rho))?;
    let kl = (kl_on + kl_off)?.sum_all()?;
    let loss = (&recon_mean + (&kl * gamma)?)?;

    let grads = loss.backward()?;
    let grad = |v: &Var| -> Result<Tensor> {
        Ok(match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.as_tensor().zeros_like()?,
        })
    };
    let gradients = Gradients {
        encoder: grad(&w_enc)?.reshape((h, d, d))?,
        encoder_bias: grad(&b_enc)?,
        decoder: grad(&w_dec_t)?.reshape((h, d, d))?,
        decoder_bias: grad(&b_dec)?.reshape((d, d))?,
    };
    let scalar = |t: &Tensor| -> Result<f64> { Ok(host_f64(t)?[0]) };
    let batch_loss = BatchLoss {
        loss: scalar(&loss)?,
        recon: scalar(&recon_mean)?,
        kl: scalar(&kl)?,
        pairs: batch.pairs(),
    };
    Ok((batch_loss, gradients))
}

//! The MISP-DPO objective: paper §4.1, Eq. 5-10, with the importance-sampling gradient of Eq. 8.
//!
//! Stage: train. Pure functions from summed sequence log-probabilities (policy and reference) to
//! a loss and its diagnostics: no model, no I/O. Everything is batched over records (dimension
//! `B`) and, for the image term, over the `K` negative images of each record.
//!
//! Notation (docs/design.md §3): `pi(y | x, m)` is the summed log-probability of response `y` (EOS
//! included) given prompt `x` and image `m`; the implicit reward is
//! `r(y, m) = pi_theta(y | x, m) - pi_ref(y | x, m)`; `y_p` / `y_n` are the chosen / rejected
//! responses, `m_p` the true image and `m_n^i` the negatives.
//!
//! Numerics: every loss is written in the forms `softplus` and shifted `logsumexp`, never as a sum
//! of raw exponentials, so advantages of magnitude 1e4 stay finite in f32. Negatives that are
//! masked out are replaced by a large negative constant *before* any arithmetic (`where_cond`),
//! so a NaN or garbage value in a masked slot can reach neither the value nor the gradient.
//! Inputs must be f32 or f64; the trainer up-casts bf16 log-probs before calling in here.

use candle_core::{DType, Tensor, D};

/// Stand-in for `-inf` in masked slots. Finite so that `x - x` stays 0 instead of NaN, and so
/// negative that `exp(FILL - anything realistic)` underflows to exactly 0 in f32 and f64.
const MASK_FILL: f64 = -1e30;

/// Errors of the objective: all of them are caller mistakes in shapes or types.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    #[error("objective input `{field}` has shape {got:?}, expected {expected}")]
    Shape {
        field: &'static str,
        got: Vec<usize>,
        expected: String,
    },
    #[error("objective input `{field}` has dtype {got:?}; all log-probs must share one dtype, f32 or f64")]
    DType { field: &'static str, got: DType },
    #[error("the importance-sampling estimator needs `log_q` (the proposal log-probabilities of the negatives)")]
    MissingProposal,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ObjectiveError>;

/// How the gradient of the image term is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Estimator {
    /// The exact gradient of Eq. 6 (Lemma 4.1, Eq. 7): weights `p = softmax(a)`.
    Exact,
    /// Eq. 8, self-normalised: weights `w = softmax(a - log q)` with `q` the proposal
    /// probabilities the miner recorded for the selected negatives.
    #[default]
    ImportanceSampling,
}

/// The weights of Eq. 10 and the temperature `beta`. A training variant of the paper is a choice
/// of these numbers (and of negatives), never a code path of its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectiveConfig {
    /// DPO temperature `beta` (paper: 0.5).
    pub beta: f64,
    /// Weight of the image term `L_img` (1 in MISP-DPO, 0 for text-only DPO).
    pub image_weight: f64,
    /// `lambda` of Eq. 10, the weight of the text term (paper: 1).
    pub lambda: f64,
    /// Weight of mDPO's anchor term `softplus(-beta * r(y_p, m_p))` (0 except for mDPO).
    pub anchor_weight: f64,
    /// Exact gradient or the importance-sampling estimator of Eq. 8.
    pub estimator: Estimator,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            beta: 0.5,
            image_weight: 1.0,
            lambda: 1.0,
            anchor_weight: 0.0,
            estimator: Estimator::ImportanceSampling,
        }
    }
}

/// Summed response log-probabilities of one policy (theta or the reference) for a batch of `B`
/// records with `K` negative images each.
#[derive(Debug, Clone)]
pub struct SequenceLogps {
    /// `pi(y_p | x, m_p)`, shape `[B]`.
    pub chosen: Tensor,
    /// `pi(y_p | x, m_n^i)`, shape `[B, K]` (`K` may be 0 for text-only variants).
    pub chosen_on_negatives: Tensor,
    /// `pi(y_n | x, m_p)`, shape `[B]`.
    pub rejected: Tensor,
}

/// What the objective needs to know about each record's negatives.
#[derive(Debug, Clone)]
pub struct NegativeSlots {
    /// `[B, K]`, any dtype: non-zero where the negative is usable. Records with fewer than `K`
    /// usable negatives still train on the ones they have; with none, their image term is 0.
    pub mask: Tensor,
    /// `[B, K]` log proposal probabilities `log q_phi(m_n^i | x, m_p, y_p)`; needed by the
    /// importance-sampling estimator, ignored by the exact one. Must be finite where usable.
    pub log_q: Option<Tensor>,
}

/// Importance-sampling diagnostics, per record (`[B]`, detached). Records without usable
/// negatives report 0 for both.
#[derive(Debug, Clone)]
pub struct IsDiagnostics {
    /// Effective sample size `1 / sum_i w_i^2`, in `[1, K]`.
    pub ess: Tensor,
    /// `max_i w_i`, in `[1/K, 1]`.
    pub max_weight: Tensor,
}

/// The result of [`misp_dpo_loss`].
#[derive(Debug, Clone)]
pub struct ObjectiveOutput {
    /// Scalar to call `backward` on: the mean over records of the per-record loss. Its value is
    /// Eq. 10 exactly; its gradient is Eq. 7 or Eq. 8 depending on the estimator.
    pub loss: Tensor,
    /// `[B]` per-record loss, differentiable like `loss` (for gradient accumulation by sum).
    pub per_record: Tensor,
    /// `[B]` detached values of each term, unweighted.
    pub image: Tensor,
    pub text: Tensor,
    pub anchor: Tensor,
    /// `[B, K]` detached image advantages `a_i` (masked slots hold a large negative number).
    pub advantages: Tensor,
    /// `[B]` detached `beta * r(y_p, m_p)` and `beta * r(y_n, m_p)` (TRL's chosen / rejected rewards).
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
    /// `[B, K]` u8, 1 where the negative is usable.
    pub usable: Tensor,
    /// Present with the importance-sampling estimator.
    pub is_diagnostics: Option<IsDiagnostics>,
}

/// Numerically stable `softplus(x) = log(1 + exp(x)) = relu(x) + log1p(exp(-|x|))`, element-wise
/// and differentiable. Exact in both tails: `x` linear for large `x`, `exp(x)` for very negative.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = x.abs()?.neg()?.exp()?; // in (0, 1]: never overflows
    Ok((x.relu()? + log1p_unit(&tail)?)?)
}

/// `log(1 + y)` for `y` in `[0, 1]`, accurate for tiny `y` (where `log(1 + y)` would round to 0)
/// and differentiable; both branches are finite for every `y` in range, so the `where_cond`
/// cannot leak a NaN into the gradient.
fn log1p_unit(y: &Tensor) -> Result<Tensor> {
    // Series y - y^2/2 + y^3/3 below the threshold (truncation error y^4/4), plain log above
    // (rounding error eps/y): 1e-4 balances the two at about 1e-12 relative in f64.
    let small = y.lt(1e-4)?;
    let y2 = y.sqr()?;
    let series = ((y - (&y2 * 0.5)?)? + ((&y2 * y)? * (1.0 / 3.0))?)?;
    let direct = (y + 1.0)?.log()?;
    Ok(small.where_cond(&series, &direct)?)
}

/// Numerically stable `sigmoid(x) = exp(-softplus(-x))`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(softplus(&x.neg()?)?.neg()?.exp()?)
}

/// `logsumexp` over the last dimension of `[B, K]` restricted to usable slots, shape `[B]`.
///
/// The shift is the row maximum, detached: `LSE` does not depend on it (its gradient through the
/// shift cancels to zero), so detaching only saves the max backward and its rounding.
/// A row with no usable slot returns about `MASK_FILL`, i.e. `-inf` for every later use.
pub fn masked_logsumexp(x: &Tensor, usable: &Tensor) -> Result<Tensor> {
    let filled = masked_fill(x, usable)?;
    let shift = filled.detach().max_keepdim(D::Minus1)?;
    let sum = filled
        .broadcast_sub(&shift)?
        .exp()?
        .sum_keepdim(D::Minus1)?;
    Ok((sum.log()? + shift)?.squeeze(D::Minus1)?)
}

/// `x` where `usable` is non-zero, `MASK_FILL` elsewhere.
fn masked_fill(x: &Tensor, usable: &Tensor) -> Result<Tensor> {
    let fill = Tensor::full(MASK_FILL, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(usable.where_cond(x, &fill)?)
}

/// Multi-negative DPO of Eq. 5 on rewards: `softplus(logsumexp_i beta * (r_i - r_p))`, with
/// `r_p` `[B]` the preferred reward and `r_neg` `[B, N]` the non-preferred ones. For `N = 1` it
/// is DPO (Eq. 2). Returns `[B]`.
pub fn multi_negative_dpo(
    r_p: &Tensor,
    r_neg: &Tensor,
    usable: &Tensor,
    beta: f64,
) -> Result<Tensor> {
    let a = image_advantages(r_p, r_neg, beta)?;
    image_loss(&a, usable)
}

/// The advantages of Lemma 4.1, `a_i = beta * (r(y_p, m_n^i) - r(y_p, m_p))`, shape `[B, K]`.
pub fn image_advantages(
    r_chosen: &Tensor,
    r_chosen_on_negatives: &Tensor,
    beta: f64,
) -> Result<Tensor> {
    let diff = r_chosen_on_negatives.broadcast_sub(&r_chosen.unsqueeze(D::Minus1)?)?;
    Ok((diff * beta)?)
}

/// Eq. 6: `L_img = -log sigmoid(-logsumexp_i a_i) = softplus(logsumexp_i a_i)` over the usable
/// negatives, `[B]`. With `K = 1` this is the single-negative image DPO of Eq. 3; a record with
/// no usable negative contributes 0 (and a zero gradient).
pub fn image_loss(advantages: &Tensor, usable: &Tensor) -> Result<Tensor> {
    if advantages.dim(D::Minus1)? == 0 {
        return Ok(Tensor::zeros(
            advantages.dim(0)?,
            advantages.dtype(),
            advantages.device(),
        )?);
    }
    softplus(&masked_logsumexp(advantages, usable)?)
}

/// Eq. 6 valued, Eq. 8 differentiated: returns a `[B]` tensor whose value is `L_img` and whose
/// gradient is that of the surrogate `stopgrad(sigmoid(LSE a)) * sum_i stopgrad(w_i) * a_i`,
/// `w = softmax(a - log q)` over the usable negatives (self-normalised importance weights).
/// With uniform `q`, `w = softmax(a)` and the gradient is exactly Eq. 7.
pub fn image_loss_importance_sampled(
    advantages: &Tensor,
    usable: &Tensor,
    log_q: &Tensor,
) -> Result<(Tensor, IsDiagnostics)> {
    let (b, k) = advantages.dims2()?;
    let dtype = advantages.dtype();
    let device = advantages.device();
    if k == 0 {
        let zeros = Tensor::zeros(b, dtype, device)?;
        let diag = IsDiagnostics {
            ess: zeros.clone(),
            max_weight: zeros.clone(),
        };
        return Ok((zeros, diag));
    }
    let lse = masked_logsumexp(advantages, usable)?;
    let value = softplus(&lse)?.detach();

    // Self-normalised weights, computed off the graph. Masked slots get weight 0; a row with no
    // usable slot would otherwise come out uniform, so it is zeroed explicitly too.
    let a = advantages.detach();
    let log_w_unnorm = (&a - log_q.detach())?;
    let log_norm = masked_logsumexp(&log_w_unnorm, usable)?;
    let w = masked_fill(&log_w_unnorm, usable)?
        .broadcast_sub(&log_norm.unsqueeze(D::Minus1)?)?
        .exp()?;
    let zeros_bk = Tensor::zeros((b, k), dtype, device)?;
    let w = usable.where_cond(&w, &zeros_bk)?;
    let coef = sigmoid(&lse)?.detach(); // exactly 0 for rows without usable negatives

    // Masked advantages enter the surrogate as 0 (not MASK_FILL) so 0 * a never meets a NaN.
    let a_live = usable.where_cond(advantages, &zeros_bk)?;
    let surrogate = (coef * (w.clone() * a_live)?.sum(D::Minus1)?)?;
    let with_is_gradient = (value + (&surrogate - surrogate.detach())?)?;

    let sum_w2 = w.sqr()?.sum(D::Minus1)?;
    let has_any = sum_w2.gt(0.0)?;
    let zeros_b = Tensor::zeros(b, dtype, device)?;
    let ones_b = Tensor::ones(b, dtype, device)?;
    let ess = has_any.where_cond(&has_any.where_cond(&sum_w2, &ones_b)?.recip()?, &zeros_b)?;
    let max_weight = w.max(D::Minus1)?;
    Ok((with_is_gradient, IsDiagnostics { ess, max_weight }))
}

/// Eq. 9: `L_text = -log sigmoid(beta * (r(y_p, m_p) - r(y_n, m_p)))`, `[B]` (DPO, Eq. 2).
pub fn text_loss(r_chosen: &Tensor, r_rejected: &Tensor, beta: f64) -> Result<Tensor> {
    softplus(&((r_chosen - r_rejected)? * (-beta))?)
}

/// mDPO's anchor (Wang et al. 2024, with threshold 0): `-log sigmoid(beta * r(y_p, m_p))`,
/// keeping the chosen response's likelihood from falling while the image term pushes. `[B]`.
pub fn anchor_loss(r_chosen: &Tensor, beta: f64) -> Result<Tensor> {
    softplus(&(r_chosen * (-beta))?)
}

/// Eq. 10 (plus the optional anchor): `L = w_img * L_img + lambda * L_text + w_anchor * L_anchor`,
/// averaged over the `B` records of the batch.
pub fn misp_dpo_loss(
    cfg: &ObjectiveConfig,
    policy: &SequenceLogps,
    reference: &SequenceLogps,
    negatives: &NegativeSlots,
) -> Result<ObjectiveOutput> {
    let (b, k) = check_inputs(policy, reference, negatives)?;
    let r_chosen = (&policy.chosen - &reference.chosen)?;
    let r_rejected = (&policy.rejected - &reference.rejected)?;
    let r_on_negatives = (&policy.chosen_on_negatives - &reference.chosen_on_negatives)?;
    let usable = negatives.mask.ne(0.0)?;

    let advantages = image_advantages(&r_chosen, &r_on_negatives, cfg.beta)?;
    let (image, is_diagnostics) = match cfg.estimator {
        Estimator::Exact => (image_loss(&advantages, &usable)?, None),
        Estimator::ImportanceSampling => {
            let log_q = negatives
                .log_q
                .as_ref()
                .ok_or(ObjectiveError::MissingProposal)?;
            expect_shape("log_q", log_q, &[b, k])?;
            let (image, diag) = image_loss_importance_sampled(&advantages, &usable, log_q)?;
            (image, Some(diag))
        }
    };
    let text = text_loss(&r_chosen, &r_rejected, cfg.beta)?;
    let anchor = anchor_loss(&r_chosen, cfg.beta)?;

    let per_record = ((((&image * cfg.image_weight)? + (&text * cfg.lambda)?)?
        + (&anchor * cfg.anchor_weight)?)?)
        .contiguous()?;
    let loss = per_record.mean_all()?;
    Ok(ObjectiveOutput {
        loss,
        per_record,
        image: image.detach(),
        text: text.detach(),
        anchor: anchor.detach(),
        advantages: masked_fill(&advantages, &usable)?.detach(),
        chosen_rewards: (r_chosen * cfg.beta)?.detach(),
        rejected_rewards: (r_rejected * cfg.beta)?.detach(),
        usable,
        is_diagnostics,
    })
}

/// Batch means of the objective's terms and rewards, under TRL-style metric names
/// (docs/design.md §3). Image metrics are over records with at least one usable negative and are
/// `None` when the batch has none.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ObjectiveMetrics {
    /// `loss`: the mean per-record loss of Eq. 10.
    pub loss: f64,
    /// `loss/img`, `loss/text`, `loss/anchor`: unweighted term means.
    pub loss_img: f64,
    pub loss_text: f64,
    pub loss_anchor: f64,
    /// `rewards/chosen`: mean `beta * r(y_p, m_p)`.
    pub rewards_chosen: f64,
    /// `rewards/rejected`: mean `beta * r(y_n, m_p)`.
    pub rewards_rejected: f64,
    /// `rewards/margins`: mean of chosen minus rejected.
    pub rewards_margins: f64,
    /// `rewards/accuracies`: share of records whose chosen reward beats the rejected one.
    pub rewards_accuracies: f64,
    /// `rewards/img_negatives`: mean `beta * r(y_p, m_n^i)` over usable negatives.
    pub rewards_img_negatives: Option<f64>,
    /// `rewards/img_accuracies`: share of records where the true image beats every negative.
    pub rewards_img_accuracies: Option<f64>,
    /// `is/ess` and `is/max_weight`, means over records with negatives (IS estimator only).
    pub is_ess: Option<f64>,
    pub is_max_weight: Option<f64>,
}

impl ObjectiveOutput {
    /// Reduces the per-record tensors to [`ObjectiveMetrics`] (one device-to-host copy each).
    pub fn metrics(&self) -> Result<ObjectiveMetrics> {
        let host = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1()?) };
        let host2 =
            |t: &Tensor| -> Result<Vec<Vec<f64>>> { Ok(t.to_dtype(DType::F64)?.to_vec2()?) };
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let mean_opt = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);

        let chosen = host(&self.chosen_rewards)?;
        let rejected = host(&self.rejected_rewards)?;
        let usable = host2(&self.usable)?;
        let advantages = host2(&self.advantages)?;
        let margins: Vec<f64> = chosen.iter().zip(&rejected).map(|(c, r)| c - r).collect();
        let wins: Vec<f64> = margins
            .iter()
            .map(|m| f64::from(u8::from(*m > 0.0)))
            .collect();

        let mut with_negatives = Vec::new(); // record indices with a usable negative
        let mut negative_rewards = Vec::new();
        let mut img_wins = Vec::new();
        for (i, (row_usable, row_a)) in usable.iter().zip(&advantages).enumerate() {
            let live: Vec<f64> = row_a
                .iter()
                .zip(row_usable)
                .filter(|(_, u)| **u != 0.0)
                .map(|(a, _)| *a)
                .collect();
            if live.is_empty() {
                continue;
            }
            with_negatives.push(i);
            // a_i = beta * (r(y_p, m_n^i) - r(y_p, m_p)), so beta * r(y_p, m_n^i) = a_i + chosen.
            negative_rewards.extend(live.iter().map(|a| a + chosen[i]));
            img_wins.push(f64::from(u8::from(live.iter().all(|a| *a < 0.0))));
        }
        let (is_ess, is_max_weight) = match &self.is_diagnostics {
            Some(d) => {
                let ess = host(&d.ess)?;
                let maxw = host(&d.max_weight)?;
                let pick = |v: &[f64]| with_negatives.iter().map(|&i| v[i]).collect::<Vec<_>>();
                (mean_opt(&pick(&ess)), mean_opt(&pick(&maxw)))
            }
            None => (None, None),
        };
        Ok(ObjectiveMetrics {
            loss: mean(&host(&self.per_record.detach())?),
            loss_img: mean(&host(&self.image)?),
            loss_text: mean(&host(&self.text)?),
            loss_anchor: mean(&host(&self.anchor)?),
            rewards_chosen: mean(&chosen),
            rewards_rejected: mean(&rejected),
            rewards_margins: mean(&margins),
            rewards_accuracies: mean(&wins),
            rewards_img_negatives: mean_opt(&negative_rewards),
            rewards_img_accuracies: mean_opt(&img_wins),
            is_ess,
            is_max_weight,
        })
    }
}

/// Checks every input against `[B]` / `[B, K]` and a common float dtype; returns `(B, K)`.
fn check_inputs(
    policy: &SequenceLogps,
    reference: &SequenceLogps,
    negatives: &NegativeSlots,
) -> Result<(usize, usize)> {
    let (b, k) = match *policy.chosen_on_negatives.dims() {
        [b, k] => (b, k),
        ref other => {
            return Err(ObjectiveError::Shape {
                field: "policy.chosen_on_negatives",
                got: other.to_vec(),
                expected: "[B, K]".into(),
            })
        }
    };
    let dtype = policy.chosen.dtype();
    let logps: [(&'static str, &Tensor, &[usize]); 6] = [
        ("policy.chosen", &policy.chosen, &[b]),
        ("policy.rejected", &policy.rejected, &[b]),
        (
            "policy.chosen_on_negatives",
            &policy.chosen_on_negatives,
            &[b, k],
        ),
        ("reference.chosen", &reference.chosen, &[b]),
        ("reference.rejected", &reference.rejected, &[b]),
        (
            "reference.chosen_on_negatives",
            &reference.chosen_on_negatives,
            &[b, k],
        ),
    ];
    for (field, t, want) in logps {
        expect_shape(field, t, want)?;
        if !matches!(t.dtype(), DType::F32 | DType::F64) || t.dtype() != dtype {
            return Err(ObjectiveError::DType {
                field,
                got: t.dtype(),
            });
        }
    }
    expect_shape("mask", &negatives.mask, &[b, k])?;
    Ok((b, k))
}

fn expect_shape(field: &'static str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(ObjectiveError::Shape {
            field,
            got: t.dims().to_vec(),
            expected: format!("{want:?}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;

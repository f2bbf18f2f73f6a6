//! Choosing K negatives among a record's scored candidates: Eq. 12 scores, the proposal `q`,
//! Algorithm 1 (greedy, diversity-promoting) and its stochastic analogue.
//!
//! Inputs are per-candidate SAE outputs (reconstruction error, `||z||_1`, the latent code `z`);
//! outputs are candidate positions with the probability the importance-sampling estimator will
//! divide by (docs/design.md §2).

use rand::Rng;

/// Eq. 12: `s_i = recon_i / max_j recon_j + ||z_i||_1 / max_j ||z_j||_1` over the candidate set.
/// A term whose maximum is 0 (every candidate identical) contributes 0 rather than 0/0.
pub fn eq12_scores(recon: &[f64], l1: &[f64]) -> Vec<f64> {
    let max_r = recon.iter().cloned().fold(0.0, f64::max);
    let max_l = l1.iter().cloned().fold(0.0, f64::max);
    let norm = |x: f64, m: f64| if m > 0.0 { x / m } else { 0.0 };
    recon
        .iter()
        .zip(l1)
        .map(|(r, l)| norm(*r, max_r) + norm(*l, max_l))
        .collect()
}

/// The proposal `q_i = softmax(s / tau)_i` over the candidate set (stable form).
pub fn proposal(scores: &[f64], tau: f64) -> Vec<f64> {
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|s| ((s - m) / tau).exp()).collect();
    let total: f64 = e.iter().sum();
    e.into_iter().map(|x| x / total).collect()
}

/// One selected candidate: its position in the candidate set and the probability recorded
/// for it (`q_i` for greedy picks, the draw probability for sampled ones).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub index: usize,
    pub q: f64,
}

/// `min_{j in S} (1 - cos(z_i, z_j))` for every candidate, maintained as picks are added.
struct Diversity<'a> {
    z: &'a [f32],
    hidden: usize,
    norms: Vec<f64>,
    /// `None` until the first pick: the min over an empty set is taken as 0 (Algorithm 1's
    /// first step is a plain `argmax s_i`).
    min_dist: Option<Vec<f64>>,
}

impl<'a> Diversity<'a> {
    fn new(z: &'a [f32], hidden: usize) -> Self {
        let norms = z
            .chunks(hidden)
            .map(|r| r.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt())
            .collect();
        Self {
            z,
            hidden,
            norms,
            min_dist: None,
        }
    }

    fn get(&self, i: usize) -> f64 {
        self.min_dist.as_ref().map_or(0.0, |d| d[i])
    }

    /// What the diversity terms are divided by at this step: their largest value among the
    /// candidates not yet taken, so that each lies in `[0, 1]` like each term of Eq. 12 (`None`
    /// when that maximum is 0: the term then contributes 0). Why: sigmoid codes keep a positive
    /// floor on every latent, so raw `1 - cos` between two candidates' codes stays small (about
    /// 0.1 on ShapesWorld, docs/design.md §12) while Eq. 12's scores spread over about 0.65;
    /// unscaled, `lambda` barely moved the picks off a plain top-K by score.
    fn normaliser(&self, taken: &[bool]) -> Option<f64> {
        let d = self.min_dist.as_ref()?;
        let max = d
            .iter()
            .zip(taken)
            .filter(|(_, t)| !**t)
            .map(|(v, _)| *v)
            .fold(0.0, f64::max);
        (max > 0.0).then_some(max)
    }

    /// The max-normalised diversity term of candidate `i` (see [`Diversity::normaliser`]).
    fn scaled(&self, i: usize, normaliser: Option<f64>) -> f64 {
        normaliser.map_or(0.0, |m| self.get(i) / m)
    }

    fn add(&mut self, j: usize) {
        let h = self.hidden;
        let zj = &self.z[j * h..(j + 1) * h];
        let n = self.norms.len();
        let dist = self.min_dist.get_or_insert_with(|| vec![f64::INFINITY; n]);
        for (i, zi) in self.z.chunks(h).enumerate() {
            let dot: f64 = zi
                .iter()
                .zip(zj)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let denom = self.norms[i] * self.norms[j];
            let cos = if denom > 0.0 { dot / denom } else { 0.0 };
            dist[i] = dist[i].min(1.0 - cos);
        }
    }
}

/// Algorithm 1: first `argmax_i s_i`, then repeatedly
/// `argmax_{i not in S} s_i + lambda * min_{j in S} (1 - cos(z_i, z_j)) / max_i(...)` until
/// `|S| = k` (or the candidates run out); the diversity term is max-normalised over the
/// candidates left, as Eq. 12 normalises its own terms. Ties go to the earlier candidate. Each pick carries `q_i` of
/// [`proposal`] with temperature `tau`.
pub fn greedy(
    scores: &[f64],
    z: &[f32],
    hidden: usize,
    k: usize,
    lambda: f64,
    tau: f64,
) -> Vec<Pick> {
    let q = proposal(scores, tau);
    let mut div = Diversity::new(z, hidden);
    let mut taken = vec![false; scores.len()];
    let mut picks = Vec::with_capacity(k);
    while picks.len() < k.min(scores.len()) {
        let mut best: Option<(usize, f64)> = None;
        let norm = div.normaliser(&taken);
        for (i, s) in scores.iter().enumerate() {
            if taken[i] {
                continue;
            }
            let v = s + lambda * div.scaled(i, norm);
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((i, v));
            }
        }
        let (i, _) = best.expect("a candidate is left while picks < len");
        taken[i] = true;
        div.add(i);
        picks.push(Pick { index: i, q: q[i] });
    }
    picks
}

/// The stochastic analogue of Algorithm 1: pick `t` is drawn among the candidates left with
/// probability proportional to `exp((s_i + lambda * div_i) / tau)` (`div_i` max-normalised as
/// in [`greedy`]); each pick carries that probability. The first draw is therefore from the proposal `q` itself.
pub fn sample(
    scores: &[f64],
    z: &[f32],
    hidden: usize,
    k: usize,
    lambda: f64,
    tau: f64,
    rng: &mut impl Rng,
) -> Vec<Pick> {
    let mut div = Diversity::new(z, hidden);
    let mut taken = vec![false; scores.len()];
    let mut picks = Vec::with_capacity(k);
    while picks.len() < k.min(scores.len()) {
        let norm = div.normaliser(&taken);
        let logits: Vec<f64> = (0..scores.len())
            .map(|i| {
                if taken[i] {
                    f64::NEG_INFINITY
                } else {
                    (scores[i] + lambda * div.scaled(i, norm)) / tau
                }
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut u = rng.random::<f64>() * total;
        // Walk the cumulative weights; the last live candidate absorbs rounding at the top.
        let mut chosen = None;
        for (i, w) in weights.iter().enumerate() {
            if taken[i] {
                continue;
            }
            chosen = Some(i);
            if u < *w {
                break;
            }
            u -= w;
        }
        let i = chosen.expect("a candidate is left while picks < len");
        taken[i] = true;
        div.add(i);
        picks.push(Pick {
            index: i,
            q: weights[i] / total,
        });
    }
    picks
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn eq12_normalises_each_term_by_its_max() {
        let s = eq12_scores(&[1.0, 2.0, 4.0], &[3.0, 1.5, 0.0]);
        assert_eq!(s, vec![0.25 + 1.0, 0.5 + 0.5, 1.0 + 0.0]);
        assert_eq!(eq12_scores(&[0.0, 0.0], &[0.0, 0.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn algorithm1_on_a_hand_made_case() {
        // Candidates 0 and 1 score highest but share a code; 2 scores lower with an orthogonal
        // code. lambda = 0.5: pick 0 (best score), then 2 (1.0 + 0.5 * 1 beats 1.4 + 0.5 * 0),
        // then 1 (1.4 + 0 beats 3's 0.2 + 0.5 * min(1 - cos) = 0.2 + 0.5 * ~0.29).
        let scores = [1.5, 1.4, 1.0, 0.2];
        let z = [
            1.0, 0.0, //
            1.0, 0.0, //
            0.0, 1.0, //
            1.0, 1.0, //
        ];
        let picks = greedy(&scores, &z, 2, 3, 0.5, 1.0);
        let idx: Vec<usize> = picks.iter().map(|p| p.index).collect();
        assert_eq!(idx, vec![0, 2, 1]);
        // Without diversity it is a plain top-3 by score.
        let plain: Vec<usize> = greedy(&scores, &z, 2, 3, 0.0, 1.0)
            .iter()
            .map(|p| p.index)
            .collect();
        assert_eq!(plain, vec![0, 1, 2]);
        // q is softmax(s / tau).
        let q = proposal(&scores, 1.0);
        assert!((picks[1].q - q[2]).abs() < 1e-15);
        assert!((q.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_diversity_term_is_max_normalised_like_eq12s_terms() {
        // Sigmoid-like codes: every latent sits on a floor of 0.1, so the codes of candidates
        // 0 and 2 are only 1 - cos = 1 - 0.05 / 0.06 = 0.167 apart. Unnormalised, lambda = 0.5
        // would add 0.083 to candidate 2 (0.883 < 0.95: candidate 1, a copy of 0, wins);
        // normalised by the largest distance left (0.167), candidate 2 gets the full 0.5.
        let scores = [1.0, 0.95, 0.8];
        let z = [
            0.2, 0.1, 0.1, //
            0.2, 0.1, 0.1, //
            0.1, 0.2, 0.1, //
        ];
        let idx: Vec<usize> = greedy(&scores, &z, 3, 2, 0.5, 1.0)
            .iter()
            .map(|p| p.index)
            .collect();
        assert_eq!(idx, vec![0, 2]);
        // When every candidate left is a copy of a pick, the term is 0, not 0/0.
        let same = [0.3, 0.3, 0.3, 0.3];
        let idx: Vec<usize> = greedy(&[0.5, 0.7], &same, 2, 2, 0.5, 1.0)
            .iter()
            .map(|p| p.index)
            .collect();
        assert_eq!(idx, vec![1, 0]);
    }

    #[test]
    fn k_larger_than_the_set_returns_every_candidate_once() {
        let picks = greedy(&[0.1, 0.3], &[1.0, 0.5], 1, 5, 0.5, 1.0);
        assert_eq!(picks.len(), 2);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(
            sample(&[0.1, 0.3], &[1.0, 0.5], 1, 5, 0.5, 1.0, &mut rng).len(),
            2
        );
    }

    #[test]
    fn sample_is_reproducible_and_records_its_draw_probability() {
        let scores: Vec<f64> = (0..20).map(|i| (i as f64 * 0.37).sin() + 1.0).collect();
        let z: Vec<f32> = (0..60)
            .map(|i| ((i * 7 % 11) as f32) / 11.0 + 0.05)
            .collect();
        let draw = |seed| {
            sample(
                &scores,
                &z,
                3,
                4,
                0.5,
                0.7,
                &mut rand::rngs::StdRng::seed_from_u64(seed),
            )
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        // The first draw's probability is the proposal's, and the empirical frequency of the
        // first pick matches it (20k draws: 4 sigma is about 0.014 at p = 0.1).
        let q = proposal(&scores, 0.7);
        let first = draw(9)[0];
        assert!((first.q - q[first.index]).abs() < 1e-12);
        let mut counts = [0usize; 20];
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..20_000 {
            counts[sample(&scores, &z, 3, 1, 0.5, 0.7, &mut rng)[0].index] += 1;
        }
        for (c, p) in counts.iter().zip(&q) {
            assert!(
                (*c as f64 / 20_000.0 - p).abs() < 0.015,
                "freq {c} vs q {p}"
            );
        }
        // Later draws: recorded q equals the normalised weight computed by hand.
        let picks = draw(5);
        let mut div = Diversity::new(&z, 3);
        let mut taken = [false; 20];
        for p in &picks {
            // The diversity term, max-normalised over the candidates left.
            let max = (0..20)
                .filter(|&i| !taken[i])
                .map(|i| div.get(i))
                .fold(0.0, f64::max);
            let d = |i: usize| if max > 0.0 { div.get(i) / max } else { 0.0 };
            let w: Vec<f64> = (0..20)
                .map(|i| {
                    if taken[i] {
                        0.0
                    } else {
                        ((scores[i] + 0.5 * d(i)) / 0.7).exp()
                    }
                })
                .collect();
            let want = w[p.index] / w.iter().sum::<f64>();
            assert!((p.q - want).abs() < 1e-12, "{} vs {want}", p.q);
            taken[p.index] = true;
            div.add(p.index);
        }
    }
}

//! Unit tests of the objective: finite differences, the special cases the paper states, the
//! importance-sampling gradient by hand, and extreme inputs. The PyTorch conformance test is in
//! `tests/objective_torch.rs`.

use super::*;
use candle_core::{Device, Var};

/// Tiny deterministic generator (xorshift64*) so tests need no RNG crate and never flake.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    fn vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }
}

/// A batch as plain numbers: `b` records, `k` negatives, policy and reference log-probs.
#[derive(Clone)]
struct Case {
    b: usize,
    k: usize,
    policy: [Vec<f64>; 3], // chosen [b], rejected [b], chosen_on_negatives [b*k]
    reference: [Vec<f64>; 3],
    mask: Vec<f64>,
    log_q: Vec<f64>,
}

impl Case {
    fn random(seed: u64, b: usize, k: usize) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let policy = [
            rng.vec(b, -40.0, 8.0),
            rng.vec(b, -40.0, 8.0),
            rng.vec(b * k, -40.0, 8.0),
        ];
        let reference = [0, 1, 2].map(|i| {
            policy[i]
                .iter()
                .map(|p| p + 1.5 * rng.normal())
                .collect::<Vec<_>>()
        });
        let mask = (0..b * k)
            .map(|_| f64::from(u8::from(rng.uniform() > 0.3)))
            .collect();
        // log_q: a proper log-softmax per record
        let mut log_q = rng.vec(b * k, 0.0, 1.5);
        for row in log_q.chunks_mut(k.max(1)) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            row.iter_mut().for_each(|x| *x -= lse);
        }
        Case {
            b,
            k,
            policy,
            reference,
            mask,
            log_q,
        }
    }

    fn tensors(&self, dtype: DType) -> (Vec<Var>, SequenceLogps, NegativeSlots) {
        let dev = Device::Cpu;
        let t = |v: &[f64], shape: &[usize]| {
            Tensor::from_slice(v, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (b, k) = (self.b, self.k);
        let vars: Vec<Var> = vec![
            Var::from_tensor(&t(&self.policy[0], &[b])).unwrap(),
            Var::from_tensor(&t(&self.policy[1], &[b])).unwrap(),
            Var::from_tensor(&t(&self.policy[2], &[b, k])).unwrap(),
        ];
        let reference = SequenceLogps {
            chosen: t(&self.reference[0], &[b]),
            rejected: t(&self.reference[1], &[b]),
            chosen_on_negatives: t(&self.reference[2], &[b, k]),
        };
        let negatives = NegativeSlots {
            mask: t(&self.mask, &[b, k]),
            log_q: Some(t(&self.log_q, &[b, k])),
        };
        (vars, reference, negatives)
    }

    fn policy_of(vars: &[Var]) -> SequenceLogps {
        SequenceLogps {
            chosen: vars[0].as_tensor().clone(),
            rejected: vars[1].as_tensor().clone(),
            chosen_on_negatives: vars[2].as_tensor().clone(),
        }
    }

    /// Loss value and autograd gradient w.r.t. the three policy inputs (flattened).
    fn eval(&self, cfg: &ObjectiveConfig, dtype: DType) -> (f64, [Vec<f64>; 3], ObjectiveOutput) {
        let (vars, reference, negatives) = self.tensors(dtype);
        let out = misp_dpo_loss(cfg, &Self::policy_of(&vars), &reference, &negatives).unwrap();
        let grads = out.loss.backward().unwrap();
        let g = |v: &Var| -> Vec<f64> {
            match grads.get(v.as_tensor()) {
                Some(g) => g
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                None => vec![0.0; v.elem_count()],
            }
        };
        let value = out
            .loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        (value, [g(&vars[0]), g(&vars[1]), g(&vars[2])], out)
    }

    fn value(&self, cfg: &ObjectiveConfig) -> f64 {
        self.eval(cfg, DType::F64).0
    }
}

fn exact(cfg: ObjectiveConfig) -> ObjectiveConfig {
    ObjectiveConfig {
        estimator: Estimator::Exact,
        ..cfg
    }
}

/// Central differences of the loss w.r.t. every policy log-prob, against autograd (f64).
/// Step 1e-5 on O(1) curvature gives truncation ~1e-10 and rounding ~1e-11: tolerance 1e-7.
fn check_fd(case: &Case, cfg: &ObjectiveConfig) {
    let (_, grads, _) = case.eval(cfg, DType::F64);
    let h = 1e-5;
    for (which, grad) in grads.iter().enumerate() {
        for (i, g) in grad.iter().enumerate() {
            let mut plus = case.clone();
            plus.policy[which][i] += h;
            let mut minus = case.clone();
            minus.policy[which][i] -= h;
            let fd = (plus.value(cfg) - minus.value(cfg)) / (2.0 * h);
            assert!(
                (fd - g).abs() <= 1e-7 * (1.0 + g.abs()),
                "input {which}[{i}]: autograd {g}, finite difference {fd}, cfg {cfg:?}"
            );
        }
    }
}

#[test]
fn gradients_of_every_term_match_finite_differences() {
    let case = Case::random(1, 5, 4);
    let only = |image_weight, lambda, anchor_weight| {
        exact(ObjectiveConfig {
            image_weight,
            lambda,
            anchor_weight,
            ..Default::default()
        })
    };
    check_fd(&case, &only(1.0, 0.0, 0.0)); // Eq. 6
    check_fd(&case, &only(0.0, 1.0, 0.0)); // Eq. 9
    check_fd(&case, &only(0.0, 0.0, 1.0)); // anchor
    check_fd(&case, &only(1.0, 0.7, 0.3)); // Eq. 10 with anchor
    check_fd(&Case::random(2, 3, 1), &only(1.0, 1.0, 1.0)); // mDPO shape, K = 1
}

fn scalar(x: f64) -> Tensor {
    Tensor::new(&[x], &Device::Cpu).unwrap()
}

fn first(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

#[test]
fn k1_image_term_is_single_negative_image_dpo() {
    // Eq. 3: -log sigmoid(beta * (r(y_p, m_p) - r(y_p, m_n))), computed by hand.
    for (r_p, r_n, beta) in [
        (0.3, -1.2, 0.5),
        (-2.0, 4.0, 0.1),
        (7.5, 7.5, 1.0),
        (-30.0, 40.0, 0.5),
    ] {
        let a = image_advantages(
            &scalar(r_p),
            &Tensor::new(&[[r_n]], &Device::Cpu).unwrap(),
            beta,
        )
        .unwrap();
        let usable = Tensor::new(&[[1u8]], &Device::Cpu).unwrap();
        let got = first(&image_loss(&a, &usable).unwrap());
        let z: f64 = beta * (r_p - r_n);
        let want = (1.0 + (-z).exp()).ln();
        assert!(
            (got - want).abs() <= 1e-12 * (1.0 + want),
            "r_p {r_p} r_n {r_n}: {got} vs {want}"
        );
    }
}

#[test]
fn n1_multi_negative_dpo_is_dpo() {
    let mut rng = Rng(7);
    for _ in 0..20 {
        let (r_p, r_n, beta) = (3.0 * rng.normal(), 3.0 * rng.normal(), 0.05 + rng.uniform());
        let usable = Tensor::new(&[[1u8]], &Device::Cpu).unwrap();
        let multi = multi_negative_dpo(
            &scalar(r_p),
            &Tensor::new(&[[r_n]], &Device::Cpu).unwrap(),
            &usable,
            beta,
        )
        .unwrap();
        let dpo = text_loss(&scalar(r_p), &scalar(r_n), beta).unwrap();
        assert!((first(&multi) - first(&dpo)).abs() < 1e-13);
    }
}

#[test]
fn multi_negative_is_plackett_luce_over_all_negatives() {
    // Eq. 5 by hand: -log(1 / (1 + sum_i exp(beta * (r_i - r_p)))).
    let (r_p, r_n, beta) = (0.4, [0.1, -0.7, 1.3], 0.5);
    let usable = Tensor::new(&[[1u8, 1, 1]], &Device::Cpu).unwrap();
    let got = multi_negative_dpo(
        &scalar(r_p),
        &Tensor::new(&[r_n], &Device::Cpu).unwrap(),
        &usable,
        beta,
    )
    .unwrap();
    let want = (1.0 + r_n.iter().map(|r| (beta * (r - r_p)).exp()).sum::<f64>()).ln();
    assert!((first(&got) - want).abs() < 1e-14);
}

#[test]
fn importance_sampling_with_uniform_q_equals_exact_gradient() {
    let mut case = Case::random(4, 6, 5);
    case.log_q = vec![-(5f64).ln(); 30];
    let is = ObjectiveConfig {
        estimator: Estimator::ImportanceSampling,
        ..Default::default()
    };
    let (v_is, g_is, _) = case.eval(&is, DType::F64);
    let (v_ex, g_ex, _) = case.eval(&exact(is), DType::F64);
    assert!((v_is - v_ex).abs() < 1e-14, "same value: {v_is} vs {v_ex}");
    for (a, b) in g_is.iter().flatten().zip(g_ex.iter().flatten()) {
        assert!((a - b).abs() < 1e-12, "IS {a} vs exact {b}");
    }
}

#[test]
fn importance_sampling_with_nonuniform_q_matches_hand_formula() {
    // Image term only, so the hand formula is all of the gradient:
    //   dL/d pi(y_p | m_n^i) =  (beta / B) * sigmoid(LSE a) * w_i
    //   dL/d pi(y_p | m_p)   = -(beta / B) * sigmoid(LSE a) * sum_i w_i
    // with w = softmax(a - log q) over the usable negatives.
    let case = Case::random(5, 4, 3);
    let cfg = ObjectiveConfig {
        lambda: 0.0,
        ..Default::default()
    };
    let (b, k, beta) = (case.b, case.k, cfg.beta);
    let (value, grads, out) = case.eval(&cfg, DType::F64);
    let (_, grads_exact, _) = case.eval(&exact(cfg), DType::F64);

    let mut want_neg = vec![0.0; b * k];
    let mut want_pos = vec![0.0; b];
    let mut want_value = 0.0;
    let mut want_ess = vec![0.0; b];
    for i in 0..b {
        let r_p = case.policy[0][i] - case.reference[0][i];
        let live: Vec<usize> = (0..k).filter(|&j| case.mask[i * k + j] != 0.0).collect();
        if live.is_empty() {
            continue;
        }
        let a: Vec<f64> = live
            .iter()
            .map(|&j| beta * (case.policy[2][i * k + j] - case.reference[2][i * k + j] - r_p))
            .collect();
        let lse = a.iter().map(|x| x.exp()).sum::<f64>().ln();
        let sig = 1.0 / (1.0 + (-lse).exp());
        let unnorm: Vec<f64> = live
            .iter()
            .zip(&a)
            .map(|(&j, a)| (a - case.log_q[i * k + j]).exp())
            .collect();
        let total: f64 = unnorm.iter().sum();
        for (n, &j) in live.iter().enumerate() {
            let w = unnorm[n] / total;
            want_neg[i * k + j] = beta / b as f64 * sig * w;
            want_pos[i] -= beta / b as f64 * sig * w;
            want_ess[i] += w * w;
        }
        want_ess[i] = 1.0 / want_ess[i];
        want_value += (1.0 + lse.exp()).ln() / b as f64;
    }
    assert!(
        (value - want_value).abs() < 1e-12,
        "value is L_img: {value} vs {want_value}"
    );
    for (g, w) in grads[2]
        .iter()
        .zip(&want_neg)
        .chain(grads[0].iter().zip(&want_pos))
    {
        assert!((g - w).abs() < 1e-13, "IS gradient {g} vs hand formula {w}");
    }
    let differs = grads[2]
        .iter()
        .zip(&grads_exact[2])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        differs > 1e-3,
        "non-uniform q must change the gradient (max diff {differs})"
    );
    let ess: Vec<f64> = out.is_diagnostics.unwrap().ess.to_vec1().unwrap();
    for (e, w) in ess.iter().zip(&want_ess) {
        assert!((e - w).abs() < 1e-12, "ESS {e} vs {w}");
    }
}

/// A case whose advantages are exactly `a` (reference 0, chosen 0, so a = beta * policy_neg).
fn advantage_case(a: &[Vec<f64>], mask: &[Vec<f64>], beta: f64) -> Case {
    let (b, k) = (a.len(), a[0].len());
    Case {
        b,
        k,
        policy: [
            vec![0.0; b],
            vec![0.0; b],
            a.iter().flatten().map(|x| x / beta).collect(),
        ],
        reference: [vec![0.0; b], vec![0.0; b], vec![0.0; b * k]],
        mask: mask.iter().flatten().cloned().collect(),
        log_q: vec![-(k as f64).ln(); b * k],
    }
}

#[test]
fn extreme_advantages_stay_finite_and_correct() {
    let k = 16;
    let beta = 0.5;
    let a = vec![
        vec![1e4; k],
        vec![-1e4; k],
        (0..k)
            .map(|i| if i % 2 == 0 { 1e4 } else { -1e4 })
            .collect(),
        vec![1e4; k],
    ];
    let mut mask = vec![vec![1.0; k]; 4];
    mask[3] = vec![0.0; k]; // a record with zero usable negatives
    let case = advantage_case(&a, &mask, beta);
    // Image term only; expected per record: softplus(LSE a).
    let want = [
        1e4 + (k as f64).ln(),
        k as f64 * (-1e4f64).exp(),
        1e4 + ((k / 2) as f64).ln(),
        0.0,
    ];
    for dtype in [DType::F64, DType::F32] {
        for estimator in [Estimator::Exact, Estimator::ImportanceSampling] {
            let cfg = ObjectiveConfig {
                lambda: 0.0,
                estimator,
                ..Default::default()
            };
            let (value, grads, out) = case.eval(&cfg, dtype);
            let image: Vec<f64> = out.image.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            let tol = if dtype == DType::F64 { 1e-9 } else { 2e-3 };
            for (got, want) in image.iter().zip(&want) {
                assert!(
                    (got - want).abs() <= tol * (1.0 + want.abs()),
                    "{dtype:?} {estimator:?}: {got} vs {want}"
                );
            }
            assert!(value.is_finite());
            assert!(
                grads.iter().flatten().all(|g| g.is_finite()),
                "{dtype:?} {estimator:?}: non-finite gradient"
            );
            // The empty record gets no gradient at all; the all-1e4 one spreads it evenly.
            assert!(grads[2][3 * k..].iter().all(|g| *g == 0.0));
            let even = beta / 4.0 / k as f64; // sigmoid(LSE) = 1, weights 1/K, batch of 4
            assert!(grads[2][..k]
                .iter()
                .all(|g| (g - even).abs() < 1e-6 * even.max(1e-6) + tol * even));
            let m = out.metrics().unwrap();
            assert_eq!(
                m.rewards_img_accuracies,
                Some(1.0 / 3.0),
                "only the all -1e4 record wins"
            );
        }
    }
}

#[test]
fn masked_slots_never_leak_nan() {
    let mut case = Case::random(6, 3, 4);
    case.mask[0] = 0.0;
    case.mask[5] = 0.0;
    let clean = case.eval(&ObjectiveConfig::default(), DType::F64);
    let mut dirty = case.clone();
    dirty.policy[2][0] = f64::NAN;
    dirty.reference[2][5] = f64::INFINITY;
    dirty.log_q[0] = f64::NEG_INFINITY;
    let got = dirty.eval(&ObjectiveConfig::default(), DType::F64);
    assert_eq!(clean.0, got.0);
    let finite: Vec<f64> = got.1.iter().flatten().cloned().collect();
    assert!(finite.iter().all(|g| g.is_finite()));
    assert_eq!(clean.1, got.1);
}

#[test]
fn fewer_usable_negatives_train_on_the_ones_present() {
    // A record with 2 of 3 usable equals the same record with K = 2 and nothing masked.
    let full = advantage_case(&[vec![0.3, -0.2, 5.0]], &[vec![1.0, 1.0, 0.0]], 0.5);
    let short = advantage_case(&[vec![0.3, -0.2]], &[vec![1.0, 1.0]], 0.5);
    let cfg = exact(ObjectiveConfig::default());
    let (v_full, g_full, _) = full.eval(&cfg, DType::F64);
    let (v_short, g_short, _) = short.eval(&cfg, DType::F64);
    assert!((v_full - v_short).abs() < 1e-14);
    assert_eq!(&g_full[2][..2], &g_short[2][..]);
    assert_eq!(g_full[2][2], 0.0);
}

#[test]
fn metrics_follow_trl_definitions() {
    // Two records, beta 1: chosen rewards (1, -1), rejected (0, 0), advantages (-1, -2 | 3, masked).
    let case = Case {
        b: 2,
        k: 2,
        policy: [vec![1.0, -1.0], vec![0.0, 0.0], vec![0.0, -1.0, 2.0, 9.0]],
        reference: [vec![0.0; 2], vec![0.0; 2], vec![0.0; 4]],
        mask: vec![1.0, 1.0, 1.0, 0.0],
        log_q: vec![-(2f64).ln(); 4],
    };
    let cfg = ObjectiveConfig {
        beta: 1.0,
        ..Default::default()
    };
    let m = case.eval(&cfg, DType::F64).2.metrics().unwrap();
    assert_eq!(m.rewards_chosen, 0.0);
    assert_eq!(m.rewards_margins, 0.0);
    assert_eq!(m.rewards_accuracies, 0.5);
    assert_eq!(m.rewards_img_negatives, Some((0.0 - 1.0 + 2.0) / 3.0));
    assert_eq!(m.rewards_img_accuracies, Some(0.5));
    let ess = m.is_ess.unwrap();
    assert!(
        ess > 1.0 && ess < 2.0,
        "record 1 ESS in (1,2), record 2 ESS 1: mean {ess}"
    );
    assert_eq!(m.is_max_weight.map(|w| w > 0.5), Some(true));
}

#[test]
fn bad_shapes_and_missing_proposal_name_the_field() {
    let case = Case::random(8, 3, 2);
    let (vars, reference, mut negatives) = case.tensors(DType::F64);
    let mut policy = Case::policy_of(&vars);
    policy.rejected = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
    let err =
        misp_dpo_loss(&ObjectiveConfig::default(), &policy, &reference, &negatives).unwrap_err();
    assert!(err.to_string().contains("policy.rejected"), "{err}");

    let policy = Case::policy_of(&vars);
    negatives.log_q = None;
    let err =
        misp_dpo_loss(&ObjectiveConfig::default(), &policy, &reference, &negatives).unwrap_err();
    assert!(matches!(err, ObjectiveError::MissingProposal), "{err}");

    let half = SequenceLogps {
        chosen: reference.chosen.to_dtype(DType::BF16).unwrap(),
        ..reference.clone()
    };
    let err = misp_dpo_loss(
        &exact(ObjectiveConfig::default()),
        &policy,
        &half,
        &negatives,
    )
    .unwrap_err();
    assert!(err.to_string().contains("reference.chosen"), "{err}");
}

#[test]
fn softplus_is_accurate_in_both_tails() {
    let xs: [f64; 7] = [-800.0, -40.0, -1e-3, 0.0, 2.0, 35.0, 1e4];
    let t = Tensor::new(&xs, &Device::Cpu).unwrap();
    let got: Vec<f64> = softplus(&t).unwrap().to_vec1().unwrap();
    for (x, g) in xs.iter().zip(got) {
        let want = if *x > 0.0 {
            x + (-x).exp().ln_1p()
        } else {
            x.exp().ln_1p()
        };
        assert!(
            (g - want).abs() <= 1e-12 * want.abs().max(f64::MIN_POSITIVE),
            "softplus({x}) = {g}, want {want}"
        );
    }
}

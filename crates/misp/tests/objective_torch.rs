//! Conformance of the objective with an independent PyTorch implementation.
//!
//! The fixture `fixtures/objective/objective_torch.json` is made by
//! `fixtures/objective/make_fixture.py` (torch, float64, record-by-record loops over the usable
//! negatives, autograd). Each case is replayed here in f64, and the non-extreme ones in f32.

use candle_core::{DType, Device, Tensor, Var};
use misp::objective::{misp_dpo_loss, Estimator, NegativeSlots, ObjectiveConfig, SequenceLogps};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    torch_version: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: Config,
    policy: Logps,
    reference: Logps,
    mask: Vec<Vec<f64>>,
    log_q: Vec<Vec<f64>>,
    expected: Expected,
}

#[derive(Deserialize)]
struct Config {
    beta: f64,
    image_weight: f64,
    lambda: f64,
    anchor_weight: f64,
    estimator: String,
}

#[derive(Deserialize)]
struct Logps {
    chosen: Vec<f64>,
    rejected: Vec<f64>,
    chosen_on_negatives: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct Expected {
    loss: f64,
    image: Vec<f64>,
    text: Vec<f64>,
    anchor: Vec<f64>,
    ess: Vec<f64>,
    max_weight: Vec<f64>,
    grad: Logps,
}

fn load() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/objective/objective_torch.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn matrix(rows: &[Vec<f64>], k: usize, dtype: DType) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().cloned().collect();
    Tensor::from_vec(flat, (rows.len(), k), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn vector(v: &[f64], dtype: DType) -> Tensor {
    Tensor::new(v, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn close(what: &str, case: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{case}: {what} length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * (1.0 + w.abs()),
            "{case}: {what}[{i}] = {g}, torch says {w} (tolerance {rel} relative)"
        );
    }
}

fn replay(case: &Case, dtype: DType, rel: f64) {
    let k = case.mask.first().map_or(0, Vec::len);
    let vars = [
        Var::from_tensor(&vector(&case.policy.chosen, dtype)).unwrap(),
        Var::from_tensor(&vector(&case.policy.rejected, dtype)).unwrap(),
        Var::from_tensor(&matrix(&case.policy.chosen_on_negatives, k, dtype)).unwrap(),
    ];
    let policy = SequenceLogps {
        chosen: vars[0].as_tensor().clone(),
        rejected: vars[1].as_tensor().clone(),
        chosen_on_negatives: vars[2].as_tensor().clone(),
    };
    let reference = SequenceLogps {
        chosen: vector(&case.reference.chosen, dtype),
        rejected: vector(&case.reference.rejected, dtype),
        chosen_on_negatives: matrix(&case.reference.chosen_on_negatives, k, dtype),
    };
    let negatives = NegativeSlots {
        mask: matrix(&case.mask, k, dtype),
        log_q: Some(matrix(&case.log_q, k, dtype)),
    };
    let cfg = ObjectiveConfig {
        beta: case.config.beta,
        image_weight: case.config.image_weight,
        lambda: case.config.lambda,
        anchor_weight: case.config.anchor_weight,
        estimator: match case.config.estimator.as_str() {
            "exact" => Estimator::Exact,
            "importance_sampling" => Estimator::ImportanceSampling,
            other => panic!("{}: unknown estimator {other}", case.name),
        },
    };
    let out = misp_dpo_loss(&cfg, &policy, &reference, &negatives).unwrap();
    let grads = out.loss.backward().unwrap();
    let name = format!("{} ({dtype:?})", case.name);
    let e = &case.expected;
    close("loss", &name, &host(&out.loss), &[e.loss], rel);
    close("image", &name, &host(&out.image), &e.image, rel);
    close("text", &name, &host(&out.text), &e.text, rel);
    close("anchor", &name, &host(&out.anchor), &e.anchor, rel);
    if let Some(d) = &out.is_diagnostics {
        close("ess", &name, &host(&d.ess), &e.ess, rel);
        close(
            "max_weight",
            &name,
            &host(&d.max_weight),
            &e.max_weight,
            rel,
        );
    }
    let grad = |v: &Var| {
        grads
            .get(v.as_tensor())
            .map(host)
            .unwrap_or_else(|| vec![0.0; v.elem_count()])
    };
    close("grad chosen", &name, &grad(&vars[0]), &e.grad.chosen, rel);
    close(
        "grad rejected",
        &name,
        &grad(&vars[1]),
        &e.grad.rejected,
        rel,
    );
    let want: Vec<f64> = e
        .grad
        .chosen_on_negatives
        .iter()
        .flatten()
        .cloned()
        .collect();
    close(
        "grad chosen_on_negatives",
        &name,
        &grad(&vars[2]),
        &want,
        rel,
    );
}

#[test]
fn objective_matches_pytorch_in_f64() {
    let fixture = load();
    assert!(
        fixture.cases.len() >= 8,
        "fixture from torch {} lost cases",
        fixture.torch_version
    );
    // Same math in the same precision; only summation order differs: 1e-10 relative.
    for case in &fixture.cases {
        replay(case, DType::F64, 1e-10);
    }
}

#[test]
fn objective_matches_pytorch_in_f32() {
    // Log-probs near -50 carry about 4e-6 absolute rounding in f32, and rewards are their
    // differences: 1e-4 relative covers that. The +-1e4 cases are checked in f64 only.
    for case in load()
        .cases
        .iter()
        .filter(|c| !c.name.starts_with("extreme"))
    {
        replay(case, DType::F32, 1e-4);
    }
}

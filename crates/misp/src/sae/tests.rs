//! Tests of the SAE: the factorised path against the dense reference (codes, loss, every
//! gradient), finite differences, the checkpoint layout, training, resume and bad input.
//!
//! Tolerances are normwise: `max_i |got_i - want_i| <= tol * max_i |want_i|`.
//! - `1e-9` for factorised vs dense, both in `f64`: the two differ only in summation order and
//!   in the expansion of `||x - x_hat||^2`, which at these sizes loses a few digits at most.
//! - `1e-4` for `f32` factorised vs `f64` dense (docs/design.md §2): `f32` GEMMs over `d` or `N`
//!   terms carry about `1e-6` relative error, a margin of 100.
//! - `1e-6` for central differences with step `1e-6` in `f64`: truncation `O(h^2)` and rounding
//!   `O(eps / h) ~ 1e-10` relative.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::factor::{self, Params};
use super::*;

/// Tiny deterministic generator (xorshift64*), as in the objective's tests.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
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
    fn symmetric(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((2.0 * self.uniform() - 1.0) * bound) as f32)
            .collect()
    }
    /// `rows` random unit vectors of dimension `d`, like normalised CLIP embeddings.
    fn unit_rows(&mut self, rows: usize, d: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * d);
        for _ in 0..rows {
            let v: Vec<f64> = (0..d).map(|_| self.normal()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            out.extend(v.iter().map(|x| (x / norm) as f32));
        }
        out
    }
}

/// Owned embeddings behind a [`TrainingSet`].
struct Data {
    pool: Vec<f32>,
    prompts: Vec<f32>,
    positives: Vec<f32>,
    candidates: Vec<Vec<u32>>,
    d: usize,
}

impl Data {
    /// Record `r` gets `counts[r]` distinct random pool rows as candidates.
    fn random(seed: u64, d: usize, pool_rows: usize, counts: &[usize]) -> Self {
        let mut rng = Rng::new(seed);
        let pool = rng.unit_rows(pool_rows, d);
        let prompts = rng.unit_rows(counts.len(), d);
        let positives = rng.unit_rows(counts.len(), d);
        let candidates = counts
            .iter()
            .map(|&n| {
                let mut rows: Vec<u32> = Vec::new();
                while rows.len() < n {
                    let i = (rng.uniform() * pool_rows as f64) as u32;
                    if !rows.contains(&i) {
                        rows.push(i);
                    }
                }
                rows
            })
            .collect();
        Data {
            pool,
            prompts,
            positives,
            candidates,
            d,
        }
    }

    /// Pool rows, prompts and positives near a few directions (as CLIP embeddings of a world
    /// with a few kinds of scene are): pairs an SAE can learn, unlike [`Data::random`]'s.
    fn clustered(seed: u64, d: usize, pool_rows: usize, records: usize, per: usize) -> Self {
        let mut rng = Rng::new(seed);
        let centres = rng.unit_rows(4, d);
        let near = |rows: usize, rng: &mut Rng| -> Vec<f32> {
            let mut out = Vec::with_capacity(rows * d);
            for _ in 0..rows {
                let c = (rng.uniform() * 4.0) as usize % 4;
                let v: Vec<f64> = (0..d)
                    .map(|a| f64::from(centres[c * d + a]) + 0.15 * rng.normal())
                    .collect();
                let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                out.extend(v.iter().map(|x| (x / n) as f32));
            }
            out
        };
        let pool = near(pool_rows, &mut rng);
        let prompts = near(records, &mut rng);
        let positives = near(records, &mut rng);
        let candidates = (0..records)
            .map(|_| {
                let mut rows: Vec<u32> = Vec::new();
                while rows.len() < per {
                    let i = (rng.uniform() * pool_rows as f64) as u32;
                    if !rows.contains(&i) {
                        rows.push(i);
                    }
                }
                rows
            })
            .collect();
        Data {
            pool,
            prompts,
            positives,
            candidates,
            d,
        }
    }

    fn set(&self) -> TrainingSet<'_> {
        TrainingSet {
            pool: &self.pool,
            prompts: &self.prompts,
            positives: &self.positives,
            candidates: &self.candidates,
            d: self.d,
        }
    }

    fn record(&self, r: usize) -> (&[f32], &[f32], Vec<f32>) {
        let d = self.d;
        let cands = self.candidates[r]
            .iter()
            .flat_map(|&i| self.pool[i as usize * d..(i as usize + 1) * d].to_vec())
            .collect();
        (
            &self.positives[r * d..(r + 1) * d],
            &self.prompts[r * d..(r + 1) * d],
            cands,
        )
    }
}

fn config(d: usize, h: usize) -> SaeConfig {
    SaeConfig {
        hidden: h,
        input_scale: 1.3,
        ..SaeConfig::for_embeddings(d, "test/clip", true)
    }
}

/// An `f32` SAE with weights large enough that codes spread over (0, 1) and the decoder
/// matters: unlike [`Sae::init`], whose codes all sit near `rho`.
fn random_sae(seed: u64, d: usize, h: usize) -> Sae {
    let mut rng = Rng::new(seed);
    let cpu = &Device::Cpu;
    let params = Params {
        encoder: Tensor::from_vec(rng.symmetric(h * d * d, 1.5), (h, d, d), cpu).unwrap(),
        encoder_bias: Tensor::from_vec(rng.symmetric(h, 1.0), h, cpu).unwrap(),
        decoder: Tensor::from_vec(rng.symmetric(h * d * d, 0.4), (h, d, d), cpu).unwrap(),
        decoder_bias: Tensor::from_vec(rng.symmetric(d * d, 0.1), (d, d), cpu).unwrap(),
    };
    Sae::from_params(config(d, h), params).unwrap()
}

fn host(t: &Tensor) -> Vec<f64> {
    factor::host_f64(t).unwrap()
}

/// Normwise closeness (module docs).
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        err <= tol * scale.max(1e-300),
        "{what}: max error {err:.3e} exceeds {tol:e} x max |reference| {scale:.3e}"
    );
}

fn grad_parts(g: &Gradients) -> [(&'static str, Vec<f64>); 4] {
    [
        ("encoder", host(&g.encoder)),
        ("encoder_bias", host(&g.encoder_bias)),
        ("decoder", host(&g.decoder)),
        ("decoder_bias", host(&g.decoder_bias)),
    ]
}

/// Factorised codes with `z` kept in `f64`: `(recon, l1, z)`.
fn factorised_codes(sae: &Sae, p: &[f32], t: &[f32], c: &[f32]) -> [Vec<f64>; 3] {
    let mut out: [Vec<f64>; 3] = Default::default();
    factor::encode_chunks(sae, p, t, c, 3, |codes| {
        out[0].extend_from_slice(&codes.recon);
        out[1].extend_from_slice(&codes.l1);
        out[2].extend_from_slice(&codes.z);
    })
    .unwrap();
    out
}

fn dense_codes(sae: &Sae, p: &[f32], t: &[f32], c: &[f32]) -> [Vec<f64>; 3] {
    let mut out: [Vec<f64>; 3] = Default::default();
    dense_reference::encode_chunks(sae, p, t, c, 2, |recon, l1, z| {
        out[0].extend(recon);
        out[1].extend(l1);
        out[2].extend(z);
    })
    .unwrap();
    out
}

const COUNTS: [usize; 5] = [4, 7, 1, 0, 5];

#[test]
fn factorised_codes_equal_dense_in_f64() {
    let data = Data::random(1, 5, 30, &COUNTS);
    let sae = random_sae(2, 5, 6).to_dtype(DType::F64).unwrap();
    for r in [0, 1, 2, 4] {
        let (p, t, c) = data.record(r);
        let fact = factorised_codes(&sae, p, t, &c);
        let dense = dense_codes(&sae, p, t, &c);
        for (k, name) in ["recon", "l1", "z"].iter().enumerate() {
            assert_close(&format!("record {r} {name}"), &fact[k], &dense[k], 1e-9);
        }
        // The codes must not be degenerate for the check to mean anything.
        assert!(fact[2].iter().any(|&z| z < 0.3) && fact[2].iter().any(|&z| z > 0.7));
    }
}

#[test]
fn factorised_gradients_equal_dense_autograd_in_f64() {
    let data = Data::random(3, 5, 30, &COUNTS);
    let sae = random_sae(4, 5, 6).to_dtype(DType::F64).unwrap();
    let records = [0, 1, 2, 3, 4];
    let (fl, fg) = sae.loss_and_grads(&data.set(), &records).unwrap();
    let (dl, dg) = dense_reference::loss_and_grads(&sae, &data.set(), &records).unwrap();
    assert_eq!(fl.pairs, 17);
    assert_eq!(dl.pairs, 17);
    assert_close("loss", &[fl.loss], &[dl.loss], 1e-9);
    assert_close("recon", &[fl.recon], &[dl.recon], 1e-9);
    assert_close("kl", &[fl.kl], &[dl.kl], 1e-9);
    for ((name, f), (_, d)) in grad_parts(&fg).iter().zip(grad_parts(&dg).iter()) {
        assert!(d.iter().any(|&x| x != 0.0), "{name}: zero dense gradient");
        assert_close(&format!("grad {name}"), f, d, 1e-9);
    }
}

#[test]
fn f32_factorised_is_within_1e_4_of_f64_dense() {
    let data = Data::random(5, 6, 40, &[9, 3, 12]);
    let sae32 = random_sae(6, 6, 8);
    let sae64 = sae32.to_dtype(DType::F64).unwrap();
    for r in 0..3 {
        let (p, t, c) = data.record(r);
        let fact = sae32.encode_candidates(p, t, &c).unwrap();
        let dense = dense_codes(&sae64, p, t, &c);
        assert_close("recon", &fact.recon, &dense[0], 1e-4);
        assert_close("l1", &fact.l1, &dense[1], 1e-4);
        let z: Vec<f64> = fact.z.iter().map(|&z| f64::from(z)).collect();
        assert_close("z", &z, &dense[2], 1e-4);
    }
    let (fl, fg) = sae32.loss_and_grads(&data.set(), &[0, 1, 2]).unwrap();
    let (dl, dg) = dense_reference::loss_and_grads(&sae64, &data.set(), &[0, 1, 2]).unwrap();
    assert_close("loss", &[fl.loss], &[dl.loss], 1e-4);
    for ((name, f), (_, d)) in grad_parts(&fg).iter().zip(grad_parts(&dg).iter()) {
        assert_close(&format!("grad {name}"), f, d, 1e-4);
    }
}

/// `sae` with entry `index` of parameter `which` (0..4 as in [`grad_parts`]) moved by `delta`.
fn nudged(sae: &Sae, which: usize, index: usize, delta: f64) -> Sae {
    let p = &sae.params;
    let mut tensors = [
        p.encoder.clone(),
        p.encoder_bias.clone(),
        p.decoder.clone(),
        p.decoder_bias.clone(),
    ];
    let mut values = host(&tensors[which]);
    values[index] += delta;
    tensors[which] = Tensor::from_vec(values, tensors[which].shape(), &Device::Cpu).unwrap();
    let [encoder, encoder_bias, decoder, decoder_bias] = tensors;
    let params = Params {
        encoder,
        encoder_bias,
        decoder,
        decoder_bias,
    };
    Sae::from_params(sae.config.clone(), params).unwrap()
}

#[test]
fn gradient_matches_central_differences() {
    let data = Data::random(7, 3, 12, &[4, 2, 5]);
    let sae = random_sae(8, 3, 4).to_dtype(DType::F64).unwrap();
    let records = [0, 1, 2];
    let loss = |s: &Sae| s.loss_and_grads(&data.set(), &records).unwrap().0.loss;
    let (_, grads) = sae.loss_and_grads(&data.set(), &records).unwrap();
    let h = 1e-6;
    for (which, (name, analytic)) in grad_parts(&grads).iter().enumerate() {
        let numeric: Vec<f64> = (0..analytic.len())
            .map(|i| {
                (loss(&nudged(&sae, which, i, h)) - loss(&nudged(&sae, which, i, -h))) / (2.0 * h)
            })
            .collect();
        assert_close(&format!("d loss / d {name}"), analytic, &numeric, 1e-6);
    }
}

#[test]
fn dead_latents_give_a_finite_loss_and_gradient() {
    let data = Data::random(9, 4, 20, &[5, 5]);
    let sae = random_sae(10, 4, 3).to_dtype(DType::F64).unwrap();
    // Latent 0 never fires: rho_hat_0 ~ exp(-1000) = 0, clamped to RHO_HAT_MIN in the KL term.
    let sae = nudged(&sae, 1, 0, -1000.0);
    let (loss, grads) = sae.loss_and_grads(&data.set(), &[0, 1]).unwrap();
    let floor = factor::kl_bernoulli(sae.config.rho, 0.0);
    assert!(
        loss.loss.is_finite() && loss.kl > floor && floor > 0.4,
        "{loss:?}"
    );
    for (name, g) in grad_parts(&grads) {
        assert!(g.iter().all(|x| x.is_finite()), "{name}");
    }
}

#[test]
fn chunking_does_not_change_codes() {
    let data = Data::random(11, 6, 50, &[23]);
    let (p, t, c) = data.record(0);
    for sae in [
        random_sae(12, 6, 5),
        random_sae(12, 6, 5).to_dtype(DType::F64).unwrap(),
    ] {
        let whole = sae.encode_candidates_chunked(p, t, &c, 23).unwrap();
        for chunk in [1, 4, 7, 100] {
            let chunked = sae.encode_candidates_chunked(p, t, &c, chunk).unwrap();
            assert_eq!(chunked, whole, "chunk {chunk}, {:?}", sae.dtype());
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-sae-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn param_bits(sae: &Sae) -> Vec<Vec<u32>> {
    [
        sae.encoder(),
        sae.encoder_bias(),
        sae.decoder(),
        sae.decoder_bias(),
    ]
    .iter()
    .map(|t| bits(t))
    .collect()
}

#[test]
fn save_load_round_trip_in_torch_layout() {
    let (d, h) = (4, 3);
    let sae = random_sae(13, d, h);
    let dir = temp_dir("roundtrip");
    sae.save(&dir).unwrap();
    let loaded = Sae::load(&dir).unwrap();
    assert_eq!(loaded.config, sae.config);
    assert_eq!(param_bits(&loaded), param_bits(&sae));

    // On disk: nn.Linear layout. decoder.weight[a*d + c, j] = D_j[a, c], and likewise for
    // encoder.weight[j, a*d + c] = E_j[a, c].
    let file = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(file["encoder.weight"].dims(), &[h, d * d]);
    assert_eq!(file["encoder.bias"].dims(), &[h]);
    assert_eq!(file["decoder.weight"].dims(), &[d * d, h]);
    assert_eq!(file["decoder.bias"].dims(), &[d * d]);
    let (j, a, c) = (2, 1, 3);
    let on_disk = file["decoder.weight"].to_vec2::<f32>().unwrap()[a * d + c][j];
    let internal = sae.decoder().to_vec3::<f32>().unwrap()[j][a][c];
    assert_eq!(on_disk.to_bits(), internal.to_bits());
    let on_disk = file["encoder.weight"].to_vec2::<f32>().unwrap()[j][a * d + c];
    let internal = sae.encoder().to_vec3::<f32>().unwrap()[j][a][c];
    assert_eq!(on_disk.to_bits(), internal.to_bits());

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for key in [
        "format",
        "activation",
        "d",
        "hidden",
        "gamma",
        "rho",
        "input_scale",
        "normalized",
        "clip_model",
    ] {
        assert!(json.get(key).is_some(), "config.json lacks {key}");
    }
    assert!(!dir.join(".model.safetensors.tmp").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_names_the_missing_or_misshaped_tensor() {
    let (d, h) = (3, 2);
    let sae = random_sae(14, d, h);
    let dir = temp_dir("load-errors");
    sae.save(&dir).unwrap();
    let model = dir.join("model.safetensors");
    let file = candle_core::safetensors::load(&model, &Device::Cpu).unwrap();

    let mut missing = file.clone();
    missing.remove("decoder.bias");
    candle_core::safetensors::save(&missing, &model).unwrap();
    let err = Sae::load(&dir).unwrap_err();
    assert!(matches!(&err, SaeError::MissingTensor { name, .. } if name == "decoder.bias"));
    let msg = err.to_string();
    assert!(
        msg.contains("decoder.bias") && msg.contains("model.safetensors"),
        "{msg}"
    );

    let mut misshaped = file.clone();
    misshaped.insert(
        "decoder.weight".into(),
        Tensor::zeros((h, d * d), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&misshaped, &model).unwrap();
    let msg = Sae::load(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("decoder.weight") && msg.contains("[2, 9]") && msg.contains("[9, 2]"),
        "{msg}"
    );

    let mut nan = file.clone();
    nan.insert(
        "encoder.bias".into(),
        Tensor::new(&[0f32, f32::NAN], &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&nan, &model).unwrap();
    let msg = Sae::load(&dir).unwrap_err().to_string();
    assert!(msg.contains("encoder.bias") && msg.contains("NaN"), "{msg}");

    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"format\": 1", "\"format\": 7")).unwrap();
    let msg = Sae::load(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("config.json") && msg.contains("version 7"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_scoring_inputs_are_named() {
    let sae = random_sae(15, 3, 2);
    let (p, t) = ([0.1f32, 0.2, 0.3], [0.3f32, 0.2, 0.1]);
    let err = sae.encode_candidates(&p, &t[..2], &[0.0; 6]).unwrap_err();
    assert!(
        matches!(
            err,
            SaeError::InputLength {
                field: "prompt",
                ..
            }
        ),
        "{err}"
    );
    let err = sae.encode_candidates(&p, &t, &[0.0; 7]).unwrap_err();
    assert!(
        matches!(
            err,
            SaeError::InputLength {
                field: "candidates",
                ..
            }
        ),
        "{err}"
    );
    let mut c = [0.5f32; 12];
    c[7] = f32::INFINITY; // row 2
    let err = sae.encode_candidates_chunked(&p, &t, &c, 2).unwrap_err();
    assert!(
        matches!(
            err,
            SaeError::NonFiniteInput {
                field: "candidates",
                row: 2
            }
        ),
        "{err}"
    );
    let empty = sae.encode_candidates(&p, &t, &[]).unwrap();
    assert!(empty.recon.is_empty() && empty.z.is_empty());
}

#[test]
fn bad_training_data_is_named() {
    let mut data = Data::random(16, 3, 10, &[3, 2]);
    data.candidates[1][1] = 10;
    let err = data.set().validate().unwrap_err();
    assert!(
        matches!(
            err,
            SaeError::CandidateIndex {
                record: 1,
                index: 10,
                pool: 10
            }
        ),
        "{err}"
    );
    let mut data = Data::random(16, 3, 10, &[3, 2]);
    data.pool[3 * 4 + 1] = f32::NAN;
    let err = data.set().validate().unwrap_err();
    assert!(
        matches!(
            err,
            SaeError::NonFiniteInput {
                field: "pool",
                row: 4
            }
        ),
        "{err}"
    );
    let data = Data::random(16, 3, 10, &[0, 0]);
    assert!(matches!(
        data.set().validate().unwrap_err(),
        SaeError::Data(_)
    ));
}

fn tiny_train_config(epochs: usize) -> SaeTrainConfig {
    SaeTrainConfig {
        epochs,
        batch_records: 4,
        lr: Some(2e-2),
        seed: 17,
        hidden: 8,
        // These tests check the optimiser's mechanics on every record; the held-out split, the
        // stopping rule and the warmup have tests of their own.
        holdout: 0.0,
        warmup_steps: 0,
        ..SaeTrainConfig::default()
    }
}

fn read_metrics(dir: &std::path::Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn training_lowers_the_loss_and_logs_every_epoch() {
    let data = Data::random(18, 4, 80, &[12; 40]);
    let dir = temp_dir("train");
    let base = SaeConfig::for_embeddings(4, "test/clip", true);
    let sae = train(&tiny_train_config(6), &data.set(), base, &dir, false).unwrap();
    let metrics = read_metrics(&dir);
    assert_eq!(
        metrics.iter().map(|m| m.epoch).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    // Random unit embeddings leave little structure to find: the loss falls slowly but steadily.
    for pair in metrics.windows(2) {
        assert!(
            pair[1].loss < pair[0].loss,
            "{} -> {}",
            pair[0].loss,
            pair[1].loss
        );
    }
    let (first, last) = (&metrics[0], &metrics[5]);
    assert!(
        last.loss < 0.9 * first.loss,
        "{} -> {}",
        first.loss,
        last.loss
    );
    assert!(last.fvu < first.fvu, "{} -> {}", first.fvu, last.fvu);
    for m in &metrics {
        assert_eq!(m.activation_histogram.iter().sum::<u64>(), 8);
        assert_eq!(m.pairs, 480);
        assert_eq!(m.steps, 10);
        assert!(m.fvu > 0.0 && m.fvu.is_finite() && (0.0..=1.0).contains(&m.dead_fraction));
        assert!(m.mean_l0 >= 0.0 && m.mean_l0 <= 8.0);
    }
    // The input scale makes the mean ||x||^2 over the training pairs exactly 1.
    let s = sae.config.input_scale;
    let mut total = 0.0;
    for r in 0..40 {
        let (p, t, c) = data.record(r);
        let tn: f64 = t.iter().map(|&x| f64::from(x).powi(2)).sum();
        for v in c.chunks(4) {
            let un: f64 = p
                .iter()
                .zip(v)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum();
            total += s * s * un * tn;
        }
    }
    assert!((total / 480.0 - 1.0).abs() < 1e-12);
    // The returned SAE is the one saved.
    let loaded = Sae::load(&dir).unwrap();
    assert_eq!(param_bits(&loaded), param_bits(&sae));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resumed_training_reaches_bit_identical_weights() {
    let data = Data::random(19, 4, 60, &[10; 20]);
    let base = SaeConfig::for_embeddings(4, "test/clip", true);
    let straight = temp_dir("straight");
    let resumed = temp_dir("resumed");
    let a = train(
        &tiny_train_config(2),
        &data.set(),
        base.clone(),
        &straight,
        false,
    )
    .unwrap();
    let stopped = train(
        &tiny_train_config(1),
        &data.set(),
        base.clone(),
        &resumed,
        false,
    )
    .unwrap();
    assert_ne!(param_bits(&stopped), param_bits(&a));
    let b = train(
        &tiny_train_config(2),
        &data.set(),
        base.clone(),
        &resumed,
        false,
    )
    .unwrap();
    assert_eq!(param_bits(&a), param_bits(&b));
    assert_eq!(read_metrics(&resumed).len(), 2);
    let (ma, mb) = (read_metrics(&straight), read_metrics(&resumed));
    assert_eq!(ma[1].loss.to_bits(), mb[1].loss.to_bits());

    // Other settings in the same folder are refused, naming what differs.
    let other = SaeTrainConfig {
        lr: Some(5e-3),
        ..tiny_train_config(3)
    };
    let err = train(&other, &data.set(), base, &resumed, false).unwrap_err();
    assert!(
        matches!(err, SaeError::ResumeMismatch { .. }) && err.to_string().contains("`lr`"),
        "{err}"
    );
    std::fs::remove_dir_all(&straight).unwrap();
    std::fs::remove_dir_all(&resumed).unwrap();
}

/// The defaults' stopping rule on a small learnable set: a quarter held out, patience 2.
fn stopping_config(epochs: usize) -> SaeTrainConfig {
    SaeTrainConfig {
        epochs,
        batch_records: 4,
        seed: 5,
        hidden: 8,
        holdout: 0.25,
        patience: 2,
        // The warmup has a test of its own; here every step counts at full rate.
        warmup_steps: 0,
        ..SaeTrainConfig::default()
    }
}

#[test]
fn the_first_steps_are_warmed_up() {
    // One Adam step moves every weight by about `lr` in its gradient's sign (bias-corrected
    // moments of one gradient: m / sqrt(v) = sign(g)); with a warmup of W steps the first
    // step's rate is lr / W.
    let data = Data::clustered(37, 4, 30, 8, 5);
    let base = SaeConfig::for_embeddings(4, "test/clip", true);
    for (warmup, want) in [(0usize, 1.0f64), (4, 0.25)] {
        let dir = temp_dir(&format!("warm-{warmup}"));
        let cfg = SaeTrainConfig {
            epochs: 1,
            batch_records: 8,
            lr: Some(1e-3),
            hidden: 6,
            holdout: 0.0,
            warmup_steps: warmup,
            ..SaeTrainConfig::default()
        };
        let trained = train(&cfg, &data.set(), base.clone(), &dir, false).unwrap();
        let fresh = Sae::init(trained.config.clone(), cfg.seed).unwrap();
        let moved: Vec<f32> = (trained.encoder() - fresh.encoder())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let max = moved.iter().cloned().fold(0f32, f32::max) as f64;
        assert!(
            (max / 1e-3 - want).abs() < 0.01,
            "warmup {warmup}: step {max:e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn held_out_fvu_picks_the_saved_epoch_and_stops_on_a_plateau() {
    let data = Data::clustered(31, 6, 80, 40, 10);
    let base = SaeConfig::for_embeddings(6, "test/clip", true);
    let dir = temp_dir("stop");
    let sae = train(
        &stopping_config(200),
        &data.set(),
        base.clone(),
        &dir,
        false,
    )
    .unwrap();
    let m = read_metrics(&dir);
    let t = sae.training.clone().expect("a training summary");
    assert_eq!((t.heldout_records, t.heldout_pairs), (10, 100));
    assert!(m.iter().all(|e| e.heldout_pairs == 100));
    let fvu: Vec<f64> = m.iter().map(|e| e.heldout_fvu.unwrap()).collect();
    let (best_at, best) =
        fvu.iter().enumerate().fold(
            (0, f64::INFINITY),
            |a, (i, &f)| if f < a.1 { (i, f) } else { a },
        );
    assert_eq!(
        (t.epoch, t.fvu, t.fvu_split.as_str()),
        (best_at + 1, best, "heldout")
    );
    // Stopped by the rule, well before the limit: the last two epochs did not beat the best
    // before them by 1 %, the one before them did.
    assert_eq!((t.stopped.as_str(), t.epochs_run), ("plateau", m.len()));
    assert!(m.len() < 200, "{} epochs", m.len());
    let n = m.len();
    let best_before = |k: usize| fvu[..k].iter().cloned().fold(f64::INFINITY, f64::min);
    for (k, f) in fvu.iter().enumerate().skip(n - 2) {
        assert!(*f >= best_before(k) * 0.99, "epoch {} improved", k + 1);
    }
    assert!(n == 3 || fvu[n - 3] < best_before(n - 3) * 0.99);
    // It learned: the held-out reconstruction is far below the variance, and latents fire.
    assert!(best < 0.5, "held-out FVU {best}");
    assert!(m[n - 1].dead_fraction < 0.5 && m[n - 1].mean_l0 > 0.0);
    // The saved weights are the best epoch's: a run of exactly that many epochs saves them.
    let dir2 = temp_dir("stop-short");
    let short = train(
        &stopping_config(best_at + 1),
        &data.set(),
        base,
        &dir2,
        false,
    )
    .unwrap();
    assert_eq!(param_bits(&short), param_bits(&sae));
    assert_eq!(short.training.unwrap().stopped, "max_epochs");
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(dir2).unwrap();
}

#[test]
fn a_resumed_run_keeps_the_stopping_rule_state() {
    let data = Data::clustered(32, 6, 80, 40, 10);
    let base = SaeConfig::for_embeddings(6, "test/clip", true);
    let (a, b) = (temp_dir("stop-a"), temp_dir("stop-b"));
    let straight = train(&stopping_config(200), &data.set(), base.clone(), &a, false).unwrap();
    for epochs in [2, 5, 200] {
        train(
            &stopping_config(epochs),
            &data.set(),
            base.clone(),
            &b,
            false,
        )
        .unwrap();
    }
    let resumed = Sae::load(&b).unwrap();
    assert_eq!(param_bits(&straight), param_bits(&resumed));
    assert_eq!(straight.training, resumed.training);
    std::fs::remove_dir_all(a).unwrap();
    std::fs::remove_dir_all(b).unwrap();
}

#[test]
fn an_untrained_sae_reads_as_dead() {
    // Every latent starts at rho for every input (b_e = logit rho, tiny encoder weights): no
    // latent ever reaches the firing threshold 2 rho.
    let data = Data::clustered(33, 6, 80, 20, 10);
    let dir = temp_dir("dead");
    let cfg = SaeTrainConfig {
        epochs: 1,
        lr: Some(1e-12),
        ..stopping_config(1)
    };
    let base = SaeConfig::for_embeddings(6, "test/clip", true);
    train(&cfg, &data.set(), base, &dir, false).unwrap();
    let m = &read_metrics(&dir)[0];
    assert_eq!((m.dead_fraction, m.mean_l0), (1.0, 0.0));
    assert!((m.firing_threshold - 0.1).abs() < 1e-12);
    assert!(m.heldout_fvu.unwrap() > 0.9, "{:?}", m.heldout_fvu);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_held_out_split_is_seeded_disjoint_and_leaves_both_sides() {
    let data = Data::clustered(34, 4, 30, 23, 5);
    let cfg = stopping_config(1);
    let (train_r, held) = train::split(&data.set(), &cfg);
    assert_eq!((train_r.len(), held.len()), (17, 6));
    assert!(held.iter().all(|r| !train_r.contains(r)));
    assert_eq!(
        train::split(&data.set(), &cfg),
        (train_r.clone(), held.clone())
    );
    let other = train::split(
        &data.set(),
        &SaeTrainConfig {
            seed: 6,
            ..cfg.clone()
        },
    );
    assert_ne!(other.1, held, "another seed holds out other records");
    // Two records: one each way; one record, or no holdout: all train.
    let two = Data::clustered(35, 4, 30, 2, 5);
    assert_eq!(train::split(&two.set(), &cfg).1.len(), 1);
    let one = Data::clustered(36, 4, 30, 1, 5);
    assert_eq!(train::split(&one.set(), &cfg), (vec![0], vec![]));
    let none = SaeTrainConfig {
        holdout: 0.0,
        ..cfg
    };
    assert!(train::split(&data.set(), &none).1.is_empty());
}

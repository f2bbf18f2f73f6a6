//! Synthetic negatives made from the positive image itself: mDPO's random resized crop and
//! CHiP's forward-diffusion noise (docs/design.md §2).
//!
//! The miner only writes a seed per negative; whoever loads pixels (training, the reference
//! cache) calls these functions with that seed, so every run sees the same pixels.

use rand::{Rng, SeedableRng};

/// Diffusion step of CHiP's negative, in a 1000-step schedule.
pub const NOISE_STEP: usize = 500;

/// `abar_t = prod_{s <= t} (1 - beta_s)` for `betas = sigmoid(linspace(-6, 6, 1000)) *
/// (5e-3 - 1e-5) + 1e-5` (1-based `t`, as in `x_t` after `t` noising steps).
pub fn alpha_bar(t: usize) -> f64 {
    let n = 1000;
    (0..t.min(n))
        .map(|i| {
            let x = -6.0 + 12.0 * i as f64 / (n - 1) as f64;
            let beta = 1.0 / (1.0 + (-x).exp()) * (5e-3 - 1e-5) + 1e-5;
            1.0 - beta
        })
        .product()
}

/// Forward diffusion in place: `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, `eps ~ N(0, 1)`
/// from `seed`, on the normalised pixel tensor.
pub fn diffuse(pixels: &mut [f32], seed: u64) {
    let abar = alpha_bar(NOISE_STEP);
    let (a, b) = (abar.sqrt() as f32, (1.0 - abar).sqrt() as f32);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for p in pixels.iter_mut() {
        *p = a * *p + b * standard_normal(&mut rng) as f32;
    }
}

/// A crop box `(x, y, w, h)` in pixels keeping 1-20% of the area, aspect ratio in [3/4, 4/3]
/// (torchvision's `RandomResizedCrop` convention), drawn from `seed`. The caller resizes the
/// crop back to full size.
pub fn crop_box(seed: u64, width: usize, height: usize) -> (usize, usize, usize, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let area = (width * height) as f64;
    for _ in 0..10 {
        let target = area * rng.random_range(0.01..=0.20);
        let log_ratio = rng.random_range((0.75f64).ln()..=(4.0f64 / 3.0).ln());
        let ratio = log_ratio.exp();
        let w = (target * ratio).sqrt().round() as usize;
        let h = (target / ratio).sqrt().round() as usize;
        if (1..=width).contains(&w) && (1..=height).contains(&h) {
            let x = rng.random_range(0..=width - w);
            let y = rng.random_range(0..=height - h);
            return (x, y, w, h);
        }
    }
    // Fallback: a centred square of 10% of the area.
    let side = ((area * 0.1).sqrt() as usize).clamp(1, width.min(height));
    ((width - side) / 2, (height - side) / 2, side, side)
}

/// A standard normal sample (Box-Muller on two uniforms; no distribution crate needed).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_bar_matches_the_schedule_by_hand() {
        assert_eq!(alpha_bar(0), 1.0);
        let beta0 = 1.0 / (1.0 + 6f64.exp()) * (5e-3 - 1e-5) + 1e-5;
        assert!((alpha_bar(1) - (1.0 - beta0)).abs() < 1e-15);
        // Value from an independent NumPy-free Python loop over the same schedule.
        let a = alpha_bar(NOISE_STEP);
        assert!((a - 0.746_674_540_2).abs() < 1e-10, "abar_500 = {a}");
        assert!(alpha_bar(1000) < a);
    }

    #[test]
    fn diffusion_is_seeded_and_has_the_right_variance() {
        let mut x = vec![0.0f32; 20_000];
        diffuse(&mut x, 7);
        let mut y = vec![0.0f32; 20_000];
        diffuse(&mut y, 7);
        assert_eq!(x, y);
        let var = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64;
        let want = 1.0 - alpha_bar(NOISE_STEP);
        assert!((var - want).abs() < 0.03, "var {var} vs 1 - abar {want}");
    }

    #[test]
    fn crops_keep_one_to_twenty_percent() {
        for seed in 0..200 {
            let (x, y, w, h) = crop_box(seed, 64, 48);
            assert!(x + w <= 64 && y + h <= 48);
            let frac = (w * h) as f64 / (64.0 * 48.0);
            assert!((0.005..=0.23).contains(&frac), "seed {seed}: {frac}");
        }
        assert_eq!(crop_box(3, 64, 48), crop_box(3, 64, 48));
    }
}

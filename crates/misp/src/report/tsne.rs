//! Exact t-SNE (van der Maaten & Hinton, 2008) for the few hundred points of a report figure:
//! perplexity-calibrated Gaussian affinities, Student-t map affinities, gradient descent with
//! momentum, gains and early exaggeration. O(n^2) per iteration, which is what a figure of
//! ~1,000 points can afford and keeps the code short and checkable.

use rand::SeedableRng;

/// Settings (the paper's defaults, fewer iterations).
#[derive(Debug, Clone, Copy)]
pub struct TsneConfig {
    pub perplexity: f64,
    pub iterations: usize,
    pub learning_rate: f64,
    pub exaggeration: f64,
    pub exaggeration_iters: usize,
    pub seed: u64,
}

impl Default for TsneConfig {
    fn default() -> Self {
        Self {
            perplexity: 30.0,
            iterations: 500,
            learning_rate: 200.0,
            exaggeration: 12.0,
            exaggeration_iters: 100,
            seed: 0,
        }
    }
}

/// Row-conditional affinities `p_{j|i}` whose entropy matches `log(perplexity)`, by bisection
/// on the precision of each row's Gaussian.
fn affinities(d2: &[f64], n: usize, perplexity: f64) -> Vec<f64> {
    let target = perplexity.ln();
    let mut p = vec![0.0; n * n];
    for i in 0..n {
        let row = &d2[i * n..(i + 1) * n];
        let (mut lo, mut hi, mut beta) = (0.0f64, f64::INFINITY, 1.0f64);
        for _ in 0..64 {
            let mut sum = 0.0;
            let mut weighted = 0.0;
            for (j, &d) in row.iter().enumerate() {
                if j != i {
                    let v = (-beta * d).exp();
                    sum += v;
                    weighted += v * d;
                }
            }
            let sum = sum.max(1e-300);
            let entropy = sum.ln() + beta * weighted / sum;
            if (entropy - target).abs() < 1e-5 {
                break;
            }
            if entropy > target {
                lo = beta;
                beta = if hi.is_finite() {
                    (beta + hi) / 2.0
                } else {
                    beta * 2.0
                };
            } else {
                hi = beta;
                beta = (beta + lo) / 2.0;
            }
        }
        let mut sum = 0.0;
        for j in 0..n {
            if j != i {
                p[i * n + j] = (-beta * row[j]).exp();
                sum += p[i * n + j];
            }
        }
        for j in 0..n {
            p[i * n + j] /= sum.max(1e-300);
        }
    }
    p
}

/// 2-D embedding of `points` (rows of equal length).
pub fn tsne(points: &[Vec<f32>], cfg: &TsneConfig) -> Vec<(f64, f64)> {
    let n = points.len();
    if n < 3 {
        return points
            .iter()
            .enumerate()
            .map(|(i, _)| (i as f64, 0.0))
            .collect();
    }
    let mut d2 = vec![0.0; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let d: f64 = points[i]
                .iter()
                .zip(&points[j])
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                .sum();
            d2[i * n + j] = d;
            d2[j * n + i] = d;
        }
    }
    let perplexity = cfg.perplexity.min((n - 1) as f64 / 3.0).max(1.0);
    let cond = affinities(&d2, n, perplexity);
    let mut p = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            p[i * n + j] = ((cond[i * n + j] + cond[j * n + i]) / (2.0 * n as f64)).max(1e-12);
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut y: Vec<[f64; 2]> = (0..n)
        .map(|_| {
            use rand::Rng;
            [rng.random_range(-1e-2..1e-2), rng.random_range(-1e-2..1e-2)]
        })
        .collect();
    let mut velocity = vec![[0.0f64; 2]; n];
    let mut gains = vec![[1.0f64; 2]; n];
    let mut num = vec![0.0; n * n];
    for it in 0..cfg.iterations {
        let exag = if it < cfg.exaggeration_iters {
            cfg.exaggeration
        } else {
            1.0
        };
        let momentum = if it < cfg.exaggeration_iters {
            0.5
        } else {
            0.8
        };
        let mut z = 0.0;
        for i in 0..n {
            for j in i + 1..n {
                let dx = y[i][0] - y[j][0];
                let dy = y[i][1] - y[j][1];
                let q = 1.0 / (1.0 + dx * dx + dy * dy);
                num[i * n + j] = q;
                num[j * n + i] = q;
                z += 2.0 * q;
            }
        }
        for i in 0..n {
            let mut g = [0.0f64; 2];
            for j in 0..n {
                if i == j {
                    continue;
                }
                let q = num[i * n + j];
                let m = (exag * p[i * n + j] - q / z) * q;
                g[0] += 4.0 * m * (y[i][0] - y[j][0]);
                g[1] += 4.0 * m * (y[i][1] - y[j][1]);
            }
            for c in 0..2 {
                let same = (g[c] > 0.0) == (velocity[i][c] > 0.0);
                gains[i][c] = if same {
                    (gains[i][c] * 0.8).max(0.01)
                } else {
                    gains[i][c] + 0.2
                };
                velocity[i][c] = momentum * velocity[i][c] - cfg.learning_rate * gains[i][c] * g[c];
            }
        }
        for i in 0..n {
            y[i][0] += velocity[i][0];
            y[i][1] += velocity[i][1];
        }
    }
    y.into_iter().map(|p| (p[0], p[1])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separated_clusters_stay_separated() {
        // Two tight clusters far apart in 10-D: every point's nearest map neighbour must be in
        // its own cluster.
        let mut pts = Vec::new();
        for c in 0..2 {
            for i in 0..20 {
                let mut v = vec![0f32; 10];
                v[0] = c as f32 * 50.0;
                v[1 + i % 9] = (i as f32) * 0.1;
                pts.push(v);
            }
        }
        let y = tsne(
            &pts,
            &TsneConfig {
                iterations: 300,
                ..TsneConfig::default()
            },
        );
        for i in 0..40 {
            let nearest = (0..40)
                .filter(|&j| j != i)
                .min_by(|&a, &b| {
                    let d = |j: usize| (y[i].0 - y[j].0).powi(2) + (y[i].1 - y[j].1).powi(2);
                    d(a).total_cmp(&d(b))
                })
                .unwrap();
            assert_eq!(i / 20, nearest / 20, "point {i}");
        }
    }
}

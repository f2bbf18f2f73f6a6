//! Paired comparisons over seeds: the mean paired difference of two variants on one metric, its
//! 95% interval (paired Student t with n - 1 degrees of freedom), and the verdict the interval
//! allows.
//!
//! A demo seed fixes a run's LoRA initialisation, record order and dropout masks for every
//! variant, so two variants' runs with the same seed differ only in the variant: the per-seed
//! differences are the unit of comparison, and seed-to-seed noise shared by both cancels.
//!
//! The t quantile is computed, not tabulated: the Student t CDF through the regularised
//! incomplete beta function (continued fraction, modified Lentz), inverted by bisection.

/// Interval level of every comparison in the demo's report.
pub const LEVEL: f64 = 0.95;

/// How the intervals are made, in words (the report and `results.json` say it).
pub const METHOD: &str = "paired Student t over seeds, 95% two-sided, n - 1 degrees of freedom";

/// `ln Gamma(x)` for `x > 0` (Lanczos, g = 7, nine terms; relative error ~1e-15).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Gamma(x) Gamma(1 - x) = pi / sin(pi x).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// Continued fraction of the incomplete beta function (modified Lentz), valid for
/// `x < (a + 1) / (a + b + 2)`.
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=500 {
        let m = m as f64;
        // Even step.
        let num = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { 1.0 / TINY } else { 1.0 / d };
        c = 1.0 + num / c;
        if c.abs() < TINY {
            c = TINY;
        }
        h *= d * c;
        // Odd step.
        let num = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { 1.0 / TINY } else { 1.0 / d };
        c = 1.0 + num / c;
        if c.abs() < TINY {
            c = TINY;
        }
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// The regularised incomplete beta function `I_x(a, b)`.
pub fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The fraction converges fast on one side of the mean; use the symmetry on the other.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// `P(T <= t)` for Student's t with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t));
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p` quantile of Student's t with `df` degrees of freedom (`0 < p < 1`, `df > 0`).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if p == 0.5 {
        return 0.0;
    }
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    // Bracket, then bisect: the CDF is monotone, and 200 halvings reach f64 resolution.
    let mut hi = 1.0;
    while t_cdf(hi, df) < p && hi < 1e12 {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Mean and sample standard deviation (n - 1); std 0 for one value.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n.max(1.0);
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The mean of paired differences with its two-sided interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Number of pairs.
    pub n: usize,
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    pub fn half_width(&self) -> f64 {
        0.5 * (self.hi - self.lo)
    }

    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
}

/// Student t interval at `level` for the mean of `diffs` (the per-seed differences `a - b`);
/// `None` with fewer than two pairs (no spread to estimate).
pub fn t_interval(diffs: &[f64], level: f64) -> Option<Interval> {
    let n = diffs.len();
    if n < 2 || diffs.iter().any(|d| !d.is_finite()) {
        return None;
    }
    let (mean, sd) = mean_std(diffs);
    let q = t_quantile(0.5 + level / 2.0, (n - 1) as f64);
    let half = q * sd / (n as f64).sqrt();
    Some(Interval {
        n,
        mean,
        lo: mean - half,
        hi: mean + half,
    })
}

/// What an interval of `a - b` lets the report say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The interval excludes 0 on the side where `a` is better.
    Better,
    /// The interval excludes 0 on the side where `a` is worse.
    Worse,
    /// The interval covers 0.
    NoDifference,
    /// Fewer than two paired seeds: no interval.
    TooFewSeeds,
}

/// The verdict of `interval` (of `a - b`) on a metric where higher is better or not.
pub fn verdict(interval: Option<&Interval>, higher_is_better: bool) -> Verdict {
    let Some(iv) = interval else {
        return Verdict::TooFewSeeds;
    };
    if !iv.excludes_zero() {
        return Verdict::NoDifference;
    }
    if (iv.lo > 0.0) == higher_is_better {
        Verdict::Better
    } else {
        Verdict::Worse
    }
}

impl Verdict {
    /// The sentence's verb for "`a` ... `b`".
    pub fn words(self) -> &'static str {
        match self {
            Verdict::Better => "beats",
            Verdict::Worse => "is worse than",
            Verdict::NoDifference => "no difference measurable from",
            Verdict::TooFewSeeds => "cannot be compared (one seed) with",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two-sided 95% Student t quantiles, t_{0.975, df}, as printed in statistics tables
    /// (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2), to the digits given there.
    #[test]
    fn t_quantiles_match_the_textbook_table() {
        for (df, q) in [
            (1.0, 12.706),
            (2.0, 4.303),
            (3.0, 3.182),
            (4.0, 2.776),
            (5.0, 2.571),
            (9.0, 2.262),
            (19.0, 2.093),
            (29.0, 2.045),
            (100.0, 1.984),
        ] {
            let got = t_quantile(0.975, df);
            assert!((got - q).abs() < 6e-4, "df {df}: {got} vs {q}");
        }
        // Large df tends to the normal quantile 1.959964.
        assert!((t_quantile(0.975, 1e7) - 1.959_964).abs() < 1e-5);
        // One df is the Cauchy distribution: quantile tan(pi (p - 1/2)), exactly.
        let cauchy = (std::f64::consts::PI * 0.4).tan();
        assert!((t_quantile(0.9, 1.0) - cauchy).abs() < 1e-9);
        assert!((t_quantile(0.025, 4.0) + t_quantile(0.975, 4.0)).abs() < 1e-12);
    }

    #[test]
    fn the_cdf_of_two_df_has_its_closed_form() {
        // For df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
        for t in [-3.0, -0.4, 0.0, 0.7, 2.5, 10.0] {
            let want = 0.5 + t / (2.0 * (2.0_f64 + t * t).sqrt());
            assert!((t_cdf(t, 2.0) - want).abs() < 1e-12, "t {t}");
        }
    }

    #[test]
    fn interval_by_hand() {
        // diffs 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), se sqrt(0.5), t_{0.975,4} = 2.7764451.
        let iv = t_interval(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.95).unwrap();
        let half = 2.776_445_105_197_793 * 0.5_f64.sqrt();
        assert_eq!(iv.n, 5);
        assert!((iv.mean - 3.0).abs() < 1e-12);
        assert!((iv.lo - (3.0 - half)).abs() < 1e-9, "{iv:?}");
        assert!((iv.hi - (3.0 + half)).abs() < 1e-9, "{iv:?}");
        assert!(t_interval(&[1.0], 0.95).is_none());
        assert!(t_interval(&[1.0, f64::NAN], 0.95).is_none());
    }

    #[test]
    fn verdicts_follow_the_interval_and_the_metric_direction() {
        let iv = |lo: f64, hi: f64| Interval {
            n: 5,
            mean: 0.5 * (lo + hi),
            lo,
            hi,
        };
        // Higher is better (F1): a clearly positive difference beats.
        assert_eq!(verdict(Some(&iv(0.1, 0.9)), true), Verdict::Better);
        assert_eq!(verdict(Some(&iv(-0.9, -0.1)), true), Verdict::Worse);
        // Lower is better (CHAIR): a negative difference beats.
        assert_eq!(verdict(Some(&iv(-0.9, -0.1)), false), Verdict::Better);
        assert_eq!(verdict(Some(&iv(0.1, 0.9)), false), Verdict::Worse);
        // Covering zero, even barely, decides nothing.
        assert_eq!(verdict(Some(&iv(-0.01, 3.0)), true), Verdict::NoDifference);
        assert_eq!(verdict(Some(&iv(0.0, 3.0)), true), Verdict::NoDifference);
        assert_eq!(verdict(None, true), Verdict::TooFewSeeds);
    }

    /// Values from SciPy (fixtures/stats/make_fixture.py): t quantiles and paired intervals.
    #[test]
    fn intervals_match_scipy() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/stats/paired_intervals.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (df, q) in v["t_quantiles_0975"].as_object().unwrap() {
            let df: f64 = df.parse().unwrap();
            let q = q.as_f64().unwrap();
            let got = t_quantile(0.975, df);
            assert!((got - q).abs() < 1e-9 * q, "df {df}: {got} vs scipy {q}");
        }
        let cases = v["cases"].as_array().unwrap();
        assert!(cases.len() >= 5);
        for c in cases {
            let f = |k: &str| -> Vec<f64> {
                c[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
            let diffs: Vec<f64> = f("a").iter().zip(f("b")).map(|(a, b)| a - b).collect();
            let iv = t_interval(&diffs, v["level"].as_f64().unwrap()).unwrap();
            let want = |k: &str| c[k].as_f64().unwrap();
            let tol = 1e-9 * (1.0 + want("hi").abs().max(want("lo").abs()));
            assert!((iv.mean - want("mean")).abs() < tol, "{}", c["name"]);
            assert!((iv.lo - want("lo")).abs() < tol, "{}: {iv:?}", c["name"]);
            assert!((iv.hi - want("hi")).abs() < tol, "{}: {iv:?}", c["name"]);
            // The interval excludes 0 exactly when the paired t test rejects at 5%.
            assert_eq!(iv.excludes_zero(), want("p_value") < 0.05, "{}", c["name"]);
        }
    }
}

//! Whether the image term still learns at the end of training: the least-squares slope of a
//! run's `loss/img` over its last third of steps, and per variant a t interval of that slope
//! over seeds. If the variants cannot be told apart, a flat image loss says the image term has
//! stopped teaching (more steps or a higher rate might separate them); a falling one says the
//! runs end too early to show its effect.

use std::path::Path;

use serde_json::{json, Value};

use crate::report::stats::{self, Interval};

/// `(step, loss/img)` of every row of a run's `metrics.jsonl` text that has both, finite.
pub fn image_loss_points(metrics_jsonl: &str) -> Vec<(f64, f64)> {
    metrics_jsonl
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v["loss/img"].as_f64()?)))
        .filter(|(s, l)| s.is_finite() && l.is_finite())
        .collect()
}

/// Least-squares slope (loss per step) over the last third of `points` (at least 3 of them);
/// `None` with fewer than 3 points or when their steps do not vary.
pub fn tail_slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = (points.len().div_ceil(3)).max(3);
    let tail = &points[points.len() - n..];
    let mx = tail.iter().map(|p| p.0).sum::<f64>() / n as f64;
    let my = tail.iter().map(|p| p.1).sum::<f64>() / n as f64;
    let sxx: f64 = tail.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = tail.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// One variant's image-loss trend over its seeds.
#[derive(Debug, Clone)]
pub struct ImageLossTrend {
    pub variant: String,
    /// (seed, slope of its last third, its first and last `loss/img`).
    pub seeds: Vec<(u64, f64, f64, f64)>,
    /// t interval of the slopes over seeds (`None` with one seed).
    pub interval: Option<Interval>,
}

impl ImageLossTrend {
    /// "still falling" only when the interval of the slope is below 0, "rising" when above;
    /// otherwise no trend is measurable.
    pub fn words(&self) -> &'static str {
        match &self.interval {
            Some(iv) if iv.hi < 0.0 => "still falling",
            Some(iv) if iv.lo > 0.0 => "rising",
            Some(_) => "flat (no trend measurable)",
            None => "one seed: no interval",
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "slope_per_step": self.interval.as_ref().map(|iv| json!({
                "mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "n": iv.n,
            })),
            "trend": self.words(),
            "runs": self.seeds.iter().map(|(seed, slope, first, last)| json!({
                "seed": seed, "slope_per_step": slope, "first": first, "last": last,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The trend of every variant among `runs` (variant, seed, run folder) that has an image term
/// (a `loss/img` that is not 0 throughout).
pub fn image_loss_trends<'a>(
    runs: impl IntoIterator<Item = (&'a str, u64, &'a Path)>,
) -> Vec<ImageLossTrend> {
    let mut out: Vec<ImageLossTrend> = Vec::new();
    for (variant, seed, dir) in runs {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
        let pts = image_loss_points(&text);
        if pts.iter().all(|p| p.1 == 0.0) {
            continue;
        }
        let Some(slope) = tail_slope(&pts) else {
            continue;
        };
        let row = (seed, slope, pts[0].1, pts[pts.len() - 1].1);
        match out.iter_mut().find(|t| t.variant == variant) {
            Some(t) => t.seeds.push(row),
            None => out.push(ImageLossTrend {
                variant: variant.to_string(),
                seeds: vec![row],
                interval: None,
            }),
        }
    }
    for t in &mut out {
        let slopes: Vec<f64> = t.seeds.iter().map(|s| s.1).collect();
        t.interval = stats::t_interval(&slopes, stats::LEVEL);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_slope_fits_the_last_third_only() {
        // Nine steps: falls by 1 per step for six, then by 0.5 per step for the last three.
        let pts: Vec<(f64, f64)> = (1..=9)
            .map(|s| {
                let s = s as f64;
                (
                    s,
                    if s <= 6.0 {
                        10.0 - s
                    } else {
                        4.0 - 0.5 * (s - 6.0)
                    },
                )
            })
            .collect();
        assert!((tail_slope(&pts).unwrap() + 0.5).abs() < 1e-12);
        // Fifteen steps (the demo's runs): the last five; y = 2 + 0.1 s there is a rise.
        let pts: Vec<(f64, f64)> = (1..=15)
            .map(|s| (s as f64, if s > 10 { 2.0 + 0.1 * s as f64 } else { 9.0 }))
            .collect();
        assert!((tail_slope(&pts).unwrap() - 0.1).abs() < 1e-12);
        // Hand-computed scatter: x 1, 2, 3, y 1, 3, 2: slope = sxy / sxx = 1 / 2.
        assert!((tail_slope(&[(1.0, 1.0), (2.0, 3.0), (3.0, 2.0)]).unwrap() - 0.5).abs() < 1e-12);
        assert!(tail_slope(&[(1.0, 1.0), (2.0, 0.5)]).is_none());
        assert!(tail_slope(&[(1.0, 1.0), (1.0, 0.5), (1.0, 0.2)]).is_none());
    }

    #[test]
    fn metrics_rows_without_an_image_loss_are_skipped() {
        let text = "{\"step\":1,\"loss/img\":1.5}\nnot json\n{\"step\":2}\n{\"step\":3,\"loss/img\":1.25}\n";
        assert_eq!(image_loss_points(text), vec![(1.0, 1.5), (3.0, 1.25)]);
    }

    fn run_dir(name: &str, losses: &[f64]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("misp-diag-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rows: Vec<String> = losses
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{{\"step\":{},\"loss/img\":{l}}}", i + 1))
            .collect();
        std::fs::write(dir.join("metrics.jsonl"), rows.join("\n")).unwrap();
        dir
    }

    #[test]
    fn trends_over_seeds_and_their_verdicts() {
        // misp: slopes -0.1, -0.2, -0.15 over the last three steps: the interval is below 0.
        let m0 = run_dir("m0", &[1.4, 1.3, 1.2, 1.1]);
        let m1 = run_dir("m1", &[1.4, 1.2, 1.0, 0.8]);
        let m2 = run_dir("m2", &[1.4, 1.25, 1.1, 0.95]);
        // random: slopes +0.1, -0.1: the interval covers 0. dpo: no image term, left out.
        let r0 = run_dir("r0", &[1.4, 1.0, 1.1, 1.2]);
        let r1 = run_dir("r1", &[1.4, 1.2, 1.1, 1.0]);
        let d0 = run_dir("d0", &[0.0, 0.0, 0.0, 0.0]);
        let runs = [
            ("misp", 0, m0.as_path()),
            ("misp", 1, m1.as_path()),
            ("misp", 2, m2.as_path()),
            ("random", 0, r0.as_path()),
            ("random", 1, r1.as_path()),
            ("dpo", 0, d0.as_path()),
        ];
        let t = image_loss_trends(runs);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].variant, "misp");
        let iv = t[0].interval.unwrap();
        assert!((iv.mean + 0.15).abs() < 1e-9, "{}", iv.mean);
        assert_eq!(t[0].words(), "still falling");
        assert_eq!((t[0].seeds[1].2, t[0].seeds[1].3), (1.4, 0.8));
        assert_eq!(t[1].words(), "flat (no trend measurable)");
        let j = t[1].to_json();
        assert_eq!(j["runs"].as_array().unwrap().len(), 2);
        assert_eq!(j["trend"], "flat (no trend measurable)");
        for d in [m0, m1, m2, r0, r1, d0] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

//! `OUT/report.md` and the training curves (`loss.png`, `rewards.png`, `is_weights.png`), made
//! from the whole `OUT/metrics.jsonl` so a resumed run's report covers every step.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::config::TrainConfig;
use super::{TrainError, TrainSummary};
use crate::files::write_atomic;
use crate::report::plot::line_chart;

/// `(step, value)` series of `key` over the metrics rows (nulls and refused steps left out).
fn series(rows: &[Value], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter(|r| r.get("refused").is_none())
        .filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?)))
        .collect()
}

/// Mean of `key` over the last `frac` of the rows that have it.
fn tail_mean(rows: &[Value], key: &str, frac: f64) -> Option<f64> {
    let s = series(rows, key);
    if s.is_empty() {
        return None;
    }
    let take = ((s.len() as f64 * frac).ceil() as usize).clamp(1, s.len());
    Some(s[s.len() - take..].iter().map(|(_, v)| v).sum::<f64>() / take as f64)
}

pub fn write(
    out: &Path,
    cfg: &TrainConfig,
    summary: &TrainSummary,
    without_negatives: usize,
    unreadable_negatives: usize,
) -> Result<(), TrainError> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let rows: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let plot = |name: &str, title: &str, keys: &[&str]| {
        let s: Vec<(String, Vec<(f64, f64)>)> = keys
            .iter()
            .map(|k| (k.to_string(), series(&rows, k)))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        if s.is_empty() {
            return None;
        }
        match line_chart(&out.join(name), title, &s, "step", "value") {
            Ok(()) => Some(name.to_string()),
            Err(e) => {
                tracing::warn!("{name}: {e}");
                None
            }
        }
    };
    let charts: Vec<String> = [
        plot("loss.png", "loss", &["loss", "loss/img", "loss/text"]),
        plot(
            "rewards.png",
            "rewards",
            &[
                "rewards/margins",
                "rewards/accuracies",
                "rewards/img_accuracies",
            ],
        ),
        plot(
            "is_weights.png",
            "importance weights",
            &["is/ess", "is/max_weight"],
        ),
    ]
    .into_iter()
    .flatten()
    .collect();

    let mut md = String::new();
    let _ = writeln!(md, "# Training run `{}`\n", cfg.variant);
    let _ = writeln!(
        md,
        "{} records ({} skipped, {} without negatives, {} unreadable negatives dropped), {} optimiser steps ({} refused), {:.1} s in this process.\n",
        summary.records,
        summary.skipped,
        without_negatives,
        unreadable_negatives,
        summary.steps,
        summary.refused_steps,
        summary.seconds
    );
    let _ = writeln!(md, "## Final metrics (mean of the last 10% of steps)\n");
    let _ = writeln!(md, "| metric | value |\n|---|---|");
    for key in [
        "loss",
        "loss/img",
        "loss/text",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "rewards/img_negatives",
        "rewards/img_accuracies",
        "is/ess",
        "is/max_weight",
        "grad_norm",
        "tokens_per_s",
    ] {
        if let Some(v) = tail_mean(&rows, key, 0.1) {
            let _ = writeln!(md, "| {key} | {v:.4} |");
        }
    }
    let _ = writeln!(md, "\n## Time per epoch\n");
    for (i, s) in summary.epoch_seconds.iter().enumerate() {
        let _ = writeln!(md, "- epoch {}: {s:.1} s", i + 1);
    }
    let _ = writeln!(md, "\n## Curves\n");
    for c in &charts {
        let _ = writeln!(md, "![{c}]({c})");
    }
    let _ = writeln!(
        md,
        "\nAdapter (PEFT layout): `adapter/`. Settings: `config.toml`. Every step: `metrics.jsonl`."
    );
    write_atomic(&out.join("report.md"), md.as_bytes())
        .map_err(|e| TrainError::Input(e.to_string()))?;
    Ok(())
}

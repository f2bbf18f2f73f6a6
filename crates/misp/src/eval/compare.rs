//! `misp eval compare`: several runs' `metrics.json` (POPE, CHAIR, HallusionBench, MMVP, AMBER)
//! side by side, as a
//! markdown table (`compare.md`), the same numbers as JSON (`compare.json`) and a grouped bar
//! chart (`compare.png`: one cluster per metric, one bar per run).
//!
//! Only the fraction-valued metrics are compared (accuracy, precision, recall, F1, yes-ratio,
//! CHAIR_s, CHAIR_i, aAcc / fAcc / qAcc, pair accuracy, AMBER's cover / hal / cog); counts stay
//! in each run's own files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::pope::SPLITS;
use super::EvalError;
use crate::files::{write_atomic, write_json_atomic, FileError};
use crate::report::plot;

/// Fraction-valued fields, in display order (POPE, CHAIR, HallusionBench, MMVP, AMBER).
const FIELDS: [&str; 15] = [
    "accuracy",
    "precision",
    "recall",
    "f1",
    "yes_ratio",
    "chair_s",
    "chair_i",
    "aAcc",
    "fAcc",
    "qAcc",
    "pair_accuracy",
    "chair",
    "cover",
    "hal",
    "cog",
];

/// Fraction-valued fields of the judged benchmarks (MMHal-Bench, WildVision-Bench).
const JUDGED_FIELDS: [&str; 4] = ["hallucination_rate", "score", "win_rate", "win_or_tie_rate"];

/// One run's comparable metrics: `(label, value)` in display order, e.g. `("overall f1", 0.87)`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunMetrics {
    pub name: String,
    pub dir: PathBuf,
    pub values: Vec<(String, f64)>,
}

fn section_rank(section: &str) -> (usize, String) {
    let rank = match section {
        s if SPLITS.contains(&s) => SPLITS.iter().position(|x| *x == s).unwrap_or(0),
        "overall" => 3,
        "chair" => 5,
        _ => 4,
    };
    (rank, section.to_string())
}

fn label(section: &str, field: &str) -> String {
    match (section, field) {
        ("chair", "chair_s") => "CHAIR_s".into(),
        ("chair", "chair_i") => "CHAIR_i".into(),
        ("chair", f) => format!("CHAIR {f}"),
        (s, f) => format!("{s} {f}"),
    }
}

/// Reads `dir/metrics.json`: an object of sections (`random`, ..., `overall`, `chair`), each
/// an object of metrics.
pub fn read_run(dir: &Path) -> Result<RunMetrics, EvalError> {
    let path = dir.join("metrics.json");
    let text = std::fs::read_to_string(&path).map_err(|e| FileError::new(&path, e))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EvalError::record(&path, e.line(), "(document)", format!("not JSON: {e}")))?;
    let sections = doc
        .as_object()
        .ok_or_else(|| EvalError::record(&path, 0, "(document)", "not a JSON object"))?;
    let mut ordered: Vec<(&String, &serde_json::Value)> = sections.iter().collect();
    ordered.sort_by_key(|(s, _)| section_rank(s));
    let mut values = Vec::new();
    for (section, metrics) in ordered {
        let Some(metrics) = metrics.as_object() else {
            return Err(EvalError::record(
                &path,
                0,
                section,
                "not an object of metrics",
            ));
        };
        for field in FIELDS.into_iter().chain(JUDGED_FIELDS) {
            if let Some(v) = metrics.get(field) {
                let v = v.as_f64().ok_or_else(|| {
                    EvalError::record(&path, 0, &format!("{section}.{field}"), "not a number")
                })?;
                values.push((label(section, field), v));
            }
        }
    }
    if values.is_empty() {
        return Err(EvalError::record(
            &path,
            0,
            "(document)",
            "no metrics of a misp eval benchmark in it",
        ));
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    Ok(RunMetrics {
        name,
        dir: dir.to_path_buf(),
        values,
    })
}

/// Every metric label any run has, in first-seen order.
fn all_labels(runs: &[RunMetrics]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for r in runs {
        for (l, _) in &r.values {
            if !labels.contains(l) {
                labels.push(l.clone());
            }
        }
    }
    labels
}

/// A markdown table: one row per metric, one column per run, values in percent with two
/// decimals (`-` where a run lacks the metric).
pub fn markdown_table(runs: &[RunMetrics]) -> String {
    let mut s = String::from("| metric (%) |");
    for r in runs {
        s.push_str(&format!(" {} |", r.name.replace('|', "\\|")));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(runs.len()));
    s.push('\n');
    for l in all_labels(runs) {
        s.push_str(&format!("| {l} |"));
        for r in runs {
            match r.values.iter().find(|(k, _)| *k == l) {
                Some((_, v)) => s.push_str(&format!(" {:.2} |", v * 100.0)),
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Reads every run folder and writes `compare.md`, `compare.json` and `compare.png` into
/// `out`. Runs whose folder names clash are named by their full paths. The chart has every
/// metric any run has, with no bar where a run lacks it.
pub fn compare(run_dirs: &[PathBuf], out: &Path) -> Result<Vec<RunMetrics>, EvalError> {
    if run_dirs.is_empty() {
        return Err(EvalError::Input("compare: no run folders given".into()));
    }
    let mut runs = run_dirs
        .iter()
        .map(|d| read_run(d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &runs {
        *counts.entry(r.name.clone()).or_default() += 1;
    }
    for r in &mut runs {
        if counts[&r.name] > 1 {
            r.name = r.dir.display().to_string();
        }
    }
    let table = markdown_table(&runs);
    write_atomic(&out.join("compare.md"), table.as_bytes())?;
    let json: Vec<_> = runs
        .iter()
        .map(|r| {
            let m: serde_json::Map<String, serde_json::Value> = r
                .values
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                .collect();
            serde_json::json!({"name": r.name, "dir": r.dir, "metrics": m})
        })
        .collect();
    write_json_atomic(&out.join("compare.json"), &json)?;
    // Every metric any run has; a run without it gets no bar (NaN) rather than a zero.
    let labels = all_labels(&runs);
    let series: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|r| {
            let vals = labels
                .iter()
                .map(|l| {
                    r.values
                        .iter()
                        .find(|(k, _)| k == l)
                        .map_or(f64::NAN, |(_, v)| *v)
                })
                .collect();
            (r.name.clone(), vals)
        })
        .collect();
    let png = out.join("compare.png");
    // Wide enough for each group's two-line label (about 12 characters) and its bars.
    let group_px = (12 * 6 + 8).max(14 * runs.len() as u32 + 16);
    let width = plot::DEFAULT_SIZE
        .0
        .max(90 + group_px * labels.len() as u32);
    plot::bar_chart_sized(
        &png,
        (width, plot::DEFAULT_SIZE.1),
        "misp eval compare",
        &labels,
        &series,
        "fraction",
    )
    .map_err(|e| EvalError::Input(format!("{}: {e}", png.display())))?;
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_metric_and_marks_missing_ones() {
        let a = RunMetrics {
            name: "base".into(),
            dir: "a".into(),
            values: vec![("overall f1".into(), 0.8), ("CHAIR_s".into(), 0.5)],
        };
        let b = RunMetrics {
            name: "dpo".into(),
            dir: "b".into(),
            values: vec![("overall f1".into(), 0.91234)],
        };
        let t = markdown_table(&[a, b]);
        assert_eq!(
            t,
            "| metric (%) | base | dpo |\n|---|---:|---:|\n| overall f1 | 80.00 | 91.23 |\n| CHAIR_s | 50.00 | - |\n"
        );
    }
}

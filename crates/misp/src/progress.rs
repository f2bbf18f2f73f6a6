//! Progress bars for long loops, one look for every stage: `{label} [bar] pos/len unit, rate,
//! ETA`, drawn on stderr, hidden when not wanted (tests, `--quiet`).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` items named `unit` (e.g. "records"), or a hidden one.
pub fn bar(enabled: bool, len: u64, label: &str, unit: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let template =
        format!("{label} [{{bar:40}}] {{pos}}/{{len}} {unit}, {{per_sec}}, ETA {{eta}} {{msg}}");
    let style = ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

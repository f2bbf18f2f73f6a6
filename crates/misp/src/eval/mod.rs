//! Stage 3, evaluation (docs/design.md §5): hallucination benchmarks with per-item audit files.
//!
//! - [`pope`]: POPE yes/no probes -> `answers.jsonl` + `metrics.json` (accuracy, precision,
//!   recall, F1, yes-ratio per split and overall), answers parsed as the official script does.
//! - [`chair`]: captions -> CHAIR_i, CHAIR_s and object recall against COCO instance
//!   annotations (or any per-image object sets), through the reference synonym table.
//! - [`hallusionbench`]: yes/no questions on figures -> aAcc, fAcc, qAcc overall, per category
//!   and subcategory ([`extract`] holds the yes/no and option extraction).
//! - [`mmvp`]: two-option questions on image pairs -> question and pair accuracy.
//! - [`amber`]: AMBER's descriptions (CHAIR, Cover, Hal, Cog) and yes/no questions (accuracy,
//!   precision, recall, F1 per dimension).
//! - [`judge`]: an LLM judge over the OpenAI chat API (cache, retries, concurrency).
//! - [`mmhal`]: MMHal-Bench, 0-6 ratings by the judge -> average score, hallucination rate.
//! - [`wildvision`]: WildVision-Bench, pairwise judgements against a baseline's answers -> the
//!   Elo-derived score, reward and win rates.
//! - [`compare`]: several runs' `metrics.json` -> one markdown table and a bar chart.
//!
//! Nothing here loads a model: generation is a caller-given batched function
//! ([`GenerateFn`]), so the metrics can be re-derived from saved answers alone
//! (`misp eval score-only`) and tested without weights.

pub mod amber;
pub mod chair;
pub mod compare;
pub mod extract;
pub mod hallusionbench;
pub mod judge;
pub mod mmhal;
pub mod mmvp;
pub mod pope;
pub mod wildvision;
pub mod words;

use std::path::{Component, Path, PathBuf};

use crate::files::FileError;

/// A batched generator: `(image path, prompt)` pairs in, one generated text per pair out (same
/// order). The error is a message; the runner adds which batch failed.
pub type GenerateFn<'a> = dyn FnMut(&[(PathBuf, String)]) -> Result<Vec<String>, String> + 'a;

/// Everything that can go wrong in evaluation, each naming where.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    File(#[from] FileError),
    /// A bad record: file, 1-based line (0 for a whole-file JSON document), field and why.
    #[error("{}:{line}: field `{field}`: {message}", path.display())]
    Record {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
    /// Input that is well-formed but unusable as a whole (nothing left, mismatched files).
    #[error("{0}")]
    Input(String),
    /// The caller's generation function failed.
    #[error("generation failed on items {first}..{last}: {message}")]
    Generate {
        first: usize,
        last: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    Image { path: PathBuf, message: String },
}

impl EvalError {
    pub(crate) fn record(
        path: &Path,
        line: usize,
        field: &str,
        message: impl Into<String>,
    ) -> Self {
        EvalError::Record {
            path: path.to_path_buf(),
            line,
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Where a benchmark's image names point: a relative name under the images folder (and never
/// out of it: dataset paths are untrusted, docs/design.md §7); an absolute path only under
/// `--image-root`, when one is given.
#[derive(Debug, Clone)]
pub struct Images {
    dir: PathBuf,
    root: Option<crate::data::paths::DatasetRoot>,
}

impl Images {
    /// Names relative to `dir`; absolute paths admitted under `image_root` (which must be an
    /// existing folder).
    pub fn new(dir: &Path, image_root: Option<&Path>) -> Result<Self, crate::files::FileError> {
        let root = image_root
            .map(crate::data::paths::DatasetRoot::new)
            .transpose()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            root,
        })
    }

    /// Relative names under `dir` only.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            root: None,
        }
    }

    /// The images folder relative names are under.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image file `name` points to, or why it cannot be used (the reason recorded in
    /// `excluded.json`).
    pub fn resolve(&self, name: &str) -> Result<PathBuf, String> {
        if Path::new(name).is_absolute() {
            return match &self.root {
                Some(root) => root.resolve(name),
                None => Err(format!(
                    "image path is absolute: {name} (--image-root DIR admits absolute paths under DIR)"
                )),
            };
        }
        match image_path(&self.dir, name) {
            None => Err(format!(
                "image path is empty or leaves the images folder: {name}"
            )),
            Some(p) if !p.is_file() => Err(format!("image file not found: {}", p.display())),
            Some(p) => Ok(p),
        }
    }
}

/// `root/name` when `name` is a plain relative path that stays inside `root` (dataset paths
/// are untrusted, docs/design.md §7); `None` otherwise.
pub fn image_path(root: &Path, name: &str) -> Option<PathBuf> {
    let rel = Path::new(name);
    let plain = rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    (plain && !name.is_empty()).then(|| root.join(rel))
}

/// A progress bar with rate and ETA on stderr (hidden when stderr is not a terminal).
pub(crate) fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// What [`ask_all`] returns: each asked question with its reply, in question order, and each
/// question left out with the reason.
pub(crate) type Asked<'q, Q> = (Vec<(&'q Q, String)>, Vec<(&'q Q, String)>);

/// The shared loop of the runners that ask one question per image: `item` gives a question's
/// image path and prompt, or why it cannot be asked. Warns about the questions left out (`why`
/// says what they have in common), refuses a set where none can be asked, and answers the rest
/// `batch` at a time.
pub(crate) fn ask_all<'q, Q>(
    questions: &'q [Q],
    images: &Images,
    what: &str,
    why: &str,
    batch: usize,
    generate: &mut GenerateFn<'_>,
    item: impl Fn(&Q) -> Result<(PathBuf, String), String>,
) -> Result<Asked<'q, Q>, EvalError> {
    let mut asked = Vec::new();
    let mut items = Vec::new();
    let mut left_out = Vec::new();
    for q in questions {
        match item(q) {
            Ok(it) => {
                items.push(it);
                asked.push(q);
            }
            Err(reason) => left_out.push((q, reason)),
        }
    }
    if !left_out.is_empty() {
        tracing::warn!(
            "{} of {} {what} questions not asked ({why}; listed in excluded.json)",
            left_out.len(),
            questions.len()
        );
    }
    if items.is_empty() {
        return Err(EvalError::Input(format!(
            "none of the {} questions has its image under {}",
            questions.len(),
            images.dir().display()
        )));
    }
    let texts = generate_all(&items, batch, what, generate)?;
    Ok((asked.into_iter().zip(texts).collect(), left_out))
}

/// Runs `generate` over `items` in batches of `batch`, with a progress bar; checks that every
/// batch returns one text per item.
pub(crate) fn generate_all(
    items: &[(PathBuf, String)],
    batch: usize,
    what: &str,
    generate: &mut GenerateFn<'_>,
) -> Result<Vec<String>, EvalError> {
    let batch = batch.max(1);
    let bar = progress(items.len(), what);
    let mut out = Vec::with_capacity(items.len());
    for (b, chunk) in items.chunks(batch).enumerate() {
        let first = b * batch;
        let last = first + chunk.len() - 1;
        let texts = generate(chunk).map_err(|message| EvalError::Generate {
            first,
            last,
            message,
        })?;
        if texts.len() != chunk.len() {
            return Err(EvalError::Generate {
                first,
                last,
                message: format!("{} texts for {} prompts", texts.len(), chunk.len()),
            });
        }
        out.extend(texts);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_stay_inside_the_root() {
        let root = Path::new("/data/coco");
        assert_eq!(
            image_path(root, "val/a.jpg"),
            Some(PathBuf::from("/data/coco/val/a.jpg"))
        );
        assert_eq!(image_path(root, "../etc/passwd"), None);
        assert_eq!(image_path(root, "/etc/passwd"), None);
        assert_eq!(image_path(root, ""), None);
    }

    #[test]
    fn absolute_image_paths_need_an_image_root_that_holds_them() {
        let dir = std::env::temp_dir().join(format!("misp-eval-images-{}", std::process::id()));
        let (inside, outside) = (dir.join("root"), dir.join("elsewhere"));
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(inside.join("a.png"), b"x").unwrap();
        std::fs::write(outside.join("b.png"), b"x").unwrap();
        let abs = |p: PathBuf| p.to_string_lossy().into_owned();
        let plain = Images::in_dir(&inside);
        assert_eq!(plain.resolve("a.png").unwrap(), inside.join("a.png"));
        let e = plain.resolve(&abs(inside.join("a.png"))).unwrap_err();
        assert!(e.contains("--image-root"), "{e}");
        let rooted = Images::new(&outside, Some(&inside)).unwrap();
        assert!(rooted.resolve(&abs(inside.join("a.png"))).is_ok());
        let e = rooted.resolve(&abs(outside.join("b.png"))).unwrap_err();
        assert!(e.contains("escapes") && e.contains("--image-root"), "{e}");
        assert!(
            rooted.resolve("b.png").is_ok(),
            "relative names stay under the images folder"
        );
        let e = rooted.resolve("missing.png").unwrap_err();
        assert!(e.starts_with("image file not found"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn generation_is_batched_and_checked() {
        let items: Vec<(PathBuf, String)> = (0..5)
            .map(|i| (PathBuf::from(format!("{i}.jpg")), format!("q{i}")))
            .collect();
        let mut sizes = Vec::new();
        let mut echo = |b: &[(PathBuf, String)]| {
            sizes.push(b.len());
            Ok(b.iter().map(|(_, p)| p.to_uppercase()).collect())
        };
        let out = generate_all(&items, 2, "test", &mut echo).unwrap();
        assert_eq!(out, ["Q0", "Q1", "Q2", "Q3", "Q4"]);
        assert_eq!(sizes, [2, 2, 1]);
        let mut short = |_: &[(PathBuf, String)]| Ok(vec![]);
        let err = generate_all(&items, 2, "test", &mut short).unwrap_err();
        assert!(err.to_string().contains("items 0..1"), "{err}");
    }
}

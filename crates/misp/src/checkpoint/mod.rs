//! Checkpoint plumbing shared by every model: reading an HF `config.json`, opening a
//! safetensors checkpoint (single file or sharded) as a `VarBuilder` that checks every tensor a
//! model asks for, and the error type every model loader returns.

use std::path::PathBuf;

mod safetensors;

pub use safetensors::TensorProblem;
pub(crate) use safetensors::{load_checked, same_keys};

/// Errors of loading and running a model. File errors name the file; tensor errors list every
/// problem tensor by its checkpoint key.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{}: cannot read safetensors: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{}: {} tensor problem(s): {}", path.display(), problems.len(), join(problems))]
    Tensors {
        path: PathBuf,
        problems: Vec<TensorProblem>,
    },
    #[error("{}: tokenizer: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("model input `{field}`: {message}")]
    Input {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The problems, all of them up to 20 (a config with fewer layers than the weights leaves
/// hundreds of unexpected tensors), then how many more.
fn join(problems: &[TensorProblem]) -> String {
    const SHOWN: usize = 20;
    let mut text = problems
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > SHOWN {
        text.push_str(&format!("; and {} more", problems.len() - SHOWN));
    }
    text
}

/// Reads `dir/config.json` (an HF model config) into `T`; returns it with the file's path for
/// later error messages. Errors name the file.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    dir: &std::path::Path,
) -> Result<(T, std::path::PathBuf), ModelError> {
    read_config_file(&dir.join("config.json"))
}

/// [`read_config`] of a config file under any name (`llava-1.5-7b.config.json`).
pub(crate) fn read_config_file<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<(T, std::path::PathBuf), ModelError> {
    let path = path.to_path_buf();
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let cfg = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    Ok((cfg, path))
}

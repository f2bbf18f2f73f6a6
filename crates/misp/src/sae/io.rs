//! The SAE checkpoint folder: `model.safetensors` in `torch.nn.Linear` layout and
//! `config.json`, written atomically (temporary file, fsync, rename).
//!
//! PyTorch reads it as is:
//! `enc = nn.Linear(d*d, H); dec = nn.Linear(H, d*d); enc.weight <- encoder.weight` etc., and
//! `z = sigmoid(enc(x))`, `x_hat = dec(z)` with `x = (s * (p - v)).outer(t).flatten()`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::factor::{host_f64, Params};
use super::train::TrainingSummary;
use super::{Result, SaeConfig, SaeError};

/// Version of the checkpoint layout written here; [`load`] refuses any other.
pub(crate) const FORMAT_VERSION: u32 = 1;
pub(crate) const MODEL_FILE: &str = "model.safetensors";
pub(crate) const CONFIG_FILE: &str = "config.json";

/// `config.json`: the [`SaeConfig`] fields plus the layout version and the activation, so that
/// a reader outside misp knows what it holds.
#[derive(Debug, Serialize, Deserialize)]
struct ConfigFile {
    format: u32,
    activation: String,
    #[serde(flatten)]
    config: SaeConfig,
    /// How training went (`misp sae train`'s own checkpoints; absent for others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    training: Option<TrainingSummary>,
}

/// Rewrites `config.json` alone, with `training` (the weights are unchanged).
pub(crate) fn save_summary(
    dir: &Path,
    config: &SaeConfig,
    training: &TrainingSummary,
) -> Result<()> {
    let file = ConfigFile {
        format: FORMAT_VERSION,
        activation: "sigmoid".into(),
        config: config.clone(),
        training: Some(training.clone()),
    };
    write_json(&dir.join(CONFIG_FILE), &file)
}

pub(crate) fn save(
    dir: &Path,
    config: &SaeConfig,
    params: &Params,
    training: Option<&TrainingSummary>,
) -> Result<()> {
    let (h, d) = params.dims();
    fs::create_dir_all(dir).map_err(|source| SaeError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tensors = HashMap::from([
        ("encoder.weight", params.encoder.reshape((h, d * d))?),
        ("encoder.bias", params.encoder_bias.clone()),
        // nn.Linear(H, d*d).weight is [d*d, H]: the transpose of the internal [H, d*d].
        (
            "decoder.weight",
            params.decoder.reshape((h, d * d))?.t()?.contiguous()?,
        ),
        ("decoder.bias", params.decoder_bias.reshape(d * d)?),
    ]);
    write_safetensors(&dir.join(MODEL_FILE), &tensors)?;
    let file = ConfigFile {
        format: FORMAT_VERSION,
        activation: "sigmoid".into(),
        config: config.clone(),
        training: training.cloned(),
    };
    write_json(&dir.join(CONFIG_FILE), &file)
}

pub(crate) fn load(dir: &Path) -> Result<(SaeConfig, Params, Option<TrainingSummary>)> {
    let config_path = dir.join(CONFIG_FILE);
    let file: ConfigFile = read_json(&config_path)?;
    if file.format != FORMAT_VERSION {
        return Err(SaeError::Format {
            path: config_path,
            got: file.format,
            supported: FORMAT_VERSION,
        });
    }
    if file.activation != "sigmoid" {
        return Err(SaeError::BadConfigFile {
            path: config_path,
            field: "activation",
            problem: format!("is {:?}; only \"sigmoid\" is supported", file.activation),
        });
    }
    let (config, training) = (file.config, file.training);
    if let Err(SaeError::Config { field, problem }) = config.validate() {
        return Err(SaeError::BadConfigFile {
            path: config_path,
            field,
            problem,
        });
    }
    let (h, d) = (config.hidden, config.d);
    let path = dir.join(MODEL_FILE);
    let mut file = TensorFile::open(&path)?;
    let encoder = file.take("encoder.weight", &[h, d * d])?;
    let encoder_bias = file.take("encoder.bias", &[h])?;
    let decoder = file.take("decoder.weight", &[d * d, h])?;
    let decoder_bias = file.take("decoder.bias", &[d * d])?;
    let params = Params {
        encoder: encoder.reshape((h, d, d))?,
        encoder_bias,
        decoder: decoder.t()?.contiguous()?.reshape((h, d, d))?,
        decoder_bias: decoder_bias.reshape((d, d))?,
    };
    Ok((config, params, training))
}

/// A safetensors file opened for checked reads: every tensor is looked up by name, its shape
/// checked, copied out as `f32` and checked for NaN/Inf, with errors naming file and tensor.
pub(crate) struct TensorFile {
    path: PathBuf,
    file: MmapedSafetensors,
    shapes: HashMap<String, Vec<usize>>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        if let Err(source) = fs::metadata(path) {
            return Err(SaeError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        // SAFETY: the mapping is only read here, and each tensor is copied out before `self`
        // is dropped. misp never modifies a checkpoint in place (writers rename a new file over
        // it), so the mapped file does not change under us unless another program truncates it.
        let file =
            unsafe { MmapedSafetensors::new(path) }.map_err(|source| SaeError::Safetensors {
                path: path.to_path_buf(),
                source,
            })?;
        let shapes = file
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            shapes,
        })
    }

    /// The tensor `name` as `dtype`, after checking it has shape `expected`.
    pub fn take_as(&mut self, name: &str, expected: &[usize], dtype: DType) -> Result<Tensor> {
        let Some(shape) = self.shapes.get(name) else {
            return Err(SaeError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            });
        };
        if shape != expected {
            return Err(SaeError::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                got: shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let t = self
            .file
            .load(name, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|source| SaeError::Safetensors {
                path: self.path.clone(),
                source,
            })?;
        if t.dtype().is_float() {
            // A NaN or Inf anywhere makes the sum non-finite: one pass, no copy.
            let total = host_f64(&t.sum_all()?.to_dtype(DType::F64)?)?;
            if !total.iter().all(|x| x.is_finite()) {
                return Err(SaeError::NonFiniteTensor {
                    path: self.path.clone(),
                    name: name.to_string(),
                });
            }
        }
        Ok(t)
    }

    /// [`TensorFile::take_as`] for `f32`.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<Tensor> {
        self.take_as(name, expected, DType::F32)
    }
}

/// Writes `path` through `write(temp)` with [`files::write_atomic_with`] (fsync, usual mode,
/// rename), keeping the writer's own error when it is the one that failed.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut inner = None;
    crate::files::write_atomic_with(path, |tmp| {
        write(tmp).map_err(|e| {
            let message = e.to_string();
            inner = Some(e);
            std::io::Error::other(message)
        })
    })
    .map_err(|e| {
        inner.take().unwrap_or(SaeError::Io {
            path: e.path,
            source: e.source,
        })
    })
}

/// Atomically writes a safetensors file.
pub(crate) fn write_safetensors(path: &Path, tensors: &HashMap<&str, Tensor>) -> Result<()> {
    write_atomic(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(|source| SaeError::Safetensors {
            path: tmp.to_path_buf(),
            source,
        })
    })
}

/// Atomically writes pretty JSON.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| SaeError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_bytes(path, text.as_bytes())
}

/// Atomically writes raw bytes.
pub(crate) fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| {
        fs::write(tmp, bytes).map_err(|source| SaeError::Io {
            path: tmp.to_path_buf(),
            source,
        })
    })
}

/// Reads and parses a JSON file, naming it on error.
pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|source| SaeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| SaeError::Json {
        path: path.to_path_buf(),
        source,
    })
}

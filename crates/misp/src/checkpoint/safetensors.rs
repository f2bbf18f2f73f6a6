//! Reading a checkpoint's safetensors (single file or sharded) into a candle `VarBuilder` that
//! checks every requested tensor and collects all problems before failing, so one error lists
//! every missing and mis-shaped tensor of the checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::ModelError;

/// One tensor the model asked for and the checkpoint could not give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    Missing {
        name: String,
    },
    Shape {
        name: String,
        file: PathBuf,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
}

impl std::fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { name } => write!(f, "`{name}` is missing"),
            Self::Shape {
                name,
                file,
                got,
                expected,
            } => write!(
                f,
                "`{name}` has shape {got:?}, expected {expected:?} (in {})",
                file.display()
            ),
        }
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The checkpoint files of `dir`: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` names. Returns the files and the path errors should name.
pub(crate) fn checkpoint_files(dir: &Path) -> Result<(Vec<PathBuf>, PathBuf), ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![single.clone()], single));
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
        path: index.clone(),
        source,
    })?;
    let parsed: ShardIndex = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: index.clone(),
        source,
    })?;
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    let mut files = Vec::with_capacity(names.len());
    for n in names {
        // Shard names are plain file names next to the index; anything else could read files
        // outside the checkpoint folder.
        if n.is_empty() || n.contains('/') || n.contains('\\') || n == ".." || n == "." {
            return Err(ModelError::Config {
                path: index.clone(),
                message: format!("shard name {n:?} is not a file name in the checkpoint folder"),
            });
        }
        files.push(dir.join(n));
    }
    Ok((files, index))
}

/// The problems a checking backend recorded. The `VarBuilder` type-erases its backend, so the
/// list is shared through this handle, taken once the model has been built.
#[derive(Clone, Default)]
pub(crate) struct Problems(Arc<Mutex<Vec<TensorProblem>>>);

impl Problems {
    pub(crate) fn take(&self) -> Vec<TensorProblem> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    fn push(&self, p: TensorProblem) {
        if let Ok(mut v) = self.0.lock() {
            v.push(p);
        }
    }
}

/// A `SimpleBackend` over memory-mapped safetensors that records problems instead of failing:
/// a missing or mis-shaped tensor yields a zero placeholder of the requested shape (a
/// broadcast scalar, so nothing is allocated) and an entry in [`Problems`].
pub(crate) struct CheckedSafetensors {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
    problems: Problems,
}

impl CheckedSafetensors {
    pub(crate) fn open(files: &[PathBuf]) -> Result<Self, ModelError> {
        let mut opened = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            if !path.is_file() {
                return Err(ModelError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                });
            }
            // SAFETY: the file is mapped read-only for the loader's lifetime and tensors are
            // copied out of the map when loaded. Like every safetensors reader, this assumes no
            // other process truncates the checkpoint while it is being read.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|source| {
                ModelError::Safetensors {
                    path: path.clone(),
                    source,
                }
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            opened.push((path.clone(), st));
        }
        Ok(Self {
            files: opened,
            routing,
            problems: Problems::default(),
        })
    }

    /// The handle through which the problems are read after building the model.
    pub(crate) fn problems(&self) -> Problems {
        self.problems.clone()
    }

    pub(crate) fn into_var_builder<'a>(self, dtype: DType, device: &Device) -> VarBuilder<'a> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for CheckedSafetensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let placeholder = || Tensor::zeros((), dtype, dev)?.broadcast_as(s.clone());
        let Some(&i) = self.routing.get(name) else {
            self.problems
                .push(TensorProblem::Missing { name: name.into() });
            return placeholder();
        };
        let (path, st) = &self.files[i];
        let view = st.get(name)?;
        if view.shape() != s.dims() {
            self.problems.push(TensorProblem::Shape {
                name: name.into(),
                file: path.clone(),
                got: view.shape().to_vec(),
                expected: s.dims().to_vec(),
            });
            return placeholder();
        }
        st.load(name, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(&i) = self.routing.get(name) else {
            candle_core::bail!("tensor `{name}` is missing");
        };
        self.files[i].1.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

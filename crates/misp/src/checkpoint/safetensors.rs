//! Reading a checkpoint's safetensors (single file or sharded) into a candle `VarBuilder` that
//! checks every requested tensor and collects all problems before failing, so one error lists
//! every missing and mis-shaped tensor of the checkpoint.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::ModelError;

/// One tensor the model asked for and the checkpoint could not give, or one the checkpoint
/// holds and the model (as its config describes it) does not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    Missing {
        name: String,
    },
    /// In the checkpoint but not part of the model its config describes (a config with fewer
    /// layers than the weights, or weights of another model).
    Unexpected {
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
            Self::Unexpected { name } => write!(
                f,
                "`{name}` is in the checkpoint but not in the model its config.json describes"
            ),
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
fn checkpoint_files(dir: &Path) -> Result<(Vec<PathBuf>, PathBuf), ModelError> {
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

/// Tensors of older checkpoints that transformers drops on load as well: buffers it now
/// computes (`position_ids`, RoPE's `inv_freq`), never weights.
const IGNORED_BUFFERS: [&str; 2] = ["position_ids", "rotary_emb.inv_freq"];

/// What a checking backend recorded: the problems, and the names the model asked for. The
/// `VarBuilder` type-erases its backend, so they are shared through this handle, read once the
/// model has been built.
#[derive(Clone, Default)]
struct Record(Arc<Mutex<(Vec<TensorProblem>, HashSet<String>)>>);

impl Record {
    fn push(&self, p: TensorProblem) {
        if let Ok(mut v) = self.0.lock() {
            v.0.push(p);
        }
    }

    fn requested(&self, name: &str) {
        if let Ok(mut v) = self.0.lock() {
            v.1.insert(name.to_owned());
        }
    }
}

/// Loads the checkpoint of `dir` through `build`, which walks a `VarBuilder` (in `dtype` on
/// `device`, names mapped by `rename` to the checkpoint's keys). Every tensor the model asks
/// for and the checkpoint lacks or holds in another shape, and every tensor the checkpoint
/// holds and the model never asked for, is listed in one [`ModelError::Tensors`] naming the
/// file. `detect` sees the checkpoint's key set first (to choose a key layout) and returns the
/// renaming.
pub(crate) fn load_checked<M>(
    dir: &Path,
    dtype: DType,
    device: &Device,
    detect: impl FnOnce(&dyn Fn(&str) -> bool) -> Box<dyn Fn(&str) -> String + Send + Sync>,
    build: impl FnOnce(VarBuilder) -> Result<M, ModelError>,
) -> Result<M, ModelError> {
    let (files, named) = checkpoint_files(dir)?;
    let st = CheckedSafetensors::open(&files)?;
    let record = st.record.clone();
    let keys: Vec<String> = st.routing.keys().cloned().collect();
    let rename = detect(&|k: &str| st.routing.contains_key(k));
    let vb = VarBuilder::from_backend(Box::new(st), dtype, device.clone());
    let model = build(vb.rename_f(rename))?;
    let (mut problems, requested) = record
        .0
        .lock()
        .map(|mut v| (std::mem::take(&mut v.0), std::mem::take(&mut v.1)))
        .unwrap_or_default();
    let mut unexpected: Vec<String> = keys
        .into_iter()
        .filter(|k| !requested.contains(k) && !IGNORED_BUFFERS.iter().any(|b| k.ends_with(b)))
        .collect();
    unexpected.sort();
    problems.extend(
        unexpected
            .into_iter()
            .map(|name| TensorProblem::Unexpected { name }),
    );
    if problems.is_empty() {
        Ok(model)
    } else {
        Err(ModelError::Tensors {
            path: named,
            problems,
        })
    }
}

/// [`load_checked`] for checkpoints whose keys are the model's names as they are.
pub(crate) fn same_keys(_: &dyn Fn(&str) -> bool) -> Box<dyn Fn(&str) -> String + Send + Sync> {
    Box::new(str::to_owned)
}

/// A `SimpleBackend` over memory-mapped safetensors that records problems instead of failing:
/// a missing or mis-shaped tensor yields a zero placeholder of the requested shape (a
/// broadcast scalar, so nothing is allocated) and an entry in its [`Record`], which also keeps
/// every name asked for.
struct CheckedSafetensors {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
    record: Record,
}

impl CheckedSafetensors {
    fn open(files: &[PathBuf]) -> Result<Self, ModelError> {
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
            record: Record::default(),
        })
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
        self.record.requested(name);
        let Some(&i) = self.routing.get(name) else {
            self.record
                .push(TensorProblem::Missing { name: name.into() });
            return placeholder();
        };
        let (path, st) = &self.files[i];
        let view = st.get(name)?;
        if view.shape() != s.dims() {
            self.record.push(TensorProblem::Shape {
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
        self.record.requested(name);
        let Some(&i) = self.routing.get(name) else {
            candle_core::bail!("tensor `{name}` is missing");
        };
        self.files[i].1.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

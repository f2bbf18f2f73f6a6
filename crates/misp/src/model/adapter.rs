//! LoRA adapters in PEFT's on-disk layout (docs/design.md §4): `adapter_config.json` plus
//! `adapter_model.safetensors`, so that a policy trained here loads with
//! `PeftModel.from_pretrained` onto transformers' `LlavaForConditionalGeneration`, and an
//! adapter trained with PEFT loads here.
//!
//! Stage: train (save after training, load to resume) and eval (load the policy). Reads and
//! writes an adapter folder only; the base checkpoint is loaded by [`Llava::load_dir`].
//!
//! Layout facts this module relies on (checked against peft 0.21.2 with transformers 5.24 by
//! `fixtures/peft/make_fixture.py`):
//! - tensor keys are `base_model.model.model.language_model.layers.N.<block>.<proj>.lora_A.weight`
//!   (and `lora_B`); peft with transformers < 4.52 wrote `base_model.model.language_model.model.`
//!   instead, and some writers keep the adapter name (`lora_A.default.weight`). All are read,
//!   the current form is written;
//! - PEFT matches a *list* `target_modules` by name suffix, so `["q_proj", ...]` would also wrap
//!   the CLIP tower's `q_proj`/`k_proj`/`v_proj`. A *string* is full-matched as a regex, which is
//!   why the saved config names the language model in a regex.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;
use serde_json::{json, Value};

use super::llama::Llama;
use super::llava::Llava;
use super::lora::LoraConfig;
use crate::checkpoint::{ModelError, TensorProblem};
use crate::files::{write_atomic_with, write_json_atomic, FileError};

/// The adapter config's file name inside an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter tensors' file name inside an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The key prefix PEFT 0.21 with transformers 5 gives the language model's decoder layers.
const CURRENT_PREFIX: &str = "base_model.model.model.language_model.";
/// The same for transformers < 4.52, where `language_model` was a `LlamaForCausalLM`.
const LEGACY_PREFIX: &str = "base_model.model.language_model.model.";

/// The seven projections misp can adapt, in the order configs are written.
const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A failed write as the model error callers already handle, keeping its path.
fn io_error(e: FileError) -> ModelError {
    ModelError::Io {
        path: e.path,
        source: e.source,
    }
}

/// Writes the adapters attached to `model`'s language model into `dir` in PEFT layout.
///
/// `cfg` must describe those adapters (rank, targets on every layer): PEFT rebuilds the wrapped
/// modules from the config alone, so a config that disagrees with the tensors would load as a
/// different model. Tensors are written first and the config last, each atomically, so a folder
/// with a config always has its tensors. `base_model_name_or_path` is recorded for PEFT's
/// `AutoPeftModel`; nothing here reads it back.
pub fn save_peft_adapter(
    dir: &Path,
    model: &Llava,
    cfg: &LoraConfig,
    base_model_name_or_path: &str,
) -> Result<(), ModelError> {
    save_peft_adapter_of(
        dir,
        model.language_model(),
        cfg,
        base_model_name_or_path,
        PeftBase::LLAVA,
    )
}

/// The transformers class PEFT records in `auto_mapping` for the base model.
#[derive(Debug, Clone, Copy)]
pub struct PeftBase {
    pub class: &'static str,
    pub library: &'static str,
}

impl PeftBase {
    pub const LLAVA: Self = Self {
        class: "LlavaForConditionalGeneration",
        library: "transformers.models.llava.modeling_llava",
    };
    pub const QWEN2_5_VL: Self = Self {
        class: "Qwen2_5_VLForConditionalGeneration",
        library: "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    };
}

/// [`save_peft_adapter`] of any vision-language model whose language model is `lm` (LLaVA's
/// LLaMA, Qwen2.5-VL's Qwen2: both under `model.language_model.` in PEFT's keys).
pub fn save_peft_adapter_of(
    dir: &Path,
    lm: &Llama,
    cfg: &LoraConfig,
    base_model_name_or_path: &str,
    base: PeftBase,
) -> Result<(), ModelError> {
    let config_path = dir.join(CONFIG_FILE);
    let bad = |message: String| ModelError::Config {
        path: config_path.clone(),
        message,
    };
    for t in &cfg.target_modules {
        if !PROJECTIONS.contains(&t.as_str()) {
            return Err(bad(format!(
                "target module `{t}` is not a language-model projection misp adapts ({})",
                PROJECTIONS.join(", ")
            )));
        }
    }
    let adapted: BTreeMap<String, _> = lm
        .lora_layers()
        .into_iter()
        .filter_map(|(path, layer)| layer.lora().map(|l| (path, l)))
        .collect();
    if adapted.is_empty() {
        return Err(bad("the model carries no LoRA adapters to save".into()));
    }
    // PEFT wraps every target on every layer, so the model must have exactly those adapters.
    let layers = lm.config().num_hidden_layers;
    for i in 0..layers {
        for (block, name) in PROJECTION_BLOCKS {
            let path = format!("model.layers.{i}.{block}.{name}");
            let wanted = cfg.targets(name);
            if wanted != adapted.contains_key(&path) {
                return Err(bad(if wanted {
                    format!("config targets `{name}` but `{path}` has no adapter")
                } else {
                    format!("`{path}` has an adapter but `{name}` is not in target_modules")
                }));
            }
        }
    }
    let mut tensors = std::collections::HashMap::new();
    for (path, lora) in &adapted {
        let rank = lora.a.dim(0)?;
        if rank != cfg.r {
            return Err(bad(format!(
                "`{path}` has rank {rank} but the config says r = {}",
                cfg.r
            )));
        }
        let key = current_key(path);
        for (which, var) in [("lora_A", &lora.a), ("lora_B", &lora.b)] {
            let t = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .contiguous()?;
            tensors.insert(format!("{key}.{which}.weight"), t);
        }
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    write_atomic_with(&weights_path, |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
    })
    .map_err(io_error)?;
    write_json_atomic(
        &config_path,
        &peft_config_json(cfg, base_model_name_or_path, base),
    )
    .map_err(io_error)?;
    Ok(())
}

/// Which block each projection lives in, in [`PROJECTIONS`] order.
const PROJECTION_BLOCKS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

/// The current PEFT key of misp's projection path `model.layers.N.<block>.<proj>`.
fn current_key(path: &str) -> String {
    format!(
        "{CURRENT_PREFIX}{}",
        path.strip_prefix("model.").unwrap_or(path)
    )
}

/// The regex PEFT full-matches against module names: only the configured projections, and only
/// under `language_model` (the CLIP tower's attention has `q_proj`/`k_proj`/`v_proj` too).
pub fn target_regex(cfg: &LoraConfig) -> String {
    let names: Vec<&str> = PROJECTIONS.into_iter().filter(|p| cfg.targets(p)).collect();
    format!(r".*language_model.*\.({})", names.join("|"))
}

/// `adapter_config.json` with the fields peft 0.21.2 writes for a plain LoRA on
/// `LlavaForConditionalGeneration` (no task type, so PEFT records `auto_mapping` instead). Keys
/// come out sorted, as PEFT writes them.
fn peft_config_json(cfg: &LoraConfig, base_model_name_or_path: &str, base: PeftBase) -> Value {
    // PEFT writes an integral alpha as an int; keep that so the files diff cleanly.
    let alpha = if cfg.lora_alpha.fract() == 0.0 && cfg.lora_alpha.abs() < 1e15 {
        json!(cfg.lora_alpha as i64)
    } else {
        json!(cfg.lora_alpha)
    };
    // `json!` widens the f32 to f64 (0.05 -> 0.05000000074505806); go through its shortest
    // decimal so the file says what the user configured.
    let dropout: f64 = cfg.lora_dropout.to_string().parse().unwrap_or(0.0);
    json!({
        "alpha_pattern": {},
        "auto_mapping": {
            "base_model_class": base.class,
            "parent_library": base.library
        },
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": false,
        "lora_dropout": dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": target_regex(cfg),
        "target_parameters": null,
        "task_type": null,
        "trainable_token_indices": null,
        "use_dora": false,
        "use_rslora": false
    })
}

/// `target_modules` as PEFT accepts it: a regex string or a list of name suffixes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    /// Kept only to accept the form: without a regex engine misp cannot evaluate it, so the
    /// file's tensors decide which modules are adapted (and those are checked key by key).
    #[allow(dead_code)]
    Regex(String),
    List(Vec<String>),
}

/// The fields of `adapter_config.json` misp reads or must refuse. Everything is optional with
/// PEFT's defaults (`r` 8, `lora_alpha` 8), and `null` reads as the default, as in PEFT.
#[derive(Debug, Deserialize)]
struct PeftConfigFile {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    lora_dropout: Option<f32>,
    target_modules: Option<TargetModules>,
    bias: Option<String>,
    use_dora: Option<bool>,
    use_rslora: Option<bool>,
    fan_in_fan_out: Option<bool>,
    lora_bias: Option<bool>,
    rank_pattern: Option<serde_json::Map<String, Value>>,
    alpha_pattern: Option<serde_json::Map<String, Value>>,
    modules_to_save: Option<Vec<String>>,
    layers_to_transform: Option<Value>,
    layer_replication: Option<Value>,
    target_parameters: Option<Value>,
    trainable_token_indices: Option<Value>,
}

impl PeftConfigFile {
    /// Every option that would make PEFT compute something other than `W x + (alpha/r) B A x`
    /// on the language model's projections, named, so the user sees all of them at once.
    fn unsupported(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.peft_type.as_deref() {
            Some("LORA") => {}
            other => out.push(format!(
                "peft_type is {other:?}, only \"LORA\" is supported"
            )),
        }
        if let Some(b) = self.bias.as_deref().filter(|b| *b != "none") {
            out.push(format!(
                "bias \"{b}\" (only \"none\"): misp's projections have no bias"
            ));
        }
        let flags = [
            ("use_dora", self.use_dora),
            ("use_rslora", self.use_rslora),
            ("fan_in_fan_out", self.fan_in_fan_out),
            ("lora_bias", self.lora_bias),
        ];
        for (name, on) in flags {
            if on == Some(true) {
                out.push(format!("{name} is true"));
            }
        }
        for (name, map) in [
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            if map.as_ref().is_some_and(|m| !m.is_empty()) {
                out.push(format!("{name} is not empty (per-module ranks/alphas)"));
            }
        }
        if let Some(m) = self.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            out.push(format!(
                "modules_to_save {m:?} (fully trained modules are not adapters)"
            ));
        }
        let present = [
            ("layers_to_transform", &self.layers_to_transform),
            ("layer_replication", &self.layer_replication),
            ("target_parameters", &self.target_parameters),
            ("trainable_token_indices", &self.trainable_token_indices),
        ];
        for (name, v) in present {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                out.push(format!("{name} is set"));
            }
        }
        if let Some(TargetModules::List(list)) = &self.target_modules {
            for t in list {
                if !PROJECTIONS.contains(&t.as_str()) {
                    out.push(format!(
                        "target module `{t}` is not a language-model projection ({})",
                        PROJECTIONS.join(", ")
                    ));
                }
            }
        }
        out
    }
}

/// One adapted projection as found in the file: misp path and its A and B (key, tensor).
#[derive(Default)]
struct Found {
    a: Option<(String, Tensor)>,
    b: Option<(String, Tensor)>,
}

/// Where a PEFT key points: misp's projection path (`model.layers.N.self_attn.q_proj`) and
/// whether it is `lora_A`. Anything else is an error message naming the key.
fn parse_key(key: &str) -> Result<(String, bool), String> {
    let Some(rest) = key
        .strip_prefix(CURRENT_PREFIX)
        .or_else(|| key.strip_prefix(LEGACY_PREFIX))
    else {
        let what = if key.contains("vision_tower") {
            "an adapter on the vision tower"
        } else if key.contains("multi_modal_projector") {
            "an adapter on the projector"
        } else {
            "not a language-model layer adapter"
        };
        return Err(format!(
            "`{key}` is {what}; misp adapts only the language model's projections"
        ));
    };
    let Some((module, tail)) = rest.split_once(".lora_") else {
        return Err(format!("`{key}` is not a LoRA tensor"));
    };
    // `A.weight`, or `A.<adapter name>.weight` when the writer kept the name.
    let Some(tail) = tail.strip_suffix(".weight") else {
        return Err(format!("`{key}` is not a LoRA weight"));
    };
    let kind = tail.split('.').next().unwrap_or(tail);
    let is_a = match kind {
        "A" => true,
        "B" => false,
        _ => {
            return Err(format!(
                "`{key}` is a `lora_{kind}` tensor (DoRA / embedding adapters are not supported)"
            ))
        }
    };
    let known = PROJECTION_BLOCKS.iter().any(|(block, name)| {
        module
            .strip_prefix("layers.")
            .and_then(|m| m.split_once('.'))
            .is_some_and(|(i, rest)| {
                i.parse::<usize>().is_ok() && rest == format!("{block}.{name}")
            })
    });
    if !known {
        return Err(format!(
            "`{key}` adapts `{module}`, which is not one of the language model's projections"
        ));
    }
    Ok((format!("model.{module}"), is_a))
}

/// Loads the PEFT adapter in `dir` onto `model`'s language model and returns its config.
///
/// Every check runs before anything is attached, so a failed load leaves `model` as it was.
/// Errors name the file and tensor: a missing `adapter_config.json`, options misp does not
/// implement (listed together), keys outside the language model's projections, an `A` without
/// its `B`, a rank other than the config's `r`, and tensors that do not fit the base's
/// projections (an adapter for another base; all listed in one [`ModelError::Tensors`]).
/// Projections that already carry adapters not in the file are refused, since mixing two
/// adapters silently is never what a caller wants. Tensors are converted to f32 (f64 over an
/// f64 base), as [`super::lora::LoraLinear::attach`] makes them.
pub fn load_peft_adapter(dir: &Path, model: &mut Llava) -> Result<LoraConfig, ModelError> {
    load_peft_adapter_into(dir, model.language_model_mut())
}

/// [`load_peft_adapter`] onto any vision-language model's language model `lm`.
pub fn load_peft_adapter_into(dir: &Path, lm: &mut Llama) -> Result<LoraConfig, ModelError> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
        path: config_path.clone(),
        source,
    })?;
    let file: PeftConfigFile = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: config_path.clone(),
        source,
    })?;
    let unsupported = file.unsupported();
    if !unsupported.is_empty() {
        return Err(ModelError::Config {
            path: config_path,
            message: format!("unsupported adapter: {}", unsupported.join("; ")),
        });
    }
    let r = file.r.unwrap_or(8);
    if r == 0 {
        return Err(ModelError::Config {
            path: config_path,
            message: "r is 0".into(),
        });
    }

    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&weights_path).map_err(|source| ModelError::Io {
        path: weights_path.clone(),
        source,
    })?;
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|source| {
            ModelError::Safetensors {
                path: weights_path.clone(),
                source,
            }
        })?;
    let bad_weights = |message: String| ModelError::Config {
        path: weights_path.clone(),
        message,
    };

    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    let mut keys: Vec<_> = tensors.into_iter().collect();
    keys.sort_by(|x, y| x.0.cmp(&y.0));
    for (key, t) in keys {
        let (path, is_a) = parse_key(&key).map_err(&bad_weights)?;
        let slot = found.entry(path).or_default();
        let side = if is_a { &mut slot.a } else { &mut slot.b };
        if let Some((other, _)) = side.replace((key.clone(), t)) {
            return Err(bad_weights(format!(
                "`{key}` and `{other}` are the same tensor (two adapters in one file?)"
            )));
        }
    }
    if found.is_empty() {
        return Err(bad_weights("no LoRA tensors".into()));
    }

    let mut problems = Vec::new();
    let mut pairs = Vec::new();
    for (path, f) in found {
        let (a, b) = match (f.a, f.b) {
            (Some(a), Some(b)) => (a, b),
            (Some((key, _)), None) | (None, Some((key, _))) => {
                let twin = if key.contains(".lora_A") {
                    key.replacen(".lora_A", ".lora_B", 1)
                } else {
                    key.replacen(".lora_B", ".lora_A", 1)
                };
                problems.push(TensorProblem::Missing {
                    name: format!("{twin} (the pair of `{key}`)"),
                });
                continue;
            }
            (None, None) => unreachable!("an entry is made by a tensor"),
        };
        let Some(layer) = lm.projection_mut(&path) else {
            return Err(bad_weights(format!(
                "`{}` names layer `{path}`, which this base model does not have",
                a.0
            )));
        };
        let (out, inp) = layer.weight().dims2()?;
        // The rank is A's rows and B's columns; a wrong one is the config's fault, any other
        // misfit means the adapter was trained on another base.
        let ranks = [(&a, 0, [r, inp]), (&b, 1, [out, r])];
        for ((key, t), axis, expected) in ranks {
            if t.rank() == 2 && t.dims()[axis] != r {
                return Err(bad_weights(format!(
                    "`{key}` has rank {} (shape {:?}) but {} says r = {r}",
                    t.dims()[axis],
                    t.dims(),
                    config_path.display()
                )));
            }
            if t.dims() != expected {
                problems.push(TensorProblem::Shape {
                    name: key.clone(),
                    file: weights_path.clone(),
                    got: t.dims().to_vec(),
                    expected: expected.to_vec(),
                });
            }
        }
        pairs.push((path, a.1, b.1));
    }
    if !problems.is_empty() {
        return Err(ModelError::Tensors {
            path: weights_path,
            problems,
        });
    }

    // Names in `PROJECTIONS` order; a list config must name exactly what the file adapts.
    let names: Vec<String> = PROJECTIONS
        .iter()
        .filter(|n| pairs.iter().any(|(p, _, _)| p.ends_with(&format!(".{n}"))))
        .map(|n| n.to_string())
        .collect();
    if let Some(TargetModules::List(list)) = &file.target_modules {
        let missing: Vec<_> = list.iter().filter(|t| !names.contains(t)).collect();
        let extra: Vec<_> = names.iter().filter(|n| !list.contains(n)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(bad_weights(format!(
                "tensors do not match target_modules {list:?} in {}: no tensors for {missing:?}, \
                 tensors for unlisted {extra:?}",
                config_path.display()
            )));
        }
    }
    let already: Vec<String> = lm
        .lora_layers()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| !pairs.iter().any(|(q, _, _)| q == p))
        .collect();
    if !already.is_empty() {
        return Err(ModelError::Config {
            path: dir.to_path_buf(),
            message: format!(
                "the model already carries adapters the file does not replace: {}",
                already.join(", ")
            ),
        });
    }

    let cfg = LoraConfig {
        r,
        lora_alpha: file.lora_alpha.unwrap_or(8.0),
        lora_dropout: file.lora_dropout.unwrap_or(0.0),
        target_modules: names,
    };
    let switch = lm.lora_switch().clone();
    for (path, a, b) in pairs {
        let layer = lm
            .projection_mut(&path)
            .expect("checked above that the projection exists");
        let dtype = if layer.weight().dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let dev = layer.weight().device().clone();
        let a = Var::from_tensor(&a.to_dtype(dtype)?.to_device(&dev)?)?;
        let b = Var::from_tensor(&b.to_dtype(dtype)?.to_device(&dev)?)?;
        layer.set_lora(a, b, &cfg, &switch)?;
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llava::token_logprobs;
    use crate::model::lora::init_rng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use std::path::PathBuf;

    /// The tiny random LLaVA of `fixtures/llava/` (hidden 32, 2 layers, GQA with 2 kv heads).
    fn tiny() -> Llava {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llava/tiny");
        Llava::load_dir(&dir, DType::F32, &Device::Cpu).unwrap()
    }

    fn cfg() -> LoraConfig {
        LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.05,
            ..LoraConfig::default()
        }
    }

    /// `tiny()` with adapters on `cfg`'s targets and a random B, so the adapter changes outputs.
    fn adapted(cfg: &LoraConfig, seed: u64) -> Llava {
        let mut m = tiny();
        m.language_model_mut()
            .attach_lora(cfg, &mut init_rng(seed))
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
        for (_, l) in m.language_model().lora_layers() {
            let b = &l.lora().unwrap().b;
            let v: Vec<f32> = (0..b.elem_count())
                .map(|_| rng.random_range(-0.5..0.5))
                .collect();
            b.set(&Tensor::from_vec(v, b.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
        m
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("misp-adapter-{}-{tag}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        d
    }

    /// The fixture batch's per-token log-probs.
    fn logprobs(m: &Llava) -> Vec<Vec<f32>> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llava/expected.json");
        let e: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(e["input_ids"].clone()).unwrap();
        let mask: Vec<Vec<u32>> = serde_json::from_value(e["attention_mask"].clone()).unwrap();
        let px: Vec<Vec<Vec<Vec<f32>>>> = serde_json::from_value(e["pixels"].clone()).unwrap();
        let flat: Vec<f32> = px.iter().flatten().flatten().flatten().copied().collect();
        let dev = Device::Cpu;
        let pixels = Tensor::from_vec(flat, (px.len(), 3, 32, 32), &dev).unwrap();
        let ids = Tensor::new(ids, &dev).unwrap();
        let mask = Tensor::new(mask, &dev).unwrap();
        let logits = m.forward(&ids, &mask, &pixels).unwrap();
        token_logprobs(&logits, &ids).unwrap().to_vec2().unwrap()
    }

    fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn values(m: &Llava) -> Vec<(String, Vec<f32>, Vec<f32>)> {
        m.language_model()
            .lora_layers()
            .into_iter()
            .map(|(p, l)| {
                let l = l.lora().unwrap();
                let flat = |v: &Var| v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (p, flat(&l.a), flat(&l.b))
            })
            .collect()
    }

    /// Saves `adapted(cfg(), 7)` into a fresh folder.
    fn saved(tag: &str) -> PathBuf {
        let dir = temp_dir(tag);
        save_peft_adapter(&dir, &adapted(&cfg(), 7), &cfg(), "fixtures/llava/tiny").unwrap();
        dir
    }

    /// Rewrites the saved config through `edit`.
    fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
        let p = dir.join(CONFIG_FILE);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    }

    /// Rewrites the saved tensors through `edit`.
    fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
        let p = dir.join(WEIGHTS_FILE);
        let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        edit(&mut t);
        candle_core::safetensors::save(&t, &p).unwrap();
    }

    fn load_err(dir: &Path) -> String {
        let err = load_peft_adapter(dir, &mut tiny()).unwrap_err().to_string();
        std::fs::remove_dir_all(dir).ok();
        err
    }

    const Q0: &str = "base_model.model.model.language_model.layers.0.self_attn.q_proj";

    #[test]
    fn round_trip_reproduces_values_and_logprobs() {
        let src = adapted(&cfg(), 7);
        let dir = temp_dir("round");
        save_peft_adapter(&dir, &src, &cfg(), "fixtures/llava/tiny").unwrap();
        let mut dst = tiny();
        let base = logprobs(&dst);
        let loaded = load_peft_adapter(&dir, &mut dst).unwrap();
        assert_eq!(loaded, cfg());
        assert_eq!(values(&dst), values(&src));
        assert_eq!(values(&dst).len(), 14);
        let (want, got) = (logprobs(&src), logprobs(&dst));
        assert_eq!(max_diff(&want, &got), 0.0);
        // The adapter matters, so equal log-probs above are not an accident of B = 0.
        assert!(max_diff(&want, &base) > 1e-2, "{}", max_diff(&want, &base));

        let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
        let c: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(c["peft_type"], "LORA");
        assert_eq!(c["lora_alpha"], json!(8));
        assert_eq!(c["bias"], "none");
        assert_eq!(
            c["target_modules"],
            r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        );
        let t = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        assert_eq!(t.len(), 28);
        assert_eq!(t[&format!("{Q0}.lora_A.weight")].dims(), [4, 32]);
        assert_eq!(t[&format!("{Q0}.lora_B.weight")].dtype(), DType::F32);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn regex_names_only_the_configured_targets() {
        let c = LoraConfig {
            target_modules: vec!["v_proj".into(), "q_proj".into()],
            ..cfg()
        };
        assert_eq!(target_regex(&c), r".*language_model.*\.(q_proj|v_proj)");
        let dir = temp_dir("subset");
        save_peft_adapter(&dir, &adapted(&c, 3), &c, "x").unwrap();
        let mut m = tiny();
        let got = load_peft_adapter(&dir, &mut m).unwrap();
        assert_eq!(got.target_modules, ["q_proj", "v_proj"]);
        assert_eq!(m.language_model().lora_layers().len(), 4);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn old_layout_adapter_names_and_list_targets_load() {
        let src = adapted(&cfg(), 7);
        let dir = saved("legacy");
        edit_tensors(&dir, |t| {
            *t = t
                .drain()
                .map(|(k, v)| {
                    let k = k.replace(CURRENT_PREFIX, LEGACY_PREFIX);
                    (k.replace(".weight", ".default.weight"), v)
                })
                .collect();
        });
        edit_config(&dir, |c| c["target_modules"] = json!(PROJECTIONS));
        let mut m = tiny();
        assert_eq!(load_peft_adapter(&dir, &mut m).unwrap(), cfg());
        assert_eq!(values(&m), values(&src));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_config_names_the_file() {
        let dir = saved("noconfig");
        std::fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
        let err = load_err(&dir);
        assert!(err.contains("adapter_config.json"), "{err}");
    }

    #[test]
    fn unsupported_options_are_all_named() {
        let dir = saved("options");
        edit_config(&dir, |c| {
            c["use_dora"] = json!(true);
            c["bias"] = json!("all");
            c["rank_pattern"] = json!({"q_proj": 8});
            c["alpha_pattern"] = json!({"q_proj": 16});
        });
        let err = load_err(&dir);
        for word in [
            "adapter_config.json",
            "use_dora",
            "bias \"all\"",
            "rank_pattern",
            "alpha_pattern",
        ] {
            assert!(err.contains(word), "{word} not in {err}");
        }
        let dir = saved("ia3");
        edit_config(&dir, |c| c["peft_type"] = json!("IA3"));
        let err = load_err(&dir);
        assert!(err.contains("peft_type") && err.contains("IA3"), "{err}");
    }

    #[test]
    fn vision_tower_and_projector_adapters_are_refused() {
        for (module, word) in [
            (
                "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj",
                "vision tower",
            ),
            (
                "base_model.model.model.multi_modal_projector.linear_1",
                "projector",
            ),
        ] {
            let dir = saved("vision");
            edit_tensors(&dir, |t| {
                let z = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
                t.insert(format!("{module}.lora_A.weight"), z);
            });
            let err = load_err(&dir);
            assert!(err.contains(word) && err.contains(module), "{err}");
            assert!(err.contains("adapter_model.safetensors"), "{err}");
        }
    }

    #[test]
    fn another_base_names_tensor_expected_and_found() {
        let dir = saved("shape");
        edit_tensors(&dir, |t| {
            let z = Tensor::zeros((4, 48), DType::F32, &Device::Cpu).unwrap();
            t.insert(format!("{Q0}.lora_A.weight"), z);
        });
        let err = load_err(&dir);
        assert!(
            err.contains(&format!("{Q0}.lora_A.weight"))
                && err.contains("[4, 48]")
                && err.contains("[4, 32]"),
            "{err}"
        );
    }

    #[test]
    fn rank_other_than_config_is_refused() {
        let dir = saved("rank");
        edit_config(&dir, |c| c["r"] = json!(8));
        let err = load_err(&dir);
        assert!(err.contains("rank 4") && err.contains("r = 8"), "{err}");
        assert!(err.contains("lora_A.weight"), "{err}");
    }

    #[test]
    fn a_without_b_is_refused_and_the_model_is_untouched() {
        let dir = saved("pair");
        let b = format!("{Q0}.lora_B.weight");
        edit_tensors(&dir, |t| {
            t.remove(&b);
        });
        let mut m = tiny();
        let err = load_peft_adapter(&dir, &mut m).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(err.contains(&b) && err.contains("missing"), "{err}");
        assert!(m.language_model().lora_layers().is_empty());
    }

    #[test]
    fn save_refuses_a_config_that_disagrees_with_the_model() {
        let m = adapted(&cfg(), 1);
        let dir = temp_dir("disagree");
        let wrong_r = LoraConfig { r: 8, ..cfg() };
        let err = save_peft_adapter(&dir, &m, &wrong_r, "x").unwrap_err();
        assert!(err.to_string().contains("r = 8"), "{err}");
        let fewer = LoraConfig {
            target_modules: vec!["q_proj".into()],
            ..cfg()
        };
        let err = save_peft_adapter(&dir, &m, &fewer, "x").unwrap_err();
        assert!(err.to_string().contains("k_proj"), "{err}");
        let err = save_peft_adapter(&dir, &tiny(), &cfg(), "x").unwrap_err();
        assert!(err.to_string().contains("no LoRA"), "{err}");
        assert!(!dir.join(CONFIG_FILE).exists());
    }
}

//! Reference log-probs `pi_ref` (the base with LoRA disabled), computed once per sequence and
//! cached on disk.
//!
//! Stage: train. The cache is `OUT/reference/<key>.json`, where the key hashes everything a
//! reference value depends on: the base checkpoint (config, tokenizer, weight files' sizes and
//! first and last MiB), dtype and image preprocessing, and every record's token ids and
//! negative images. A cache under another key is stale and is deleted, never read. Values are
//! filled lazily during the first epoch (a record's reference pass runs just before its first
//! policy pass), so later epochs skip that forward entirely.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::data::TrainItem;
use super::TrainError;
use crate::files::{self, write_json_atomic, Fnv};

/// `pi_ref` of one record's sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefEntry {
    pub chosen: f64,
    pub rejected: f64,
    /// One per negative, in the item's order.
    pub negatives: Vec<f64>,
}

#[derive(Debug)]
pub struct RefCache {
    path: PathBuf,
    key: String,
    entries: HashMap<String, RefEntry>,
    dirty: bool,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    key: String,
    entries: HashMap<String, RefEntry>,
}

/// Hashes what of the base checkpoint a reference value depends on: its config, tokenizer and
/// processor files whole, its weight files sampled ([`files::hash_file`]; a 7B checkpoint is
/// 14 GB).
pub fn hash_model(dir: &Path, h: &mut Fnv) -> Result<(), TrainError> {
    let io = |e: files::FileError| TrainError::Input(e.to_string());
    for name in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        let p = dir.join(name);
        if p.is_file() {
            h.str(name);
            files::hash_file(&p, h).map_err(io)?;
        }
    }
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| TrainError::Input(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    weights.sort();
    for p in weights {
        h.str(&p.file_name().unwrap_or_default().to_string_lossy());
        files::hash_file(&p, h).map_err(io)?;
    }
    Ok(())
}

/// Hashes the sequences of the training set.
pub fn hash_items(items: &[TrainItem], h: &mut Fnv) {
    for it in items {
        h.str(&it.id);
        h.ids(&it.prompt_ids);
        h.ids(&it.chosen_ids);
        h.ids(&it.rejected_ids);
        for n in &it.negatives {
            h.str(&n.key());
        }
        if let crate::data::ImageSource::Path(p) = &it.image {
            h.str(&p.to_string_lossy());
        }
    }
}

impl RefCache {
    /// Opens the cache for `key` in `dir`, deleting caches of other keys.
    pub fn open(dir: &Path, key: u64) -> Result<Self, TrainError> {
        let key = format!("{key:016x}");
        std::fs::create_dir_all(dir)
            .map_err(|e| TrainError::Input(format!("{}: {e}", dir.display())))?;
        let path = dir.join(format!("{key}.json"));
        for e in std::fs::read_dir(dir)
            .map_err(|e| TrainError::Input(format!("{}: {e}", dir.display())))?
            .flatten()
        {
            if e.path() != path {
                tracing::info!("removing stale reference cache {}", e.path().display());
                let _ = std::fs::remove_file(e.path());
            }
        }
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str::<OnDisk>(&text) {
                Ok(d) if d.key == key => d.entries,
                _ => {
                    tracing::warn!("{}: unreadable reference cache, rebuilding", path.display());
                    HashMap::new()
                }
            },
            Err(_) => HashMap::new(),
        };
        Ok(Self {
            path,
            key,
            entries,
            dirty: false,
        })
    }

    pub fn get(&self, id: &str) -> Option<&RefEntry> {
        self.entries.get(id)
    }

    pub fn insert(&mut self, id: String, entry: RefEntry) {
        self.entries.insert(id, entry);
        self.dirty = true;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the cache (atomically) if it changed.
    pub fn save(&mut self) -> Result<(), TrainError> {
        if !self.dirty {
            return Ok(());
        }
        let on_disk = OnDisk {
            key: self.key.clone(),
            entries: self.entries.clone(),
        };
        write_json_atomic(&self.path, &on_disk).map_err(|e| TrainError::Input(e.to_string()))?;
        self.dirty = false;
        Ok(())
    }
}

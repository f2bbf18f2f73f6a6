//! Small file helpers every stage uses: atomic writes, JSON Lines reading with line numbers,
//! and stable hashing for per-record seeds.
//!
//! Atomic means "temp file in the same folder, fsync, rename": a reader (or a resumed run) sees
//! the old file or the new one, never half of either.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// An I/O failure with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    pub fn new(path: &Path, source: std::io::Error) -> Self {
        Self {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The temporary sibling used while `path` is being written.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic_with(path, |tmp| File::create(tmp)?.write_all(bytes))
}

/// Runs `write` on a temporary sibling of `path`, then renames it over `path`. For writers
/// that want a path rather than bytes (safetensors).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<(), FileError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| FileError::new(dir, e))?;
    }
    let tmp = temp_path(path);
    let result = write(&tmp)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| usual_mode(&tmp))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(FileError::new(path, e));
    }
    Ok(())
}

/// Gives `path` the mode a newly created file gets (`0o666` less the umask). Writers that go
/// through a private temporary file of their own (the safetensors crate's) leave `0o600`,
/// which another user could not read; every output is made readable alike.
fn usual_mode(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Linux reports the umask in /proc (4.7+); elsewhere assume the common 022.
        let umask = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|t| {
                let line = t.lines().find(|l| l.starts_with("Umask:"))?;
                u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
            })
            .unwrap_or(0o022);
        fs::set_permissions(path, fs::Permissions::from_mode(0o666 & !umask))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes `tensors` as a safetensors file at `path`, atomically and with the usual mode.
pub fn write_safetensors(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<(), FileError> {
    write_atomic_with(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(std::io::Error::other)
    })
}

/// Serialises `value` as pretty JSON into `path`, atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), FileError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| FileError::new(path, std::io::Error::other(e)))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Writes `rows` as JSON Lines (one compact JSON value per line) into `path`, atomically: a
/// reader sees the old file or the whole new one, never a half-written run.
pub fn write_jsonl<'a, T: serde::Serialize + 'a>(
    path: &Path,
    rows: impl IntoIterator<Item = &'a T>,
) -> Result<(), FileError> {
    let mut text = String::new();
    for row in rows {
        let line = serde_json::to_string(row)
            .map_err(|e| FileError::new(path, std::io::Error::other(e)))?;
        text.push_str(&line);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// The non-empty lines of a JSON Lines file, with their 1-based line numbers.
pub fn read_lines(path: &Path) -> Result<Vec<(usize, String)>, FileError> {
    let file = File::open(path).map_err(|e| FileError::new(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| FileError::new(path, e))?;
        if !line.trim().is_empty() {
            out.push((i + 1, line));
        }
    }
    Ok(out)
}

/// FNV-1a, 64 bit: a stable hash without a dependency (not for security).
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
        // Length-delimit so ("ab", "c") and ("a", "bc") differ.
        for x in (b.len() as u64).to_le_bytes() {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }

    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub fn ids(&mut self, ids: &[u32]) {
        let b: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        self.bytes(&b);
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

/// Files up to this size are hashed whole by [`hash_file`]; larger ones are sampled.
const HASH_WHOLE_LIMIT: u64 = 64 << 20;

/// Feeds `path` into `h`: its size, then its bytes when it is at most 64 MiB, else its first
/// and last MiB (weights and embedding stores run to GBs; a different file of the same size
/// and the same ends is not a mistake a user makes by accident).
pub fn hash_file(path: &Path, h: &mut Fnv) -> Result<(), FileError> {
    use std::io::{Read, Seek, SeekFrom};
    const MIB: u64 = 1 << 20;
    let io = |e| FileError::new(path, e);
    let mut f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    h.bytes(&len.to_le_bytes());
    if len <= HASH_WHOLE_LIMIT {
        let mut buf = Vec::with_capacity(len as usize);
        (&mut f).take(len).read_to_end(&mut buf).map_err(io)?;
        h.bytes(&buf);
        return Ok(());
    }
    let mut buf = vec![0u8; MIB as usize];
    f.read_exact(&mut buf).map_err(io)?;
    h.bytes(&buf);
    f.seek(SeekFrom::Start(len - MIB)).map_err(io)?;
    f.read_exact(&mut buf).map_err(io)?;
    h.bytes(&buf);
    Ok(())
}

/// A hex fingerprint of the files of `dir` named in `names` (absent ones count as absent), for
/// recording which inputs a run was made from.
pub fn fingerprint_files(dir: &Path, names: &[&str]) -> Result<String, FileError> {
    let mut h = Fnv::default();
    for name in names {
        let p = dir.join(name);
        h.str(name);
        if p.is_file() {
            hash_file(&p, &mut h)?;
        } else {
            h.str("<absent>");
        }
    }
    Ok(format!("{:016x}", h.finish()))
}

/// SplitMix64 finaliser: a well-mixed, version-stable 64-bit hash step (std's hashers are not
/// stable across Rust releases, and seeds written to files must be).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A stable seed for one record (and one purpose) from the run seed and the record id, so that
/// results do not depend on processing order, sharding or resumption.
pub fn record_seed(run_seed: u64, record_id: &str, purpose: u64) -> u64 {
    // FNV-1a over the id, then mixed with the run seed and purpose.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in record_id.as_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(splitmix64(h ^ splitmix64(run_seed)) ^ purpose)
}

/// `--shard i/n`: this run handles the `i`-th of `n` contiguous ranges of records or images
/// (0-based). Shared by every stage that shards (embed, mine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("shard {s:?}: expected i/n with 0 <= i < n, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// The record range of this shard: `[index * R / count, (index + 1) * R / count)`.
    pub fn range(&self, records: usize) -> std::ops::Range<usize> {
        (self.index * records / self.count)..((self.index + 1) * records / self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("misp-files-{}", std::process::id()));
        let path = dir.join("sub/a.json");
        write_json_atomic(&path, &serde_json::json!({"x": 1})).unwrap();
        write_json_atomic(&path, &serde_json::json!({"x": 2})).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains('2') && !text.contains('1'));
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn safetensors_outputs_get_the_usual_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("misp-mode-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("a.json");
        write_json_atomic(&plain, &serde_json::json!({})).unwrap();
        let t = candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu);
        let tensors = [("x".to_string(), t.unwrap())].into_iter().collect();
        let st = dir.join("a.safetensors");
        write_safetensors(&st, &tensors).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // The safetensors crate alone writes 0o600; both must match a plain created file.
        assert_eq!(mode(&st), mode(&plain));
        assert_ne!(
            mode(&st),
            0o600,
            "umask of the test process hides the check"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn json_floats_read_back_bit_for_bit() {
        // Saved configs are compared after a round trip (SAE resume compares its input scale):
        // serde_json's default parser can come back one ulp off, e.g. for this scale.
        let mut values = vec![0.970_739_922_174_651_2_f64, 0.1, 1.0 / 3.0, 1e-300, 5e-324];
        let mut s = 1u64;
        for _ in 0..2000 {
            s = splitmix64(s);
            values.push(f64::from_bits(s >> 2));
        }
        for v in values.into_iter().filter(|v| v.is_finite()) {
            let text = serde_json::to_string(&serde_json::json!({ "v": v })).unwrap();
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back["v"].as_f64().unwrap().to_bits(), v.to_bits(), "{text}");
        }
    }

    #[test]
    fn record_seeds_are_stable_and_distinct() {
        // Fixed values: a change here would silently change every mined negatives file.
        assert_eq!(record_seed(0, "a", 0), record_seed(0, "a", 0));
        assert_ne!(record_seed(0, "a", 0), record_seed(1, "a", 0));
        assert_ne!(record_seed(0, "a", 0), record_seed(0, "b", 0));
        assert_ne!(record_seed(0, "a", 0), record_seed(0, "a", 1));
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }
}

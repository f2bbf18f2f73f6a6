//! The image pool (the candidate negatives of `misp embed pool`): a folder, a list file, or a
//! COCO `instances_*.json`, into [`PoolImage`]s with stable ids and confined paths.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::paths::{normalize, DatasetRoot};
use super::text::{explicit_id, kind};
use super::{dedup_ids, DataError, Skip};
use crate::files::{self, FileError};

/// Extensions (lower case) the pool takes from a folder: those the `image` build decodes.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "bmp", "gif"];

/// Image extensions this build cannot decode: listed as skipped rather than ignored, so a
/// folder of TIFFs does not come out silently empty.
const UNSUPPORTED_IMAGE_EXTENSIONS: [&str; 7] =
    ["tif", "tiff", "heic", "heif", "avif", "jxl", "ico"];

/// One pool image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolImage {
    /// Stable id: the path relative to the root with `/` separators (folder, list file), or
    /// the COCO image id in decimal.
    pub id: String,
    /// An existing file inside the root (absolute).
    pub path: PathBuf,
}

/// What [`read_pool`] found: images in a deterministic order, and everything skipped.
#[derive(Debug, Clone, Default)]
pub struct PoolSet {
    pub images: Vec<PoolImage>,
    pub skipped: Vec<Skip>,
}

/// Reads an image pool from `src`:
///
/// - a folder: every file with an image extension ([`IMAGE_EXTENSIONS`], any case) below it,
///   recursively, sorted by relative path. Hidden entries (names starting with `.`, such as
///   macOS `._x.jpg` forks) are ignored, as are other non-image files; image formats this
///   build cannot decode are skipped with a reason. Symlinked files are followed when they
///   stay inside the root; symlinked folders are not followed (a cycle would never end) and
///   are listed as skipped. The root is `image_root` if given (the folder must be inside
///   it), else the folder. Ids are paths relative to the root.
/// - a list file (`.txt`): one path per line, relative to `image_root` if given, else to the
///   list's folder; blank lines and lines starting with `#` are ignored. Kept in file order;
///   ids are paths relative to the root.
/// - a COCO `instances_*.json` (any `.json`): `images[].file_name` under `image_root`, which
///   is required; ids are `images[].id`. Kept in file order. Other keys (`annotations`, ...)
///   are skipped while parsing, not held in memory.
///
/// Entries that leave the root, do not exist, or repeat an id (the later ones, `duplicate
/// id`) are skipped with a reason.
pub fn read_pool(src: &Path, image_root: Option<&Path>) -> Result<PoolSet, DataError> {
    let meta = fs::metadata(src).map_err(|e| FileError::new(src, e))?;
    if meta.is_dir() {
        return read_folder(src, image_root);
    }
    let ext = src
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("txt") => read_list(src, image_root),
        Some("json") => read_coco(src, image_root),
        _ => Err(DataError::UnknownFormat {
            path: src.to_path_buf(),
            expected: "expected a folder, a .txt list of paths, or a COCO instances .json",
        }),
    }
}

fn finish(found: Vec<(String, PoolImage)>, mut skipped: Vec<Skip>) -> PoolSet {
    let images = dedup_ids(found, |i: &PoolImage| &i.id, &mut skipped);
    PoolSet { images, skipped }
}

fn read_folder(dir: &Path, image_root: Option<&Path>) -> Result<PoolSet, DataError> {
    let root = DatasetRoot::new(image_root.unwrap_or(dir))?;
    let start = normalize(&std::path::absolute(dir).map_err(|e| FileError::new(dir, e))?);
    if !start.starts_with(root.dir()) {
        return Err(DataError::Option {
            path: dir.to_path_buf(),
            message: format!(
                "the folder is not inside the image root {}",
                root.dir().display()
            ),
        });
    }
    let mut found: Vec<(String, PoolImage)> = Vec::new();
    let mut skipped = Vec::new();
    let mut stack = vec![start];
    while let Some(folder) = stack.pop() {
        let entries = match fs::read_dir(&folder) {
            Ok(entries) => entries,
            // The top folder was readable (metadata above); a subfolder that is not is one
            // skipped entry, not the end of the pool.
            Err(e) => {
                let source = folder.display().to_string();
                skipped.push(Skip::new(source, None, format!("unreadable folder: {e}")));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    let source = folder.display().to_string();
                    skipped.push(Skip::new(source, None, format!("unreadable folder: {e}")));
                    continue;
                }
            };
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let source = path.display().to_string();
            let file_type = match entry.file_type() {
                Ok(t) => t,
                Err(e) => {
                    skipped.push(Skip::new(source, None, format!("image unreadable: {e}")));
                    continue;
                }
            };
            if file_type.is_dir() {
                stack.push(path);
                continue;
            }
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if file_type.is_symlink() && path.is_dir() {
                skipped.push(Skip::new(source, None, "symlinked folder not followed"));
                continue;
            }
            if UNSUPPORTED_IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                let reason = format!("unsupported image format: .{ext}");
                skipped.push(Skip::new(source, None, reason));
                continue;
            }
            if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                continue;
            }
            let id = root.relative_id(&path);
            // Plain files found by the walk are inside the root by construction; a symlink
            // may point anywhere, so it goes through the full check.
            let checked = if file_type.is_symlink() {
                root.resolve(&id)
            } else {
                Ok(path)
            };
            match checked {
                Ok(path) => found.push((source, PoolImage { id, path })),
                Err(reason) => skipped.push(Skip::new(source, Some(id), reason)),
            }
        }
    }
    // Sorted by id (the relative path with `/`), not by OS path, so the order is the same on
    // every platform and file system.
    found.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    skipped.sort_by(|a, b| a.source.cmp(&b.source));
    Ok(finish(found, skipped))
}

fn read_list(list: &Path, image_root: Option<&Path>) -> Result<PoolSet, DataError> {
    let default_root = list
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let root = DatasetRoot::new(image_root.unwrap_or(default_root))?;
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for (line, text) in files::read_lines(list)? {
        // A byte-order mark (Windows editors) is not part of the first path.
        let entry = text.trim_start_matches('\u{feff}').trim();
        if entry.starts_with('#') {
            continue;
        }
        let source = format!("{}:{line}", list.display());
        match root.resolve(entry) {
            Ok(path) => {
                let id = root.relative_id(&path);
                found.push((source, PoolImage { id, path }));
            }
            Err(reason) => skipped.push(Skip::new(source, None, reason)),
        }
    }
    Ok(finish(found, skipped))
}

#[derive(serde::Deserialize)]
struct Coco {
    images: Vec<Value>,
}

fn read_coco(path: &Path, image_root: Option<&Path>) -> Result<PoolSet, DataError> {
    let image_root = image_root.ok_or_else(|| DataError::Option {
        path: path.to_path_buf(),
        message: "a COCO instances file needs the image root (the folder its file_name entries \
                  are in, e.g. val2017/)"
            .into(),
    })?;
    let root = DatasetRoot::new(image_root)?;
    let file = fs::File::open(path).map_err(|e| FileError::new(path, e))?;
    let coco: Coco =
        serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| DataError::Format {
            path: path.to_path_buf(),
            format: "a COCO instances file",
            message: e.to_string(),
        })?;
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for (i, entry) in coco.images.iter().enumerate() {
        let source = format!("{}#{i}", path.display());
        let Some(obj) = entry.as_object() else {
            let reason = format!("not a JSON object: the entry is {}", kind(entry));
            skipped.push(Skip::new(source, None, reason));
            continue;
        };
        let id = match explicit_id(obj, "id") {
            Ok(Some(id)) => id,
            Ok(None) => {
                skipped.push(Skip::new(source, None, "missing field `id`"));
                continue;
            }
            Err(e) => {
                skipped.push(Skip::new(source, None, e));
                continue;
            }
        };
        let resolved = match obj.get("file_name") {
            Some(Value::String(name)) => root.resolve(name),
            None | Some(Value::Null) => Err("no image: missing field `file_name`".into()),
            Some(other) => Err(format!(
                "field `file_name` is {}, expected a string",
                kind(other)
            )),
        };
        match resolved {
            Ok(path) => found.push((source, PoolImage { id, path })),
            Err(reason) => skipped.push(Skip::new(source, Some(id), reason)),
        }
    }
    Ok(finish(found, skipped))
}

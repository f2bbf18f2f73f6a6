//! Confinement of untrusted image paths to a dataset root (docs/design.md §7).
//!
//! A path from a dataset is joined to the root (or taken as is when absolute), normalised
//! lexically (`.` and `..` folded without touching the disk) and must stay under the root;
//! then the file must exist and its canonical path (symlinks resolved) must stay under the
//! canonical root too. The lexical check alone would let `imgs/link.jpg -> /etc/passwd`
//! through; the canonical check alone cannot judge a path that does not exist. The path
//! handed back is the lexical one, the same path that was checked, so the decoder opens
//! exactly what was confined.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use crate::files::FileError;

/// Reason of a skip for a path that leaves the root, lexically or through a symlink.
pub const ESCAPES_ROOT: &str = "image path escapes the dataset root";
/// Reason of a skip for a path under the root that does not exist.
pub const NOT_FOUND: &str = "image not found";

/// The folder a dataset's image paths must stay in.
#[derive(Debug, Clone)]
pub struct DatasetRoot {
    /// Absolute and lexically normalised.
    dir: PathBuf,
    /// `dir` with symlinks resolved.
    canonical: PathBuf,
}

impl DatasetRoot {
    /// A root at `dir`, which must be an existing folder (an error naming it otherwise).
    pub fn new(dir: &Path) -> Result<Self, FileError> {
        let canonical = dir.canonicalize().map_err(|e| FileError::new(dir, e))?;
        if !canonical.is_dir() {
            return Err(FileError::new(
                dir,
                std::io::Error::new(ErrorKind::NotADirectory, "not a folder"),
            ));
        }
        let absolute = std::path::absolute(dir).map_err(|e| FileError::new(dir, e))?;
        Ok(Self {
            dir: normalize(&absolute),
            canonical,
        })
    }

    /// The root folder (absolute, lexically normalised).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Resolves `raw` (relative to the root, or absolute) to an existing file inside the root,
    /// or gives the reason it cannot be used.
    pub fn resolve(&self, raw: &str) -> Result<PathBuf, String> {
        if raw.trim().is_empty() {
            return Err("no image: empty path".into());
        }
        let joined = self.dir.join(raw);
        let lexical = normalize(&joined);
        if !lexical.starts_with(&self.dir) {
            return Err(format!(
                "{ESCAPES_ROOT}: {raw} (not under {}; --image-root DIR admits paths under DIR, --image-root / any path)",
                self.dir.display()
            ));
        }
        match lexical.canonicalize() {
            Ok(real) if !real.starts_with(&self.canonical) => {
                Err(format!(
                    "{ESCAPES_ROOT} (through a symlink): {raw} (not under {}; --image-root DIR admits paths under DIR)",
                    self.canonical.display()
                ))
            }
            Ok(real) if !real.is_file() => Err(format!("image is not a file: {raw}")),
            Ok(_) => Ok(lexical),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(format!("{NOT_FOUND}: {raw}")),
            Err(e) => Err(format!("image unreadable: {raw}: {e}")),
        }
    }

    /// `path` (inside the root) relative to the root, with `/` separators on every platform,
    /// for use as an id.
    pub fn relative_id(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.dir).unwrap_or(path);
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// Folds `.` and `..` without touching the disk. `..` above the filesystem root stays at the
/// root, as the OS does; `..` above a relative start is kept, so it can never look confined.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            _ => out.push(c),
        }
    }
    out.iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("misp-paths-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn normalize_folds_dots() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("/../a")), PathBuf::from("/a"));
        assert_eq!(normalize(Path::new("a/../../b")), PathBuf::from("../b"));
    }

    #[test]
    fn resolve_confines_paths() {
        let base = temp_dir("resolve");
        let root_dir = base.join("root");
        fs::create_dir_all(root_dir.join("sub")).unwrap();
        fs::write(root_dir.join("sub/a.jpg"), b"x").unwrap();
        fs::write(base.join("outside.jpg"), b"x").unwrap();
        let root = DatasetRoot::new(&root_dir).unwrap();

        let ok = root.resolve("sub/a.jpg").unwrap();
        assert!(ok.is_absolute() && ok.ends_with("root/sub/a.jpg"), "{ok:?}");
        assert_eq!(root.relative_id(&ok), "sub/a.jpg");
        // `..` that stays inside is fine; absolute paths inside the root are fine.
        assert_eq!(root.resolve("sub/../sub/a.jpg").unwrap(), ok);
        assert_eq!(root.resolve(ok.to_str().unwrap()).unwrap(), ok);

        let escape = root.resolve("../outside.jpg").unwrap_err();
        assert!(escape.starts_with(ESCAPES_ROOT), "{escape}");
        let abs = base.join("outside.jpg");
        let escape = root.resolve(abs.to_str().unwrap()).unwrap_err();
        assert!(escape.starts_with(ESCAPES_ROOT), "{escape}");
        // Lexical escape of a file that does not exist: still an escape, not "not found".
        let escape = root.resolve("../../nowhere.jpg").unwrap_err();
        assert!(escape.starts_with(ESCAPES_ROOT), "{escape}");

        let missing = root.resolve("sub/b.jpg").unwrap_err();
        assert!(missing.starts_with(NOT_FOUND), "{missing}");
        assert!(root.resolve("sub").unwrap_err().contains("not a file"));
        assert!(root.resolve("").unwrap_err().starts_with("no image"));

        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(base.join("outside.jpg"), root_dir.join("link.jpg"))
                .unwrap();
            let escape = root.resolve("link.jpg").unwrap_err();
            assert!(escape.contains("symlink"), "{escape}");
            // A symlink that stays inside is followed.
            std::os::unix::fs::symlink(root_dir.join("sub/a.jpg"), root_dir.join("in.jpg"))
                .unwrap();
            assert!(root.resolve("in.jpg").is_ok());
        }
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn missing_root_is_an_error_naming_it() {
        let err = DatasetRoot::new(Path::new("/definitely/not/here")).unwrap_err();
        assert!(err.to_string().contains("/definitely/not/here"), "{err}");
    }
}

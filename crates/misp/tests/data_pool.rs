//! Image pool readers on generated inputs: a folder with nested folders, non-image and hidden
//! files and symlinks; a list file with comments, a `../escape.jpg` line and repeats; a COCO
//! instances file. Checks ids, order, skip reasons and sources, and path confinement.

use std::fs;
use std::path::PathBuf;

use misp::data::{read_pool, DataError, PoolSet, Skip};
use serde_json::json;

/// A fresh folder per test with `root/` holding a small image tree and `escape.jpg` beside it.
fn setup(name: &str) -> (PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("misp-data-pool-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    let root = base.join("root");
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    for f in [
        "a.jpg",
        "sub/b.PNG",
        "sub/deeper/c.jpeg",
        "notes.txt",
        ".hidden.jpg",
        "x.tif",
    ] {
        fs::write(root.join(f), f).unwrap();
    }
    fs::write(base.join("escape.jpg"), b"outside").unwrap();
    (base, root)
}

fn ids(set: &PoolSet) -> Vec<&str> {
    set.images.iter().map(|i| i.id.as_str()).collect()
}

fn skip_for<'a>(set: &'a PoolSet, source: &str) -> &'a Skip {
    set.skipped
        .iter()
        .find(|s| s.source == source)
        .unwrap_or_else(|| panic!("no skip at {source}: {:#?}", set.skipped))
}

#[test]
fn folder_is_recursive_sorted_and_confined() {
    let (base, root) = setup("folder");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(base.join("escape.jpg"), root.join("sub/out.jpg")).unwrap();
        std::os::unix::fs::symlink(root.join("a.jpg"), root.join("sub/in.jpg")).unwrap();
        std::os::unix::fs::symlink(root.join("sub"), root.join("loop")).unwrap();
    }
    let set = read_pool(&root, None).unwrap();
    #[cfg(unix)]
    assert_eq!(
        ids(&set),
        ["a.jpg", "sub/b.PNG", "sub/deeper/c.jpeg", "sub/in.jpg"]
    );
    #[cfg(not(unix))]
    assert_eq!(ids(&set), ["a.jpg", "sub/b.PNG", "sub/deeper/c.jpeg"]);
    let abs_root = std::path::absolute(&root).unwrap();
    for img in &set.images {
        assert!(img.path.starts_with(&abs_root), "{:?}", img.path);
        assert!(img.path.is_file(), "{:?}", img.path);
    }
    let tif = skip_for(&set, &root.join("x.tif").display().to_string());
    assert_eq!(tif.reason, "unsupported image format: .tif");
    #[cfg(unix)]
    {
        let out = skip_for(&set, &abs_root.join("sub/out.jpg").display().to_string());
        assert!(out.reason.contains("escapes the dataset root"), "{out:?}");
        assert_eq!(out.id.as_deref(), Some("sub/out.jpg"));
        let lp = skip_for(&set, &abs_root.join("loop").display().to_string());
        assert_eq!(lp.reason, "symlinked folder not followed");
        assert_eq!(set.skipped.len(), 3, "{:#?}", set.skipped);
    }

    // Stable across runs.
    let again = read_pool(&root, None).unwrap();
    assert_eq!((again.images, again.skipped), (set.images, set.skipped));

    // A sub-folder under an explicit root: ids relative to that root; outside it, an error.
    let sub = read_pool(&root.join("sub/deeper"), Some(&root)).unwrap();
    assert_eq!(ids(&sub), ["sub/deeper/c.jpeg"]);
    let err = read_pool(&root, Some(&root.join("sub"))).unwrap_err();
    assert!(matches!(err, DataError::Option { .. }), "{err}");
    fs::remove_dir_all(base).unwrap();
}

#[test]
fn list_file_resolves_against_its_folder_or_the_root() {
    let (base, root) = setup("list");
    let abs_inside = root.join("sub/b.PNG");
    let list = root.join("list.txt");
    let lines = [
        "a.jpg".to_string(),
        "# a comment".to_string(),
        String::new(),
        "  sub/deeper/c.jpeg  ".to_string(),
        "../escape.jpg".to_string(),
        "missing.jpg".to_string(),
        "./a.jpg".to_string(),
        std::path::absolute(&abs_inside)
            .unwrap()
            .display()
            .to_string(),
        std::path::absolute(base.join("escape.jpg"))
            .unwrap()
            .display()
            .to_string(),
    ];
    fs::write(&list, "\u{feff}".to_string() + &lines.join("\n")).unwrap();
    let set = read_pool(&list, None).unwrap();
    assert_eq!(ids(&set), ["a.jpg", "sub/deeper/c.jpeg", "sub/b.PNG"]);

    let at = |line: usize| format!("{}:{line}", list.display());
    let esc = skip_for(&set, &at(5));
    assert!(
        esc.reason
            .starts_with("image path escapes the dataset root"),
        "{esc:?}"
    );
    assert!(skip_for(&set, &at(6)).reason.starts_with("image not found"));
    let dup = skip_for(&set, &at(7));
    assert_eq!(
        (dup.id.as_deref(), dup.reason.as_str()),
        (Some("a.jpg"), "duplicate id")
    );
    assert!(skip_for(&set, &at(9))
        .reason
        .starts_with("image path escapes the dataset root"));
    assert_eq!(set.skipped.len(), 4, "{:#?}", set.skipped);

    // A list kept elsewhere, with paths relative to the image root.
    let elsewhere = base.join("lists/pool.txt");
    fs::create_dir_all(elsewhere.parent().unwrap()).unwrap();
    fs::write(&elsewhere, "sub/b.PNG\n").unwrap();
    let set = read_pool(&elsewhere, Some(&root)).unwrap();
    assert_eq!(ids(&set), ["sub/b.PNG"]);
    assert!(set.images[0].path.is_file());
    fs::remove_dir_all(base).unwrap();
}

#[test]
fn coco_instances_use_image_ids_under_the_root() {
    let (base, root) = setup("coco");
    let coco = json!({
        "info": {"description": "COCO 2017"},
        "images": [
            {"id": 397133, "file_name": "a.jpg", "height": 427, "width": 640},
            {"id": 2, "file_name": "../escape.jpg"},
            {"id": 3},
            {"file_name": "a.jpg"},
            {"id": 397133, "file_name": "sub/b.PNG"},
            {"id": "37777", "file_name": "sub/deeper/c.jpeg"},
        ],
        "annotations": [{"id": 1, "image_id": 397133, "bbox": [0, 0, 1, 1]}],
        "categories": [],
    });
    let file = base.join("instances_val2017.json");
    fs::write(&file, coco.to_string()).unwrap();
    let set = read_pool(&file, Some(&root)).unwrap();
    assert_eq!(ids(&set), ["397133", "37777"]);
    assert!(set.images[0].path.ends_with("root/a.jpg"));

    let at = |i: usize| format!("{}#{i}", file.display());
    let s = skip_for(&set, &at(1));
    assert!(
        s.reason.starts_with("image path escapes") && s.id.as_deref() == Some("2"),
        "{s:?}"
    );
    assert!(skip_for(&set, &at(2)).reason.contains("file_name"));
    assert_eq!(skip_for(&set, &at(3)).reason, "missing field `id`");
    assert_eq!(skip_for(&set, &at(4)).reason, "duplicate id");

    let err = read_pool(&file, None).unwrap_err();
    assert!(
        matches!(err, DataError::Option { .. })
            && err.to_string().contains("instances_val2017.json")
    );
    let not_coco = base.join("x.json");
    fs::write(&not_coco, "{\"annotations\": []}").unwrap();
    let err = read_pool(&not_coco, Some(&root)).unwrap_err().to_string();
    assert!(err.contains("x.json") && err.contains("images"), "{err}");
    let err = read_pool(&base.join("pool.csv"), None).unwrap_err();
    assert!(
        matches!(err, DataError::File(_)),
        "missing file first: {err}"
    );
    fs::write(base.join("pool.csv"), "a.jpg").unwrap();
    let err = read_pool(&base.join("pool.csv"), None).unwrap_err();
    assert!(matches!(err, DataError::UnknownFormat { .. }), "{err}");
    fs::remove_dir_all(base).unwrap();
}

//! CHAIR annotations (Rohrbach et al. 2018) in the COCO layout the CHAIR script reads: an
//! instances file per evaluation split and a synonym table.
//!
//! `instances_SPLIT.json` has `images` (`{id, file_name}`, `file_name` relative to the world
//! folder, so `read_pool(file, Some(world))` takes it), `annotations` (`{id, image_id,
//! category_id}`, one per object, hidden ones included: they are in the scene) and
//! `categories` (`{id, name}`, id = shape index + 1). `synonyms.txt` has one line per object:
//! its name, then the words that mean it, comma-separated (`circle, circles`).

use serde::Serialize;

use super::scene::{Scene, Shape};

#[derive(Debug, Serialize)]
pub struct Instances {
    pub images: Vec<ImageEntry>,
    pub annotations: Vec<Annotation>,
    pub categories: Vec<Category>,
}

#[derive(Debug, Serialize)]
pub struct ImageEntry {
    pub id: usize,
    pub file_name: String,
}

#[derive(Debug, Serialize)]
pub struct Annotation {
    pub id: usize,
    pub image_id: usize,
    pub category_id: usize,
}

#[derive(Debug, Serialize)]
pub struct Category {
    pub id: usize,
    pub name: &'static str,
}

/// Instances of `scenes`; image ids are the scenes' indices within their split.
pub fn instances(scenes: &[Scene]) -> Instances {
    let mut annotations = Vec::new();
    for (image_id, scene) in scenes.iter().enumerate() {
        for obj in &scene.objects {
            annotations.push(Annotation {
                id: annotations.len() + 1,
                image_id,
                category_id: obj.shape.index() + 1,
            });
        }
    }
    Instances {
        images: scenes
            .iter()
            .enumerate()
            .map(|(id, s)| ImageEntry {
                id,
                file_name: s.image.clone(),
            })
            .collect(),
        annotations,
        categories: Shape::ALL
            .iter()
            .map(|s| Category {
                id: s.index() + 1,
                name: s.name(),
            })
            .collect(),
    }
}

/// The synonym table: `name, plural` per line.
pub fn synonyms() -> String {
    Shape::ALL
        .iter()
        .map(|s| format!("{}, {}\n", s.name(), s.plural()))
        .collect()
}

//! Which kind of hallucination a caption makes, from the world's scene graphs: what preference
//! training on this world can be expected to change, and what it cannot.
//!
//! A hallucinated object (a shape CHAIR finds in the caption but not in the scene) is a
//! **co-occurrence** hallucination when it forms one of the world's prior pairs (square and
//! triangle, circle and cross, star and diamond: `world::scene::Prior::PAIRS`) with a shape
//! that is in the scene: the language prior's error that the world was built to provoke and
//! that the image term should teach the model out of. Any other hallucinated object is
//! **misnamed**: a shape read wrong (a small hexagon called a circle), a perception error of the
//! frozen tower that a LoRA on the language model has little to work with. The demo reports
//! CHAIR_s split this way (`chair_s_cooccurrence`, `chair_s_misnamed`: the share of captions
//! with at least one hallucination of the kind; a caption may have both).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::world::scene::{Prior, Shape};

/// The shapes of each scene, by its image path relative to the world (`images/test/00042.png`,
/// as CHAIR's `captions.jsonl` names images).
pub fn scene_shapes(world: &Path) -> Option<HashMap<String, Vec<Shape>>> {
    Some(
        super::scenes_by_image(world)?
            .into_iter()
            .map(|(image, scene)| (image, scene.shapes()))
            .collect(),
    )
}

/// The other shape of `shape`'s prior pair, if it is in one.
fn mate(shape: Shape) -> Option<Shape> {
    Prior::PAIRS.iter().find_map(|&(a, p)| {
        if a == shape {
            Some(p)
        } else if p == shape {
            Some(a)
        } else {
            None
        }
    })
}

/// Captions with at least one hallucination of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// Captions whose image has a scene graph (the others are not counted).
    pub captions: usize,
    pub cooccurrence: usize,
    pub misnamed: usize,
}

impl KindCounts {
    /// `(chair_s_cooccurrence, chair_s_misnamed)`, shares of the counted captions.
    pub fn shares(&self) -> Option<(f64, f64)> {
        (self.captions > 0).then(|| {
            let n = self.captions as f64;
            (self.cooccurrence as f64 / n, self.misnamed as f64 / n)
        })
    }
}

/// Counts the kinds over a CHAIR `captions.jsonl` text (rows with `image` and `hallucinated`:
/// `[[word, object], ...]`, the object a category name). Rows that do not parse, name an image
/// without a scene or an object that is not a shape are left out of the count.
pub fn count_kinds(captions_jsonl: &str, scenes: &HashMap<String, Vec<Shape>>) -> KindCounts {
    let by_name: HashMap<&str, Shape> = Shape::ALL.iter().map(|s| (s.name(), *s)).collect();
    let mut out = KindCounts::default();
    for row in captions_jsonl
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let Some(present) = row["image"].as_str().and_then(|i| scenes.get(i)) else {
            continue;
        };
        let Some(hallucinated) = row["hallucinated"].as_array() else {
            continue;
        };
        out.captions += 1;
        let (mut cooc, mut misnamed) = (false, false);
        for h in hallucinated {
            let Some(shape) = h[1].as_str().and_then(|o| by_name.get(o)) else {
                continue;
            };
            if mate(*shape).is_some_and(|m| present.contains(&m)) {
                cooc = true;
            } else {
                misnamed = true;
            }
        }
        out.cooccurrence += cooc as usize;
        out.misnamed += misnamed as usize;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenes() -> HashMap<String, Vec<Shape>> {
        [
            ("a.png", vec![Shape::Square, Shape::Ring]),
            ("b.png", vec![Shape::Diamond]),
            ("c.png", vec![Shape::Hexagon]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn hallucinations_are_split_by_the_worlds_prior_pairs() {
        let text = [
            // A triangle with a square present: the prior's partner. Co-occurrence.
            r#"{"image":"a.png","hallucinated":[["triangle","triangle"]]}"#,
            // A star with a diamond present: the pair read backwards still counts.
            r#"{"image":"b.png","hallucinated":[["star","star"]]}"#,
            // A circle with only a hexagon there: misnamed.
            r#"{"image":"c.png","hallucinated":[["circle","circle"]]}"#,
            // Both kinds in one caption: counted once under each.
            r#"{"image":"a.png","hallucinated":[["triangles","triangle"],["hexagon","hexagon"]]}"#,
            // Faithful caption: counted, no kind.
            r#"{"image":"c.png","hallucinated":[]}"#,
            // A cross with no circle present is misnamed, though cross is a partner.
            r#"{"image":"a.png","hallucinated":[["cross","cross"]]}"#,
            // Left out: no scene, no hallucinated list, not JSON.
            r#"{"image":"zzz.png","hallucinated":[["star","star"]]}"#,
            r#"{"image":"a.png"}"#,
            "not json",
        ]
        .join("\n");
        let k = count_kinds(&text, &scenes());
        assert_eq!(
            k,
            KindCounts {
                captions: 6,
                cooccurrence: 3,
                misnamed: 3,
            }
        );
        let (c, m) = k.shares().unwrap();
        assert!((c - 0.5).abs() < 1e-12 && (m - 0.5).abs() < 1e-12);
        assert_eq!(KindCounts::default().shares(), None);
    }

    #[test]
    fn scene_shapes_reads_a_worlds_scenes_file() {
        let dir = std::env::temp_dir().join(format!("misp-kinds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = r#"{"id":"test-00000","split":"test","image":"images/test/00000.png","objects":[{"shape":"star","colour":"red","size":"small","cell":0,"visibility":"clear"},{"shape":"diamond","colour":"blue","size":"large","cell":4,"visibility":"faint"}]}"#;
        std::fs::write(dir.join("scenes.jsonl"), format!("{line}\nbroken\n")).unwrap();
        let s = scene_shapes(&dir).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(
            s["images/test/00000.png"],
            vec![Shape::Diamond, Shape::Star]
        );
        assert!(scene_shapes(&dir.join("missing")).is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}

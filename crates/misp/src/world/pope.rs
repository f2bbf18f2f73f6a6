//! POPE question files (Li et al. 2023): per image, `k` questions about objects that are there
//! ("yes") and `k` about objects that are not ("no"), the negatives drawn three ways:
//!
//! - random: absent shapes uniformly;
//! - popular: the absent shapes most frequent in the training scenes;
//! - adversarial: the absent shapes that co-occur most (in the training scenes) with the
//!   shapes present — here, mostly the missing partner of an anchor.
//!
//! The "yes" questions of an image are the same in all three files, so the files differ only
//! in their negatives. Rows: `{"question_id", "image", "text", "label"}`.

use serde::{Deserialize, Serialize};

use super::rng::Rng;
use super::scene::{Cooccurrence, Scene, Shape};
use super::text::exists_question;
use crate::files::record_seed;

/// How the "no" questions are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Negatives {
    Random,
    Popular,
    Adversarial,
}

impl Negatives {
    pub const ALL: [Negatives; 3] = [
        Negatives::Random,
        Negatives::Popular,
        Negatives::Adversarial,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Negatives::Random => "random",
            Negatives::Popular => "popular",
            Negatives::Adversarial => "adversarial",
        }
    }
}

/// A line of a POPE question file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopeRow {
    pub question_id: usize,
    pub image: String,
    pub text: String,
    pub label: String,
}

const PURPOSE_YES: u64 = 0x706f_7065_0001;
const PURPOSE_RANDOM: u64 = 0x706f_7065_0002;

/// The absent shapes of `scene` in the order `negatives` prefers them.
pub fn ranked_absent(
    scene: &Scene,
    stats: &Cooccurrence,
    negatives: Negatives,
    seed: u64,
) -> Vec<Shape> {
    let mut absent = scene.absent();
    let present = scene.shapes();
    let freq = |s: &Shape| stats.frequency[s.index()];
    let cooc = |s: &Shape| -> usize {
        present
            .iter()
            .map(|p| stats.pairs[p.index()][s.index()])
            .sum()
    };
    match negatives {
        Negatives::Random => {
            Rng::new(record_seed(seed, &scene.id, PURPOSE_RANDOM)).shuffle(&mut absent);
        }
        // Stable sorts over ALL order: ties go to the earlier shape, reproducibly.
        Negatives::Popular => absent.sort_by_key(|s| std::cmp::Reverse(freq(s))),
        Negatives::Adversarial => {
            absent.sort_by_key(|s| (std::cmp::Reverse(cooc(s)), std::cmp::Reverse(freq(s))))
        }
    }
    absent
}

/// The question file of `negatives` over `scenes`: per image `min(per_image, present,
/// absent)` "yes" and as many "no" questions, alternating, numbered from 1.
pub fn questions(
    scenes: &[Scene],
    stats: &Cooccurrence,
    negatives: Negatives,
    per_image: usize,
    seed: u64,
) -> Vec<PopeRow> {
    let mut rows = Vec::new();
    for scene in scenes {
        let mut present = scene.shapes();
        Rng::new(record_seed(seed, &scene.id, PURPOSE_YES)).shuffle(&mut present);
        let absent = ranked_absent(scene, stats, negatives, seed);
        let k = per_image.min(present.len()).min(absent.len());
        for (yes, no) in present.iter().zip(&absent).take(k) {
            for (shape, label) in [(yes, "yes"), (no, "no")] {
                rows.push(PopeRow {
                    question_id: rows.len() + 1,
                    image: scene.image.clone(),
                    text: exists_question(*shape),
                    label: label.to_owned(),
                });
            }
        }
    }
    rows
}

//! Training text: supervised rows (`sft.jsonl`) and preference records (`records.jsonl`,
//! `records_val.jsonl`) in the TRL-style JSONL that [`crate::data::read_records`] reads.
//!
//! Preference records mirror RLHF-V: chosen is faithful to the scene, rejected is the same
//! answer with one hallucinated object or attribute ([`super::text::hallucinate`]). Their
//! kinds are mixed by [`RecordMix`] so that chosen answers are "yes" as well as "no", and
//! descriptions as well as questions (WORLD-NOTES 2). Each row also carries `kind`, `scene`
//! and the chosen response's `claims`, which the readers ignore and audits use.

use serde::{Deserialize, Serialize};

use super::rng::Rng;
use super::scene::Scene;
use super::text::{self, Claim, Kind, Utterance};

/// Prompts of the caption rows in `sft.jsonl`; the first is [`text::DESCRIBE`], used by
/// every evaluation.
pub const CAPTION_PROMPTS: [&str; 3] = [
    text::DESCRIBE,
    "What is in the image?",
    "What do you see in this picture?",
];

/// Shares of record kinds (normalised; need not sum to 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordMix {
    /// "Describe the image." with a caption that adds or alters an object.
    pub description: f64,
    /// Chosen "Yes, there is a X." against "No, there is no X.".
    pub exists_yes: f64,
    /// Chosen "No, there is no X." against "Yes, there is a X.".
    pub exists_no: f64,
    /// Colour, count and position questions with a wrong attribute in rejected.
    pub attribute: f64,
}

impl Default for RecordMix {
    fn default() -> Self {
        RecordMix {
            description: 0.4,
            exists_yes: 0.2,
            exists_no: 0.2,
            attribute: 0.2,
        }
    }
}

/// A line of `sft.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftRow {
    pub id: String,
    pub image: String,
    pub prompt: String,
    pub response: String,
    pub kind: Kind,
}

/// A line of `records.jsonl` / `records_val.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordRow {
    pub id: String,
    pub image: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub kind: Kind,
    pub scene: String,
    /// What `chosen` claims; all true of `scene`.
    pub claims: Vec<Claim>,
}

/// One caption (prompt cycling through [`CAPTION_PROMPTS`]) and `qa` questions of random
/// kinds for a training scene.
pub fn sft_rows(scene: &Scene, index: usize, qa: usize, rng: &mut Rng) -> Vec<SftRow> {
    let caption = text::describe(&scene.objects);
    let mut rows = vec![SftRow {
        id: format!("{}-cap", scene.id),
        image: scene.image.clone(),
        prompt: CAPTION_PROMPTS[index % CAPTION_PROMPTS.len()].to_owned(),
        response: caption.response,
        kind: Kind::Description,
    }];
    let mut made = 0;
    let mut tries = 0;
    while made < qa && tries < qa * 8 {
        tries += 1;
        let kind = *rng.pick(&Kind::QA).unwrap_or(&Kind::ExistsYes);
        if let Some(u) = text::question(scene, kind, rng) {
            rows.push(SftRow {
                id: format!("{}-qa{made}", scene.id),
                image: scene.image.clone(),
                prompt: u.prompt,
                response: u.response,
                kind: u.kind,
            });
            made += 1;
        }
    }
    rows
}

/// The preference record `id` on `scene`, its kind drawn from `mix`. Falls back to a
/// description when the scene offers no subject for the drawn kind.
pub fn record(id: String, scene: &Scene, mix: &RecordMix, rng: &mut Rng) -> Option<RecordRow> {
    let weights = [
        mix.description,
        mix.exists_yes,
        mix.exists_no,
        mix.attribute,
    ];
    let kind = match rng.weighted(&weights) {
        0 => Kind::Description,
        1 => Kind::ExistsYes,
        2 => Kind::ExistsNo,
        _ => *rng.pick(&[Kind::Colour, Kind::Count, Kind::Position])?,
    };
    let chosen: Utterance = match kind {
        // Records ask about the prior's partner more often than SFT does: that is the
        // hallucination preference data is meant to fix.
        Kind::ExistsNo => text::exists(text::absent_shape(scene, 0.7, rng)?, false),
        _ => text::question(scene, kind, rng)
            .or_else(|| text::question(scene, Kind::Description, rng))?,
    };
    let rejected = text::hallucinate(scene, &chosen, rng)?;
    Some(RecordRow {
        id,
        image: scene.image.clone(),
        prompt: chosen.prompt,
        chosen: chosen.response,
        rejected: rejected.response,
        kind: chosen.kind,
        scene: scene.id.clone(),
        claims: chosen.claims,
    })
}

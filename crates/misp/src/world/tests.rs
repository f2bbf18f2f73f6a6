//! ShapesWorld tests: determinism, the prior, faithfulness of the text, POPE construction,
//! that the data readers take the outputs, and the manifest rules. Statistical checks use
//! thousands of sampled scenes and bounds several standard errors wide (a binomial share over
//! ~1,000 draws has a standard error of about 0.015), so they fail only when the generator
//! changes, not by chance — and the seeds are fixed anyway.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use super::pope::{self, Negatives, PopeRow};
use super::records::{self, RecordMix};
use super::rng::Rng;
use super::scene::{Colour, Cooccurrence, Prior, Scene, Shape, Split, Visibility};
use super::text::{self, Kind};
use super::*;
use crate::data::{read_pool, read_records};

fn tiny(seed: u64) -> WorldConfig {
    WorldConfig {
        seed,
        image_size: 32,
        train_scenes: 80,
        val_scenes: 20,
        test_scenes: 40,
        pool_images: 15,
        records: 50,
        val_records: 10,
        ..WorldConfig::default()
    }
}

/// A fresh folder per test (tests run in parallel in one process).
fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-world-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn all_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn same_seed_gives_byte_identical_worlds_and_another_seed_does_not() {
    let (a, b, c) = (temp("det-a"), temp("det-b"), temp("det-c"));
    let ga = generate(&tiny(3), &a, false).unwrap();
    let gb = generate(&tiny(3), &b, false).unwrap();
    let gc = generate(&tiny(4), &c, false).unwrap();
    let (fa, fb) = (all_files(&a), all_files(&b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (name, bytes) in &fa {
        assert!(
            bytes == &fb[name],
            "{name} differs between two runs of seed 3"
        );
    }
    assert_eq!(ga.manifest.content_hash, gb.manifest.content_hash);
    assert_ne!(ga.manifest.content_hash, gc.manifest.content_hash);
    assert_ne!(fa["scenes.jsonl"], all_files(&c)["scenes.jsonl"]);
    for d in [a, b, c] {
        fs::remove_dir_all(d).unwrap();
    }
}

/// Shares over many sampled scenes of one split.
struct PriorStats {
    /// P(partner | anchor), pooled over pairs.
    partner_given_anchor: f64,
    /// P(partner | no anchor), pooled.
    partner_without_anchor: f64,
    /// Share of partners (in scenes with their anchor) that are hidden.
    partner_hidden: f64,
    /// Share of the other objects that are hidden.
    other_hidden: f64,
}

fn prior_stats(cfg: &WorldConfig, split: Split) -> PriorStats {
    let scenes = sample_split(cfg, split);
    let (mut anchor, mut both, mut no_anchor, mut alone) = (0, 0, 0, 0);
    let (mut partners, mut partners_hidden, mut others, mut others_hidden) = (0, 0, 0, 0);
    for s in &scenes {
        for (a, p) in Prior::PAIRS {
            if s.has(a) {
                anchor += 1;
                both += usize::from(s.has(p));
            } else {
                no_anchor += 1;
                alone += usize::from(s.has(p));
            }
        }
        for o in &s.objects {
            let brought = Prior::anchor(o.shape).is_some_and(|a| s.has(a));
            if brought {
                partners += 1;
                partners_hidden += usize::from(o.visibility.is_hidden());
            } else {
                others += 1;
                others_hidden += usize::from(o.visibility.is_hidden());
            }
        }
    }
    let share = |a: usize, b: usize| a as f64 / b.max(1) as f64;
    PriorStats {
        partner_given_anchor: share(both, anchor),
        partner_without_anchor: share(alone, no_anchor),
        partner_hidden: share(partners_hidden, partners),
        other_hidden: share(others_hidden, others),
    }
}

#[test]
fn the_cooccurrence_prior_shows_in_the_scenes() {
    let cfg = WorldConfig {
        train_scenes: 4000,
        val_scenes: 4000,
        ..WorldConfig::default()
    };
    let train = prior_stats(&cfg, Split::Train);
    // Asked for 0.9; redraws in full scenes keep it there.
    assert!(
        (train.partner_given_anchor - 0.9).abs() < 0.04,
        "{}",
        train.partner_given_anchor
    );
    assert!(
        train.partner_without_anchor < 0.15,
        "{}",
        train.partner_without_anchor
    );
    assert!(
        (train.partner_hidden - cfg.partner_hidden).abs() < 0.05,
        "{}",
        train.partner_hidden
    );
    assert!(
        (train.other_hidden - cfg.other_hidden).abs() < 0.03,
        "{}",
        train.other_hidden
    );
    // Evaluation scenes pair less often, so adversarial questions meet absent partners.
    let val = prior_stats(&cfg, Split::Val);
    assert!(
        (val.partner_given_anchor - cfg.eval_cooccurrence).abs() < 0.06,
        "{}",
        val.partner_given_anchor
    );
    // The knob is what makes the prior: without it, partners are as rare with anchors as without.
    let flat = prior_stats(
        &WorldConfig {
            cooccurrence: 0.0,
            ..cfg.clone()
        },
        Split::Train,
    );
    assert!(
        flat.partner_given_anchor < 0.2,
        "{}",
        flat.partner_given_anchor
    );
    // Object counts stay in range and cells are distinct.
    for s in sample_split(&cfg, Split::Train).iter().take(1000) {
        assert!(
            (cfg.min_objects..=cfg.max_objects).contains(&s.objects.len()),
            "{s:?}"
        );
        let mut cells: Vec<u8> = s.objects.iter().map(|o| o.cell).collect();
        cells.dedup();
        assert_eq!(cells.len(), s.objects.len(), "{s:?}");
    }
}

/// Independent of [`text::Claim`]: reads a description word by word. Every shape word must
/// be a shape of the scene and every "COLOUR SHAPE" must name an object of the scene.
fn description_is_faithful(scene: &Scene, response: &str) -> bool {
    let words: Vec<String> = response
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    let shape_of = |w: &str| {
        Shape::ALL
            .into_iter()
            .find(|s| s.name() == w || s.plural() == w)
    };
    let colour_of = |w: &str| Colour::ALL.into_iter().find(|c| c.name() == w);
    for (i, w) in words.iter().enumerate() {
        if let Some(shape) = shape_of(w) {
            if !scene.has(shape) {
                return false;
            }
            if let Some(colour) = i.checked_sub(1).and_then(|j| colour_of(&words[j])) {
                if !scene
                    .objects
                    .iter()
                    .any(|o| o.shape == shape && o.colour == colour)
                {
                    return false;
                }
            }
        }
    }
    true
}

#[test]
fn chosen_text_is_true_of_its_scene_and_rejected_is_not() {
    let cfg = WorldConfig::default();
    let scenes = sample_split(&cfg, Split::Train);
    let mut rng = Rng::new(11);
    let mut kinds: HashMap<Kind, usize> = HashMap::new();
    for scene in scenes.iter().take(1500) {
        for row in records::sft_rows(scene, 0, 6, &mut rng) {
            if row.kind == Kind::Description {
                assert!(
                    description_is_faithful(scene, &row.response),
                    "{scene:?}\n{row:?}"
                );
            }
        }
        for kind in [Kind::Description].into_iter().chain(Kind::QA) {
            let Some(chosen) = text::question(scene, kind, &mut rng) else {
                continue;
            };
            *kinds.entry(kind).or_default() += 1;
            assert!(!chosen.claims.is_empty());
            assert!(chosen.holds(scene), "{scene:?}\n{chosen:?}");
            let rejected = text::hallucinate(scene, &chosen, &mut rng).unwrap();
            assert_eq!(rejected.prompt, chosen.prompt);
            assert_ne!(rejected.response, chosen.response);
            assert!(!rejected.holds(scene), "{scene:?}\n{rejected:?}");
            if kind == Kind::Description {
                assert!(description_is_faithful(scene, &chosen.response));
                // Same answer, one thing changed: the same number of objects named, or one more.
                let n = |s: &str| s.matches(" in the ").count();
                assert!(n(&rejected.response) - n(&chosen.response) <= 1);
            }
        }
    }
    // Every kind was exercised, not skipped for lack of subjects.
    for kind in [Kind::Description].into_iter().chain(Kind::QA) {
        assert!(
            kinds.get(&kind).copied().unwrap_or(0) > 500,
            "{kind:?}: {kinds:?}"
        );
    }
}

#[test]
fn preference_records_are_faithful_and_balanced() {
    let cfg = WorldConfig::default();
    let scenes = sample_split(&cfg, Split::Train);
    let mut kinds: HashMap<Kind, usize> = HashMap::new();
    let (mut yes, mut no, mut could, mut did) = (0, 0, 0, 0);
    let n = 2000;
    for i in 0..n {
        let scene = &scenes[i % scenes.len()];
        let mut rng = Rng::new(i as u64);
        let r = records::record(format!("r{i}"), scene, &RecordMix::default(), &mut rng).unwrap();
        *kinds.entry(r.kind).or_default() += 1;
        let claims_hold = r.claims.iter().all(|c| c.holds(scene));
        assert!(claims_hold, "{scene:?}\n{r:?}");
        assert_ne!(r.chosen, r.rejected);
        if r.kind == Kind::Description {
            assert!(description_is_faithful(scene, &r.chosen), "{r:?}");
        }
        yes += usize::from(r.chosen.starts_with("Yes"));
        if r.chosen.starts_with("No") {
            no += 1;
            let missing: Vec<Shape> = scene
                .shapes()
                .into_iter()
                .filter_map(Prior::partner)
                .filter(|p| !scene.has(*p))
                .collect();
            if !missing.is_empty() {
                could += 1;
                did += usize::from(
                    missing
                        .iter()
                        .any(|p| r.prompt == text::exists_question(*p)),
                );
            }
        }
    }
    let share = |k: Kind| kinds.get(&k).copied().unwrap_or(0) as f64 / n as f64;
    assert!((share(Kind::Description) - 0.4).abs() < 0.05, "{kinds:?}");
    assert!((share(Kind::ExistsYes) - 0.2).abs() < 0.04, "{kinds:?}");
    assert!((share(Kind::ExistsNo) - 0.2).abs() < 0.04, "{kinds:?}");
    // Chosen answers say "yes" as often as "no" (WORLD-NOTES 2).
    assert!(
        (yes as f64 / no as f64 - 1.0).abs() < 0.25,
        "yes {yes}, no {no}"
    );
    // Where an anchor's partner is missing, "no" records mostly deny that partner: the
    // hallucination they are there to fix (asked for 0.7 plus chance).
    assert!(
        could > 20 && did as f64 / could as f64 > 0.6,
        "{did} of {could}"
    );
}

/// Absent shapes paired (either way) with a shape of the scene: a square without its triangle,
/// a triangle without its square.
fn paired_missing(scene: &Scene) -> Vec<Shape> {
    scene
        .absent()
        .into_iter()
        .filter(|s| {
            Prior::partner(*s).is_some_and(|p| scene.has(p))
                || Prior::anchor(*s).is_some_and(|a| scene.has(a))
        })
        .collect()
}

#[test]
fn pope_files_are_balanced_true_and_adversarial_asks_about_partners() {
    let dir = temp("pope");
    let cfg = WorldConfig {
        test_scenes: 200,
        ..tiny(5)
    };
    generate(&cfg, &dir, false).unwrap();
    let scenes: HashMap<String, Scene> = jsonl::<Scene>(&dir.join("scenes.jsonl"))
        .into_iter()
        .map(|s| (s.image.clone(), s))
        .collect();
    let mut partner_share = BTreeMap::new();
    for negatives in Negatives::ALL {
        let rows: Vec<PopeRow> = jsonl(&dir.join(format!("pope/{}_test.jsonl", negatives.name())));
        assert!(!rows.is_empty());
        let yes = rows.iter().filter(|r| r.label == "yes").count();
        assert_eq!(yes * 2, rows.len(), "{}: not 50/50", negatives.name());
        let (mut no, mut partner) = (0, 0);
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r.question_id, i + 1);
            let scene = &scenes[&r.image];
            let shape = Shape::ALL
                .into_iter()
                .find(|s| r.text == text::exists_question(*s))
                .unwrap();
            assert_eq!(scene.has(shape), r.label == "yes", "{r:?} {scene:?}");
            if r.label == "no" {
                no += 1;
                partner += usize::from(paired_missing(scene).contains(&shape));
            }
        }
        partner_share.insert(negatives.name(), partner as f64 / no as f64);
    }
    // Adversarial negatives are the anchors' missing partners wherever a scene has one.
    let stats = Cooccurrence::of(scenes.values().filter(|s| s.split == Split::Train));
    let adversarial: Vec<PopeRow> = jsonl(&dir.join("pope/adversarial_test.jsonl"));
    for scene in scenes.values().filter(|s| s.split == Split::Test) {
        let missing = paired_missing(scene);
        let asked: Vec<&PopeRow> = adversarial
            .iter()
            .filter(|r| r.image == scene.image && r.label == "no")
            .collect();
        let ranked = pope::ranked_absent(scene, &stats, Negatives::Adversarial, 5);
        if let Some(first) = asked.first() {
            assert_eq!(first.text, text::exists_question(ranked[0]));
            if !missing.is_empty() {
                assert!(
                    missing
                        .iter()
                        .any(|m| first.text == text::exists_question(*m)),
                    "{scene:?} {first:?}"
                );
            }
        }
    }
    assert!(
        partner_share["adversarial"] > partner_share["random"] + 0.15,
        "{partner_share:?}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_data_readers_accept_the_outputs() {
    let dir = temp("readers");
    let cfg = tiny(6);
    generate(&cfg, &dir, false).unwrap();
    let recs = read_records(&dir.join("records.jsonl"), None, None).unwrap();
    assert!(recs.skipped.is_empty(), "{:?}", recs.skipped);
    assert_eq!(recs.records.len(), cfg.records);
    assert_eq!(recs.records[0].id, "rec-00000");
    assert!(!recs.records[0].prompt.is_empty());
    let val = read_records(&dir.join("records_val.jsonl"), None, None).unwrap();
    assert!(val.skipped.is_empty() && val.records.len() == cfg.val_records);
    let pool = read_pool(&dir.join("pool.txt"), None).unwrap();
    assert!(pool.skipped.is_empty(), "{:?}", pool.skipped);
    assert_eq!(pool.images.len(), cfg.pool_images);
    let coco = read_pool(&dir.join("chair/instances_test.json"), Some(&dir)).unwrap();
    assert!(coco.skipped.is_empty() && coco.images.len() == cfg.test_scenes);
    // Images decode at the configured size.
    let img = image::open(&pool.images[0].path).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    let synonyms = fs::read_to_string(dir.join("chair/synonyms.txt")).unwrap();
    assert_eq!(synonyms.lines().count(), Shape::ALL.len());
    assert!(synonyms.contains("cross, crosses\n"));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn manifest_reuses_refuses_and_regenerates() {
    let dir = temp("manifest");
    let cfg = tiny(7);
    let first = generate(&cfg, &dir, false).unwrap();
    assert!(!first.reused && first.manifest.complete);
    assert!(generate(&cfg, &dir, false).unwrap().reused);

    let field_of = |r: Result<Generated, WorldError>| match r {
        Err(WorldError::Mismatch { field, .. }) => field,
        other => panic!("expected a mismatch, got {other:?}"),
    };
    assert_eq!(field_of(generate(&tiny(8), &dir, false)), "seed");
    let bigger = WorldConfig {
        train_scenes: 81,
        ..cfg.clone()
    };
    assert_eq!(
        field_of(generate(&bigger, &dir, false)),
        "config.train_scenes"
    );
    // Forced, the other world replaces this one; then back.
    assert!(!generate(&tiny(8), &dir, true).unwrap().reused);
    assert!(!generate(&cfg, &dir, true).unwrap().reused);

    // A damaged world (an image gone) is regenerated to the same content.
    fs::remove_file(dir.join("images/test/00003.png")).unwrap();
    let again = generate(&cfg, &dir, false).unwrap();
    assert!(again.regenerated && !again.reused);
    assert_eq!(again.manifest.content_hash, first.manifest.content_hash);
    // An interrupted one (manifest still marked incomplete) too, with no leftovers kept.
    let manifest_path = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    m["complete"] = false.into();
    fs::write(&manifest_path, m.to_string()).unwrap();
    fs::write(dir.join("images/pool/99999.png"), b"stale").unwrap();
    let again = generate(&cfg, &dir, false).unwrap();
    assert!(again.regenerated);
    assert!(!dir.join("images/pool/99999.png").exists());
    assert_eq!(again.manifest.content_hash, first.manifest.content_hash);

    // Another version is named as such.
    m["complete"] = true.into();
    m["version"] = (VERSION + 1).into();
    fs::write(&manifest_path, m.to_string()).unwrap();
    assert_eq!(field_of(generate(&cfg, &dir, false)), "version");
    fs::remove_dir_all(&dir).unwrap();

    // Somebody else's folder is left alone.
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("notes.txt"), b"mine").unwrap();
    assert!(matches!(
        generate(&cfg, &dir, false),
        Err(WorldError::NotAWorld { .. })
    ));
    generate(&cfg, &dir, true).unwrap();
    assert!(dir.join("notes.txt").exists());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_are_errors_not_panics() {
    for cfg in [
        WorldConfig {
            max_objects: 10,
            ..WorldConfig::default()
        },
        WorldConfig {
            min_objects: 0,
            ..WorldConfig::default()
        },
        WorldConfig {
            cooccurrence: 1.5,
            ..WorldConfig::default()
        },
        WorldConfig {
            image_size: 4,
            ..WorldConfig::default()
        },
        WorldConfig {
            train_scenes: 0,
            ..WorldConfig::default()
        },
    ] {
        assert!(
            matches!(cfg.validate(), Err(WorldError::Config(_))),
            "{cfg:?}"
        );
    }
}

#[test]
fn faint_objects_are_drawn_fainter_than_clear_ones() {
    let cfg = WorldConfig::default();
    let object = |visibility| super::scene::Object {
        shape: Shape::Circle,
        colour: Colour::Red,
        size: super::scene::Size::Large,
        cell: 4,
        visibility,
    };
    let draw = |objects: Vec<_>| {
        render::render(&Scene::new(Split::Test, 0, objects), &cfg, &mut Rng::new(1))
    };
    // The same stream gives the same background, so differences are the object alone.
    let empty = draw(vec![]);
    let diff = |img: &image::RgbImage| -> f64 {
        img.pixels()
            .zip(empty.pixels())
            .map(|(a, b)| {
                (0..3)
                    .map(|c| f64::from(a.0[c].abs_diff(b.0[c])))
                    .sum::<f64>()
            })
            .sum()
    };
    let clear = diff(&draw(vec![object(Visibility::Clear)]));
    let faint = diff(&draw(vec![object(Visibility::Faint)]));
    let tiny = diff(&draw(vec![object(Visibility::Tiny)]));
    assert!(
        faint > 0.0 && faint < 0.3 * clear,
        "faint {faint}, clear {clear}"
    );
    assert!(
        tiny > 0.0 && tiny < 0.3 * clear,
        "tiny {tiny}, clear {clear}"
    );
}

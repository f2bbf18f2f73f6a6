//! Tests of the world pretraining: the tokenizer round trip, that training learns, that
//! gradients reach exactly the trained weights, that saved folders load back to the same
//! model, and conformance of the shipped checkpoints with transformers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::tokenizer::{world_words, Flavour, WorldTokenizer};
use super::*;
use crate::model::clip::{ClipModel, ClipTokenizer};
use crate::model::vlm::{PreparedPrompt, Vlm, VlmOptions};
use crate::world::{self, WorldConfig};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-pretrain-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A very small world, generated once per test process.
fn tiny_world() -> &'static Path {
    static WORLD: OnceLock<PathBuf> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = temp("world");
        let cfg = WorldConfig {
            train_scenes: 48,
            val_scenes: 6,
            test_scenes: 4,
            pool_images: 4,
            records: 8,
            val_records: 4,
            image_size: 32,
            ..WorldConfig::quick()
        };
        world::generate(&cfg, &dir, false).expect("tiny world");
        dir
    })
}

/// Models small enough for debug builds.
fn tiny_config() -> PretrainConfig {
    let train = TrainConfig {
        steps: 3,
        batch: 8,
        lr: 3e-3,
        warmup: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
    };
    PretrainConfig {
        sizes: ModelSizes {
            patch_size: 16,
            vision_hidden: 16,
            vision_layers: 2,
            vision_heads: 2,
            text_hidden: 16,
            text_layers: 1,
            text_heads: 2,
            text_positions: 64,
            projection_dim: 16,
            llm_hidden: 32,
            llm_intermediate: 64,
            llm_layers: 1,
            llm_heads: 2,
            llm_positions: 128,
        },
        clip: train.clone(),
        sft: train,
        eval_batch: 8,
        skip_eval: true,
        ..PretrainConfig::default()
    }
}

/// Everything one needs to train by hand on the tiny world.
struct Setup {
    dir: PathBuf,
    clip_cfg: crate::model::clip::ClipConfig,
    llava_cfg: crate::model::llava::LlavaConfig,
    pixels: PixelTable,
    rows: Vec<SftRow>,
}

fn setup(name: &str) -> Setup {
    let world = tiny_world();
    let cfg = tiny_config();
    let rows = read_sft(&world.join("sft.jsonl")).unwrap();
    let texts = world_texts(world, &rows).unwrap();
    let words = world_words(texts.iter().map(String::as_str)).unwrap();
    let (ct, lt) = (
        WorldTokenizer::build(&words, Flavour::Clip),
        WorldTokenizer::build(&words, Flavour::Llava),
    );
    let dir = temp(name);
    let (cj, lj) = (
        save::clip_json(&cfg.sizes, 32, &ct),
        save::llava_json(&cfg.sizes, 32, &lt),
    );
    save::write_clip_files(&dir.join("clip"), &cj, &ct, 32, 64).unwrap();
    save::write_llava_files(&dir.join("llava"), &lj, &lt, &cfg.sizes, 32).unwrap();
    let names: Vec<String> = rows
        .iter()
        .map(|r| r.image.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let proc = ImageProcessor::from_checkpoint(&dir.join("clip"), 32).unwrap();
    let pixels = PixelTable::load(world, &names, &proc, 32).unwrap();
    Setup {
        clip_cfg: save::clip_config(&cj).unwrap(),
        llava_cfg: save::llava_config(&lj).unwrap(),
        dir,
        pixels,
        rows,
    }
}

fn examples(s: &Setup, vlm: &Vlm) -> Vec<sft::Example> {
    s.rows
        .iter()
        .map(|r| {
            let (prompt_ids, response_ids) = vlm.scored_ids(&r.prompt, &r.response).unwrap();
            sft::Example {
                image: s.pixels.index[&r.image],
                ids: PreparedScore {
                    prompt_ids,
                    response_ids,
                    pixels: Vec::new(),
                    grid: None,
                },
            }
        })
        .collect()
}

fn tower_of(clip: &init::Params) -> HashMap<String, Tensor> {
    clip.iter()
        .filter_map(|(n, v)| {
            n.strip_prefix("vision_model.")
                .map(|r| (format!("vision_tower.{r}"), v.as_tensor().detach()))
        })
        .collect()
}

fn llava_vlm(s: &Setup, tower: &HashMap<String, Tensor>, params: &init::Params) -> Vlm {
    let model = sft::llava_model(tower, params, &s.llava_cfg, &Device::Cpu).unwrap();
    let processor = LlavaProcessor::from_dir(&s.dir.join("llava"), &s.llava_cfg).unwrap();
    Vlm::from_parts(
        model,
        processor,
        ImageProcessor::clip_default(32),
        Device::Cpu,
    )
}

#[test]
fn tokenizer_round_trip_and_special_ids() {
    let words = world_words(["Is there a ring in the image?", "No, there is no ring."]).unwrap();
    let dir = temp("tok");
    std::fs::create_dir_all(&dir).unwrap();
    let llava = WorldTokenizer::build(&words, Flavour::Llava);
    llava.save(&dir, 128).unwrap();
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.token_to_id("<unk>"), Some(0));
    assert_eq!(tok.token_to_id("<s>"), Some(1));
    assert_eq!(tok.token_to_id("</s>"), Some(2));
    assert_eq!(tok.token_to_id("<image>"), llava.image);
    let enc = tok.encode("Is there a RING in the image?", true).unwrap();
    assert_eq!(enc.get_ids()[0], 1, "BOS first");
    assert!(
        !enc.get_ids()[1..].contains(&0),
        "every world word is known"
    );
    let text = tok.decode(enc.get_ids(), true).unwrap();
    assert_eq!(text, "is there a ring in the image ?");
    let again = tok.encode(text.as_str(), true).unwrap();
    assert_eq!(again.get_ids(), enc.get_ids());
    assert_eq!(
        tok.encode("a zebra", false).unwrap().get_ids()[1],
        0,
        "unknown -> <unk>"
    );
    // `<image>` is one token however it is surrounded.
    let img = tok.encode("USER: <image>\nhi", false).unwrap();
    assert!(img.get_ids().contains(&llava.image.unwrap()));

    let clip = WorldTokenizer::build(&words, Flavour::Clip);
    let cdir = temp("tok-clip");
    std::fs::create_dir_all(&cdir).unwrap();
    clip.save(&cdir, 64).unwrap();
    assert_eq!(
        clip.eos as usize,
        clip.vocab_size - 1,
        "eos last, never the legacy id 2"
    );
    let ct = ClipTokenizer::load(&cdir).unwrap();
    assert_eq!(ct.pad_id, clip.eos);
    let ids = ct
        .encode(&["no ring", "is there a ring"])
        .unwrap()
        .ids
        .to_vec2::<u32>()
        .unwrap();
    assert_eq!(ids[0][0], clip.bos);
    assert_eq!(ids[0][3], clip.eos);
    assert_eq!(ids[0][4], clip.eos, "padded with <|endoftext|>");
}

#[test]
fn clip_gradients_reach_every_parameter_and_training_lowers_the_loss() {
    let s = setup("clip");
    let mut rng = StdRng::seed_from_u64(1);
    let params = init::clip_params(&s.clip_cfg, &mut rng, &Device::Cpu).unwrap();
    let tok = ClipTokenizer::load(&s.dir.join("clip")).unwrap();
    let pairs = clip::description_pairs(&s.rows, &s.pixels);
    let batch: Vec<&clip::Pair> = pairs.iter().take(8).collect();
    let px = s
        .pixels
        .batch(
            &batch.iter().map(|p| p.image).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
    let texts: Vec<&str> = batch.iter().map(|p| p.text.as_str()).collect();
    let model = clip::clip_model(&params, &s.clip_cfg, &Device::Cpu).unwrap();
    let (loss0, _) = clip::clip_loss(&model, &tok, &px, &texts).unwrap();
    let grads = loss0.backward().unwrap();
    for (name, var) in &params {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
    // Steps on this very batch must lower its loss (the optimiser reaches the model).
    let cfg = TrainConfig {
        steps: 15,
        batch: 8,
        lr: 3e-3,
        warmup: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
    };
    let few: Vec<clip::Pair> = batch.iter().map(|p| (*p).clone()).collect();
    clip::train_clip(
        &params,
        &s.clip_cfg,
        &tok,
        &s.pixels,
        &few,
        None,
        &cfg,
        &mut rng,
        &mut |_| {},
    )
    .unwrap();
    let model = clip::clip_model(&params, &s.clip_cfg, &Device::Cpu).unwrap();
    let (loss1, _) = clip::clip_loss(&model, &tok, &px, &texts).unwrap();
    let (l0, l1) = (
        loss0.to_scalar::<f32>().unwrap(),
        loss1.to_scalar::<f32>().unwrap(),
    );
    assert!(l1 < l0 - 0.1, "CLIP loss {l0} -> {l1}");
}

#[test]
fn dense_targets_map_patches_to_cells_and_leave_hidden_objects_out() {
    use crate::world::scene::{Colour, Object, Scene, Shape, Size, Split, Visibility};
    // 48 px / 16: patch = cell; 64 px / 16: centres at 8, 24, 40, 56 of cells [0, 21.3),
    // [21.3, 42.7), [42.7, 64); 32 px / 16: centres 8 and 24 fall in cells 0 and 2.
    assert_eq!(dense::patch_cells(3), (0..9).collect::<Vec<u32>>());
    assert_eq!(
        dense::patch_cells(4),
        vec![0, 1, 1, 2, 3, 4, 4, 5, 3, 4, 4, 5, 6, 7, 7, 8]
    );
    assert_eq!(dense::patch_cells(2), vec![0, 2, 6, 8]);
    let obj = |shape, colour, cell, visibility| Object {
        shape,
        colour,
        size: Size::Large,
        cell,
        visibility,
    };
    let scene = Scene::new(
        Split::Train,
        0,
        vec![
            obj(Shape::Star, Colour::Blue, 0, Visibility::Clear),
            obj(Shape::Ring, Colour::Red, 4, Visibility::Faint),
            obj(Shape::Hexagon, Colour::Orange, 8, Visibility::Clear),
        ],
    );
    let t = dense::cell_targets(&scene, 3);
    let none_shape = Shape::ALL.len() as u32;
    let none_colour = Colour::ALL.len() as u32;
    let mut want_shape = vec![none_shape; 9];
    let mut want_colour = vec![none_colour; 9];
    want_shape[0] = Shape::Star.index() as u32;
    want_colour[0] = 2; // blue
    want_shape[8] = Shape::Hexagon.index() as u32;
    want_colour[8] = 5; // orange
    assert_eq!(
        t.shape, want_shape,
        "the faint ring in the center is not a target"
    );
    assert_eq!(t.colour, want_colour);
    let t2 = dense::cell_targets(&scene, 2);
    assert_eq!(
        t2.shape,
        vec![want_shape[0], none_shape, none_shape, want_shape[8]]
    );
}

/// The dense task of the tiny world over fresh heads.
fn dense_task(s: &Setup, rng: &mut StdRng) -> dense::DenseTask {
    let v = &s.clip_cfg.vision_config;
    dense::DenseTask {
        heads: dense::dense_head_params(v.hidden_size, rng, &Device::Cpu).unwrap(),
        targets: scene_targets(
            tiny_world(),
            &read_scenes(tiny_world()).unwrap(),
            &s.pixels,
            v.grid(),
        )
        .unwrap(),
        weight: 1.0,
        layer: v.num_hidden_layers - 1,
    }
}

#[test]
fn dense_loss_gradients_match_finite_differences_and_training_lowers_it() {
    let s = setup("dense");
    let mut rng = StdRng::seed_from_u64(5);
    let params = init::clip_params(&s.clip_cfg, &mut rng, &Device::Cpu).unwrap();
    let task = dense_task(&s, &mut rng);
    let images: Vec<usize> = (0..6).collect();
    let px = s.pixels.batch(&images, &Device::Cpu).unwrap();
    let loss_now = || {
        let model = clip::clip_model(&params, &s.clip_cfg, &Device::Cpu).unwrap();
        let (l, _, _) = dense::dense_loss(&model, &task, &px, &images).unwrap();
        l
    };
    let loss0 = loss_now();
    let grads = loss0.backward().unwrap();
    // One element of each head's bias and weight, and of tower weights on the path (the patch
    // embedding and layer 0) and off it (the last layer: LLaVA's features stop before it).
    let probes: [(&str, usize, bool); 6] = [
        ("dense.shape.bias", 3, true),
        ("dense.colour.weight", 7, true),
        ("dense.cell.bias", 1, true),
        ("vision_model.embeddings.patch_embedding.weight", 11, true),
        ("vision_model.encoder.layers.0.mlp.fc1.weight", 5, true),
        ("vision_model.encoder.layers.1.mlp.fc1.weight", 5, false),
    ];
    let all: Vec<&(String, candle_core::Var)> = params.iter().chain(&task.heads).collect();
    for (name, i, on_path) in probes {
        let (_, var) = all.iter().find(|(n, _)| n == name).unwrap();
        let g = grads.get(var.as_tensor());
        if !on_path {
            let zero = g.is_none_or(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            });
            assert!(
                zero,
                "{name} is not read by the dense heads but got a gradient"
            );
            continue;
        }
        let g: Vec<f32> = g
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let flat: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-2f32;
        let at = |delta: f32| {
            let mut x = flat.clone();
            x[i] += delta;
            var.set(&Tensor::from_vec(x, orig.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss_now().to_scalar::<f32>().unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        var.set(&orig).unwrap();
        assert!(
            (fd - g[i]).abs() <= 5e-5 + 0.02 * fd.abs(),
            "{name}[{i}]: autograd {}, finite difference {fd}",
            g[i]
        );
    }
    // Training with the dense task lowers its loss on these images.
    let pairs: Vec<clip::Pair> = clip::description_pairs(&s.rows, &s.pixels)
        .into_iter()
        .filter(|p| images.contains(&p.image))
        .collect();
    let cfg = TrainConfig {
        steps: 20,
        batch: 6,
        lr: 3e-3,
        warmup: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
    };
    let tok = ClipTokenizer::load(&s.dir.join("clip")).unwrap();
    let mut logged = 0;
    clip::train_clip(
        &params,
        &s.clip_cfg,
        &tok,
        &s.pixels,
        &pairs,
        Some(&task),
        &cfg,
        &mut rng,
        &mut |l| {
            assert!(l.dense.is_some(), "dense loss logged");
            logged += 1;
        },
    )
    .unwrap();
    assert_eq!(logged, cfg.steps);
    let (l0, l1) = (
        loss0.to_scalar::<f32>().unwrap(),
        loss_now().to_scalar::<f32>().unwrap(),
    );
    assert!(l1 < l0 - 0.1, "dense loss {l0} -> {l1}");
}

#[test]
fn sft_gradients_reach_the_trained_weights_only_and_training_lowers_the_loss() {
    let s = setup("sft");
    let mut rng = StdRng::seed_from_u64(2);
    let clip_params = init::clip_params(&s.clip_cfg, &mut rng, &Device::Cpu).unwrap();
    let tower = tower_of(&clip_params);
    let params = init::llava_trainable_params(&s.llava_cfg, &mut rng, &Device::Cpu).unwrap();
    let vlm = llava_vlm(&s, &tower, &params);
    let ex = examples(&s, &vlm);
    let batch: Vec<&sft::Example> = ex.iter().take(6).collect();
    let loss0 = sft::sft_loss(&vlm, &batch, &s.pixels).unwrap();
    let grads = loss0.backward().unwrap();
    for (name, var) in &params {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
    for (name, t) in &tower {
        assert!(
            grads.get(t).is_none(),
            "the frozen tower got a gradient for {name}"
        );
    }
    let cfg = TrainConfig {
        steps: 15,
        batch: 6,
        lr: 3e-3,
        warmup: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
    };
    let few: Vec<sft::Example> = batch.iter().map(|e| (*e).clone()).collect();
    sft::train_sft(
        &vlm,
        &params,
        &few,
        &s.pixels,
        &cfg,
        &mut rng,
        &mut |_, _, _| {},
    )
    .unwrap();
    let loss1 = sft::sft_loss(&vlm, &batch, &s.pixels).unwrap();
    let (l0, l1) = (
        loss0.to_scalar::<f32>().unwrap(),
        loss1.to_scalar::<f32>().unwrap(),
    );
    assert!(l1 < l0 - 0.5, "SFT loss {l0} -> {l1}");
    // The tower is untouched by training.
    let fresh = tower_of(&clip_params);
    for (name, t) in &tower {
        let d = (t - &fresh[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name} changed");
    }
}

#[test]
fn saved_folders_load_back_to_the_same_models() {
    let s = setup("save");
    let mut rng = StdRng::seed_from_u64(3);
    let cpu = Device::Cpu;
    let clip_params = init::clip_params(&s.clip_cfg, &mut rng, &cpu).unwrap();
    let clip_dir = s.dir.join("clip");
    let tensors: HashMap<String, Tensor> = clip_params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    save::write_weights(&clip_dir, &tensors).unwrap();
    let mem = clip::clip_model(&clip_params, &s.clip_cfg, &cpu).unwrap();
    let disk = ClipModel::load(&clip_dir, DType::F32, &cpu).unwrap();
    let px = s.pixels.batch(&[0, 1, 2], &cpu).unwrap();
    // Not bit-equal: the in-memory weights are `Var`s, so that model takes the differentiable
    // compositions, the loaded one the fused inference kernels (QuickGELU); they agree to
    // rounding, while a weight lost or misnamed on saving would differ by far more.
    let same = 1e-6;
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(
        diff(
            &mem.embed_images(&px).unwrap(),
            &disk.embed_images(&px).unwrap()
        ) < same
    );
    let tok = ClipTokenizer::load(&clip_dir).unwrap();
    let t = tok.encode(&["a red circle", "is there a star"]).unwrap();
    assert!(
        diff(
            &mem.embed_texts(&t).unwrap(),
            &disk.embed_texts(&t).unwrap()
        ) < same
    );

    let tower = tower_of(&clip_params);
    let params = init::llava_trainable_params(&s.llava_cfg, &mut rng, &cpu).unwrap();
    let mem = llava_vlm(&s, &tower, &params);
    let llava_dir = s.dir.join("llava");
    let mut all = tower.clone();
    for (n, v) in &params {
        all.insert(n.clone(), v.as_tensor().detach());
    }
    let disk_names = save::llava_disk_names(all);
    assert!(disk_names.contains_key("vision_tower.vision_model.embeddings.class_embedding"));
    assert!(disk_names.contains_key("language_model.model.embed_tokens.weight"));
    assert!(disk_names.contains_key("language_model.lm_head.weight"));
    save::write_weights(&llava_dir, &disk_names).unwrap();
    let disk = Vlm::load(&llava_dir, None, &VlmOptions::default()).unwrap();
    let ex = examples(&s, &mem);
    let items: Vec<PreparedScore> = ex
        .iter()
        .take(3)
        .map(|e| PreparedScore {
            pixels: s.pixels.pixels[e.image].clone(),
            ..e.ids.clone()
        })
        .collect();
    let a = mem.score_prepared(&items).unwrap();
    let b = disk.score_prepared(&items).unwrap();
    assert_eq!(a, b);
    let prompts: Vec<PreparedPrompt> = items
        .iter()
        .map(|i| PreparedPrompt {
            prompt_ids: i.prompt_ids.clone(),
            pixels: i.pixels.clone(),
            grid: None,
        })
        .collect();
    assert_eq!(
        mem.generate_ids(&prompts, 5).unwrap(),
        disk.generate_ids(&prompts, 5).unwrap()
    );
}

#[test]
fn run_writes_both_folders_and_its_record() {
    let out = temp("run");
    let mut cfg = tiny_config();
    cfg.skip_eval = false;
    let report = run(tiny_world(), &out, &cfg, &Device::Cpu, false).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ] {
        assert!(out.join("shapes-clip").join(f).is_file(), "shapes-clip/{f}");
    }
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "generation_config.json",
    ] {
        assert!(
            out.join("shapes-llava").join(f).is_file(),
            "shapes-llava/{f}"
        );
    }
    assert!(out.join("pretrain_config.json").is_file());
    assert!(out.join("pretrain_metrics.jsonl").is_file());
    assert!(out.join("pretrain_report.json").is_file());
    let acc = report
        .dense_shape_accuracy
        .expect("dense training is on by default");
    assert!((0.0..=1.0).contains(&acc), "held-out shape accuracy {acc}");
    // The tower is frozen by default: the LLaVA's is the CLIP's, bit for bit.
    let load = |dir: &str| {
        candle_core::safetensors::load(out.join(dir).join("model.safetensors"), &Device::Cpu)
            .unwrap()
    };
    let (clip_w, llava_w) = (load("shapes-clip"), load("shapes-llava"));
    let name = "vision_model.encoder.layers.0.mlp.fc1.weight";
    let (a, b) = (&clip_w[name], &llava_w[&format!("vision_tower.{name}")]);
    let diff = (a - b).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(
        diff.to_scalar::<f32>().unwrap(),
        0.0,
        "frozen tower changed"
    );
    assert!(
        !llava_w
            .keys()
            .chain(clip_w.keys())
            .any(|k| k.starts_with("dense.")),
        "the dense heads stay out of both checkpoints"
    );
    let eval = report.eval.expect("evaluated");
    assert_eq!(eval.pope.len(), 3);
    assert!(eval.chair.n > 0);
    // The written config reads back to the one used.
    let text = std::fs::read_to_string(out.join("pretrain_config.json")).unwrap();
    let back: PretrainConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn bad_sft_rows_are_errors_naming_file_line_and_field() {
    let dir = temp("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sft.jsonl");
    std::fs::write(
        &path,
        "{\"id\":\"a\",\"image\":\"x.png\",\"prompt\":\"p\",\"response\":\"r\",\"kind\":\"k\"}\n{\"id\":\"b\",\"image\":\"x.png\",\"prompt\":\"p\",\"kind\":\"k\"}\n",
    )
    .unwrap();
    let msg = read_sft(&path).unwrap_err().to_string();
    assert!(
        msg.contains("sft.jsonl:2") && msg.contains("response"),
        "{msg}"
    );
    std::fs::write(
        &path,
        "{\"id\":\"a\",\"image\":\"x.png\",\"prompt\":\"p\",\"response\":\" \",\"kind\":\"k\"}\n",
    )
    .unwrap();
    let msg = read_sft(&path).unwrap_err().to_string();
    assert!(
        msg.contains("sft.jsonl:1") && msg.contains("`response`"),
        "{msg}"
    );
}

// ---- conformance of the shipped checkpoints with transformers ----

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `fixtures/world_models/expected.json` was written by `check_transformers.py` from the
/// shipped `models/`. Tolerances: embeddings cosine >= 0.9999 and summed log-probs within 1e-4
/// (both sides f32; only the order of float sums differs), ids and greedy tokens exact,
/// preprocessing 1e-5 (PIL and our decoder read the same PNG bytes; only f32 rounding differs).
#[test]
fn shipped_models_match_transformers() {
    let fixture = repo().join("fixtures/world_models");
    let text = std::fs::read_to_string(fixture.join("expected.json")).expect("expected.json");
    let exp: Value = serde_json::from_str(&text).unwrap();
    let cpu = Device::Cpu;

    let clip_dir = repo().join("models/shapes-clip");
    let clip = ClipModel::load(&clip_dir, DType::F32, &cpu).unwrap();
    let tok = ClipTokenizer::load(&clip_dir).unwrap();
    let c = &exp["clip"];
    let s = clip.image_size();
    let proc = ImageProcessor::from_checkpoint(&clip_dir, s).unwrap();
    let mut all_px = Vec::new();
    for (name, px) in c["images"]
        .as_array()
        .unwrap()
        .iter()
        .zip(c["pixels"].as_array().unwrap())
    {
        let want = floats(px);
        let img = proc
            .decode_file(&fixture.join(name.as_str().unwrap()))
            .unwrap();
        let got = proc.pixels(&img);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: preprocessing differs by {worst}");
        all_px.extend(want);
    }
    let n = c["images"].as_array().unwrap().len();
    let px = Tensor::from_vec(all_px, (n, 3, s, s), &cpu).unwrap();
    let got = clip.embed_images(&px).unwrap().to_vec2::<f32>().unwrap();
    for (g, w) in got.iter().zip(c["image_embeds"].as_array().unwrap()) {
        let cos = cosine(g, &floats(w));
        assert!(cos >= 0.9999, "image embedding cosine {cos}");
    }
    let texts: Vec<&str> = c["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let enc = tok.encode(&texts).unwrap();
    let rows = enc.ids.to_vec2::<u32>().unwrap();
    for (row, want) in rows.iter().zip(c["text_ids"].as_array().unwrap()) {
        let want = ids(want);
        assert_eq!(&row[..want.len()], want.as_slice());
    }
    let got = clip.embed_texts(&enc).unwrap().to_vec2::<f32>().unwrap();
    for (g, w) in got.iter().zip(c["text_embeds"].as_array().unwrap()) {
        let cos = cosine(g, &floats(w));
        assert!(cos >= 0.9999, "text embedding cosine {cos}");
    }

    let vlm = Vlm::load(
        &repo().join("models/shapes-llava"),
        None,
        &VlmOptions::default(),
    )
    .unwrap();
    for item in exp["llava"].as_array().unwrap() {
        let prompt = item["prompt"].as_str().unwrap();
        let response = item["response"].as_str().unwrap();
        let (p, r) = vlm.scored_ids(prompt, response).unwrap();
        assert_eq!(p, ids(&item["prompt_ids"]), "prompt ids of {prompt:?}");
        assert_eq!(
            r,
            ids(&item["response_ids"]),
            "response ids of {response:?}"
        );
        let at = item["pixel_index"].as_u64().expect("pixel_index") as usize;
        let pixels = floats(&c["pixels"][at]);
        let scored = vlm
            .score_prepared(&[PreparedScore {
                prompt_ids: p.clone(),
                response_ids: r,
                pixels: pixels.clone(),
                grid: None,
            }])
            .unwrap();
        let want = item["logprob"].as_f64().unwrap();
        assert!(
            (scored[0].0 - want).abs() <= 1e-4,
            "log-prob {} vs {want} for {prompt:?}",
            scored[0].0
        );
        let gen = vlm
            .generate_ids(
                &[PreparedPrompt {
                    prompt_ids: p,
                    pixels,
                    grid: None,
                }],
                24,
            )
            .unwrap();
        assert_eq!(
            gen[0],
            ids(&item["greedy_ids"]),
            "greedy tokens for {prompt:?}"
        );
    }
}

#[test]
fn a_tuned_tower_gets_gradients_for_every_weight_its_features_use() {
    let s = setup("tune");
    let mut rng = StdRng::seed_from_u64(4);
    let clip_params = init::clip_params(&s.clip_cfg, &mut rng, &Device::Cpu).unwrap();
    let tower = tower_of(&clip_params);
    let mut params = init::llava_trainable_params(&s.llava_cfg, &mut rng, &Device::Cpu).unwrap();
    for (n, t) in &tower {
        params.push((n.clone(), candle_core::Var::from_tensor(t).unwrap()));
    }
    let vlm = llava_vlm(&s, &tower, &params);
    let ex = examples(&s, &vlm);
    let batch: Vec<&sft::Example> = ex.iter().take(4).collect();
    let grads = sft::sft_loss(&vlm, &batch, &s.pixels)
        .unwrap()
        .backward()
        .unwrap();
    // LLaVA reads hidden_states[-2]: the last layer and post_layernorm are not on the path.
    let last = s.llava_cfg.vision_config.num_hidden_layers - 1;
    let unused =
        |n: &str| n.contains("post_layernorm") || n.contains(&format!("encoder.layers.{last}."));
    for (name, var) in params.iter().filter(|(n, _)| !unused(n)) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn clip_initialisation_follows_transformers_scales() {
    // transformers' CLIPPreTrainedModel._init_weights; a flat 0.02 everywhere trained a CLIP
    // that could not tell the world's images apart.
    let s = setup("clip-init");
    let params =
        init::clip_params(&s.clip_cfg, &mut StdRng::seed_from_u64(3), &Device::Cpu).unwrap();
    let std_of = |name: &str| -> f64 {
        let (_, v) = params.iter().find(|(n, _)| n == name).unwrap();
        let x: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        (x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
    };
    let v = &s.clip_cfg.vision_config;
    let t = &s.clip_cfg.text_config;
    let (dv, lv) = (v.hidden_size as f64, v.num_hidden_layers as f64);
    let (dt, lt) = (t.hidden_size as f64, t.num_hidden_layers as f64);
    let expect = [
        (
            "vision_model.encoder.layers.0.self_attn.q_proj.weight",
            dv.powf(-0.5) * (2.0 * lv).powf(-0.5),
        ),
        (
            "vision_model.encoder.layers.0.self_attn.out_proj.weight",
            dv.powf(-0.5),
        ),
        (
            "vision_model.encoder.layers.0.mlp.fc1.weight",
            (2.0 * dv).powf(-0.5),
        ),
        (
            "vision_model.encoder.layers.0.mlp.fc2.weight",
            dv.powf(-0.5) * (2.0 * lv).powf(-0.5),
        ),
        (
            "text_model.encoder.layers.0.self_attn.v_proj.weight",
            dt.powf(-0.5) * (2.0 * lt).powf(-0.5),
        ),
        ("vision_model.embeddings.patch_embedding.weight", 0.02),
        ("text_model.embeddings.token_embedding.weight", 0.02),
        ("visual_projection.weight", dv.powf(-0.5)),
        ("text_projection.weight", dt.powf(-0.5)),
    ];
    for (name, want) in expect {
        let got = std_of(name);
        // Sampling error of a std over >= 32 values stays well inside 30 %.
        assert!(
            (got / want - 1.0).abs() < 0.3,
            "{name}: std {got:.4}, transformers {want:.4}"
        );
    }
    assert_eq!(
        std_of("vision_model.encoder.layers.0.self_attn.q_proj.bias"),
        0.0
    );
}

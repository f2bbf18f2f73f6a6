//! misp's LLaVA prompt encoding, response scoring and batched greedy generation against
//! transformers (`fixtures/llava_chat/make_fixture.py`): the same ids for the templated prompt
//! and the response, the same per-sequence log-prob, the same generated tokens and text.

use std::path::{Path, PathBuf};

use misp::kernels::{Kernels, ThreadKernels};
use misp::model::llava::token_logprobs;
use misp::model::vlm::{PreparedPrompt, Vlm, VlmOptions};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(root().join("fixtures/llava_chat/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn image(name: &str) -> PathBuf {
    root().join("fixtures/clip/images").join(name)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn load() -> Vlm {
    Vlm::load(
        &root().join("fixtures/llava_chat/tiny"),
        None,
        &VlmOptions::default(),
    )
    .unwrap()
}

#[test]
fn prompt_and_response_ids_and_logprobs_match_transformers() {
    prompt_and_response_ids_and_logprobs_match_transformers_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn prompt_and_response_ids_and_logprobs_match_transformers_on_the_generic_path() {
    prompt_and_response_ids_and_logprobs_match_transformers_with(Kernels::Generic);
}

fn prompt_and_response_ids_and_logprobs_match_transformers_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let vlm = load();
    let want = expected();
    let cases = want["score"].as_array().unwrap();
    let mut items = Vec::new();
    for c in cases {
        let item = vlm
            .prepare_score(
                &image(c["image"].as_str().unwrap()),
                c["prompt"].as_str().unwrap(),
                c["response"].as_str().unwrap(),
            )
            .unwrap();
        assert_eq!(item.prompt_ids, ids(&c["prompt_ids"]), "prompt ids of {c}");
        assert_eq!(item.response_ids, ids(&c["response_ids"]), "response ids");
        let mean = item.pixels.iter().map(|&p| p as f64).sum::<f64>() / item.pixels.len() as f64;
        let want_mean = c["pixel_mean"].as_f64().unwrap();
        assert!(
            (mean - want_mean).abs() < 1e-2,
            "{}: pixel mean {mean} vs {want_mean}",
            c["image"]
        );
        items.push(item);
    }
    // One right-padded batch fed transformers' own pixels (JPEG decoders differ by a grey
    // level here and there): per-token log-probs of every response token and EOS.
    let pixels: Vec<Vec<f32>> = cases
        .iter()
        .map(|c| {
            c["pixel_values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
    let pixels = vlm.pixel_tensor(&refs).unwrap();
    let seqs: Vec<(&[u32], &[u32])> = items
        .iter()
        .map(|i| (i.prompt_ids.as_slice(), i.response_ids.as_slice()))
        .collect();
    let batch = vlm.score_batch(&seqs).unwrap();
    let logits = vlm
        .llava()
        .unwrap()
        .forward(&batch.ids, &batch.mask, &pixels)
        .unwrap();
    let lp: Vec<Vec<f32>> = token_logprobs(&logits, &batch.ids)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut worst = 0f64;
    for ((c, item), row) in cases.iter().zip(&items).zip(&lp) {
        let want: Vec<f64> = c["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let start = item.prompt_ids.len();
        assert_eq!(want.len(), item.response_ids.len());
        for (k, w) in want.iter().enumerate() {
            // Entry t of token_logprobs scores token t + 1.
            worst = worst.max((row[start + k - 1] as f64 - w).abs());
        }
    }
    assert!(worst <= 1e-4, "max abs per-token log-prob diff {worst}");
    // And the summed scores of `score_prepared` (our own pixels) agree with these to the
    // precision the pixel differences allow.
    let got = vlm.score_prepared(&items).unwrap();
    for (c, (lp, n)) in cases.iter().zip(&got) {
        assert_eq!(*n, c["response_ids"].as_array().unwrap().len());
        let want = c["logp"].as_f64().unwrap();
        assert!(
            (lp - want).abs() <= 0.1,
            "log-prob {lp} vs transformers {want}"
        );
    }
}

#[test]
fn batched_greedy_generation_matches_transformers() {
    batched_greedy_generation_matches_transformers_with(Kernels::Fused);
}

/// The same on candle's ordinary ops (`--kernels generic`): the op graph a GPU runs.
#[test]
fn batched_greedy_generation_matches_transformers_on_the_generic_path() {
    batched_greedy_generation_matches_transformers_with(Kernels::Generic);
}

fn batched_greedy_generation_matches_transformers_with(kernels: Kernels) {
    let _kernels = ThreadKernels::set(kernels);
    let vlm = load();
    let want = expected();
    let cases = want["generate"].as_array().unwrap();
    let max_new = want["max_new_tokens"].as_u64().unwrap() as usize;
    let items: Vec<PreparedPrompt> = cases
        .iter()
        .map(|c| {
            vlm.prepare_prompt(
                &image(c["image"].as_str().unwrap()),
                c["prompt"].as_str().unwrap(),
            )
            .unwrap()
        })
        .collect();
    let got = vlm.generate_ids(&items, max_new).unwrap();
    let texts = vlm.generate_prepared(&items, max_new).unwrap();
    for ((c, g), text) in cases.iter().zip(&got).zip(&texts) {
        assert_eq!(g, &ids(&c["new_ids"]), "generated ids for {}", c["prompt"]);
        assert_eq!(text, c["text"].as_str().unwrap());
    }
    // Each row alone gives the same tokens as in the left-padded batch.
    for (item, g) in items.iter().zip(&got) {
        let alone = vlm
            .generate_ids(std::slice::from_ref(item), max_new)
            .unwrap();
        assert_eq!(&alone[0], g);
    }
}

#[test]
fn prompts_with_their_own_image_placeholder_are_refused() {
    let vlm = load();
    let err = vlm
        .prepare_prompt(&image("hopper.jpg"), "<image>\nWhat is this?")
        .unwrap_err();
    assert!(err.to_string().contains("2 `<image>`"), "{err}");
    let err = vlm
        .prepare_prompt(&image("missing.png"), "What is this?")
        .unwrap_err();
    assert!(err.to_string().contains("missing.png"), "{err}");
}

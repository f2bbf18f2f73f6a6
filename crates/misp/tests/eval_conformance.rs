//! misp's POPE and CHAIR numbers against the reference implementations, on the fixtures of
//! `fixtures/pope/` and `fixtures/chair/` (each folder has the script that made it).
//!
//! Tolerance: none. Both metrics are ratios of integer counts computed in one f64 division
//! (F1 in the same order of operations as the official script), so misp must give the same
//! bits, and therefore print every digit the references print (Python's `repr` for POPE,
//! `%0.01f` / `:.2f` of the percentage for CHAIR).

use std::path::{Path, PathBuf};

use misp::eval::chair::{self, Chair, GroundTruth};
use misp::eval::pope;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

fn expected(path: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(path)).unwrap()).unwrap()
}

/// Python's `str(float)` (the shortest string that parses back to the same double) for the values these fixtures hold (no exponents).
fn py_repr(v: f64) -> String {
    let s = format!("{v}");
    if s.contains(['.', 'e']) {
        s
    } else {
        format!("{s}.0")
    }
}

#[test]
fn pope_matches_the_official_evaluation_to_the_last_digit() {
    let answers = pope::read_answers(&fixture("pope/answers.jsonl")).unwrap();
    assert_eq!(answers.len(), 60);
    let want = expected("pope/expected.json");
    let scores = pope::score(&answers).unwrap();
    assert_eq!(scores.splits.len(), 3);
    let mut groups: Vec<(&str, pope::PopeMetrics)> = scores
        .splits
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    groups.push(("overall", scores.overall));
    for (name, got) in groups {
        let w = &want[name];
        let counts = (got.tp, got.fp, got.tn, got.fn_, got.n);
        let want_counts = ["tp", "fp", "tn", "fn", "n"].map(|k| w[k].as_u64().unwrap() as usize);
        assert_eq!(counts, want_counts.into(), "{name} counts");
        let printed: Vec<String> = vec![
            "TP\tFP\tTN\tFN\t".to_string(),
            format!("{}\t{}\t{}\t{}", got.tp, got.fp, got.tn, got.fn_),
            format!("Accuracy: {}", py_repr(got.accuracy)),
            format!("Precision: {}", py_repr(got.precision)),
            format!("Recall: {}", py_repr(got.recall)),
            format!("F1 score: {}", py_repr(got.f1)),
            format!("Yes ratio: {}", py_repr(got.yes_ratio)),
        ];
        let want_printed: Vec<String> = w["printed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        assert_eq!(printed, want_printed, "{name}");
        // Equal shortest round-trip strings mean equal doubles: the lines above already
        // compare every bit (the floats stored in the JSON are only for readers).
    }
    // The empty answer is scored "yes" as the official script does, and listed.
    assert_eq!(scores.empty_answers.len(), 1);
    // The `pred` the reference derived equals misp's parse for every answer.
    let raw = std::fs::read_to_string(fixture("pope/answers.jsonl")).unwrap();
    for (line, a) in raw.lines().zip(&answers) {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["pred"].as_str().unwrap(), a.pred, "{:?}", a.answer);
    }
}

#[test]
fn chair_matches_the_reference_to_the_last_digit() {
    let chair = Chair::coco();
    let gt = GroundTruth::from_coco_instances(&fixture("chair/instances.json"), &chair).unwrap();
    let caps = chair::read_captions(&fixture("chair/captions.jsonl")).unwrap();
    let want = expected("chair/expected.json");
    let (m, rows) = chair::score(&chair, &gt, &caps).unwrap();

    let sentences = want["sentences"].as_array().unwrap();
    assert_eq!(rows.len(), sentences.len());
    let pairs = |v: &serde_json::Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    for ((row, s), cap) in rows.iter().zip(sentences).zip(&caps) {
        assert_eq!(row.image, s["image"].as_str().unwrap());
        let words: Vec<String> = s["words"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            chair.caption_objects(&cap.caption).words,
            words,
            "words of {:?}",
            cap.caption
        );
        assert_eq!(
            row.mentioned,
            pairs(&s["mentioned"]),
            "mentions in {:?}",
            cap.caption
        );
        assert_eq!(
            row.hallucinated,
            pairs(&s["hallucinated"]),
            "hallucinations in {:?}",
            cap.caption
        );
        let truth: Vec<String> = s["ground_truth"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect();
        assert_eq!(row.ground_truth, truth, "ground truth of {}", row.image);
    }

    let o = &want["overall"];
    for (k, v) in [
        ("CHAIRs", m.chair_s),
        ("CHAIRi", m.chair_i),
        ("Recall", m.recall),
    ] {
        // Shortest round-trip strings are equal exactly when the doubles are.
        assert_eq!(py_repr(v), want["overall_repr"][k].as_str().unwrap(), "{k}");
        assert!((v - o[k].as_f64().unwrap()).abs() < 1e-15);
        assert_eq!(
            format!("{:.2}", v * 100.0),
            want["printed"]["maxlinn"][k].as_str().unwrap(),
            "{k}"
        );
    }
    let lisaanne = format!("{:.1}\t{:.1}", m.chair_s * 100.0, m.chair_i * 100.0);
    assert_eq!(lisaanne, want["printed"]["lisaanne"].as_str().unwrap());
}

#[test]
fn hallusionbench_matches_the_official_aggregation() {
    use misp::eval::hallusionbench;
    let questions =
        hallusionbench::read_questions(&fixture("hallusionbench/HallusionBench.json")).unwrap();
    let answers = hallusionbench::read_answers(&fixture("hallusionbench/answers.jsonl")).unwrap();
    assert_eq!(questions.len(), answers.len());
    for (q, a) in questions.iter().zip(&answers) {
        assert_eq!(q, &a.question, "the audit rows carry the questions as read");
    }
    let want = expected("hallusionbench/expected.json");
    let preds: Vec<&str> = answers.iter().map(|a| a.pred.as_str()).collect();
    let want_preds: Vec<&str> = want["preds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(preds, want_preds);
    let got = hallusionbench::score(&answers).unwrap();
    let sections = want["metrics"].as_object().unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        sections.keys().collect::<Vec<_>>()
    );
    for (name, w) in sections {
        let m = &got[name];
        let counts = [
            m.n,
            m.correct,
            m.figures,
            m.figures_correct,
            m.question_groups,
            m.question_groups_correct,
        ];
        let want_counts = [
            "n",
            "correct",
            "figures",
            "figures_correct",
            "question_groups",
            "question_groups_correct",
        ]
        .map(|k| w[k].as_u64().unwrap() as usize);
        assert_eq!(counts, want_counts, "{name} counts");
        assert!(
            (m.a_acc - w["aAcc"].as_f64().unwrap()).abs() < 1e-9,
            "{name} aAcc"
        );
        assert!(
            (m.q_acc - w["qAcc"].as_f64().unwrap()).abs() < 1e-9,
            "{name} qAcc"
        );
        match (m.f_acc, w.get("fAcc")) {
            (Some(f), Some(wf)) => {
                assert!((f - wf.as_f64().unwrap()).abs() < 1e-9, "{name} fAcc")
            }
            (None, None) => {}
            (f, wf) => panic!("{name} fAcc: {f:?} vs {wf:?}"),
        }
    }
}

#[test]
fn mmvp_matches_the_official_pair_grading() {
    use misp::eval::mmvp;
    let questions = mmvp::read_questions(&fixture("mmvp/Questions.csv")).unwrap();
    let answers = mmvp::read_answers(&fixture("mmvp/answers.jsonl")).unwrap();
    assert_eq!(questions.len(), 24);
    for (q, a) in questions.iter().zip(&answers) {
        assert_eq!(q, &a.question, "the CSV reads as the audit rows record it");
    }
    let want = expected("mmvp/expected.json");
    let preds: Vec<Option<String>> = answers.iter().map(|a| a.pred.map(String::from)).collect();
    let want_preds: Vec<Option<String>> = want["preds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().map(str::to_string))
        .collect();
    assert_eq!(preds, want_preds);
    let m = &mmvp::score(&answers).unwrap()["overall"];
    let w = &want["overall"];
    let counts = [m.n, m.correct, m.pairs, m.pairs_correct, m.unknown];
    let want_counts = ["n", "correct", "pairs", "pairs_correct", "unknown"]
        .map(|k| w[k].as_u64().unwrap() as usize);
    assert_eq!(counts, want_counts);
    assert!((m.accuracy - w["accuracy"].as_f64().unwrap()).abs() < 1e-9);
    assert!((m.pair_accuracy - w["pair_accuracy"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(
        format!("The accuracy is {}", py_repr(m.pair_accuracy)),
        w["printed"].as_str().unwrap()
    );
}

#[test]
fn amber_matches_the_official_counting() {
    use misp::eval::amber;
    let data = fixture("amber/data");
    let a = amber::Amber::load(&data).unwrap();
    let answers = amber::read_answers(&fixture("amber/responses.json")).unwrap();
    assert_eq!(answers.len(), 28);
    let want = expected("amber/expected.json");
    let (metrics, rescored) = amber::score(&a, &answers).unwrap();
    // Per description: misp's object nouns are the ones NLTK gives, the hallucinated ones the
    // official loop's.
    for r in &rescored {
        let key = r.id.to_string();
        if let Some(item) = want["items"].get(&key) {
            let list = |v: &serde_json::Value| -> Vec<String> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|w| w.as_str().unwrap().to_string())
                    .collect()
            };
            assert_eq!(
                r.nouns.as_ref().unwrap(),
                &list(&item["nouns"]),
                "nouns of {key}"
            );
            assert_eq!(
                r.hallucinated.as_ref().unwrap(),
                &list(&item["hallucinated"]),
                "hallucinated in {key}"
            );
        } else {
            let pred = r.pred.unwrap().as_str();
            assert_eq!(pred, want["preds"][&key].as_str().unwrap(), "reply {key}");
        }
    }
    let c = &want["counters"];
    let count = |k: &str| c[k].as_u64().unwrap() as usize;
    let g = &metrics["generative"];
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    assert_eq!(u(&g["hallucinated"]), count("chair_score"));
    assert_eq!(u(&g["mentioned"]), count("chair_num"));
    assert_eq!(u(&g["covered"]), count("safe_cover_score"));
    assert_eq!(u(&g["truth"]), count("safe_cover_num"));
    assert_eq!(u(&g["hallu_mentioned"]), count("hallu_cover_score"));
    assert_eq!(u(&g["hallu"]), count("hallu_cover_num"));
    assert_eq!(
        u(&g["n"]) - u(&g["replies_with_hallucination"]),
        count("non_hallu_score")
    );
    let d = &metrics["discriminative"];
    assert_eq!(u(&d["correct"]), count("qa_correct_score"));
    assert_eq!(u(&d["n"]), count("qa_correct_num"));
    assert_eq!(u(&d["truth_no"]), count("qa_no_num"));
    assert_eq!(u(&d["truth_no_answered_no"]), count("qa_no_score"));
    assert_eq!(u(&d["answered_no"]), count("qa_ans_no_num"));
    let exact = &want["exact"];
    for (section, field) in [
        ("generative", "chair"),
        ("generative", "cover"),
        ("generative", "hal"),
        ("generative", "cog"),
        ("discriminative", "accuracy"),
        ("discriminative", "precision"),
        ("discriminative", "recall"),
    ] {
        let got = metrics[section][field].as_f64().unwrap();
        assert!(
            (got - exact[field].as_f64().unwrap()).abs() < 1e-9,
            "{field}"
        );
    }
    // What inference.py prints, every dimension.
    let printed = want["printed"].as_object().unwrap();
    for (section, values) in printed {
        assert_eq!(
            &metrics[section]["official"], values,
            "{section}: the official prints"
        );
    }
}

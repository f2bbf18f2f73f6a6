//! `misp demo --quick` end to end: the CI smoke test of the whole pipeline on ShapesWorld with
//! the shipped checkpoints (world -> embed -> SAE -> mine -> train four variants -> POPE and
//! CHAIR -> report). Slow (minutes): it is the one test that runs every stage for real.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn quick_demo_writes_a_complete_report() {
    let out = std::env::temp_dir().join(format!("misp-demo-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_misp"))
        .args(["demo", "--quick", "--out", out.to_str().unwrap()])
        .current_dir(root())
        .output()
        .expect("run misp demo");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let variants = &results["variants"];
    for variant in ["base", "dpo", "mdpo", "random", "misp"] {
        for bench in ["pope/random", "pope/popular", "pope/adversarial"] {
            let f1 = variants[variant][bench]["f1"]["mean"].as_f64();
            assert!(
                f1.is_some_and(|x| (0.0..=1.0).contains(&x)),
                "{variant} {bench}"
            );
        }
        // CHAIR_s split by kind, from the scene graphs.
        for kind in ["chair_s_cooccurrence", "chair_s_misnamed"] {
            let x = variants[variant]["chair"][kind]["mean"].as_f64();
            assert!(
                x.is_some_and(|x| (0.0..=1.0).contains(&x)),
                "{variant} {kind}"
            );
        }
        // Every run's value is kept, with its seed.
        let cs = variants[variant]["chair"]["chair_s"]["runs"].as_array();
        assert_eq!(cs.map(Vec::len), Some(1), "{variant}");
    }
    // misp vs random, mDPO and dpo on every metric; one seed: no interval, no verdict.
    let comps = results["comparisons"].as_array().unwrap();
    assert_eq!(comps.len(), 3 * 7, "{comps:?}");
    assert!(comps
        .iter()
        .all(|c| c["verdict"].as_str().unwrap().contains("no verdict")));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "Does the base model hallucinate?",
        "The paper's claims",
        "Negative validity",
        "CHAIR_s by kind of hallucination",
    ] {
        assert!(report.contains(needle), "{needle}");
    }
    // The sampler learned, on the world's own embeddings: a held-out FVU well under the
    // variance, stated in the report, and latents that fire.
    let sae: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sae/config.json")).unwrap())
            .unwrap();
    let fvu = sae["training"]["fvu"].as_f64().unwrap();
    assert_eq!(sae["training"]["fvu_split"], "heldout");
    assert!(fvu <= 0.5, "the demo's SAE reaches held-out FVU {fvu}");
    assert!(
        report.contains(&format!("FVU **{fvu:.3}**")),
        "the report states it"
    );
    let last_epoch = std::fs::read_to_string(out.join("sae/metrics.jsonl")).unwrap();
    let last: Value = serde_json::from_str(last_epoch.lines().last().unwrap()).unwrap();
    assert!(last["dead_fraction"].as_f64().unwrap() < 0.5, "{last}");
    for png in ["results.png", "training_loss.png", "tsne_negatives.png"] {
        assert!(out.join(png).is_file(), "{png}");
    }
    // A re-run reuses every finished step.
    let again = Command::new(env!("CARGO_BIN_EXE_misp"))
        .args(["demo", "--quick", "--out", out.to_str().unwrap()])
        .current_dir(root())
        .output()
        .expect("rerun misp demo");
    assert!(again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !err.contains("$ misp train"),
        "a finished run was retrained:\n{err}"
    );
    // The same folder with another training setting would mix runs: refused, naming it.
    let other = Command::new(env!("CARGO_BIN_EXE_misp"))
        .args([
            "demo",
            "--quick",
            "--set",
            "lr=5e-4",
            "--out",
            out.to_str().unwrap(),
        ])
        .current_dir(root())
        .output()
        .expect("rerun misp demo with another setting");
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        err.contains("other settings") && err.contains("lr=5e-4"),
        "{err}"
    );
    // A stamp from before settings were recorded: refused too, nothing deleted.
    let stamp = out.join("demo_models.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&stamp).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("settings");
    std::fs::write(&stamp, v.to_string()).unwrap();
    let old = Command::new(env!("CARGO_BIN_EXE_misp"))
        .args(["demo", "--quick", "--out", out.to_str().unwrap()])
        .current_dir(root())
        .output()
        .expect("rerun misp demo on an older stamp");
    assert!(!old.status.success());
    let err = String::from_utf8_lossy(&old.stderr);
    assert!(err.contains("did not record its training"), "{err}");
    assert!(out.join("runs").is_dir(), "nothing was deleted");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_missing_shipped_checkpoint_names_the_rebuild_command() {
    let o = Command::new(env!("CARGO_BIN_EXE_misp"))
        .args([
            "demo",
            "--quick",
            "--models",
            "/nonexistent",
            "--out",
            "/tmp/unused-demo",
        ])
        .output()
        .expect("run misp demo");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("misp world pretrain"), "{err}");
}

#[test]
fn a_demo_folder_made_with_other_models_is_refused_not_mixed() {
    let out = std::env::temp_dir().join(format!("misp-demo-stale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let demo = |out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_misp"))
            .args(["demo", "--quick", "--out", out.to_str().unwrap()])
            .current_dir(root())
            .output()
            .expect("run misp demo")
    };
    // Stamped by other models.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("demo_models.json"),
        r#"{"models_hash": "0123456789abcdef"}"#,
    )
    .unwrap();
    let o = demo(&out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("other base models"), "{err}");
    assert!(err.contains("choose another --out"), "{err}");
    // Made before stamps existed: a world but no stamp.
    std::fs::remove_file(out.join("demo_models.json")).unwrap();
    std::fs::create_dir_all(out.join("world")).unwrap();
    let o = demo(&out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("earlier misp"), "{err}");
    assert!(out.join("world").is_dir(), "nothing was deleted");
    let _ = std::fs::remove_dir_all(&out);
}

//! Unit tests of the CLIP building blocks; conformance with transformers is in
//! `crates/misp/tests/clip_conformance.rs`.

use super::*;

#[test]
fn pooling_rules_follow_transformers() {
    // Legacy rule (eos_token_id == 2): the first maximal id, wherever the EOS is.
    let ids = vec![vec![0, 7, 300, 5, 1, 1], vec![0, 9, 1, 400, 400, 1]];
    assert_eq!(text_pool_positions(&ids, 2), vec![2, 3]);
    // Otherwise the first position holding the EOS id (padding may repeat it).
    assert_eq!(text_pool_positions(&ids, 1), vec![4, 2]);
    // No EOS at all: torch's argmax of all zeros, position 0.
    assert_eq!(text_pool_positions(&[vec![0, 5, 6]], 1), vec![0]);
}

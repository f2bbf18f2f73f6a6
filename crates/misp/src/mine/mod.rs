//! Stage 1b, mining: K negative images per preference record (docs/design.md §2).
//!
//! Reads a pool store and a records store (see [`crate::embeddings`]) and, for the `misp`
//! strategy, a trained SAE; writes the negatives file ([`negatives`]). The pieces, in the order
//! a record goes through them: [`candidates`] (which pool images are considered),
//! the SAE's factorised codes, [`select`] (Eq. 12, Algorithm 1, the proposal `q`),
//! [`strategy`] (which parts fill the K slots) and [`synthetic`] (crop / noise negatives).

pub mod candidates;
pub mod negatives;
mod run;
pub mod select;
pub mod strategy;
pub mod synthetic;

pub use crate::files::Shard;
pub use run::{
    candidate_sets, mine, sidecar, MineConfig, MineError, MineReport, SelectMode, Short, Skipped,
};

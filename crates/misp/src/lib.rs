//! `misp`: MISP-DPO, multi-negative multimodal Direct Preference Optimization with
//! importance sampling over negatives mined by a CLIP + sparse-autoencoder sampler.
//!
//! This library holds the method and the models; the `misp` binary (crate `misp-cli`) only
//! parses arguments and calls in here. Modules follow the pipeline of DESIGN.md §1:
//!
//! | stage | module | reads -> writes |
//! |---|---|---|
//! | sae, mine | [`sae`] | CLIP embeddings -> SAE checkpoint; per-candidate reconstruction error and L1 (Eq. 11-12) |
//! | train | [`objective`] | sequence log-probs -> loss, gradient, metrics (Eq. 6-10) |
//!
//! Later stages (embed, mine, model, eval, world) arrive as modules of their own.

pub mod objective;
pub mod sae;

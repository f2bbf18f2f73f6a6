//! Reports: figures for run summaries and comparisons (`misp eval compare`, training curves).
//!
//! [`plot`] draws PNG bar, line and band charts with `plotters` and a font shipped in the crate,
//! so they render the same on every machine.

pub mod plot;
pub mod stats;
pub mod tsne;

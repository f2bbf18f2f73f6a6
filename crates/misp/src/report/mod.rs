//! Reports: figures for run summaries and comparisons (`misp eval compare`, training curves).
//!
//! [`plot`] draws PNG bar and line charts with the `image` crate and a built-in bitmap font,
//! so reports need no plotting or font dependency and render the same on every machine.

pub mod plot;
pub mod stats;
pub mod tsne;

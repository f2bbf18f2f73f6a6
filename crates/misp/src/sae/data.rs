//! What the SAE trains on: a record's positive and prompt embeddings and the pool rows of its
//! candidate set, as `f32` slices the caller has loaded (no file format of the embed stage
//! here), checked before any step.

use super::{Result, SaeError};

/// Embeddings to train on: every record's positive and prompt, and the rows of the pool that
/// form its candidate set. All `f32`, row-major, `d` columns.
#[derive(Debug, Clone, Copy)]
pub struct TrainingSet<'a> {
    /// `[N_pool, d]` candidate image embeddings.
    pub pool: &'a [f32],
    /// `[R, d]` prompt (text) embeddings `t`.
    pub prompts: &'a [f32],
    /// `[R, d]` positive image embeddings `p`.
    pub positives: &'a [f32],
    /// Per record, its candidates as rows of `pool`. Records with none are skipped.
    pub candidates: &'a [Vec<u32>],
    pub d: usize,
}

impl TrainingSet<'_> {
    /// Number of records `R`.
    pub fn records(&self) -> usize {
        self.candidates.len()
    }

    /// Number of (record, candidate) pairs.
    pub fn pairs(&self) -> usize {
        self.candidates.iter().map(Vec::len).sum()
    }

    /// Lengths agree with `d` and `R`, candidate rows exist, every value is finite.
    pub(crate) fn validate(&self) -> Result<()> {
        let d = self.d;
        if d == 0 {
            return Err(SaeError::Data("`d` is 0".into()));
        }
        let r = self.records();
        let check = |field: &'static str, v: &[f32], rows: Option<usize>| -> Result<()> {
            let ok = match rows {
                Some(rows) => v.len() == rows * d,
                None => v.len().is_multiple_of(d),
            };
            if !ok {
                return Err(SaeError::InputLength {
                    field,
                    got: v.len(),
                    expected: match rows {
                        Some(rows) => format!("{rows} x {d}"),
                        None => format!("a multiple of {d}"),
                    },
                });
            }
            if let Some(row) = v
                .chunks_exact(d)
                .position(|x| x.iter().any(|a| !a.is_finite()))
            {
                return Err(SaeError::NonFiniteInput { field, row });
            }
            Ok(())
        };
        check("pool", self.pool, None)?;
        check("prompts", self.prompts, Some(r))?;
        check("positives", self.positives, Some(r))?;
        let pool = self.pool.len() / d;
        for (record, cands) in self.candidates.iter().enumerate() {
            if let Some(&index) = cands.iter().find(|&&i| i as usize >= pool) {
                return Err(SaeError::CandidateIndex {
                    record,
                    index,
                    pool,
                });
            }
        }
        if self.pairs() == 0 {
            return Err(SaeError::Data(
                "no record has a candidate: nothing to train on".into(),
            ));
        }
        Ok(())
    }
}

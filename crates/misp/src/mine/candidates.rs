//! Candidate sets: which pool images are scored for a record (docs/design.md §2).
//!
//! `knn:M` (default, M = 256): the M pool images nearest to the positive by CLIP image-image
//! cosine; `random:M`: M uniform draws; `all`: the whole pool. Every spec first removes the
//! positive itself and its near-duplicates (cosine > 0.95) and pool rows with non-finite
//! embeddings: a near-copy of the true image is not a negative.

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use rand::Rng;

use crate::embeddings::PoolEmbeddings;

/// Pool images above this cosine to the positive count as the same picture (excluded as
/// candidates; exactly 0.95 stays eligible).
pub const NEAR_DUPLICATE_COSINE: f32 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateSpec {
    Knn(usize),
    Random(usize),
    All,
}

impl Default for CandidateSpec {
    fn default() -> Self {
        CandidateSpec::Knn(256)
    }
}

impl FromStr for CandidateSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let size = |m: &str| match m.parse::<usize>() {
            Ok(0) | Err(_) => Err(format!(
                "candidate set {s:?}: the size after ':' must be a positive integer"
            )),
            Ok(m) => Ok(m),
        };
        match s.split_once(':') {
            None if s == "all" => Ok(CandidateSpec::All),
            Some(("knn", m)) => Ok(CandidateSpec::Knn(size(m)?)),
            Some(("random", m)) => Ok(CandidateSpec::Random(size(m)?)),
            _ => Err(format!(
                "unknown candidate set {s:?}: expected knn:M, random:M or all"
            )),
        }
    }
}

impl fmt::Display for CandidateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CandidateSpec::Knn(m) => write!(f, "knn:{m}"),
            CandidateSpec::Random(m) => write!(f, "random:{m}"),
            CandidateSpec::All => write!(f, "all"),
        }
    }
}

impl CandidateSpec {
    /// The most candidates a record can get (`None` for the whole pool).
    pub fn size(&self) -> Option<usize> {
        match self {
            CandidateSpec::Knn(m) | CandidateSpec::Random(m) => Some(*m),
            CandidateSpec::All => None,
        }
    }
}

/// The pool prepared for cosine queries: one `[N, d]` tensor and the row norms.
pub struct PoolIndex<'a> {
    pub pool: &'a PoolEmbeddings,
    matrix: Tensor,
    norms: Vec<f32>,
    usable: Vec<bool>,
}

impl<'a> PoolIndex<'a> {
    pub fn new(pool: &'a PoolEmbeddings) -> candle_core::Result<Self> {
        let d = pool.meta.dim;
        let matrix = Tensor::from_slice(&pool.embeds, (pool.len(), d), &Device::Cpu)?;
        let norms = pool
            .embeds
            .chunks(d)
            .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
            .collect();
        let mut usable = vec![true; pool.len()];
        for r in &pool.invalid_rows {
            usable[r.row] = false;
        }
        Ok(Self {
            pool,
            matrix,
            norms,
            usable,
        })
    }

    /// Cosines of every pool row to each of `queries` (`[Q, d]` row-major): `Q` rows of `N`.
    /// One GEMM for the whole batch of queries.
    pub fn cosines(&self, queries: &[f32]) -> candle_core::Result<Vec<Vec<f32>>> {
        let d = self.pool.meta.dim;
        let q = queries.len() / d;
        let qt = Tensor::from_slice(queries, (q, d), &Device::Cpu)?;
        let dots = qt.matmul(&self.matrix.t()?)?.to_vec2::<f32>()?;
        Ok(dots
            .into_iter()
            .zip(queries.chunks(d))
            .map(|(mut row, query)| {
                let qn = query.iter().map(|x| x * x).sum::<f32>().sqrt();
                for (c, n) in row.iter_mut().zip(&self.norms) {
                    let denom = qn * n;
                    *c = if denom > 0.0 { *c / denom } else { 0.0 };
                }
                row
            })
            .collect())
    }

    /// Pool rows that may serve as negatives for a positive with these cosines.
    fn eligible(&self, cosines: &[f32]) -> Vec<u32> {
        (0..cosines.len())
            .filter(|&i| {
                self.usable[i] && cosines[i].is_finite() && cosines[i] <= NEAR_DUPLICATE_COSINE
            })
            .map(|i| i as u32)
            .collect()
    }

    /// The `m` eligible rows most similar to the positive, most similar first (ties: lower
    /// row first).
    pub fn nearest(&self, cosines: &[f32], m: usize) -> Vec<u32> {
        let mut rows = self.eligible(cosines);
        let order = |a: &u32, b: &u32| {
            cosines[*b as usize]
                .total_cmp(&cosines[*a as usize])
                .then(a.cmp(b))
        };
        if rows.len() > m {
            rows.select_nth_unstable_by(m, order);
            rows.truncate(m);
        }
        rows.sort_by(order);
        rows
    }

    /// `m` uniform draws without replacement among the eligible rows, in row order.
    pub fn random(&self, cosines: &[f32], m: usize, rng: &mut impl Rng) -> Vec<u32> {
        let rows = self.eligible(cosines);
        let mut picked: Vec<u32> = rand::seq::index::sample(rng, rows.len(), m.min(rows.len()))
            .into_iter()
            .map(|i| rows[i])
            .collect();
        picked.sort_unstable();
        picked
    }

    /// The candidate set of one record under `spec`.
    pub fn candidates(&self, spec: CandidateSpec, cosines: &[f32], rng: &mut impl Rng) -> Vec<u32> {
        match spec {
            CandidateSpec::Knn(m) => self.nearest(cosines, m),
            CandidateSpec::Random(m) => self.random(cosines, m, rng),
            CandidateSpec::All => self.eligible(cosines),
        }
    }

    /// The number of eligible rows (for the uniform `q` of random negatives).
    pub fn eligible_count(&self, cosines: &[f32]) -> usize {
        self.eligible(cosines).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embeddings::{EmbeddingMeta, InvalidRow};
    use rand::SeedableRng;

    fn pool(rows: &[[f32; 2]]) -> PoolEmbeddings {
        PoolEmbeddings {
            dir: "pool".into(),
            meta: EmbeddingMeta {
                clip_model: "t".into(),
                dim: 2,
                normalized: false,
            },
            ids: (0..rows.len()).map(|i| format!("p{i}")).collect(),
            paths: vec![String::new(); rows.len()],
            embeds: rows.iter().flatten().cloned().collect(),
            invalid_rows: vec![],
        }
    }

    #[test]
    fn specs_parse_and_print() {
        for s in ["knn:256", "random:12", "all"] {
            assert_eq!(s.parse::<CandidateSpec>().unwrap().to_string(), s);
        }
        assert!("knn:0".parse::<CandidateSpec>().is_err());
        assert!("nearest:4"
            .parse::<CandidateSpec>()
            .unwrap_err()
            .contains("knn:M"));
    }

    #[test]
    fn knn_excludes_the_positive_and_near_duplicates() {
        // Angles from the positive (1, 0): 0 (itself), ~8 degrees (cos 0.99, near-dup), 30, 60,
        // 90, and an invalid row.
        let deg = |a: f32| [a.to_radians().cos(), a.to_radians().sin()];
        let mut p = pool(&[
            deg(0.0),
            deg(8.0),
            deg(30.0),
            deg(60.0),
            deg(90.0),
            [f32::NAN, 0.0],
        ]);
        p.invalid_rows.push(InvalidRow {
            row: 5,
            id: "p5".into(),
            tensor: "image_embeds",
            reason: "non-finite",
        });
        let index = PoolIndex::new(&p).unwrap();
        let cos = &index.cosines(&[2.0, 0.0]).unwrap()[0];
        assert_eq!(index.nearest(cos, 2), vec![2, 3]);
        assert_eq!(index.nearest(cos, 10), vec![2, 3, 4]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(
            index.candidates(CandidateSpec::All, cos, &mut rng),
            vec![2, 3, 4]
        );
        let r = index.candidates(CandidateSpec::Random(2), cos, &mut rng);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|i| [2, 3, 4].contains(i)));
    }
}

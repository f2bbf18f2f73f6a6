//! Negative strategies: MISP-DPO's own (`misp`), the paper's baselines (`random`, `similarity`,
//! mDPO's `crop`, CHiP's `noise`) and their mixes (`noise+misp`, `crop+noise+misp`).
//!
//! A strategy is a list of parts. Synthetic parts (`crop`, `noise`) contribute one negative
//! each in a mix; the single pool part (`misp`, `random` or `similarity`) fills the rest up to
//! K. A strategy of one part fills all K slots with it.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// SAE-scored candidates, Algorithm 1 (or its sampled analogue).
    Misp,
    /// Uniform draws from the pool.
    Random,
    /// The nearest pool images by CLIP image-image cosine.
    Similarity,
    /// A random resized crop of the positive (mDPO).
    Crop,
    /// Forward diffusion of the positive at step 500 (CHiP).
    Noise,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Misp => "misp",
            Part::Random => "random",
            Part::Similarity => "similarity",
            Part::Crop => "crop",
            Part::Noise => "noise",
        }
    }

    pub fn is_synthetic(self) -> bool {
        matches!(self, Part::Crop | Part::Noise)
    }
}

/// A parsed `--strategy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strategy {
    parts: Vec<Part>,
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        for name in s.split('+') {
            let part = match name.trim() {
                "misp" => Part::Misp,
                "random" => Part::Random,
                "similarity" => Part::Similarity,
                "crop" => Part::Crop,
                "noise" => Part::Noise,
                other => {
                    return Err(format!(
                        "unknown strategy part {other:?} in {s:?}: use misp, random, similarity, crop, noise, or mixes such as noise+misp"
                    ))
                }
            };
            if parts.contains(&part) {
                return Err(format!("strategy {s:?} names {:?} twice", part.name()));
            }
            parts.push(part);
        }
        if parts.len() > 1 && parts.iter().filter(|p| !p.is_synthetic()).count() != 1 {
            return Err(format!(
                "strategy {s:?}: a mix needs exactly one pool part (misp, random or similarity) to fill the slots the synthetic parts leave"
            ));
        }
        Ok(Strategy { parts })
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.parts.iter().map(|p| p.name()).collect();
        f.write_str(&names.join("+"))
    }
}

impl Strategy {
    /// How many of the `k` slots each part fills, in the order negatives are written
    /// (synthetic parts first).
    pub fn allocation(&self, k: usize) -> Result<Vec<(Part, usize)>, String> {
        if self.parts.len() == 1 {
            return Ok(vec![(self.parts[0], k)]);
        }
        let synthetic: Vec<Part> = self
            .parts
            .iter()
            .cloned()
            .filter(|p| p.is_synthetic())
            .collect();
        if k <= synthetic.len() {
            return Err(format!("strategy {self} needs k > {} (one per synthetic part plus at least one from the pool); got k = {k}", synthetic.len()));
        }
        let pool = self
            .parts
            .iter()
            .cloned()
            .find(|p| !p.is_synthetic())
            .expect("checked at parse");
        let mut out: Vec<(Part, usize)> = synthetic.into_iter().map(|p| (p, 1)).collect();
        let used = out.len();
        out.push((pool, k - used));
        Ok(out)
    }

    /// Whether the strategy needs a trained SAE.
    pub fn needs_sae(&self) -> bool {
        self.parts.contains(&Part::Misp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_variants_allocate_their_slots() {
        let alloc = |s: &str, k| s.parse::<Strategy>().unwrap().allocation(k).unwrap();
        assert_eq!(alloc("misp", 3), vec![(Part::Misp, 3)]);
        assert_eq!(alloc("crop", 1), vec![(Part::Crop, 1)]);
        assert_eq!(
            alloc("noise+misp", 3),
            vec![(Part::Noise, 1), (Part::Misp, 2)]
        );
        assert_eq!(
            alloc("crop+noise+misp", 3),
            vec![(Part::Crop, 1), (Part::Noise, 1), (Part::Misp, 1)]
        );
        assert!("crop+noise+misp"
            .parse::<Strategy>()
            .unwrap()
            .allocation(2)
            .is_err());
        assert_eq!(
            "noise+misp".parse::<Strategy>().unwrap().to_string(),
            "noise+misp"
        );
    }

    #[test]
    fn malformed_strategies_are_rejected_with_a_reason() {
        assert!("misp+random"
            .parse::<Strategy>()
            .unwrap_err()
            .contains("exactly one pool part"));
        assert!("crop+noise"
            .parse::<Strategy>()
            .unwrap_err()
            .contains("exactly one pool part"));
        assert!("misp+misp"
            .parse::<Strategy>()
            .unwrap_err()
            .contains("twice"));
        assert!("sae".parse::<Strategy>().unwrap_err().contains("unknown"));
    }
}

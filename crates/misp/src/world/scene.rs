//! Scene graphs and how they are drawn from the co-occurrence prior.
//!
//! A scene is 1-4 objects (shape, colour, size, a cell of a 3x3 grid, how visible it is). The
//! prior is what makes a weakly grounded model hallucinate (WORLD-NOTES 1): a few *anchor*
//! shapes bring their *partner* along most of the time, and the partner is often hard to see
//! (faint, tiny or occluded) while the text still names it. A model that learns "square ->
//! say triangle" instead of looking answers "yes" for the absent partner — the POPE
//! adversarial failure.

use serde::{Deserialize, Serialize};

use super::rng::Rng;
use super::WorldConfig;

/// The object categories (POPE's and CHAIR's "objects").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
    Cross,
    Ring,
    Star,
    Hexagon,
}

impl Shape {
    pub const ALL: [Shape; 8] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Diamond,
        Shape::Cross,
        Shape::Ring,
        Shape::Star,
        Shape::Hexagon,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
            Shape::Cross => "cross",
            Shape::Ring => "ring",
            Shape::Star => "star",
            Shape::Hexagon => "hexagon",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Diamond => "diamonds",
            Shape::Cross => "crosses",
            Shape::Ring => "rings",
            Shape::Star => "stars",
            Shape::Hexagon => "hexagons",
        }
    }

    /// Position in [`Shape::ALL`]; CHAIR category ids are this plus one.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Colour {
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    /// Position in [`Colour::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Saturated, so that every colour stands out from the muted backgrounds.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [225, 40, 40],
            Colour::Green => [40, 200, 70],
            Colour::Blue => [50, 100, 240],
            Colour::Yellow => [240, 220, 40],
            Colour::Purple => [165, 60, 215],
            Colour::Orange => [250, 140, 30],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

/// How an object is drawn. Every object is *in* the scene graph whatever its visibility: the
/// text names it, POPE asks "yes" about it, CHAIR counts it as present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Clear,
    /// Blended at `faint_alpha` over the background.
    Faint,
    /// A few pixels across.
    Tiny,
    /// Mostly covered by a patch of background texture.
    Occluded,
}

impl Visibility {
    pub fn is_hidden(self) -> bool {
        self != Visibility::Clear
    }
}

/// The 3x3 grid cells, row-major from the top left, as the text names them.
pub const CELL_NAMES: [&str; 9] = [
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    /// 0..9, row-major (see [`CELL_NAMES`]).
    pub cell: u8,
    pub visibility: Visibility,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
    Pool,
}

impl Split {
    pub const ALL: [Split; 4] = [Split::Train, Split::Val, Split::Test, Split::Pool];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
            Split::Pool => "pool",
        }
    }

    /// Evaluation splits draw partners less often, so POPE's adversarial questions meet
    /// scenes where the expected partner is really absent (see `eval_cooccurrence`).
    pub fn is_eval(self) -> bool {
        matches!(self, Split::Val | Split::Test)
    }
}

/// One scene: a line of `scenes.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    /// `SPLIT-NNNNN`.
    pub id: String,
    pub split: Split,
    /// Relative to the world folder: `images/SPLIT/NNNNN.png`.
    pub image: String,
    /// Sorted by cell; cells are distinct.
    pub objects: Vec<Object>,
}

impl Scene {
    pub fn new(split: Split, index: usize, objects: Vec<Object>) -> Scene {
        Scene {
            id: format!("{}-{index:05}", split.name()),
            split,
            image: format!("images/{}/{index:05}.png", split.name()),
            objects,
        }
    }

    pub fn count(&self, shape: Shape) -> usize {
        self.objects.iter().filter(|o| o.shape == shape).count()
    }

    pub fn has(&self, shape: Shape) -> bool {
        self.objects.iter().any(|o| o.shape == shape)
    }

    /// Distinct shapes present, in [`Shape::ALL`] order.
    pub fn shapes(&self) -> Vec<Shape> {
        Shape::ALL.into_iter().filter(|s| self.has(*s)).collect()
    }

    /// Shapes not in the scene, in [`Shape::ALL`] order.
    pub fn absent(&self) -> Vec<Shape> {
        Shape::ALL.into_iter().filter(|s| !self.has(*s)).collect()
    }
}

/// The co-occurrence prior: which anchor brings which partner, and how often each shape is
/// drawn on its own. Fixed (part of the format version), not configuration: the strength of
/// the pairing and the partners' visibility are the knobs.
pub struct Prior;

impl Prior {
    /// `(anchor, partner)`: a square comes with a triangle, a circle with a cross, a star with
    /// a diamond. Ring and hexagon are free shapes with no partner.
    pub const PAIRS: [(Shape, Shape); 3] = [
        (Shape::Square, Shape::Triangle),
        (Shape::Circle, Shape::Cross),
        (Shape::Star, Shape::Diamond),
    ];

    /// Relative frequency of each shape (in [`Shape::ALL`] order) as a freely drawn object.
    /// Partners are rare on their own, so seeing one is mostly explained by its anchor.
    pub const WEIGHTS: [f64; 8] = [3.0, 3.0, 0.4, 0.4, 0.4, 2.0, 2.5, 2.0];

    pub fn partner(shape: Shape) -> Option<Shape> {
        Self::PAIRS
            .iter()
            .find(|(a, _)| *a == shape)
            .map(|(_, p)| *p)
    }

    pub fn anchor(shape: Shape) -> Option<Shape> {
        Self::PAIRS
            .iter()
            .find(|(_, p)| *p == shape)
            .map(|(a, _)| *a)
    }
}

/// Draws one scene's objects.
///
/// The object count is uniform in `[min_objects, max_objects]`. Shapes are drawn from
/// [`Prior::WEIGHTS`]; each anchor brings its partner with probability `cooccurrence`
/// (`eval_cooccurrence` in val/test) when the partner is not there yet. A partner that would
/// not fit is handled by drawing again for that slot, so the pairing rate is kept even in full
/// scenes. Partners brought by an anchor are hidden with probability `partner_hidden`, other
/// objects with `other_hidden`; a hidden object is faint, tiny or occluded with equal chance.
pub fn sample_objects(cfg: &WorldConfig, split: Split, rng: &mut Rng) -> Vec<Object> {
    let p_pair = if split.is_eval() {
        cfg.eval_cooccurrence
    } else {
        cfg.cooccurrence
    };
    let target = rng.range(cfg.min_objects, cfg.max_objects);
    // (shape, brought by its anchor)
    let mut shapes: Vec<(Shape, bool)> = Vec::with_capacity(cfg.max_objects);
    let mut redraws = 0;
    while shapes.len() < target {
        let shape = Shape::ALL[rng.weighted(&Prior::WEIGHTS)];
        let partner = Prior::partner(shape)
            .filter(|p| !shapes.iter().any(|(s, _)| s == p))
            .filter(|_| rng.chance(p_pair));
        match partner {
            Some(_) if shapes.len() + 2 > cfg.max_objects => {
                // No room for the pair: draw this slot again (rarely more than once).
                redraws += 1;
                if redraws > 64 {
                    shapes.push((shape, false));
                }
            }
            Some(p) => {
                shapes.push((shape, false));
                shapes.push((p, true));
            }
            None => shapes.push((shape, false)),
        }
    }
    let mut cells: Vec<u8> = (0..9).collect();
    rng.shuffle(&mut cells);
    let mut objects: Vec<Object> = shapes
        .into_iter()
        .zip(cells)
        .map(|((shape, brought), cell)| {
            let colour = Colour::ALL[rng.below(Colour::ALL.len())];
            let mut size = if rng.chance(0.5) {
                Size::Small
            } else {
                Size::Large
            };
            let p_hidden = if brought {
                cfg.partner_hidden
            } else {
                cfg.other_hidden
            };
            let visibility = if rng.chance(p_hidden) {
                [Visibility::Faint, Visibility::Tiny, Visibility::Occluded][rng.below(3)]
            } else {
                Visibility::Clear
            };
            if visibility == Visibility::Tiny {
                size = Size::Small;
            }
            Object {
                shape,
                colour,
                size,
                cell,
                visibility,
            }
        })
        .collect();
    objects.sort_by_key(|o| o.cell);
    objects
}

/// Co-occurrence statistics of a set of scenes (POPE's popular and adversarial negatives are
/// drawn from these, computed on the training scenes as POPE computes them on its dataset).
#[derive(Debug, Clone, Default)]
pub struct Cooccurrence {
    /// Scenes containing each shape.
    pub frequency: [usize; 8],
    /// `pairs[a][b]`: scenes containing both `a` and `b` (a != b).
    pub pairs: [[usize; 8]; 8],
}

impl Cooccurrence {
    pub fn of<'a>(scenes: impl IntoIterator<Item = &'a Scene>) -> Self {
        let mut c = Cooccurrence::default();
        for scene in scenes {
            let shapes = scene.shapes();
            for a in &shapes {
                c.frequency[a.index()] += 1;
                for b in &shapes {
                    if a != b {
                        c.pairs[a.index()][b.index()] += 1;
                    }
                }
            }
        }
        c
    }

    /// Share of scenes with `anchor` that also contain `partner`.
    pub fn conditional(&self, anchor: Shape, partner: Shape) -> f64 {
        let n = self.frequency[anchor.index()];
        if n == 0 {
            0.0
        } else {
            self.pairs[anchor.index()][partner.index()] as f64 / n as f64
        }
    }
}

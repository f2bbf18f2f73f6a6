//! Text from scene graphs: captions and question/answer pairs in a small fixed vocabulary of
//! plain English, each carried with the atomic [`Claim`]s it makes, so that any response can
//! be checked against any scene (the faithfulness tests here, and later the "negative
//! validity" of mined negatives: is the chosen response wrong for the negative image?).

use serde::{Deserialize, Serialize};

use super::rng::Rng;
use super::scene::{Colour, Object, Prior, Scene, Shape, Size, CELL_NAMES};

/// The prompt of every description (SFT captions, description records, CHAIR captioning).
pub const DESCRIBE: &str = "Describe the image.";

/// One atomic statement about a scene.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "claim", rename_all = "snake_case")]
pub enum Claim {
    /// "there is a X" (`present`) or "there is no X".
    Exists { shape: Shape, present: bool },
    /// "the X is C" (the scene has exactly one X).
    Colour { shape: Shape, colour: Colour },
    /// "there are N Xs".
    Count { shape: Shape, count: usize },
    /// "the C X is in the P" (the scene has exactly one C X).
    Position {
        shape: Shape,
        colour: Colour,
        cell: u8,
    },
    /// "a S C X in the P": an object with all these attributes exists.
    Object {
        shape: Shape,
        colour: Colour,
        size: Size,
        cell: u8,
    },
}

impl Claim {
    /// Whether the claim is true of `scene`.
    pub fn holds(&self, scene: &Scene) -> bool {
        let with = |shape: Shape, colour: Colour| {
            scene
                .objects
                .iter()
                .filter(move |o| o.shape == shape && o.colour == colour)
        };
        match *self {
            Claim::Exists { shape, present } => scene.has(shape) == present,
            Claim::Colour { shape, colour } => {
                scene.count(shape) == 1 && with(shape, colour).count() == 1
            }
            Claim::Count { shape, count } => scene.count(shape) == count,
            Claim::Position {
                shape,
                colour,
                cell,
            } => {
                let found: Vec<&Object> = with(shape, colour).collect();
                found.len() == 1 && found[0].cell == cell
            }
            Claim::Object {
                shape,
                colour,
                size,
                cell,
            } => scene.objects.iter().any(|o| {
                o.shape == shape && o.colour == colour && o.size == size && o.cell == cell
            }),
        }
    }
}

/// What a text is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Description,
    ExistsYes,
    ExistsNo,
    Colour,
    Count,
    Position,
}

impl Kind {
    pub const QA: [Kind; 5] = [
        Kind::ExistsYes,
        Kind::ExistsNo,
        Kind::Colour,
        Kind::Count,
        Kind::Position,
    ];
}

/// A prompt and a response with the claims the response makes.
#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    pub kind: Kind,
    pub prompt: String,
    pub response: String,
    pub claims: Vec<Claim>,
}

impl Utterance {
    pub fn holds(&self, scene: &Scene) -> bool {
        self.claims.iter().all(|c| c.holds(scene))
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn number(n: usize) -> &'static str {
    [
        "no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ]
    .get(n)
    .copied()
    .unwrap_or("many")
}

fn cell_name(cell: u8) -> &'static str {
    CELL_NAMES
        .get(usize::from(cell))
        .copied()
        .unwrap_or("center")
}

/// "a large red circle in the top left".
fn object_phrase(o: &Object) -> String {
    let size = o.size.name();
    format!(
        "{} {size} {} {} in the {}",
        article(size),
        o.colour.name(),
        o.shape.name(),
        cell_name(o.cell)
    )
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// "A large red circle in the top left, a small blue square in the center and a small green
/// triangle in the bottom middle." — every object, hidden ones included, in cell order.
pub fn describe(objects: &[Object]) -> Utterance {
    let phrases: Vec<String> = objects.iter().map(object_phrase).collect();
    let text = match phrases.split_last() {
        None => "An empty picture".to_owned(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    };
    Utterance {
        kind: Kind::Description,
        prompt: DESCRIBE.to_owned(),
        response: format!("{}.", capitalise(&text)),
        claims: objects
            .iter()
            .map(|o| Claim::Object {
                shape: o.shape,
                colour: o.colour,
                size: o.size,
                cell: o.cell,
            })
            .collect(),
    }
}

pub fn exists_question(shape: Shape) -> String {
    format!(
        "Is there {} {} in the image?",
        article(shape.name()),
        shape.name()
    )
}

/// "Is there a X in the image?" answered yes or no.
pub fn exists(shape: Shape, present: bool) -> Utterance {
    let name = shape.name();
    let (kind, response) = if present {
        (
            Kind::ExistsYes,
            format!("Yes, there is {} {name}.", article(name)),
        )
    } else {
        (Kind::ExistsNo, format!("No, there is no {name}."))
    };
    Utterance {
        kind,
        prompt: exists_question(shape),
        response,
        claims: vec![Claim::Exists { shape, present }],
    }
}

fn colour(shape: Shape, colour: Colour) -> Utterance {
    Utterance {
        kind: Kind::Colour,
        prompt: format!("What colour is the {}?", shape.name()),
        response: format!("The {} is {}.", shape.name(), colour.name()),
        claims: vec![Claim::Colour { shape, colour }],
    }
}

fn count(shape: Shape, n: usize) -> Utterance {
    let response = if n == 1 {
        format!("There is one {}.", shape.name())
    } else {
        format!("There are {} {}.", number(n), shape.plural())
    };
    Utterance {
        kind: Kind::Count,
        prompt: format!("How many {} are there?", shape.plural()),
        response,
        claims: vec![Claim::Count { shape, count: n }],
    }
}

fn position(shape: Shape, colour: Colour, cell: u8) -> Utterance {
    let thing = format!("{} {}", colour.name(), shape.name());
    Utterance {
        kind: Kind::Position,
        prompt: format!("Where is the {thing}?"),
        response: format!("The {thing} is in the {}.", cell_name(cell)),
        claims: vec![Claim::Position {
            shape,
            colour,
            cell,
        }],
    }
}

/// An absent shape to ask or hallucinate about: with probability `prefer_partner`, the
/// missing partner of an anchor in the scene (the prior's hallucination), else any absent one.
pub fn absent_shape(scene: &Scene, prefer_partner: f64, rng: &mut Rng) -> Option<Shape> {
    let absent = scene.absent();
    let partners: Vec<Shape> = scene
        .shapes()
        .into_iter()
        .filter_map(Prior::partner)
        .filter(|p| !scene.has(*p))
        .collect();
    if !partners.is_empty() && rng.chance(prefer_partner) {
        return rng.pick(&partners).copied();
    }
    rng.pick(&absent).copied()
}

/// A faithful question/answer of `kind` about `scene`, or `None` when the scene offers no
/// subject for it (a colour question needs a shape present exactly once, a position question
/// an object unique by colour and shape).
pub fn question(scene: &Scene, kind: Kind, rng: &mut Rng) -> Option<Utterance> {
    let shapes = scene.shapes();
    match kind {
        Kind::Description => Some(describe(&scene.objects)),
        Kind::ExistsYes => rng.pick(&shapes).map(|s| exists(*s, true)),
        Kind::ExistsNo => absent_shape(scene, 0.5, rng).map(|s| exists(s, false)),
        Kind::Colour => {
            let single: Vec<&Object> = scene
                .objects
                .iter()
                .filter(|o| scene.count(o.shape) == 1)
                .collect();
            rng.pick(&single).map(|o| colour(o.shape, o.colour))
        }
        Kind::Count => {
            // Mostly shapes that are there; sometimes one that is not ("There are no stars.").
            let shape = if rng.chance(0.8) {
                *rng.pick(&shapes)?
            } else {
                absent_shape(scene, 0.5, rng)?
            };
            Some(count(shape, scene.count(shape)))
        }
        Kind::Position => {
            let unique: Vec<&Object> = scene
                .objects
                .iter()
                .filter(|o| {
                    scene
                        .objects
                        .iter()
                        .filter(|p| p.shape == o.shape && p.colour == o.colour)
                        .count()
                        == 1
                })
                .collect();
            rng.pick(&unique)
                .map(|o| position(o.shape, o.colour, o.cell))
        }
    }
}

/// The rejected twin of a faithful `chosen` utterance: the same answer with one hallucinated
/// object or attribute (RLHF-V's correction pairs, reversed).
///
/// - description: an absent object added (the missing partner of a present anchor when there
///   is one — the prior's own hallucination — else any absent shape), or one object's colour
///   or shape changed to one the scene does not have there;
/// - "no, there is no X" -> "yes, there is a X";
/// - "yes, there is a X" -> "no, there is no X": the mirror error, kept so that the preference
///   data does not teach "always answer no" (WORLD-NOTES 2);
/// - colour, count, position: another colour, count or cell.
pub fn hallucinate(scene: &Scene, chosen: &Utterance, rng: &mut Rng) -> Option<Utterance> {
    let other_colour = |c: Colour, rng: &mut Rng| {
        let others: Vec<Colour> = Colour::ALL.into_iter().filter(|x| *x != c).collect();
        *rng.pick(&others).unwrap_or(&c)
    };
    let claim = chosen.claims.first()?;
    let wrong = match (chosen.kind, claim) {
        (Kind::Description, _) => hallucinate_description(scene, rng)?,
        (_, Claim::Exists { shape, present }) => exists(*shape, !present),
        (_, Claim::Colour { shape, colour: c }) => colour(*shape, other_colour(*c, rng)),
        (_, Claim::Count { shape, count: n }) => {
            let m = if *n == 0 || rng.chance(0.5) {
                n + 1
            } else {
                n - 1
            };
            count(*shape, m)
        }
        (
            _,
            Claim::Position {
                shape,
                colour,
                cell,
            },
        ) => {
            let others: Vec<u8> = (0..9u8).filter(|c| c != cell).collect();
            position(*shape, *colour, *rng.pick(&others)?)
        }
        (_, Claim::Object { .. }) => return None,
    };
    Some(Utterance {
        kind: chosen.kind,
        prompt: chosen.prompt.clone(),
        ..wrong
    })
}

fn hallucinate_description(scene: &Scene, rng: &mut Rng) -> Option<Utterance> {
    let mut objects = scene.objects.clone();
    let free: Vec<u8> = (0..9u8)
        .filter(|c| !objects.iter().any(|o| o.cell == *c))
        .collect();
    let roll = rng.unit();
    if roll < 0.5 && !free.is_empty() {
        let shape = absent_shape(scene, 0.8, rng)?;
        objects.push(Object {
            shape,
            colour: Colour::ALL[rng.below(Colour::ALL.len())],
            size: if rng.chance(0.5) {
                Size::Small
            } else {
                Size::Large
            },
            cell: *rng.pick(&free)?,
            visibility: super::scene::Visibility::Clear,
        });
        objects.sort_by_key(|o| o.cell);
    } else {
        let i = rng.below(objects.len());
        let target = objects.get_mut(i)?;
        if roll < 0.75 {
            let others: Vec<Colour> = Colour::ALL
                .into_iter()
                .filter(|c| *c != target.colour)
                .collect();
            target.colour = *rng.pick(&others)?;
        } else {
            target.shape = *rng.pick(&scene.absent())?;
        }
    }
    Some(describe(&objects))
}

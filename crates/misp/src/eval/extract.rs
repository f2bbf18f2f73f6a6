//! Answer extraction shared by the yes/no and multiple-choice benchmarks (HallusionBench,
//! AMBER's discriminative part, MMVP): what a free-form reply says, or that it says nothing
//! usable.
//!
//! - [`yes_no`]: VLMEvalKit's exact-matching mode (`YOrN_Extraction` in
//!   `vlmeval/dataset/utils/yorn.py`): lower-case, the VQA punctuation pass
//!   (`process_punctuation`), split on whitespace; "yes" when the words hold `yes` and not `no`,
//!   "no" for the reverse, else unknown (both or neither).
//! - [`option`]: the option a reply picks among lettered choices, after VLMEvalKit's
//!   `can_infer` (`vlmeval/utils/matching_util.py`): a letter named alone, else the one option
//!   whose text the reply contains.

use serde::{Deserialize, Serialize};

/// A yes/no reply as extracted; `Unknown` counts as wrong and is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum YesNo {
    Yes,
    No,
    Unknown,
}

impl YesNo {
    pub fn as_str(self) -> &'static str {
        match self {
            YesNo::Yes => "yes",
            YesNo::No => "no",
            YesNo::Unknown => "unknown",
        }
    }

    /// `Some(true)` for yes, `Some(false)` for no.
    pub fn as_bool(self) -> Option<bool> {
        match self {
            YesNo::Yes => Some(true),
            YesNo::No => Some(false),
            YesNo::Unknown => None,
        }
    }
}

/// The characters the VQA punctuation pass removes or turns into spaces.
const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// The VQA evaluation's `process_punctuation`, quirks included: each mark is deleted when the
/// original text has it next to a space (or the text has a digit-comma-digit anywhere), else
/// replaced by a space; then periods not followed by a digit are deleted, at most 32 of them
/// (the reference passes `re.UNICODE`, 32, where `re.sub` takes its count).
pub fn process_punctuation(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let digit_comma_digit = chars
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == ',' && w[2].is_ascii_digit());
    let mut out = text.to_string();
    for p in PUNCT {
        let spaced = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        let with = if spaced || digit_comma_digit { "" } else { " " };
        out = out.replace(p, with);
    }
    let chars: Vec<char> = out.chars().collect();
    let mut result = String::with_capacity(out.len());
    let mut removed = 0;
    for (i, &c) in chars.iter().enumerate() {
        let next_digit = chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if c == '.' && !next_digit && removed < 32 {
            removed += 1;
            continue;
        }
        result.push(c);
    }
    result
}

/// VLMEvalKit's `YOrN_Extraction`: exactly one of the words `yes` / `no` decides.
pub fn yes_no(reply: &str) -> YesNo {
    let lower = reply.to_lowercase();
    let processed = process_punctuation(&lower);
    let (mut yes, mut no) = (false, false);
    for w in processed.split_whitespace() {
        yes |= w == "yes";
        no |= w == "no";
    }
    match (yes, no) {
        (true, false) => YesNo::Yes,
        (false, true) => YesNo::No,
        _ => YesNo::Unknown,
    }
}

/// The option `reply` picks among `options` (`(letter, text)`, letters lower-case), or `None`.
///
/// 1. Letters: `.()[],:;!*#{}` become spaces and the reply splits on whitespace; a word that is
///    an option's letter (either case) names it. Exactly one named letter decides. A lone `a`
///    is an English article, so lower-case `a` counts only when the reply is that one word or
///    the letter was written in parentheses, `(a)`.
/// 2. Otherwise the option texts: when the lower-cased reply is at most twice as long as all
///    option texts together and contains exactly one of them, that one.
pub fn option(reply: &str, options: &[(char, String)]) -> Option<char> {
    let spaced: String = reply
        .chars()
        .map(|c| if ".()[],:;!*#{}".contains(c) { ' ' } else { c })
        .collect();
    let words: Vec<&str> = spaced.split_whitespace().collect();
    let lower_reply = reply.to_lowercase();
    let named: Vec<char> = options
        .iter()
        .map(|(l, _)| *l)
        .filter(|l| {
            let upper = l.to_ascii_uppercase().to_string();
            let lower = l.to_string();
            words.iter().any(|w| {
                *w == upper
                    || (*w == lower
                        && (*l != 'a' || words.len() == 1 || lower_reply.contains("(a)")))
            })
        })
        .collect();
    if named.len() == 1 {
        return Some(named[0]);
    }
    let total: usize = options.iter().map(|(_, t)| t.chars().count()).sum();
    if lower_reply.chars().count() > 2 * total {
        return None;
    }
    let hits: Vec<char> = options
        .iter()
        .filter(|(_, t)| {
            let t = t.trim().to_lowercase();
            !t.is_empty() && lower_reply.contains(&t)
        })
        .map(|(l, _)| *l)
        .collect();
    (hits.len() == 1).then(|| hits[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctuation_pass_keeps_its_quirks() {
        assert_eq!(process_punctuation("yes, it is"), "yes it is");
        assert_eq!(process_punctuation("yes,no"), "yes no");
        assert_eq!(process_punctuation("1,000 or yes,no"), "1000 or yesno");
        assert_eq!(process_punctuation("yes.no 3.5"), "yesno 3.5");
        let many = ".".repeat(40);
        assert_eq!(process_punctuation(&many), ".".repeat(8));
    }

    #[test]
    fn yes_no_needs_exactly_one_of_them() {
        assert_eq!(yes_no("Yes"), YesNo::Yes);
        assert_eq!(yes_no("No, it is not."), YesNo::No);
        assert_eq!(yes_no("Yes. No."), YesNo::Unknown);
        assert_eq!(yes_no("I cannot tell"), YesNo::Unknown);
        assert_eq!(yes_no("Nope"), YesNo::Unknown);
        assert_eq!(yes_no("yes,no"), YesNo::Unknown);
        assert_eq!(yes_no("YES!"), YesNo::Yes);
        assert_eq!(yes_no(""), YesNo::Unknown);
    }

    #[test]
    fn options_from_letters_or_text() {
        let opts = vec![('a', "Open".to_string()), ('b', "Closed".to_string())];
        assert_eq!(option("(a)", &opts), Some('a'));
        assert_eq!(option("(b) Closed", &opts), Some('b'));
        assert_eq!(option("B", &opts), Some('b'));
        assert_eq!(option("a", &opts), Some('a'));
        assert_eq!(option("The door is closed.", &opts), Some('b'));
        assert_eq!(option("a door", &opts), None, "an article is not a letter");
        assert_eq!(option("(a) or (b)", &opts), None);
        assert_eq!(option("open or closed", &opts), None);
        assert_eq!(option("", &opts), None);
        let long = format!("{} closed", "word ".repeat(10));
        assert_eq!(option(&long, &opts), None, "too long for a text match");
    }
}

//! The explanation in a teacher completion: the text of the tokens generated after the
//! opening explanation tag and its padding, up to the closing tag, less exactly the layout's
//! padding before that tag ([`crate::data::explanation_of`], the one definition RL, `score`,
//! bench-effect and distillation share). Everything else the teacher wrote, trailing spaces
//! and blank lines included, is its explanation and reaches the student as written.
//!
//! The tag is found in the decoded text, not by its ids: a real byte-level BPE (Qwen2's
//! pre-tokenizer glues punctuation to a following `<|`) spells `.<|end_of_explanation|>`
//! with a token that holds both the `.` and the tag's start.
use anyhow::Result;

use crate::data::explanation_of;
use crate::model::tokenizer::Tokenizer;

/// The explanation inside a teacher completion. `well_formed` is false when the closing tag
/// never came (e.g. the token limit cut the explanation); then the whole completion up to any
/// stop token counts as the explanation, as the reference does after appending the missing tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCompletion {
    pub text: String,
    pub well_formed: bool,
}

/// The explanation of `completion` (sampled ids, cut at the first of `stop_tokens`).
pub fn parse_completion(
    completion: &[i64],
    tok: &Tokenizer,
    stop_tokens: &[i64],
) -> Result<ParsedCompletion> {
    let body_len = completion
        .iter()
        .position(|t| stop_tokens.contains(t))
        .unwrap_or(completion.len());
    let text = tok.decode(&completion[..body_len])?;
    let (explanation, well_formed) = explanation_of(&text);
    Ok(ParsedCompletion {
        text: explanation.to_string(),
        well_formed,
    })
}

/// First position of `needle` in `hay`.
pub fn find_subsequence(hay: &[i64], needle: &[i64]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_parsing_finds_the_closing_tag_or_flags_the_format() {
        let tok = Tokenizer::tiny();
        let ids = |s: &str| tok.encode(s).unwrap();
        let stop = tok.eos_ids().to_vec();
        let parse = |s: &str| parse_completion(&ids(s), &tok, &stop).unwrap();
        let text = |s: &str, w: bool| ParsedCompletion {
            text: s.into(),
            well_formed: w,
        };

        // Only the layout's padding goes; what the teacher wrote stays.
        assert_eq!(
            parse("ab.\n\n<|end_of_explanation|><|im_end|>"),
            text("ab.", true)
        );
        assert_eq!(
            parse("ab. \n\n<|end_of_explanation|><|im_end|>"),
            text("ab. ", true)
        );
        assert_eq!(
            parse("ab\n\n\n\n<|end_of_explanation|>"),
            text("ab\n\n", true)
        );
        assert_eq!(
            parse("ab<|end_of_explanation|> more<|im_end|>"),
            text("ab", true)
        );
        // Cut by the token limit: everything before the end of turn, flagged.
        assert_eq!(
            parse("ab <|end_of<|im_end|><|endoftext|>"),
            text("ab <|end_of", false)
        );
        assert_eq!(parse("ab"), text("ab", false));
    }
}

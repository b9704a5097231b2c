//! Finding the explanation in a teacher completion (the tokens generated after the opening
//! explanation tag and its padding).
//!
//! The closing tag is found in the decoded text, not by searching for the ids the tag has on its
//! own: a real byte-level BPE (Qwen2's pre-tokenizer glues punctuation to a following `<|`)
//! spells `.<|end_of_explanation|>` with a token that holds both the `.` and the tag's start,
//! so the standalone ids never occur although the explanation is well closed. The explanation
//! is then the longest run of sampled tokens whose text lies before the tag (trailing blank
//! lines dropped: the student chat pads the thought itself), plus the re-tokenized rest of the
//! text before the tag when a token straddles it.
use anyhow::Result;

use crate::tokenizer::{Tokenizer, END_OF_EXPLANATION};

/// The explanation inside a teacher completion. `well_formed` is false when the closing tag
/// never came (e.g. the token limit cut the explanation); then the whole completion up to any
/// stop token counts as the explanation, as the reference does after appending the missing tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCompletion {
    /// The explanation's ids in the student's chat.
    pub explanation: Vec<i64>,
    /// How many leading ids of `explanation` are the teacher's own sampled ids (the rest
    /// re-tokenize the text of a token that straddled the closing tag): the KL term compares
    /// teacher and student on these.
    pub shared: usize,
    pub well_formed: bool,
}

/// Splits `completion` at its closing explanation tag. `end_tag` is the tag's standalone ids
/// (a fast path when they do occur); `stop_tokens` end the turn.
pub fn parse_completion(
    completion: &[i64],
    tok: &Tokenizer,
    end_tag: &[i64],
    stop_tokens: &[i64],
) -> Result<ParsedCompletion> {
    let body_len = completion
        .iter()
        .position(|t| stop_tokens.contains(t))
        .unwrap_or(completion.len());
    let body = &completion[..body_len];
    let malformed = ParsedCompletion {
        explanation: body.to_vec(),
        shared: body.len(),
        well_formed: false,
    };
    let decode = |k: usize| tok.decode(&body[..k]);
    let text = decode(body.len())?;
    let Some(tag_at) = text.find(END_OF_EXPLANATION) else {
        return Ok(malformed);
    };
    // The fewest leading tokens whose text holds the whole tag (a prefix that holds it holds
    // it in every longer prefix, so bisection finds it).
    let through_tag = match find_subsequence(body, end_tag) {
        Some(at) => at + end_tag.len(),
        None => {
            let (mut lo, mut hi) = (0, body.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if decode(mid)?.contains(END_OF_EXPLANATION) {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            lo
        }
    };
    let before = text[..tag_at].trim_end();
    // Back from there, the longest prefix whose text the explanation starts with: a few
    // decodes (the tag's tokens and the padding before it).
    for k in (0..=through_tag).rev() {
        let prefix = decode(k)?;
        if let Some(rest) = before.strip_prefix(prefix.as_str()) {
            let mut explanation = body[..k].to_vec();
            if !rest.is_empty() {
                explanation.extend(tok.encode(rest)?);
            }
            return Ok(ParsedCompletion {
                explanation,
                shared: k,
                well_formed: true,
            });
        }
    }
    Ok(malformed)
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
        let end = ids(END_OF_EXPLANATION);
        let stop = tok.eos_ids().to_vec();
        let parse = |s: &str| parse_completion(&ids(s), &tok, &end, &stop).unwrap();

        let p = parse("ab.\n\n<|end_of_explanation|><|im_end|>");
        assert_eq!(
            (p.explanation, p.shared, p.well_formed),
            (ids("ab."), 3, true)
        );
        let p = parse("ab<|end_of_explanation|> more<|im_end|>");
        assert_eq!((p.explanation, p.well_formed), (ids("ab"), true));
        // Cut by the token limit: everything before the end of turn, flagged.
        let p = parse("ab <|end_of<|im_end|><|endoftext|>");
        assert_eq!((p.explanation, p.well_formed), (ids("ab <|end_of"), false));
        let p = parse("ab");
        assert_eq!(
            (p.explanation, p.shared, p.well_formed),
            (ids("ab"), 2, false)
        );
    }
}

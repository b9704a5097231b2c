//! Pulling the final answer out of a model's completion.
//!
//! Math answers are the content of the *last* `\boxed{...}` (or `\fbox{...}`), with nested
//! braces matched, because reasoning models often box intermediate results before the final
//! one. Multiple-choice answers are a letter, read from the box or, failing that, from an
//! explicit "answer is (X)" / "Answer: X" statement.

use super::normalize::split_group;
use crate::model::tokenizer::{BEGIN_OF_SOLUTION, END_OF_SOLUTION};

/// The content of the last `\boxed{...}` / `\fbox{...}` in `text`, braces matched.
///
/// `\boxed 5` (the brace-less TeX form) yields the token after the space. Returns `None` when
/// there is no box or the last box is never closed (a completion cut off by the token limit
/// must not be scored on a half-written answer).
pub fn last_boxed(text: &str) -> Option<String> {
    let start = ["\\boxed", "\\fbox"]
        .iter()
        .filter_map(|cmd| text.rfind(cmd).map(|i| (i, i + cmd.len())))
        .max_by_key(|(i, _)| *i)?;
    let rest = &text[start.1..];
    let trimmed = rest.trim_start();
    if let Some(body) = trimmed.strip_prefix('{') {
        split_group(body).map(|(content, _)| content.trim().to_string())
    } else if rest.starts_with(char::is_whitespace) {
        // `\boxed 5$`: the argument is the next token.
        let token: String = trimmed
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '$')
            .collect();
        (!token.is_empty()).then_some(token)
    } else {
        // `\boxedfoo` is some other macro, not a box: look further back.
        last_boxed(&text[..start.0])
    }
}

/// The text of the solution section (`<|begin_of_solution|>...<|end_of_solution|>`, the
/// student format), the answer of a completion that boxed nothing (the synthetic task's
/// solutions are bare numbers). `None` when the section is missing or never closed.
pub fn solution_section(text: &str) -> Option<String> {
    let start = text.rfind(BEGIN_OF_SOLUTION)? + BEGIN_OF_SOLUTION.len();
    let end = text[start..].find(END_OF_SOLUTION)? + start;
    Some(text[start..end].trim().to_string())
}

/// The chosen letter (`A`..=`last`) of a multiple-choice completion.
pub fn choice_letter(text: &str, last: char) -> Option<char> {
    if let Some(boxed) = last_boxed(text) {
        return leading_letter(&boxed, last);
    }
    // No box: accept an explicit statement, the last one wins.
    let lower = text.to_lowercase();
    let mut found = None;
    for marker in ["answer is", "answer:"] {
        for (i, _) in lower.match_indices(marker) {
            let after = &text[i + marker.len()..];
            if let Some(letter) = leading_letter(after, last) {
                if found.is_none_or(|(j, _)| i > j) {
                    found = Some((i, letter));
                }
            }
        }
    }
    found.map(|(_, letter)| letter)
}

/// A letter standing alone at the start of `s`, after wrappers such as spaces, `(`, `\text{`,
/// `**`: `B`, `(B)`, `\text{B}`, `B) 42`, `B. 42` all give `B`; `Because` gives nothing.
fn leading_letter(s: &str, last: char) -> Option<char> {
    let s = s.trim_start();
    let s = s
        .strip_prefix("\\text{")
        .or_else(|| s.strip_prefix("\\textbf{"))
        .unwrap_or(s);
    let s = s.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '(' | '[' | '*' | '$'));
    let mut chars = s.chars();
    let letter = chars.next()?.to_ascii_uppercase();
    let standalone = chars.next().is_none_or(|c| !c.is_alphanumeric());
    (('A'..=last).contains(&letter) && standalone).then_some(letter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_takes_the_last_box_with_nested_braces() {
        assert_eq!(last_boxed("so \\boxed{42}.").as_deref(), Some("42"));
        assert_eq!(
            last_boxed("\\boxed{1} then \\boxed{2}").as_deref(),
            Some("2")
        );
        assert_eq!(
            last_boxed("$\\boxed{\\frac{\\sqrt{3}}{2}}$").as_deref(),
            Some("\\frac{\\sqrt{3}}{2}")
        );
        assert_eq!(
            last_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}").as_deref(),
            Some("\\left( 3, \\frac{\\pi}{2} \\right)")
        );
        assert_eq!(last_boxed("\\fbox{7}").as_deref(), Some("7"));
        assert_eq!(last_boxed("\\boxed { 7 }").as_deref(), Some("7"));
        assert_eq!(last_boxed("is $\\boxed 5$.").as_deref(), Some("5"));
    }

    #[test]
    fn boxed_rejects_missing_or_unclosed_boxes() {
        assert_eq!(last_boxed("the answer is 42"), None);
        assert_eq!(last_boxed("\\boxed{\\frac{1}{2}"), None);
        assert_eq!(last_boxed("\\boxed{"), None);
        // A macro that merely starts with "boxed" is not a box; the earlier real one counts.
        assert_eq!(last_boxed("\\boxed{3} \\boxedsymbol").as_deref(), Some("3"));
    }

    #[test]
    fn solution_section_is_the_last_closed_one() {
        let t = "<|begin_of_thought|>x<|end_of_thought|><|begin_of_solution|>\n\n 18 \n\n<|end_of_solution|>";
        assert_eq!(solution_section(t).as_deref(), Some("18"));
        assert_eq!(solution_section("<|begin_of_solution|> 18"), None);
        assert_eq!(solution_section("no tags"), None);
    }

    #[test]
    fn choice_letter_reads_boxes_and_statements() {
        assert_eq!(choice_letter("thus \\boxed{B}", 'D'), Some('B'));
        assert_eq!(choice_letter("thus \\boxed{(c)}", 'D'), Some('C'));
        assert_eq!(choice_letter("thus \\boxed{\\text{D}}", 'D'), Some('D'));
        assert_eq!(choice_letter("\\boxed{A) 3.2 eV}", 'D'), Some('A'));
        assert_eq!(choice_letter("The answer is (B).", 'D'), Some('B'));
        assert_eq!(
            choice_letter("Answer: A ... wait, the answer is C", 'D'),
            Some('C')
        );
        assert_eq!(choice_letter("**Answer:** **D**", 'D'), Some('D'));
    }

    #[test]
    fn choice_letter_rejects_words_and_out_of_range_letters() {
        assert_eq!(choice_letter("\\boxed{E}", 'D'), None);
        assert_eq!(choice_letter("\\boxed{Because}", 'D'), None);
        assert_eq!(choice_letter("the answer is clear", 'D'), None);
        assert_eq!(choice_letter("no answer here", 'D'), None);
    }
}

//! Deciding whether two math answers are the same answer written differently.
//!
//! Benchmarks such as MATH-500 and AIME state one gold string (`\frac{1}{2}`, `5`,
//! `\text{(C)}`, `30^\circ`); a model may write `0.5`, `5.0`, `x = 5`, `30 degrees`. Both sides
//! go through [`normalize`], which strips presentation (TeX spacing, `\left`/`\right`, `\text`,
//! units, degree signs, dollar/percent signs, a leading `x =`) and rewrites every number as an
//! exact reduced fraction, so `0.5`, `1/2`, `\dfrac12` and `\frac{2}{4}` all become `1/2`.
//! Numbers are compared exactly (i128 rationals), never with a float tolerance, so `0.333` is
//! not `1/3`. An unbracketed list (`1, -2`: the solutions of an equation) matches in any order;
//! a bracketed one (a point, an interval) only in order.

use super::extract::last_boxed;

/// Whether `predicted` and `gold` are equivalent math answers.
pub fn answers_match(predicted: &str, gold: &str) -> bool {
    let (p, g) = (normalize(predicted), normalize(gold));
    if p.is_empty() || g.is_empty() {
        return false;
    }
    if p == g {
        return true;
    }
    // Solutions listed without brackets are a set: compare sorted.
    match (unbracketed_list(&p), unbracketed_list(&g)) {
        (Some(mut a), Some(mut b)) if a.len() == b.len() => {
            a.sort_unstable();
            b.sort_unstable();
            a == b
        }
        _ => false,
    }
}

/// The canonical form of a math answer (see the module docs). Equal outputs mean equal answers.
pub fn normalize(answer: &str) -> String {
    let mut s = answer.trim().to_string();
    // A gold answer or a prediction may still carry its box.
    if s.contains("\\boxed") || s.contains("\\fbox") {
        if let Some(inner) = last_boxed(&s) {
            s = inner;
        }
    }
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\displaystyle", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("\\degree", ""),
        ("°", ""),
        ("{,}", ","),
        ("\\qquad", " "),
        ("\\quad", " "),
        ("\\!", ""),
        ("\\,", " "),
        ("\\;", " "),
        ("\\:", " "),
        ("\\ ", " "),
        ("~", " "),
    ] {
        s = s.replace(from, to);
    }
    s = remove_sizing(&s);
    for cmd in [
        "\\text",
        "\\textbf",
        "\\textnormal",
        "\\mathrm",
        "\\mathbf",
        "\\mbox",
    ] {
        s = unwrap_command(&s, cmd);
    }
    s = strip_units(&s);
    s = strip_variable_prefix(&s);
    s.retain(|c| !c.is_whitespace());
    let s = s.trim_end_matches('.');
    let s = brace_single_arguments(s);
    let s = unbrace_single_scripts(&s);
    let s = canonical_elements(&s);
    if s.len() > 1 && s.chars().all(|c| c.is_ascii_alphabetic()) {
        // A word answer ("Evelyn", "even"): case is presentation.
        return s.to_ascii_lowercase();
    }
    s
}

/// Drops `\left` and `\right` (and `\big` and friends) in front of delimiters.
fn remove_sizing(s: &str) -> String {
    let mut out = s.to_string();
    for cmd in [
        "\\left", "\\right", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\big", "\\Big",
    ] {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(cmd) {
            let after = &rest[i + cmd.len()..];
            result.push_str(&rest[..i]);
            // `\rightarrow` is a different command: keep it.
            if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
                result.push_str(cmd);
            }
            rest = after;
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// `\text{abc}` -> `abc`, braces matched; other commands sharing the prefix are kept.
fn unwrap_command(s: &str, cmd: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(cmd) {
        out.push_str(&rest[..i]);
        let after = &rest[i + cmd.len()..];
        match after.strip_prefix('{').and_then(|body| split_group(body)) {
            Some((inner, tail)) => {
                out.push_str(&unwrap_command(inner, cmd));
                rest = tail;
            }
            None => {
                out.push_str(cmd);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Splits `body` (just after an opening `{`) into the group's content and what follows its
/// matching `}`.
pub(super) fn split_group(body: &str) -> Option<(&str, &str)> {
    let mut depth = 1usize;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&body[..i], &body[i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// Unit words that may trail a numeric answer. Single letters (`m`, `g`) only count after a
/// space, so that `2m` stays an algebraic answer.
const UNITS: &[&str] = &[
    "cm",
    "mm",
    "km",
    "m",
    "in",
    "inch",
    "inches",
    "ft",
    "foot",
    "feet",
    "yd",
    "yard",
    "yards",
    "mile",
    "miles",
    "meter",
    "meters",
    "metre",
    "metres",
    "centimeter",
    "centimeters",
    "kilometer",
    "kilometers",
    "unit",
    "units",
    "square",
    "sq",
    "cubic",
    "degree",
    "degrees",
    "radian",
    "radians",
    "dollar",
    "dollars",
    "cent",
    "cents",
    "second",
    "seconds",
    "sec",
    "minute",
    "minutes",
    "min",
    "hour",
    "hours",
    "hr",
    "day",
    "days",
    "week",
    "weeks",
    "year",
    "years",
    "mph",
    "kg",
    "g",
    "gram",
    "grams",
    "lb",
    "lbs",
    "pound",
    "pounds",
    "ounce",
    "ounces",
    "oz",
    "liter",
    "liters",
    "litre",
    "litres",
    "ml",
    "percent",
    "people",
    "ways",
    "points",
    "students",
];

/// `12 square feet` -> `12`, `5 cm^2` -> `5`: trailing unit words after a number go.
fn strip_units(s: &str) -> String {
    let mut s = s.trim_end().to_string();
    loop {
        let body = s
            .trim_end_matches(['2', '3', '^', '{', '}'])
            .trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let word_start = body.len();
        // The exponent of `cm^2` must follow a word, not a number.
        let word_end = s[word_start..]
            .find(|c: char| !c.is_ascii_alphabetic())
            .map_or(s.len(), |i| word_start + i);
        let word = &s[word_start..word_end];
        let exponent = &s[word_end..];
        let exponent_ok = matches!(exponent, "" | "^2" | "^3" | "^{2}" | "^{3}");
        let before = &s[..word_start];
        let spaced = before.ends_with(char::is_whitespace);
        let known = UNITS.contains(&word.to_ascii_lowercase().as_str());
        let remaining = before.trim_end();
        let after_number = remaining
            .ends_with(|c: char| c.is_ascii_digit() || c == '}' || c == ')')
            || UNITS
                .iter()
                .any(|u| remaining.to_ascii_lowercase().ends_with(u));
        if word.is_empty()
            || !exponent_ok
            || !known
            || !after_number
            || (word.len() == 1 && !spaced)
        {
            return s;
        }
        s = remaining.to_string();
    }
}

/// `x = 5` -> `5`, `\theta = 30` -> `30`: one named quantity on the left of the only `=`.
fn strip_variable_prefix(s: &str) -> String {
    let Some((lhs, rhs)) = s.split_once('=') else {
        return s.to_string();
    };
    if rhs.contains('=') {
        return s.to_string();
    }
    let lhs = lhs.trim();
    let name = lhs.strip_prefix('\\').unwrap_or(lhs);
    let name = name.split_once('_').map_or(name, |(base, _)| base);
    let is_name = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphabetic())
        && (name.len() == 1 || lhs.starts_with('\\'));
    if is_name && !rhs.trim().is_empty() {
        rhs.trim().to_string()
    } else {
        s.to_string()
    }
}

/// `\frac12` -> `\frac{1}{2}`, `\sqrt3` -> `\sqrt{3}`: TeX's brace-less single-token arguments.
fn brace_single_arguments(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut rest = s;
    loop {
        let next = [("\\frac", 2), ("\\sqrt", 1)]
            .into_iter()
            .filter_map(|(cmd, n)| rest.find(cmd).map(|i| (i, cmd, n)))
            .min_by_key(|(i, _, _)| *i);
        let Some((i, cmd, n_args)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..i]);
        out.push_str(cmd);
        rest = &rest[i + cmd.len()..];
        if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue; // some longer command, e.g. `\sqrtsign`
        }
        for _ in 0..n_args {
            if let Some(body) = rest.strip_prefix('{') {
                match split_group(body) {
                    Some((inner, tail)) => {
                        out.push('{');
                        out.push_str(&brace_single_arguments(inner));
                        out.push('}');
                        rest = tail;
                    }
                    None => break,
                }
            } else if rest.starts_with('[') {
                break; // `\sqrt[3]{x}`: leave as written
            } else if let Some(c) = rest.chars().next() {
                // The token is one character, or a whole command such as `\pi`.
                let len = if c == '\\' {
                    1 + rest[1..]
                        .find(|c: char| !c.is_ascii_alphabetic())
                        .unwrap_or(rest.len() - 1)
                } else {
                    c.len_utf8()
                };
                out.push('{');
                out.push_str(&rest[..len]);
                out.push('}');
                rest = &rest[len..];
            }
        }
    }
}

/// `x^{2}` -> `x^2`, `a_{1}` -> `a_1`.
fn unbrace_single_scripts(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if (c == '^' || c == '_')
            && chars.get(i + 1) == Some(&'{')
            && chars.get(i + 3) == Some(&'}')
        {
            out.push(c);
            out.push(chars[i + 2]);
            i += 4;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Rewrites the whole answer, or each element of a comma list (bracketed or not), as an exact
/// fraction when it is a number.
fn canonical_elements(s: &str) -> String {
    if let Some(number) = canonical_number(s) {
        return number;
    }
    let (open, inner, close) = split_brackets(s);
    let parts = split_top_level_commas(inner);
    if parts.len() < 2 {
        return s.to_string();
    }
    let parts: Vec<String> = parts
        .iter()
        .map(|p| canonical_number(p).unwrap_or_else(|| p.to_string()))
        .collect();
    format!("{open}{}{close}", parts.join(","))
}

/// Splits an outer pair of brackets (`(..)`, `[..)`, `\{..\}`, ...) off `s`, if it has one.
fn split_brackets(s: &str) -> (&str, &str, &str) {
    for (open, closes) in [
        ("\\{", &["\\}"][..]),
        ("(", &[")", "]"]),
        ("[", &["]", ")"]),
    ] {
        if let Some(rest) = s.strip_prefix(open) {
            for close in closes {
                if let Some(inner) = rest.strip_suffix(close) {
                    return (open, inner, close);
                }
            }
        }
    }
    ("", s, "")
}

/// The elements of a comma list with no outer brackets, or `None`.
fn unbracketed_list(s: &str) -> Option<Vec<&str>> {
    let (open, _, _) = split_brackets(s);
    let parts = split_top_level_commas(s);
    (open.is_empty() && parts.len() > 1).then_some(parts)
}

/// Splits on commas outside any brackets or braces.
fn split_top_level_commas(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// `"0.50"` -> `"1/2"`, `"1,000"` -> `"1000"`, `"-\frac{6}{4}"` -> `"-3/2"`.
fn canonical_number(s: &str) -> Option<String> {
    parse_rational(s).map(|r| r.to_string())
}

/// An exact fraction, reduced, with a positive denominator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rational {
    num: i128,
    den: i128,
}

impl Rational {
    fn new(num: i128, den: i128) -> Option<Rational> {
        if den == 0 {
            return None;
        }
        let g = gcd(num.unsigned_abs(), den.unsigned_abs()).max(1) as i128;
        let sign = if den < 0 { -1 } else { 1 };
        Some(Rational {
            num: sign * num / g,
            den: sign * den / g,
        })
    }
    fn div(self, other: Rational) -> Option<Rational> {
        Rational::new(
            self.num.checked_mul(other.den)?,
            self.den.checked_mul(other.num)?,
        )
    }
}

impl std::fmt::Display for Rational {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Integers, decimals (with `,` thousands groups), `\frac{a}{b}` and `a/b`, signed.
fn parse_rational(s: &str) -> Option<Rational> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let value = if let Some(args) = body.strip_prefix("\\frac{") {
        let (num, tail) = split_group(args)?;
        let den = split_group(tail.strip_prefix('{')?)
            .and_then(|(d, rest)| rest.is_empty().then_some(d))?;
        parse_rational(num)?.div(parse_rational(den)?)?
    } else if let Some((num, den)) = body.split_once('/') {
        parse_rational(num)?.div(parse_rational(den)?)?
    } else {
        parse_decimal(body)?
    };
    Some(if negative {
        Rational {
            num: -value.num,
            den: value.den,
        }
    } else {
        value
    })
}

/// `12`, `12.50`, `.5`, `1,234.5` (commas only as thousands groups).
fn parse_decimal(s: &str) -> Option<Rational> {
    let (int_part, frac_part) = s.split_once('.').unwrap_or((s, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    let int_digits = if int_part.contains(',') {
        let groups: Vec<&str> = int_part.split(',').collect();
        let well_formed =
            (1..=3).contains(&groups[0].len()) && groups[1..].iter().all(|g| g.len() == 3);
        if !well_formed {
            return None;
        }
        groups.concat()
    } else {
        int_part.to_string()
    };
    let all_digits = |t: &str| t.chars().all(|c| c.is_ascii_digit());
    if !all_digits(&int_digits) || !all_digits(frac_part) || frac_part.len() > 30 {
        return None;
    }
    let digits = format!("{int_digits}{frac_part}");
    let num: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let den = 10i128.checked_pow(frac_part.len() as u32)?;
    Rational::new(num, den)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (prediction, gold) pairs a grader must accept.
    const EQUIVALENT: &[(&str, &str)] = &[
        ("42", "42"),
        ("42.0", "42"),
        ("42.000", "42"),
        ("+42", "42"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac12"),
        ("1/2", "\\dfrac{1}{2}"),
        ("\\tfrac{2}{4}", "\\frac{1}{2}"),
        ("-\\frac{3}{2}", "\\frac{-3}{2}"),
        ("-1.5", "-\\frac{3}{2}"),
        ("\\frac{1}{-2}", "-0.5"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        ("1,234,567.50", "1234567.5"),
        ("$5$", "5"),
        ("\\$5.00", "5"),
        ("50\\%", "50"),
        ("50%", "50"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("30°", "30"),
        ("30 degrees", "30"),
        ("12\\text{ cm}", "12"),
        ("12 \\mbox{square feet}", "12"),
        ("5 cm^2", "5"),
        ("5\\text{ inches}", "5"),
        ("x = 5", "5"),
        ("x=\\frac{1}{2}", "0.5"),
        ("\\theta = 30^\\circ", "30"),
        ("a_1 = 7", "7"),
        ("\\text{(C)}", "(C)"),
        ("\\textbf{Evelyn}", "Evelyn"),
        ("evelyn", "\\text{Evelyn}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("(3, \\dfrac\\pi2)", "\\left(3,\\frac{\\pi}{2}\\right)"),
        ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
        ("\\sqrt 2", "\\sqrt{2}"),
        ("2\\sqrt{2}", "2 \\sqrt{2}"),
        ("x^{2}+1", "x^2 + 1"),
        ("(0.5, 2)", "\\left(\\frac{1}{2}, 2\\right)"),
        ("[1, 2.0)", "[1,2)"),
        ("-2, 1", "1, -2"),
        ("1,-2,3", "3, 1, -2"),
        ("\\boxed{7}", "7"),
        ("\\displaystyle \\frac{7}{3}", "\\frac{7}{3}"),
        ("\\!\\frac{7}{3}\\,", "7/3"),
        ("5.", "5"),
        ("1\\,000", "1000"),
        ("\\infty", "\\infty"),
        ("(-\\infty, 3]", "\\left(-\\infty,3\\right]"),
        ("\\{1, 2\\}", "\\{1,2\\}"),
        ("3\\pi", "3 \\pi"),
        ("0", "0.0"),
        ("-0", "0"),
        ("025", "25"),
    ];

    /// Pairs that look alike but are different answers.
    const DIFFERENT: &[(&str, &str)] = &[
        ("0.333", "\\frac{1}{3}"),
        ("0.5", "5"),
        ("42", "43"),
        ("2m", "2"),
        ("(1, 2)", "(2, 1)"),
        ("(1, 2)", "[1, 2]"),
        ("1, 2", "1, 2, 3"),
        ("\\frac{1}{2}", "\\frac{2}{1}"),
        ("x^2", "x^3"),
        ("\\sqrt{2}", "\\sqrt{3}"),
        ("12", "1,2"),
        ("", "5"),
        ("5", ""),
        ("\\rightarrow 5", "5"),
        ("x = y = 5", "5"),
        ("-5", "5"),
        ("1,00", "100"),
    ];

    #[test]
    fn equivalent_answers_match() {
        let failures: Vec<_> = EQUIVALENT
            .iter()
            .filter(|(p, g)| !answers_match(p, g))
            .map(|(p, g)| format!("{p:?} vs {g:?}: {:?} != {:?}", normalize(p), normalize(g)))
            .collect();
        assert!(failures.is_empty(), "not matched:\n{}", failures.join("\n"));
    }

    #[test]
    fn different_answers_do_not_match() {
        let failures: Vec<_> = DIFFERENT
            .iter()
            .filter(|(p, g)| answers_match(p, g))
            .map(|(p, g)| format!("{p:?} vs {g:?}: both {:?}", normalize(p)))
            .collect();
        assert!(
            failures.is_empty(),
            "wrongly matched:\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn matching_is_symmetric() {
        for (a, b) in EQUIVALENT.iter().chain(DIFFERENT) {
            assert_eq!(answers_match(a, b), answers_match(b, a), "{a:?} / {b:?}");
        }
    }

    #[test]
    fn numbers_become_reduced_fractions() {
        assert_eq!(normalize("0.50"), "1/2");
        assert_eq!(normalize("\\frac{6}{4}"), "3/2");
        assert_eq!(normalize("-\\dfrac{6}{-4}"), "3/2");
        assert_eq!(normalize("1,000,000"), "1000000");
        assert_eq!(normalize("7"), "7");
        // Division by zero is not a number; the text is kept.
        assert_eq!(normalize("1/0"), "1/0");
    }
}

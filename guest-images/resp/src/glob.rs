//! Glob patterns as Redis's `stringmatchlen` reads them (KEYS, CONFIG GET, INFO).
//!
//! `*` any run, `?` any byte, `[abc]`, `[^abc]`, `[a-z]` (ends swapped if reversed), `\x`
//! a literal `x`; an unterminated class ends at the end of the pattern. Redis matches
//! recursively and bounds the nesting after CVE-2022-36021 (exponential time on patterns
//! like `*a*a*a*b`); here the pattern is tokenised and matched with the single-backtrack
//! greedy algorithm, so time is at most pattern length times subject length, with no
//! recursion.

use alloc::vec::Vec;

#[derive(Debug)]
enum Token {
    Star,
    Any,
    Byte(u8),
    Class { negate: bool, items: Vec<ClassItem> },
}

#[derive(Debug)]
enum ClassItem {
    Byte(u8),
    Range(u8, u8),
}

fn fold(b: u8, nocase: bool) -> u8 {
    if nocase {
        b.to_ascii_lowercase()
    } else {
        b
    }
}

fn tokenize(pattern: &[u8]) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut it = pattern.iter().copied().peekable();
    while let Some(c) = it.next() {
        match c {
            b'*' => {
                if !matches!(tokens.last(), Some(Token::Star)) {
                    tokens.push(Token::Star);
                }
            }
            b'?' => tokens.push(Token::Any),
            b'\\' => tokens.push(Token::Byte(it.next().unwrap_or(b'\\'))),
            b'[' => {
                let negate = it.next_if_eq(&b'^').is_some();
                let mut items = Vec::new();
                while let Some(c) = it.next() {
                    match c {
                        b']' => break,
                        // A backslash at the very end stands for itself.
                        b'\\' => items.push(ClassItem::Byte(it.next().unwrap_or(b'\\'))),
                        _ => {
                            let mut ahead = it.clone();
                            match (ahead.next(), ahead.next()) {
                                (Some(b'-'), Some(end)) => {
                                    it = ahead;
                                    items.push(ClassItem::Range(c.min(end), c.max(end)));
                                }
                                _ => items.push(ClassItem::Byte(c)),
                            }
                        }
                    }
                }
                tokens.push(Token::Class { negate, items });
            }
            _ => tokens.push(Token::Byte(c)),
        }
    }
    tokens
}

fn token_matches(token: &Token, c: u8, nocase: bool) -> bool {
    match token {
        Token::Star | Token::Any => true,
        Token::Byte(b) => fold(*b, nocase) == fold(c, nocase),
        Token::Class { negate, items } => {
            let c = fold(c, nocase);
            let hit = items.iter().any(|item| match *item {
                ClassItem::Byte(b) => fold(b, nocase) == c,
                ClassItem::Range(lo, hi) => (fold(lo, nocase)..=fold(hi, nocase)).contains(&c),
            });
            hit != *negate
        }
    }
}

/// Whether `subject` matches the glob `pattern`; `nocase` folds ASCII case.
pub(crate) fn matches(pattern: &[u8], subject: &[u8], nocase: bool) -> bool {
    let tokens = tokenize(pattern);
    let (mut t, mut s) = (0usize, 0usize);
    // After a star: the token after it, and the subject position it was last tried at.
    let mut backtrack: Option<(usize, usize)> = None;
    loop {
        match (tokens.get(t), subject.get(s)) {
            (Some(Token::Star), _) => {
                t = t.saturating_add(1);
                backtrack = Some((t, s));
            }
            (Some(tok), Some(&c)) if token_matches(tok, c, nocase) => {
                t = t.saturating_add(1);
                s = s.saturating_add(1);
            }
            (None, None) => return true,
            _ => match backtrack {
                // Let the last star swallow one more byte and retry from there.
                Some((bt, bs)) if bs < subject.len() => {
                    let bs = bs.saturating_add(1);
                    backtrack = Some((bt, bs));
                    t = bt;
                    s = bs;
                }
                _ => return false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn redis_glob_cases() {
        let yes: &[(&[u8], &[u8])] = &[
            (b"*", b""),
            (b"*", b"anything"),
            (b"h?llo", b"hello"),
            (b"h*llo", b"heeeello"),
            (b"h[ae]llo", b"hallo"),
            (b"h[^e]llo", b"hallo"),
            (b"h[a-b]llo", b"hbllo"),
            (b"h[b-a]llo", b"hallo"),
            (b"a\\*b", b"a*b"),
            (b"*a*a*a*b", b"aaab"),
            (b"key:*", b"key:__rand_int__"),
            (b"[abc", b"b"),
        ];
        for (p, s) in yes {
            assert!(matches(p, s, false), "{p:?} {s:?}");
        }
        let no: &[(&[u8], &[u8])] = &[
            (b"h[^e]llo", b"hello"),
            (b"h?llo", b"hllo"),
            (b"a\\*b", b"axb"),
            (b"*a*a*a*a*a*a*a*a*a*a*b", b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            (b"", b"a"),
        ];
        for (p, s) in no {
            assert!(!matches(p, s, false), "{p:?} {s:?}");
        }
        assert!(matches(b"SAVE", b"save", true));
        assert!(!matches(b"SAVE", b"save", false));
    }
}

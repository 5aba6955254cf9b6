//! Where a configuration problem is, and how it is shown: `site.toml:42:9: message`.
//!
//! Checks name the offending key by its path in the document (`meter[17].link`); the
//! path is turned into a line and column only when there is something to report, by
//! walking the document parsed with spans, so the happy path pays nothing for it.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use toml_edit::{ImDocument, Item};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// A key of a table.
    Key(Cow<'static, str>),
    /// An element of an array (of tables).
    Index(usize),
}

/// Where in the document a value lives, e.g. `meter[17].link`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    /// A top-level key.
    pub fn top(key: impl Into<Cow<'static, str>>) -> Self {
        Self(vec![Seg::Key(key.into())])
    }
    /// Element `i` of the top-level array of tables `key` (`[[key]]`).
    pub fn element(key: &'static str, i: usize) -> Self {
        Self(vec![Seg::Key(Cow::Borrowed(key)), Seg::Index(i)])
    }
    /// This path, then `key`.
    pub fn key(mut self, key: impl Into<Cow<'static, str>>) -> Self {
        self.0.push(Seg::Key(key.into()));
        self
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if n == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// Something that parses but cannot work, with what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The offending key, when known. Without it, a message that starts with
    /// `[section]` is placed at the first key of that section it names.
    pub at: Option<KeyPath>,
    /// Another place the message refers to (the first definition of a duplicate).
    pub first: Option<KeyPath>,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl Problem {
    /// A problem at a key.
    pub fn at(at: KeyPath, message: impl Into<String>) -> Self {
        Self { at: Some(at), first: None, message: message.into() }
    }
    /// A duplicate: at `at`, first defined at `first`.
    pub fn duplicate(at: KeyPath, first: KeyPath, message: impl Into<String>) -> Self {
        Self { at: Some(at), first: Some(first), message: message.into() }
    }
}

impl From<String> for Problem {
    fn from(message: String) -> Self {
        Self { at: None, first: None, message }
    }
}

impl From<&str> for Problem {
    fn from(message: &str) -> Self {
        Self::from(message.to_owned())
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Every problem of a configuration. Sections push plain strings (`[section] ...`);
/// the registry checks push located [`Problem`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Add one.
    pub fn push(&mut self, p: impl Into<Problem>) {
        self.0.push(p.into());
    }
    /// Add one at a key.
    pub fn at(&mut self, at: KeyPath, message: impl Into<String>) {
        self.0.push(Problem::at(at, message));
    }
    /// True when the configuration can be used.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// The messages, joined (for logs and tests).
    pub fn join(&self, sep: &str) -> String {
        self.0.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join(sep)
    }
    /// The problems.
    pub fn iter(&self) -> std::slice::Iter<'_, Problem> {
        self.0.iter()
    }
}

impl<P: Into<Problem>> Extend<P> for Problems {
    fn extend<I: IntoIterator<Item = P>>(&mut self, iter: I) {
        self.0.extend(iter.into_iter().map(Into::into));
    }
}

impl IntoIterator for Problems {
    type Item = Problem;
    type IntoIter = std::vec::IntoIter<Problem>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// A problem placed in the file: 1-based line and column (0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Line, from 1; 0 when the problem has no place.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic at a byte span of `text`.
    pub fn at_span(text: &str, span: Option<Range<usize>>, message: String) -> Self {
        let (line, column) = span.map_or((0, 0), |s| line_col(text, s.start));
        Self { line, column, message }
    }
}

/// At most this many diagnostics are shown: a generated file can be wrong 100,000 times
/// over, and the first hundred say what to fix.
pub const SHOWN: usize = 100;

/// Render `file:line:col: message`, one per line.
pub fn render(path: &Path, diagnostics: &[Diagnostic]) -> String {
    let file = path.display();
    let mut lines: Vec<String> = diagnostics
        .iter()
        .take(SHOWN)
        .map(|d| match d.line {
            0 => format!("{file}: {}", d.message),
            l => format!("{file}:{l}:{}: {}", d.column, d.message),
        })
        .collect();
    if diagnostics.len() > SHOWN {
        lines.push(format!("{file}: ... and {} more", diagnostics.len() - SHOWN));
    }
    if diagnostics.len() > 1 {
        lines.push(format!("{file}: {} problems", diagnostics.len()));
    }
    lines.join("\n")
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(1, |s| s.chars().count() + 1);
    (line, column)
}

/// Place problems in the document, sorted by line.
pub fn locate_all(doc: &ImDocument<&str>, problems: impl IntoIterator<Item = Problem>) -> Vec<Diagnostic> {
    let text = doc.raw();
    let mut out: Vec<Diagnostic> = problems
        .into_iter()
        .map(|p| {
            let mut message = p.message;
            if let Some((line, _)) = p.first.as_ref().and_then(|f| span_of(doc, f)).map(|s| line_col(text, s.start)) {
                message.push_str(&format!(" (first defined at line {line})"));
            }
            let span = match &p.at {
                Some(path) => span_of(doc, path),
                None => section_place(doc, &message),
            };
            Diagnostic::at_span(text, span, message)
        })
        .collect();
    out.sort_by_key(|d| (d.line, d.column));
    out
}

/// The span of the deepest part of `path` present in the document: the value when the
/// whole path is there, else the nearest table header or key that is.
pub fn span_of(doc: &ImDocument<&str>, path: &KeyPath) -> Option<Range<usize>> {
    let mut item: &Item = doc.as_item();
    let mut best = None;
    for seg in &path.0 {
        let next = match seg {
            Seg::Key(k) => {
                let Some((key, child)) = item.as_table_like().and_then(|t| t.get_key_value(k)) else { break };
                best = key.span().or(best);
                child
            }
            Seg::Index(i) => match item.get(*i) {
                Some(child) => child,
                None => break,
            },
        };
        best = next.span().or(best);
        item = next;
    }
    best
}

/// `[policy.window] start must be ...` names section `policy.window`; the first word of
/// the message that is a key of that section in the document is the place.
fn section_place(doc: &ImDocument<&str>, message: &str) -> Option<Range<usize>> {
    let rest = message.strip_prefix('[')?;
    let (section, rest) = rest.split_once(']')?;
    let path = KeyPath(section.split('.').map(|k| Seg::Key(Cow::Owned(k.trim().to_owned()))).collect());
    let table = path.0.iter().try_fold(doc.as_item(), |item, seg| match seg {
        Seg::Key(k) => item.get(k.as_ref()),
        Seg::Index(_) => None,
    });
    let word = table.and_then(Item::as_table_like).and_then(|t| {
        rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).find(|w| !w.is_empty() && t.contains_key(w))
    });
    match word {
        Some(w) => span_of(doc, &path.key(w.to_owned())),
        None => span_of(doc, &path),
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" and "unknown variant":
/// the closest expected name, if one is close.
pub fn did_you_mean(message: &str) -> Option<String> {
    let mut quoted = message.split('`').skip(1).step_by(2);
    let wrong = quoted.next()?;
    let best = quoted.map(|c| (edit_distance(wrong, c), c)).min_by_key(|(d, _)| *d)?;
    (best.0 <= (wrong.len() / 3).max(2) && best.0 > 0).then(|| best.1.to_owned())
}

/// Levenshtein distance, for suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns_count_from_one() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, text.find("\"x").unwrap_or(0)), (2, 6));
    }

    #[test]
    fn paths_find_values_and_fall_back_to_headers() {
        let text = "[[meter]]\nid = \"a\"\n\n[[meter]]\nid = \"b\"\nlink = \"x\"\n";
        let doc = ImDocument::parse(text).expect("parses");
        let at = |p: KeyPath| span_of(&doc, &p).map(|s| line_col(text, s.start));
        assert_eq!(at(KeyPath::element("meter", 1).key("link")), Some((6, 8)));
        assert_eq!(at(KeyPath::element("meter", 0).key("link")), Some((1, 1)));
        let p = Problem::from("[policy.window] start must be before end".to_owned());
        let doc = ImDocument::parse("[policy.window]\nend = \"09:00\"\nstart = \"10:00\"\n").expect("parses");
        assert_eq!(locate_all(&doc, [p])[0].line, 3);
    }

    #[test]
    fn suggestions_are_close_names_only() {
        let m = "unknown field `adress`, expected one of `name`, `protocol`, `address`, `serial`";
        assert_eq!(did_you_mean(m).as_deref(), Some("address"));
        assert_eq!(did_you_mean("unknown field `zzzzzzzz`, expected one of `name`, `serial`"), None);
    }
}

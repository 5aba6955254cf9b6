//! Loading with every error reported, each at its line.
//!
//! The fast path is one `toml::from_str` and the checks. Only when something is wrong is
//! the text parsed again with spans: a syntax error stops there (TOML cannot be resumed);
//! otherwise each top-level key, each `[[array]]` element and each child of a section is
//! deserialized on its own, so that every bad element is reported, not just the first;
//! the checks then run on what remains.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use toml_edit::{ArrayOfTables, DocumentMut, ImDocument, Item, Table};

use super::checks::{self, KeyFiles};
use super::diagnostics::{did_you_mean, locate_all, Diagnostic, KeyPath, Problem, Seg};
use super::{ConfigError, SiteConfig};

/// Parse and check `text`, read from `path`.
pub(super) fn load_text(text: &str, path: &Path) -> Result<SiteConfig, ConfigError> {
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let invalid = |diagnostics: Vec<Diagnostic>| ConfigError::Invalid { path: path.to_owned(), diagnostics };
    // Read the key files the text names while it is parsed: on a large site that is
    // half the work, and the other core is free.
    let (parsed, preloaded) = std::thread::scope(|s| {
        let keys = s.spawn(|| preload_key_files(text, &base_dir));
        let parsed = toml::from_str::<SiteConfig>(text);
        (parsed, keys.join().unwrap_or_default())
    });
    let doc = match parsed {
        Ok(mut cfg) => {
            cfg.base_dir = base_dir;
            let problems = checks::with_preloaded(preloaded, || cfg.problems());
            if problems.is_empty() {
                return Ok(cfg);
            }
            match ImDocument::parse(text) {
                Ok(doc) => return Err(invalid(locate_all(&doc, problems))),
                Err(e) => return Err(invalid(vec![syntax(text, &e)])),
            }
        }
        Err(first) => match ImDocument::parse(text) {
            Ok(doc) => (doc, first),
            Err(e) => return Err(invalid(vec![syntax(text, &e)])),
        },
    };
    let (doc, first) = doc;
    let split = split(&doc);
    let mut diagnostics = split.errors;
    if let Ok(mut partial) = toml_edit::de::from_document::<SiteConfig>(split.kept) {
        partial.base_dir = base_dir;
        let problems = partial.problems().into_iter().filter(|p| !split.removed.hides(&partial, p)).map(|p| Problem {
            at: p.at.map(|a| split.remap.apply(a)),
            first: p.first.map(|f| split.remap.apply(f)),
            ..p
        });
        diagnostics.extend(locate_all(&doc, problems));
    }
    if diagnostics.is_empty() {
        // Nothing the parts showed alone: the whole file's own error, then.
        diagnostics.push(Diagnostic::at_span(text, first.span(), first.message().trim_end().to_owned()));
    }
    diagnostics.sort_by_key(|d| (d.line, d.column));
    Err(invalid(diagnostics))
}

/// The key files of lines `keys = "path"`, read. Only a warm-up: the checks read any
/// file not found here themselves, so a line this scan misreads costs time, not truth.
fn preload_key_files(text: &str, base_dir: &Path) -> KeyFiles {
    let mut out = KeyFiles::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix("keys") else { continue };
        let Some(rest) = rest.trim_start().strip_prefix('=') else { continue };
        let Some(quoted) = rest.trim_start().strip_prefix('"') else { continue };
        let Some((path, _)) = quoted.split_once('"') else { continue };
        if path.contains('\\') {
            continue;
        }
        let path = base_dir.join(path);
        if let std::collections::hash_map::Entry::Vacant(v) = out.entry(path) {
            let loaded = checks::load_key_file(v.key());
            v.insert(loaded);
        }
    }
    out
}

fn syntax(text: &str, e: &toml_edit::TomlError) -> Diagnostic {
    Diagnostic::at_span(text, e.span(), format!("TOML syntax: {}", e.message().trim_end()))
}

/// What deserializing the parts one by one found.
struct Split {
    /// A diagnostic per bad part.
    errors: Vec<Diagnostic>,
    /// The document without the bad parts.
    kept: DocumentMut,
    /// Element indices of the kept document's arrays in the original one.
    remap: Remap,
    /// Names of removed `[[link]]`s and `[modbus_profile.*]`s, so that meters naming them
    /// are not reported as naming nothing.
    removed: Removed,
}

#[derive(Default)]
struct Remap(HashMap<String, Vec<usize>>);

impl Remap {
    fn apply(&self, mut path: KeyPath) -> KeyPath {
        if let [Seg::Key(k), Seg::Index(i), ..] = path.0.as_mut_slice() {
            if let Some(&orig) = self.0.get(k.as_ref()).and_then(|m| m.get(*i)) {
                *i = orig;
            }
        }
        path
    }
}

#[derive(Default)]
struct Removed {
    links: HashSet<String>,
    profiles: HashSet<String>,
}

impl Removed {
    fn hides(&self, cfg: &SiteConfig, p: &Problem) -> bool {
        let Some([Seg::Key(top), Seg::Index(i), Seg::Key(key)]) = p.at.as_ref().map(|a| a.0.as_slice()) else {
            return false;
        };
        let Some(m) = cfg.meters.get(*i).filter(|_| top == "meter") else { return false };
        match key.as_ref() {
            "link" => self.links.contains(&m.link),
            "modbus_profile" => m.modbus_profile.as_ref().is_some_and(|n| self.profiles.contains(n)),
            _ => false,
        }
    }
}

fn try_alone(key: &str, item: Item) -> Result<(), toml_edit::de::Error> {
    try_at(&[key], item)
}

/// Deserialize a document holding only `item`, at `path`.
fn try_at(path: &[&str], item: Item) -> Result<(), toml_edit::de::Error> {
    let mut item = item;
    for key in path.iter().rev() {
        let mut t = Table::new();
        t.set_implicit(true);
        t.insert(key, item);
        item = Item::Table(t);
    }
    let Item::Table(root) = item else { return Ok(()) };
    toml_edit::de::from_document::<SiteConfig>(DocumentMut::from(root)).map(drop)
}

/// A section (`[policy]`, `[policy.window]`, `[modbus_profile]`): whole if it is good,
/// else each child alone, into sub-sections, so that every bad value is reported. When
/// leaving children out loses a required field, the section is one error. Returns what
/// is kept.
fn section(text: &str, path: &[&str], t: &Table, errors: &mut Vec<Diagnostic>, removed: &mut Removed) -> Option<Table> {
    let whole = match try_at(path, Item::Table(t.clone())) {
        Ok(()) => return Some(t.clone()),
        Err(e) => e,
    };
    let mut good = Table::new();
    let mut child_errors = Vec::new();
    for (child, citem) in t.iter() {
        let mut one = Table::new();
        one.insert(child, citem.clone());
        match try_at(path, Item::Table(one)) {
            Ok(()) => {
                good.insert(child, citem.clone());
            }
            Err(e) => child_errors.push((e, child, citem)),
        }
    }
    if child_errors.is_empty() || child_errors.iter().any(|(e, ..)| e.message().starts_with("missing field")) {
        errors.push(diagnostic(text, &whole, Some(&format!("[{}]", path.join("."))), t, t.span()));
        return None;
    }
    for (e, child, citem) in child_errors {
        if path == ["modbus_profile"] {
            removed.profiles.insert(child.to_owned());
        }
        match citem.as_table() {
            Some(inner) => {
                let mut sub = path.to_vec();
                sub.push(child);
                if let Some(kept) = section(text, &sub, inner, errors, removed) {
                    good.insert(child, Item::Table(kept));
                }
            }
            None => {
                let at = t.key(child).and_then(toml_edit::Key::span);
                errors.push(diagnostic(text, &e, Some(&format!("[{}]", path.join("."))), t, at));
            }
        }
    }
    Some(good)
}

fn split(doc: &ImDocument<&str>) -> Split {
    let text = doc.raw();
    let mut errors = Vec::new();
    let mut kept = Table::new();
    let mut remap = Remap::default();
    let mut removed = Removed::default();
    for (key, item) in doc.as_table().iter() {
        match item {
            Item::ArrayOfTables(aot) => {
                let mut good = ArrayOfTables::new();
                let mut indices = Vec::new();
                for (i, t) in aot.iter().enumerate() {
                    let mut one = ArrayOfTables::new();
                    one.push(t.clone());
                    match try_alone(key, Item::ArrayOfTables(one)) {
                        Ok(()) => {
                            good.push(t.clone());
                            indices.push(i);
                        }
                        Err(e) => {
                            let name = t.get("id").or_else(|| t.get("name")).and_then(Item::as_str);
                            if key == "link" {
                                removed.links.extend(name.map(str::to_owned));
                            }
                            let what = name.map_or_else(|| format!("[[{key}]] #{}", i + 1), |n| format!("{key} {n:?}"));
                            errors.push(diagnostic(text, &e, Some(&what), t, t.span()));
                        }
                    }
                }
                remap.0.insert(key.to_owned(), indices);
                kept.insert(key, Item::ArrayOfTables(good));
            }
            Item::Table(t) => {
                if let Some(good) = section(text, &[key], t, &mut errors, &mut removed) {
                    kept.insert(key, Item::Table(good));
                }
            }
            _ => {
                if let Err(e) = try_alone(key, item.clone()) {
                    let at = doc.as_table().key(key).and_then(toml_edit::Key::span);
                    errors.push(diagnostic(text, &e, None, doc.as_table(), at));
                }
                // A bad top-level value is left out; the rest is still checked.
                else {
                    kept.insert(key, item.clone());
                }
            }
        }
    }
    Split { errors, kept: DocumentMut::from(kept), remap, removed }
}

/// A serde error as `what: key: message; did you mean ...`. The key is found by the
/// span of its value in `table`, since the message itself does not name it.
fn diagnostic(
    text: &str,
    e: &toml_edit::de::Error,
    what: Option<&str>,
    table: &Table,
    fallback: Option<std::ops::Range<usize>>,
) -> Diagnostic {
    let mut span = e.span().or(fallback);
    let found = span.as_ref().and_then(|s| table.iter().find(|(_, v)| v.span().as_ref() == Some(s) || contains(v, s)));
    let key = found.map(|(k, _)| k.to_owned());
    // An array's element errors carry the array's span: point at the element named.
    if let Some(array) = found.and_then(|(_, v)| v.as_array()) {
        let named = array.iter().find(|v| v.as_str().is_some_and(|s| e.message().contains(&format!("{s:?}"))));
        span = named.and_then(toml_edit::Value::span).or(span);
    }
    let mut message = String::new();
    if let Some(w) = what {
        message.push_str(w);
        message.push_str(": ");
    }
    if let Some(k) = key.filter(|_| !e.message().starts_with("unknown field")) {
        message.push_str(&format!("`{k}`: "));
    }
    message.push_str(e.message().trim_end());
    if let Some(s) = did_you_mean(e.message()) {
        message.push_str(&format!("; did you mean `{s}`?"));
    }
    let m = e.message();
    if m.starts_with("invalid type: string") && ["expected u", "expected i", "expected f"].iter().any(|x| m.contains(x))
    {
        message.push_str("; write the number without quotes");
    }
    Diagnostic::at_span(text, span, message)
}

/// True when the value of `item` (an inline table or array) encloses `span`.
fn contains(item: &Item, span: &std::ops::Range<usize>) -> bool {
    item.span().is_some_and(|s| s.start <= span.start && span.end <= s.end)
}

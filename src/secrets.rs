//! Meter secrets (LLS passwords, HLS keys) read from key files.
//!
//! Secrets never appear in logs, errors or `Debug` output: the types here print
//! `<redacted>`, and parse errors name the field, never the value.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The secrets of one meter.
#[derive(Clone, Default)]
pub struct MeterKeys {
    /// LLS password.
    pub password: Option<Vec<u8>>,
    /// Global unicast encryption key (suite 0: 16 bytes).
    pub guek: Option<[u8; 16]>,
    /// Global authentication key.
    pub gak: Option<[u8; 16]>,
    /// The client's system title (8 bytes), half of every nonce the client sends under.
    pub client_system_title: Option<[u8; 8]>,
}

impl fmt::Debug for MeterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |present: bool| if present { "<redacted>" } else { "<none>" };
        f.debug_struct("MeterKeys")
            .field("password", &shown(self.password.is_some()))
            .field("guek", &shown(self.guek.is_some()))
            .field("gak", &shown(self.gak.is_some()))
            .field("client_system_title", &self.client_system_title.map(hex))
            .finish()
    }
}

/// A key file that cannot be used. Never carries a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Cannot read the file.
    #[error("key file {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, or unknown fields.
    #[error("key file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (TOML errors quote the line; we drop the quote).
        message: String,
    },
    /// A field is not the hex of the right length.
    #[error("key file {path}: `{field}` must be {bytes} bytes in hex ({} hex digits)", bytes * 2)]
    BadHex {
        /// The file.
        path: PathBuf,
        /// Which field.
        field: &'static str,
        /// Expected length in bytes.
        bytes: usize,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    password: Option<String>,
    guek: Option<String>,
    gak: Option<String>,
    client_system_title: Option<String>,
}

impl MeterKeys {
    /// Load a key file.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| KeyFileError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parse key file text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, KeyFileError> {
        let file: KeyFile = toml::from_str(text).map_err(|e| KeyFileError::Syntax {
            path: path.to_owned(),
            // toml's full message quotes the offending source line, and serde's "invalid
            // type: string `...`" quotes the value: either may be a key. Line and what
            // was expected only.
            message: redacted(text, &e),
        })?;
        let bad = |field, bytes| KeyFileError::BadHex { path: path.to_owned(), field, bytes };
        Ok(Self {
            password: file.password.map(String::into_bytes),
            guek: file.guek.map(|h| unhex::<16>(&h).ok_or_else(|| bad("guek", 16))).transpose()?,
            gak: file.gak.map(|h| unhex::<16>(&h).ok_or_else(|| bad("gak", 16))).transpose()?,
            client_system_title: file
                .client_system_title
                .map(|h| unhex::<8>(&h).ok_or_else(|| bad("client_system_title", 8)))
                .transpose()?,
        })
    }
}

fn redacted(text: &str, e: &toml::de::Error) -> String {
    let line = e.span().map(|s| text.get(..s.start).unwrap_or("").matches('\n').count() + 1);
    let m = e.message();
    let what = if m.starts_with("invalid") {
        m.split_once(", expected ").map_or("a value is not valid".to_owned(), |(_, exp)| format!("expected {exp}"))
    } else if m.starts_with("unknown field") || m.starts_with("missing field") || m.starts_with("duplicate key") {
        // Names of fields, never values.
        m.to_owned()
    } else {
        "not valid TOML".to_owned()
    };
    match line {
        Some(l) => format!("line {l}: {what} (the value is not shown)"),
        None => format!("{what} (the value is not shown)"),
    }
}

/// Decode exactly `N` bytes of hex (spaces allowed).
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        *out.get_mut(i)? = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Hex of bytes, upper case.
pub fn hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_key_file_parses() {
        let keys = MeterKeys::parse(include_str!("../config/keys.example.toml"), Path::new("k.toml")).expect("parses");
        assert_eq!(keys.password.as_deref(), Some(&b"12345678"[..]));
        assert_eq!(keys.guek.map(|k| k[15]), Some(0x0F));
        assert_eq!(keys.client_system_title.map(|t| t[0]), Some(0x48));
    }

    #[test]
    fn debug_and_errors_never_show_secrets() {
        let text = "password = \"hunter22\"\nguek = \"000102030405060708090A0B0C0D0E0F\"\ngak = \"zz\"\n";
        let err = MeterKeys::parse(text, Path::new("k.toml")).expect_err("bad gak").to_string();
        assert!(!err.contains("hunter22") && !err.contains("000102"), "{err}");
        assert!(err.contains("gak"), "{err}");
        let keys = MeterKeys::parse("password = \"hunter22\"\n", Path::new("k.toml")).expect("parses");
        assert!(!format!("{keys:?}").contains("hunter22"));
        let syntax = MeterKeys::parse("password = \"hunter22\"\noops\n", Path::new("k.toml")).expect_err("syntax");
        assert!(!syntax.to_string().contains("hunter22"), "{syntax}");
        let typed = MeterKeys::parse("password = 31415926\n", Path::new("k.toml")).expect_err("type");
        assert!(!typed.to_string().contains("31415926") && typed.to_string().contains("line 1"), "{typed}");
    }
}

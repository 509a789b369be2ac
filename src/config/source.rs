//! Config files as text, `${VAR}` expansion, and the `file:line:col: message` errors every config
//! mistake becomes. Expansion happens on the text before TOML parsing, line by line, so line
//! numbers in errors stay those of the file the user edits.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One config file's text (after `${VAR}` expansion) and its path.
#[derive(Debug, Clone)]
pub(crate) struct SourceFile {
    pub(crate) path: Arc<Path>,
    pub(crate) text: Arc<str>,
}

impl SourceFile {
    /// 1-based line and column of a byte offset.
    pub(crate) fn locate(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    /// A located error; `message` is any typed error of the module that found it.
    pub(crate) fn error_at(&self, span: Range<usize>, message: impl fmt::Display) -> ConfigError {
        let (line, col) = self.locate(span.start);
        ConfigError {
            file: self.path.to_path_buf(),
            line,
            col,
            message: message.to_string(),
        }
    }
}

/// One mistake in the configuration, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl ConfigError {
    /// An error about a whole file (it cannot be read, say).
    pub(crate) fn file(path: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every mistake found in one load, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub(crate) fn push(&mut self, e: ConfigError) {
        self.0.push(e);
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub(crate) fn into_result<T>(self, ok: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(ok)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Replaces `${NAME}` and `${NAME:-default}` with the environment's values. A value is escaped for
/// a TOML basic string (`\`, `"` and control characters), so a secret cannot break the file's
/// syntax or shift its lines. `$${` stands for a literal `${`.
pub(crate) fn expand_env(
    path: &Path,
    raw: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigErrors> {
    let mut out = String::with_capacity(raw.len());
    let mut errors = ConfigErrors::default();
    let comments = comment_ranges(raw);
    let in_comment = |at: usize| comments.iter().any(|r| r.contains(&at));
    let mut rest = raw;
    let mut offset = 0;
    while let Some(i) = rest.find("${") {
        if in_comment(offset + i) {
            out.push_str(&rest[..i + 2]);
            rest = &rest[i + 2..];
            offset += i + 2;
            continue;
        }
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            offset += i + 2;
            continue;
        }
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let locate = |at: usize| {
            let file = SourceFile {
                path: Arc::from(path),
                text: Arc::from(raw),
            };
            file.locate(at)
        };
        let Some(end) = after.find('}').filter(|&e| !after[..e].contains('\n')) else {
            let (line, col) = locate(offset + i);
            errors.push(ConfigError {
                file: path.to_path_buf(),
                line,
                col,
                message: "unterminated `${`".into(),
            });
            out.push_str("${");
            rest = after;
            offset += i + 2;
            continue;
        };
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        let valid =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let value = if valid { lookup(name) } else { None };
        match (valid, value, default) {
            (true, Some(v), _) => push_escaped(&mut out, &v),
            (true, None, Some(d)) => push_escaped(&mut out, d),
            (true, None, None) => {
                let (line, col) = locate(offset + i);
                errors.push(ConfigError {
                    file: path.to_path_buf(),
                    line,
                    col,
                    message: format!(
                        "environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)"
                    ),
                });
            }
            (false, _, _) => {
                let (line, col) = locate(offset + i);
                errors.push(ConfigError {
                    file: path.to_path_buf(),
                    line,
                    col,
                    message: format!("`${{{expr}}}` is not a valid variable reference"),
                });
            }
        }
        rest = &after[end + 1..];
        offset += i + 2 + end + 1;
    }
    out.push_str(rest);
    errors.into_result(out)
}

/// The byte ranges of TOML comments, so that `${…}` in a comment is left alone.
fn comment_ranges(text: &str) -> Vec<Range<usize>> {
    #[derive(PartialEq)]
    enum St {
        Normal,
        Basic,
        Literal,
        MlBasic,
        MlLiteral,
        Comment(usize),
    }
    let b = text.as_bytes();
    let mut ranges = Vec::new();
    let mut st = St::Normal;
    let mut i = 0;
    let triple = |i: usize, q: u8| b.get(i..i + 3) == Some(&[q, q, q][..]);
    while i < b.len() {
        let c = b[i];
        st = match st {
            St::Normal if c == b'#' => St::Comment(i),
            St::Normal if triple(i, b'"') => {
                i += 2;
                St::MlBasic
            }
            St::Normal if triple(i, b'\'') => {
                i += 2;
                St::MlLiteral
            }
            St::Normal if c == b'"' => St::Basic,
            St::Normal if c == b'\'' => St::Literal,
            St::Basic | St::MlBasic if c == b'\\' => {
                i += 1;
                st
            }
            St::Basic if c == b'"' || c == b'\n' => St::Normal,
            St::Literal if c == b'\'' || c == b'\n' => St::Normal,
            St::MlBasic if triple(i, b'"') => {
                i += 2;
                St::Normal
            }
            St::MlLiteral if triple(i, b'\'') => {
                i += 2;
                St::Normal
            }
            St::Comment(start) if c == b'\n' => {
                ranges.push(start..i);
                St::Normal
            }
            other => other,
        };
        i += 1;
    }
    if let St::Comment(start) = st {
        ranges.push(start..b.len());
    }
    ranges
}

fn push_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
}

/// Reads, expands and deserializes one TOML file; errors carry file, line and column.
pub(crate) fn parse_file<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<(SourceFile, T), ConfigErrors> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors(vec![ConfigError::file(path, format!("cannot read: {e}"))]))?;
    parse_text(path, &raw, |n| std::env::var(n).ok())
}

/// Parses the text of a config file (`${VAR}` expanded with `lookup`), errors located in it.
pub(crate) fn parse_text<T: serde::de::DeserializeOwned>(
    path: &Path,
    raw: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(SourceFile, T), ConfigErrors> {
    let text = expand_env(path, raw, lookup)?;
    let file = SourceFile {
        path: Arc::from(path),
        text: Arc::from(text),
    };
    match toml::from_str::<T>(&file.text) {
        Ok(v) => Ok((file, v)),
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_owned();
            Err(ConfigErrors(vec![file.error_at(span, message)]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: &str) -> Option<String> {
        match n {
            "HOST" => Some("db.local".into()),
            "QUOTE" => Some("a\"b\nc".into()),
            _ => None,
        }
    }

    #[test]
    fn expands_defaults_and_escapes() {
        let p = Path::new("g.toml");
        let out = expand_env(
            p,
            "a = \"${HOST}\"\nb = \"${NOPE:-x}\"\nc = \"${QUOTE}\" $${HOST}",
            env,
        )
        .unwrap();
        assert_eq!(
            out,
            "a = \"db.local\"\nb = \"x\"\nc = \"a\\\"b\\nc\" ${HOST}"
        );
    }

    #[test]
    fn comments_are_not_expanded() {
        let p = Path::new("g.toml");
        let text =
            "# token = \"${MISSING}\"\na = \"#${HOST}\" # ${MISSING}\nb = '''\n# ${HOST}\n'''";
        let out = expand_env(p, text, env).unwrap();
        assert_eq!(
            out,
            "# token = \"${MISSING}\"\na = \"#db.local\" # ${MISSING}\nb = '''\n# db.local\n'''"
        );
    }

    #[test]
    fn unset_variable_is_located() {
        let p = Path::new("g.toml");
        let err = expand_env(p, "a = 1\nb = \"${MISSING}\"\nc = \"${OTHER}\"", env).unwrap_err();
        assert_eq!(err.0.len(), 2);
        assert_eq!(
            err.0[0].to_string().split(": ").next().unwrap(),
            "g.toml:2:6"
        );
        assert!(err.0[0].message.contains("MISSING"));
        assert_eq!((err.0[1].line, err.0[1].col), (3, 6));
    }

    #[test]
    fn locate_counts_lines_and_columns() {
        let f = SourceFile {
            path: Arc::from(Path::new("x")),
            text: Arc::from("ab\ncdé\nf"),
        };
        assert_eq!(f.locate(0), (1, 1));
        assert_eq!(f.locate(4), (2, 2));
        assert_eq!(f.locate(8), (3, 1));
    }
}

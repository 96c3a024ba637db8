//! A small YAML reader for kubeconfig files, into `serde_json::Value`.
//!
//! The agent's size budget rules out a full YAML library for one file. This covers what
//! kubeconfigs written by kubectl, k3s, kubeadm and hand use: block mappings and sequences
//! (including `- key: value` items), flow mappings and sequences (`{a: b, c: [d]}`), plain,
//! single- and double-quoted scalars, comments and `---`. Not supported (an error, never a
//! wrong answer): anchors, tags, multi-line (`|`, `>`) scalars.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
#[error("kubeconfig line {line}: {msg}")]
pub struct YamlError {
    pub line: usize,
    pub msg: String,
}

struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

fn err(line: usize, msg: impl Into<String>) -> YamlError {
    YamlError {
        line,
        msg: msg.into(),
    }
}

/// Parses a document. JSON is YAML too and takes the fast path.
pub fn parse(src: &str) -> Result<Value, YamlError> {
    if let Ok(v) = serde_json::from_str::<Value>(src) {
        return Ok(v);
    }
    let mut lines = Vec::new();
    for (i, raw) in src.lines().enumerate() {
        let text = strip_comment(raw).trim_end();
        let trimmed = text.trim_start();
        if trimmed.is_empty() || trimmed == "---" || trimmed.starts_with("%") {
            continue;
        }
        if raw.starts_with('\t') {
            return Err(err(i + 1, "tabs are not allowed for indentation"));
        }
        lines.push(Line {
            no: i + 1,
            indent: text.len() - trimmed.len(),
            text: trimmed,
        });
    }
    if lines.is_empty() {
        return Ok(Value::Null);
    }
    let mut pos = 0;
    let indent = lines[0].indent;
    let v = block(&lines, &mut pos, indent)?;
    if pos < lines.len() {
        return Err(err(lines[pos].no, "unexpected indentation"));
    }
    Ok(v)
}

/// Removes a `#` comment that is not inside quotes.
fn strip_comment(s: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev_space => return &s[..i],
            None => {}
        }
        prev_space = c == ' ' || c == '\t';
    }
    s
}

/// A block node whose lines start at `lines[*pos]` with exactly `indent`.
fn block(lines: &[Line<'_>], pos: &mut usize, indent: usize) -> Result<Value, YamlError> {
    let first = &lines[*pos];
    if first.text == "-" || first.text.starts_with("- ") {
        let mut items = Vec::new();
        while *pos < lines.len() && lines[*pos].indent == indent {
            let l = &lines[*pos];
            if !(l.text == "-" || l.text.starts_with("- ")) {
                // The end of a sequence nested at its parent key's indentation
                // (`key:\n- a\nnext: b`); the caller decides whether that is valid.
                break;
            }
            let Some(rest) = l.text.strip_prefix('-') else {
                return Err(err(l.no, "expected a sequence item"));
            };
            let rest = rest.trim_start();
            let item_indent = indent + (l.text.len() - rest.len());
            *pos += 1;
            if rest.is_empty() {
                if *pos < lines.len() && lines[*pos].indent > indent {
                    let ind = lines[*pos].indent;
                    items.push(block(lines, pos, ind)?);
                } else {
                    items.push(Value::Null);
                }
            } else if split_key(rest).is_some() {
                // `- key: value` starts a mapping whose other keys sit at item_indent.
                let mut map = Map::new();
                mapping_entry(lines, pos, l.no, rest, item_indent, &mut map)?;
                while *pos < lines.len() && lines[*pos].indent == item_indent {
                    let l2 = &lines[*pos];
                    *pos += 1;
                    mapping_entry(lines, pos, l2.no, l2.text, item_indent, &mut map)?;
                }
                items.push(Value::Object(map));
            } else {
                items.push(scalar_or_flow(rest, l.no)?);
            }
        }
        return Ok(Value::Array(items));
    }
    if split_key(first.text).is_some() {
        let mut map = Map::new();
        while *pos < lines.len() && lines[*pos].indent == indent {
            let l = &lines[*pos];
            *pos += 1;
            mapping_entry(lines, pos, l.no, l.text, indent, &mut map)?;
        }
        return Ok(Value::Object(map));
    }
    *pos += 1;
    scalar_or_flow(first.text, first.no)
}

/// One `key: value` of a mapping at `indent`; a missing value is the nested block.
fn mapping_entry(
    lines: &[Line<'_>],
    pos: &mut usize,
    no: usize,
    text: &str,
    indent: usize,
    map: &mut Map<String, Value>,
) -> Result<(), YamlError> {
    let (k, v) = split_key(text).ok_or_else(|| err(no, "expected `key: value`"))?;
    let key = match scalar_or_flow(k, no)? {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let value = if v.is_empty() {
        // Nested block: deeper lines, or a sequence at the same indent (`key:\n- a`).
        match lines.get(*pos) {
            Some(n) if n.indent > indent => {
                let ind = n.indent;
                block(lines, pos, ind)?
            }
            Some(n) if n.indent == indent && (n.text == "-" || n.text.starts_with("- ")) => {
                block(lines, pos, indent)?
            }
            _ => Value::Null,
        }
    } else {
        scalar_or_flow(v, no)?
    };
    map.insert(key, value);
    Ok(())
}

/// Splits `key: value` (or `key:`) outside quotes and brackets.
fn split_key(s: &str) -> Option<(&str, &str)> {
    let mut quote: Option<char> = None;
    let mut depth = 0i32;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' if i == 0 => quote = Some(c),
                '{' | '[' => depth += 1,
                '}' | ']' => depth -= 1,
                ':' if depth == 0 => {
                    let after = &s[i + 1..];
                    if after.is_empty() || after.starts_with(' ') {
                        return Some((s[..i].trim(), after.trim()));
                    }
                }
                _ => {}
            },
        }
    }
    None
}

fn scalar_or_flow(s: &str, no: usize) -> Result<Value, YamlError> {
    let s = s.trim();
    if s.starts_with('{') || s.starts_with('[') {
        let mut p = Flow {
            s: s.as_bytes(),
            src: s,
            i: 0,
            no,
        };
        let v = p.value()?;
        p.ws();
        if p.i != s.len() {
            return Err(err(no, "trailing characters after a flow collection"));
        }
        return Ok(v);
    }
    if s.starts_with('|') || s.starts_with('>') {
        return Err(err(no, "block scalars (| and >) are not supported"));
    }
    if s.starts_with('&') || s.starts_with('*') || s.starts_with('!') {
        return Err(err(no, "anchors, aliases and tags are not supported"));
    }
    if s.starts_with('"') || s.starts_with('\'') {
        let (v, used) = quoted(s, no)?;
        if used != s.len() {
            return Err(err(no, "trailing characters after a quoted string"));
        }
        return Ok(Value::String(v));
    }
    Ok(plain(s))
}

/// A plain scalar: null, booleans and integers are typed, everything else is a string.
fn plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => Value::Null,
        "true" | "True" | "TRUE" => Value::Bool(true),
        "false" | "False" | "FALSE" => Value::Bool(false),
        _ => match s.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::String(s.to_string()),
        },
    }
}

/// A quoted string at the start of `s`: its value and how many bytes it used.
fn quoted(s: &str, no: usize) -> Result<(String, usize), YamlError> {
    let mut chars = s.char_indices();
    let Some((_, q)) = chars.next() else {
        return Err(err(no, "empty string"));
    };
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == q {
            if q == '\'' && s[i + 1..].starts_with('\'') {
                chars.next();
                out.push('\'');
                continue;
            }
            return Ok((out, i + 1));
        }
        if q == '"' && c == '\\' {
            match chars.next().map(|(_, e)| e) {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('0') => out.push('\0'),
                Some(e @ ('"' | '\\' | '/' | ' ')) => out.push(e),
                _ => return Err(err(no, "unsupported escape in a double-quoted string")),
            }
            continue;
        }
        out.push(c);
    }
    Err(err(no, "unterminated quoted string"))
}

struct Flow<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
    no: usize,
}

impl Flow<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i] == b' ' {
            self.i += 1;
        }
    }

    fn value(&mut self) -> Result<Value, YamlError> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut map = Map::new();
                loop {
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(Value::Object(map));
                    }
                    let key = match self.atom(true)? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    self.ws();
                    if self.s.get(self.i) != Some(&b':') {
                        return Err(err(self.no, "expected `:` in a flow mapping"));
                    }
                    self.i += 1;
                    self.ws();
                    let v = match self.s.get(self.i) {
                        Some(b',') | Some(b'}') => Value::Null,
                        _ => self.value()?,
                    };
                    map.insert(key, v);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {}
                        _ => return Err(err(self.no, "expected `,` or `}`")),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(Value::Array(items));
                    }
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {}
                        _ => return Err(err(self.no, "expected `,` or `]`")),
                    }
                }
            }
            _ => self.atom(false),
        }
    }

    /// A scalar inside a flow collection; `key` stops plain scalars at `:`.
    fn atom(&mut self, key: bool) -> Result<Value, YamlError> {
        let rest = &self.src[self.i..];
        if rest.starts_with('"') || rest.starts_with('\'') {
            let (v, used) = quoted(rest, self.no)?;
            self.i += used;
            return Ok(Value::String(v));
        }
        let mut end = self.i;
        while end < self.s.len() {
            let c = self.s[end];
            if c == b',' || c == b'}' || c == b']' {
                break;
            }
            if c == b':' && (key || self.s.get(end + 1).is_none_or(|n| *n == b' ')) {
                break;
            }
            end += 1;
        }
        let v = plain(self.src[self.i..end].trim());
        self.i = end;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn flow_style_kubeconfig() {
        let src = r#"apiVersion: v1
kind: Config
clusters:
- name: edgeport-test
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: "/tmp/ca.crt"}
users:
- name: agent
  user: {token: "abc123"}
contexts:
- name: agent
  context: {cluster: edgeport-test, user: agent, namespace: default}
current-context: agent
"#;
        let v = parse(src).unwrap();
        assert_eq!(v["current-context"], "agent");
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(v["users"][0]["user"]["token"], "abc123");
        assert_eq!(v["contexts"][0]["context"]["cluster"], "edgeport-test");
    }

    #[test]
    fn block_style_kubeconfig() {
        let src = "# k3s\napiVersion: v1\nclusters:\n  - cluster:\n      certificate-authority-data: QUJD # comment\n      server: https://127.0.0.1:6443\n    name: default\ncontexts:\n- context:\n    cluster: default\n    user: default\n  name: default\ncurrent-context: default\nusers:\n- name: default\n  user:\n    client-certificate-data: 'eA=='\n    client-key-data: \"eQ==\"\n";
        let v = parse(src).unwrap();
        assert_eq!(v["clusters"][0]["name"], "default");
        assert_eq!(
            v["clusters"][0]["cluster"]["certificate-authority-data"],
            "QUJD"
        );
        assert_eq!(v["users"][0]["user"]["client-key-data"], "eQ==");
        assert_eq!(v["contexts"][0]["context"]["user"], "default");
    }

    #[test]
    fn every_truncation_parses_or_errors() {
        let src = "apiVersion: v1\nclusters:\n- name: 'a''b'\n  cluster: {server: \"https://h:1\", x: [1, {y: z}]}\nusers:\n  - name: u # c\n    user:\n      token: t\n";
        for i in 0..=src.len() {
            let _ = parse(&src[..i]);
            let _ = parse(&src[i..]);
        }
        let v = parse(src).unwrap();
        assert_eq!(v["clusters"][0]["name"], "a'b");
        assert_eq!(v["clusters"][0]["cluster"]["x"][1]["y"], "z");
        assert_eq!(v["users"][0]["user"]["token"], "t");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in ["a: {b: c", "a: \"x", "a: |\n  x", "- a\nb: c", "\tk: v"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}

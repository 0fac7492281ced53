//! PROTOCOL.md, read as the contract it is: the blocks it lists (enums with their variant
//! numbers, structs with their fields in order, close and reset codes, constants, defaults,
//! worked examples in bytes) parsed here, and the layout of a serde type read from the type
//! itself, so that `tests/protocol.rs` holds the document and the code to each other.
//!
//! The blocks are fenced code blocks whose first line says what they are:
//!
//! - `enum NAME`, then one line per variant: its number, its name, its fields;
//! - `struct NAME`, then one line per field: `name: type`;
//! - `codes NAME`, then one line per code: `0xHEX NAME meaning`;
//! - `constants` or `defaults NAME`, then `key = value` lines;
//! - `example: NAME`, then lines of hex bytes, `|`, and a comment.
//!
//! Anything after `//` on a line is a comment.
#![warn(missing_docs, unreachable_pub)]

use std::fmt;

use serde::de::{self, DeserializeOwned, Visitor};

/// One block of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// An enum: `(number, variant name)` in the order listed.
    Enum {
        /// Its name.
        name: String,
        /// Its variants.
        variants: Vec<(u64, String)>,
    },
    /// A struct: its field names in order.
    Struct {
        /// Its name.
        name: String,
        /// Its fields.
        fields: Vec<String>,
    },
    /// Codes: `(code, name)`.
    Codes {
        /// Which codes.
        name: String,
        /// The codes.
        codes: Vec<(u64, String)>,
    },
    /// `key = value` pairs (`constants`, or `defaults NAME`).
    Values {
        /// `constants`, or the name after `defaults`.
        name: String,
        /// The pairs.
        values: Vec<(String, String)>,
    },
    /// A worked example: the bytes it shows.
    Example {
        /// Its name.
        name: String,
        /// Its bytes.
        bytes: Vec<u8>,
    },
}

/// Why the document does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(pub String);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

fn strip_comment(line: &str) -> &str {
    line.split("//").next().unwrap_or("").trim_end()
}

/// Every block of `doc`, in order.
///
/// # Errors
/// A block that says what it is but does not parse, with its line.
pub fn blocks(doc: &str) -> Result<Vec<Block>, SpecError> {
    let mut out = Vec::new();
    let mut lines = doc.lines().enumerate();
    while let Some((_, line)) = lines.next() {
        if !line.trim_start().starts_with("```") {
            continue;
        }
        let mut body: Vec<(usize, &str)> = Vec::new();
        for (n, l) in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            body.push((n + 1, l));
        }
        let Some(&(first_line, first)) = body.first() else {
            continue;
        };
        let head = strip_comment(first).trim();
        let rest = &body[1..];
        let fail = |n: usize, what: &str| SpecError(format!("PROTOCOL.md line {n}: {what}"));
        if let Some(name) = head.strip_prefix("enum ") {
            let mut variants = Vec::new();
            for &(n, l) in rest {
                let l = strip_comment(l).trim();
                if l.is_empty() {
                    continue;
                }
                let mut words = l.split_whitespace();
                let number = words
                    .next()
                    .and_then(|w| w.parse::<u64>().ok())
                    .ok_or_else(|| fail(n, "a variant line starts with its number"))?;
                let name = words
                    .next()
                    .map(|w| {
                        w.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                            .next()
                            .unwrap_or("")
                    })
                    .filter(|w| !w.is_empty())
                    .ok_or_else(|| fail(n, "a variant line names the variant"))?;
                variants.push((number, name.to_owned()));
            }
            out.push(Block::Enum {
                name: name.trim().to_owned(),
                variants,
            });
        } else if let Some(name) = head.strip_prefix("struct ") {
            let mut fields = Vec::new();
            for &(n, l) in rest {
                let l = strip_comment(l).trim();
                if l.is_empty() {
                    continue;
                }
                let (field, _) = l
                    .split_once(':')
                    .ok_or_else(|| fail(n, "a field line is `name: type`"))?;
                fields.push(field.trim().to_owned());
            }
            out.push(Block::Struct {
                name: name.trim().to_owned(),
                fields,
            });
        } else if let Some(name) = head.strip_prefix("codes ") {
            let mut codes = Vec::new();
            for &(n, l) in rest {
                let l = strip_comment(l).trim();
                if l.is_empty() {
                    continue;
                }
                let mut words = l.split_whitespace();
                let code = words
                    .next()
                    .and_then(|w| w.strip_prefix("0x"))
                    .and_then(|w| u64::from_str_radix(w, 16).ok())
                    .ok_or_else(|| fail(n, "a code line starts with 0x and the code"))?;
                let name = words
                    .next()
                    .ok_or_else(|| fail(n, "a code line names the code"))?;
                codes.push((code, name.to_owned()));
            }
            out.push(Block::Codes {
                name: name.trim().to_owned(),
                codes,
            });
        } else if head == "constants" || head.starts_with("defaults ") {
            let name = head.strip_prefix("defaults ").unwrap_or(head).trim();
            let mut values = Vec::new();
            for &(n, l) in rest {
                let l = strip_comment(l).trim();
                if l.is_empty() {
                    continue;
                }
                let (k, v) = l
                    .split_once('=')
                    .ok_or_else(|| fail(n, "a value line is `key = value`"))?;
                values.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            out.push(Block::Values {
                name: name.to_owned(),
                values,
            });
        } else if let Some(name) = head.strip_prefix("example:") {
            let mut bytes = Vec::new();
            for &(n, l) in rest {
                let hex = l.split('|').next().unwrap_or("");
                for w in hex.split_whitespace() {
                    let b = u8::from_str_radix(w, 16)
                        .ok()
                        .filter(|_| w.len() == 2)
                        .ok_or_else(|| fail(n, "example bytes are two hex digits each"))?;
                    bytes.push(b);
                }
            }
            if bytes.is_empty() {
                return Err(fail(first_line, "an example without bytes"));
            }
            out.push(Block::Example {
                name: name.trim().to_owned(),
                bytes,
            });
        }
    }
    Ok(out)
}

/// The layout serde gives a type: what its (de)serialization names, in order. Postcard
/// numbers enum variants by their place in `variants` and writes struct fields in the
/// order of `fields`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// An enum.
    Enum {
        /// Its name.
        name: &'static str,
        /// Its variants, in order.
        variants: &'static [&'static str],
    },
    /// A struct.
    Struct {
        /// Its name.
        name: &'static str,
        /// Its fields, in order.
        fields: &'static [&'static str],
    },
}

/// The layout of `T`, as its `Deserialize` asks for it; `None` for a type that is neither
/// an enum nor a struct with named fields.
pub fn shape_of<T: DeserializeOwned>() -> Option<Shape> {
    match T::deserialize(Probe) {
        Err(Found::Shape(s)) => Some(s),
        _ => None,
    }
}

/// A deserializer that answers nothing, and stops at the first enum or struct asked of it,
/// saying what serde asked for.
struct Probe;

#[derive(Debug)]
enum Found {
    Shape(Shape),
    Other,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for Found {}

impl de::Error for Found {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Found::Other
    }
}

impl<'de> de::Deserializer<'de> for Probe {
    type Error = Found;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
        Err(Found::Other)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Found> {
        Err(Found::Shape(Shape::Enum { name, variants }))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Found> {
        Err(Found::Shape(Shape::Struct { name, fields }))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map identifier
        ignored_any
    }
}

/// The value at a dotted `path` (`limits.maxConnections`) of a JSON object, as text: a
/// string's contents, any other value as JSON.
pub fn json_at(value: &serde_json::Value, path: &str) -> Option<String> {
    let mut v = value;
    for key in path.split('.') {
        v = v.get(key)?;
    }
    Some(match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_each_kind_parse() {
        let doc = "text\n```text\nenum E // comment\n  0 A { x: u8 }\n  1 B(u64)\n```\n\
                   ```text\nstruct S\n  a: u8   // first\n  b: str\n```\n\
                   ```text\ncodes close\n  0x0 NORMAL bye\n  0x1a BIG big\n```\n\
                   ```text\nconstants\n  alpn = aqe/4\n```\n\
                   ```text\nexample: e\n00 01 | two bytes\nff    | one more\n```\n\
                   ```rust\nlet x = 1;\n```\n";
        let b = blocks(doc).expect("parse");
        assert_eq!(
            b,
            [
                Block::Enum {
                    name: "E".into(),
                    variants: vec![(0, "A".into()), (1, "B".into())]
                },
                Block::Struct {
                    name: "S".into(),
                    fields: vec!["a".into(), "b".into()]
                },
                Block::Codes {
                    name: "close".into(),
                    codes: vec![(0, "NORMAL".into()), (0x1a, "BIG".into())]
                },
                Block::Values {
                    name: "constants".into(),
                    values: vec![("alpn".into(), "aqe/4".into())]
                },
                Block::Example {
                    name: "e".into(),
                    bytes: vec![0, 1, 0xff]
                },
            ]
        );
        assert!(blocks("```text\nexample: x\nzz | no\n```\n").is_err());
    }

    #[test]
    fn shapes_come_from_the_types() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        enum E {
            A,
            B(u8),
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct S {
            x: u8,
            y: u8,
        }
        assert_eq!(
            shape_of::<E>(),
            Some(Shape::Enum {
                name: "E",
                variants: &["A", "B"]
            })
        );
        assert_eq!(
            shape_of::<S>(),
            Some(Shape::Struct {
                name: "S",
                fields: &["x", "y"]
            })
        );
        assert_eq!(shape_of::<u64>(), None);
    }
}

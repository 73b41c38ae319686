//! A strict reading of `guard.cdc.envelope.decode_document` for ops c/u/r/d without a schema wrapper.
//!
//! Anything the Python decoder would treat differently, report as an error, or that is merely unusual
//! (a schema wrapper, a non-string namespace, a boolean timestamp, an odd position) is a decline: the
//! Python path then decodes the event itself.

use std::borrow::Cow;
use std::fmt;

use serde::de;
use serde_json::value::RawValue;

use crate::json::{check, is_null, long, text, Members, Text};
use crate::Decline;

/// The parts of a Debezium envelope the sanitized record carries.
pub struct Envelope<'a> {
    pub op: u8,
    pub before: Option<Members<'a>>,
    pub after: Option<Members<'a>>,
    pub namespace: Cow<'a, str>,
    pub table: Cow<'a, str>,
    pub database: Cow<'a, str>,
    pub ts_ms: Option<i64>,
    pub source_ts_ms: Option<i64>,
    pub position: String,
}

impl<'a> Envelope<'a> {
    /// The row the table plan is chosen by: the after image, else the before image.
    pub fn row(&self) -> &Members<'a> {
        self.after
            .as_ref()
            .or(self.before.as_ref())
            .expect("read() requires an image")
    }
}

/// `ts if isinstance(ts, int) else None`, declining booleans (ints in Python) and integers beyond a long.
fn opt_ts(raw: Option<&RawValue>) -> Result<Option<i64>, Decline> {
    let Some(raw) = raw else { return Ok(None) };
    match raw.get() {
        "true" | "false" => Err(Decline),
        t if matches!(t.as_bytes().first(), Some(b'-' | b'0'..=b'9')) => match long(raw) {
            Ok(n) => Ok(Some(n)),
            Err(()) if t.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) => Ok(None), // a float
            Err(()) => Err(Decline),
        },
        _ => Ok(None),
    }
}

/// A string or null (`None`); anything else declines.
fn opt_text(raw: Option<&RawValue>) -> Result<Option<Cow<'_, str>>, Decline> {
    match raw {
        None => Ok(None),
        Some(raw) if is_null(raw) => Ok(None),
        Some(raw) => text(raw).map(Some),
    }
}

/// `str(v)` for the scalars a position is made of (a string or a long); anything else declines.
fn scalar_text(raw: &RawValue) -> Result<String, Decline> {
    if raw.get().starts_with('"') {
        return text(raw).map(Cow::into_owned);
    }
    long(raw).map(|n| n.to_string()).map_err(|()| Decline)
}

/// The top level of a record value, read in one pass: the images and the source as objects (anything
/// else there fails the read, which declines), every other member kept as its JSON text. A repeated
/// image or source fails too: Python would keep only the last one, which this reading can't follow.
struct Doc<'a> {
    /// None: absent; Some(None): null.
    before: Option<Option<Members<'a>>>,
    after: Option<Option<Members<'a>>>,
    source: Option<Members<'a>>,
    rest: Members<'a>,
}

impl<'de> de::Deserialize<'de> for Doc<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DocVisitor;
        impl<'de> de::Visitor<'de> for DocVisitor {
            type Value = Doc<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Debezium change event")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Doc<'de>, A::Error> {
                let mut doc = Doc {
                    before: None,
                    after: None,
                    source: None,
                    rest: Members(Vec::with_capacity(8)),
                };
                while let Some(Text(name)) = map.next_key::<Text<'de>>()? {
                    let repeated = match name.as_ref() {
                        "before" => doc.before.replace(map.next_value()?).is_some(),
                        "after" => doc.after.replace(map.next_value()?).is_some(),
                        "source" => doc.source.replace(map.next_value()?).is_some(),
                        _ => {
                            doc.rest.0.push((name, map.next_value::<&'de RawValue>()?));
                            false
                        }
                    };
                    if repeated {
                        return Err(de::Error::custom("repeated image or source"));
                    }
                }
                Ok(doc)
            }
        }
        d.deserialize_map(DocVisitor)
    }
}

pub fn read(value: &[u8]) -> Result<Envelope<'_>, Decline> {
    // One UTF-8 check of the whole document, then a `str` parse: from bytes, serde_json checked every
    // string it read and again every raw value it captured, and the images' values are captured twice.
    let document = std::str::from_utf8(value).map_err(|_| Decline)?;
    let doc: Doc = serde_json::from_str(document).map_err(|_| Decline)?;
    let rest = &doc.rest;
    if rest.get("payload").is_some() || rest.get("schema").is_some() {
        return Err(Decline);
    }
    // The images' values are read in full later (`Plan::values`); every other value is checked here, so
    // that what orjson would reject anywhere in the document declines.
    for (_, raw) in &rest.0 {
        check(raw)?;
    }
    let op = match text(rest.get("op").ok_or(Decline)?)?.as_ref() {
        "c" => b'c',
        "u" => b'u',
        "r" => b'r',
        "d" => b'd',
        _ => return Err(Decline),
    };
    let source = doc.source.ok_or(Decline)?;
    for (_, raw) in &source.0 {
        check(raw)?;
    }
    let table = text(source.get("table").ok_or(Decline)?)?;
    if table.is_empty() {
        return Err(Decline);
    }
    let before = doc.before.flatten();
    let after = doc.after.flatten();
    match op {
        b'c' | b'r' | b'u' if after.is_none() => return Err(Decline),
        b'd' if before.is_none() => return Err(Decline),
        _ => {}
    }
    // `source.get("schema") or source.get("db") or ""`; `str(source.get("db") or "")`.
    let schema = opt_text(source.get("schema"))?.filter(|s| !s.is_empty());
    let database = opt_text(source.get("db"))?.unwrap_or(Cow::Borrowed(""));
    let namespace = schema.unwrap_or_else(|| database.clone());
    let position = match source.get("lsn") {
        Some(lsn) if !is_null(lsn) => format!("lsn:{}", scalar_text(lsn)?),
        _ => match (source.get("file"), source.get("pos")) {
            (Some(file), Some(pos)) => {
                format!("binlog:{}:{}", scalar_text(file)?, scalar_text(pos)?)
            }
            _ => String::new(),
        },
    };
    Ok(Envelope {
        op,
        before,
        after,
        namespace,
        table,
        database,
        ts_ms: opt_ts(rest.get("ts_ms"))?,
        source_ts_ms: opt_ts(source.get("ts_ms"))?,
        position,
    })
}

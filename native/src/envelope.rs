//! A strict reading of `guard.envelope.decode_document` for ops c/u/r/d without a schema wrapper.
//!
//! Anything the Python decoder would treat differently, report as an error, or that is merely unusual
//! (a schema wrapper, a non-string namespace, a boolean timestamp, an odd position) is a decline: the
//! Python path then decodes the event itself.

use std::borrow::Cow;

use serde_json::value::RawValue;

use crate::json::{check, is_null, long, object, text, Members};
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

/// An image: absent or null is None, an object is its members, anything else declines.
fn image(raw: Option<&RawValue>) -> Result<Option<Members<'_>>, Decline> {
    match raw {
        None => Ok(None),
        Some(raw) if is_null(raw) => Ok(None),
        Some(raw) => object(raw).map(Some),
    }
}

pub fn read(value: &[u8]) -> Result<Envelope<'_>, Decline> {
    let doc: Members = serde_json::from_slice(value).map_err(|_| Decline)?;
    if doc.get("payload").is_some() || doc.get("schema").is_some() {
        return Err(Decline);
    }
    // The images' values are read in full later (`Plan::values`), the source's members below; every
    // other member is checked here. A repeated image or source (only its last one would be read) declines.
    let mut structural = 0;
    for (name, raw) in &doc.0 {
        if matches!(name.as_ref(), "before" | "after" | "source") {
            structural += 1;
        } else {
            check(raw)?;
        }
    }
    let distinct = ["before", "after", "source"]
        .iter()
        .filter(|n| doc.get(n).is_some())
        .count();
    if structural != distinct {
        return Err(Decline);
    }
    let op = match text(doc.get("op").ok_or(Decline)?)?.as_ref() {
        "c" => b'c',
        "u" => b'u',
        "r" => b'r',
        "d" => b'd',
        _ => return Err(Decline),
    };
    let source = object(doc.get("source").ok_or(Decline)?)?;
    for (_, raw) in &source.0 {
        check(raw)?;
    }
    let table = text(source.get("table").ok_or(Decline)?)?;
    if table.is_empty() {
        return Err(Decline);
    }
    let before = image(doc.get("before"))?;
    let after = image(doc.get("after"))?;
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
        ts_ms: opt_ts(doc.get("ts_ms"))?,
        source_ts_ms: opt_ts(source.get("ts_ms"))?,
        position,
    })
}

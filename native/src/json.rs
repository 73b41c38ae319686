//! Reading a record's JSON without building a Python object per field.
//!
//! The envelope and the rows are read with serde_json into borrowed members whose values stay JSON
//! text (`RawValue`) until a column needs one. Nulls, booleans, integers that fit a long and strings are
//! handled here; every other value (a float, an integer beyond a long, an array or object) becomes the
//! Python object orjson makes of its text, so its encodings are orjson's, exactly as on the Python path.

use std::borrow::Cow;
use std::fmt;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyString};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::{Decline, Step};

/// A JSON string, borrowed from the input when it holds no escapes.
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(TextVisitor)
    }
}

/// A JSON object's members in document order, each value still as its JSON text.
pub struct Members<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> de::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // JSON gives no size hint; 32 holds a typical table row without growing.
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(32));
                while let Some(Text(name)) = map.next_key::<Text<'de>>()? {
                    out.push((name, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

impl<'a> Members<'a> {
    /// The member as Python's `dict.get` sees it: with duplicate names, the last one.
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }
}

/// A JSON string (else a decline).
pub fn text(raw: &RawValue) -> Result<Cow<'_, str>, Decline> {
    serde_json::from_str::<Text>(raw.get())
        .map(|t| t.0)
        .map_err(|_| Decline)
}

pub fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// A JSON integer's value if it fits a long; `Err` for any other number or value.
pub fn long(raw: &RawValue) -> Result<i64, ()> {
    let t = raw.get();
    let integer = matches!(t.as_bytes().first(), Some(b'-' | b'0'..=b'9'))
        && !t.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'));
    if integer {
        t.parse::<i64>().map_err(|_| ())
    } else {
        Err(())
    }
}

/// A column value.
pub enum Val<'a, 'py> {
    Null,
    Bool(bool),
    Int(i64),
    Str(Cow<'a, str>),
    /// Anything else: orjson's object for the value's text.
    Py(Bound<'py, PyAny>),
}

impl<'a, 'py> Val<'a, 'py> {
    pub fn read(raw: &'a RawValue, loads: &Bound<'py, PyAny>) -> Step<Self> {
        let t = raw.get();
        Ok(match t.as_bytes().first() {
            Some(b'n') => Val::Null,
            Some(b't') => Val::Bool(true),
            Some(b'f') => Val::Bool(false),
            Some(b'"') => Val::Str(text(raw)?),
            _ => match long(raw) {
                Ok(n) => Val::Int(n),
                Err(()) => Val::Py(loads.call1((t,))?),
            },
        })
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Val::Null)
    }

    /// The value as a Python object (what orjson would have made of it).
    pub fn to_py(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self {
            Val::Null => py.None().into_bound(py),
            Val::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
            Val::Int(n) => n.into_pyobject(py)?.into_any(),
            Val::Str(s) => PyString::new(py, s).into_any(),
            Val::Py(o) => o.clone(),
        })
    }

    /// Python's `str(value)` (the display masks of non-string values are computed from it).
    pub fn py_str(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self {
            Val::Null => PyString::new(py, "None").into_any(),
            Val::Bool(b) => PyString::new(py, if *b { "True" } else { "False" }).into_any(),
            Val::Int(n) => PyString::new(py, &n.to_string()).into_any(),
            Val::Str(s) => PyString::new(py, s).into_any(),
            Val::Py(o) => o.str()?.into_any(),
        })
    }

    /// Appends the value as orjson writes it (compact JSON).
    pub fn put_json(&self, out: &mut Vec<u8>, dumps: &Bound<'py, PyAny>) -> PyResult<()> {
        match self {
            Val::Null => out.extend_from_slice(b"null"),
            Val::Bool(true) => out.extend_from_slice(b"true"),
            Val::Bool(false) => out.extend_from_slice(b"false"),
            Val::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Val::Str(s) => {
                serde_json::to_writer(&mut *out, s.as_ref()).expect("writing JSON to a Vec")
            }
            Val::Py(o) => {
                out.extend_from_slice(dumps.call1((o,))?.downcast::<PyBytes>()?.as_bytes())
            }
        }
        Ok(())
    }

    /// `avro_fast._value_bytes`: a string's UTF-8, anything else as orjson's JSON text.
    pub fn value_bytes(
        &self,
        py: Python<'py>,
        dumps: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Val::Str(s) => Ok(PyBytes::new(py, s.as_bytes()).into_any()),
            Val::Py(o) => dumps.call1((o,)),
            other => {
                let mut out = Vec::with_capacity(20);
                other.put_json(&mut out, dumps)?;
                Ok(PyBytes::new(py, &out).into_any())
            }
        }
    }
}

/// Any JSON value read in full without keeping it: strings are decoded (a lone surrogate fails) and
/// numbers converted (an infinite float fails), so a document the native path accepts is one orjson
/// accepts too, even in members it never uses.
pub struct Checked;

impl<'de> de::Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Checked, E> {
        if v.is_finite() {
            Ok(Checked)
        } else {
            Err(E::custom("number is infinite"))
        }
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// Whether orjson would read this value too (see `Checked`).
pub fn check(raw: &RawValue) -> Result<(), Decline> {
    serde_json::from_str::<Checked>(raw.get())
        .map(|_| ())
        .map_err(|_| Decline)
}

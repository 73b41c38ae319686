//! Kafka-key tokens in the compiled path: keyed BLAKE2b/128 under a blind-index key held in Rust.
//!
//! Why: a native run asked the sanitizer (`Protector.sanitize_key`, a Python call with a JSON parse, a
//! policy lookup per column, a hash and a JSON dump) for every Kafka key it had not memoised; with a
//! branch's traffic nearly every key is new (~7% of a guard worker). `sanitize_key` here writes the same
//! bytes for the ordinary key (a JSON object of integers and plain strings) and declines anything else,
//! which then takes the Python callback as before.
//!
//! `TokenKey` is `guard.keys.primitives.BlindIndex`'s native twin: the same keyed BLAKE2b (RFC 7693,
//! digest 16 bytes, as `hashlib.blake2b(value, key=key, digest_size=16)`, 32 hex digits), by RustCrypto's
//! `blake2`. No method returns its key, its repr hides it, pickling and copying are refused, and its copy
//! of the key is zeroed when it is freed.

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::Blake2bMac;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use crate::json::{long, Members};

/// BLAKE2b keys are 1 to 64 bytes (RFC 7693).
const MAX_KEY_BYTES: usize = 64;

/// A blind-index key: keyed BLAKE2b/128 tokens as 32 hex digits.
#[pyclass(module = "guard_native", frozen)]
pub(crate) struct TokenKey {
    key: Zeroizing<Vec<u8>>,
}

impl TokenKey {
    /// The token of `value`: hex of keyed BLAKE2b with a 16-byte digest.
    pub(crate) fn token(&self, value: &[u8]) -> String {
        let mut mac = <Blake2bMac<U16> as KeyInit>::new_from_slice(&self.key)
            .expect("key length checked at construction");
        mac.update(value);
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(32);
        for b in digest {
            out.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
            out.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
        }
        out
    }
}

#[pymethods]
impl TokenKey {
    #[new]
    fn new(key: &[u8]) -> PyResult<Self> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(PyValueError::new_err("a BLAKE2b key is 1 to 64 bytes"));
        }
        Ok(TokenKey {
            key: Zeroizing::new(key.to_vec()),
        })
    }

    /// The token of `value` (`BlindIndex.token`).
    #[pyo3(name = "token")]
    fn py_token(&self, value: &[u8]) -> String {
        self.token(value)
    }

    fn __repr__(&self) -> &'static str {
        "TokenKey(key=<hidden>)"
    }

    /// Refused: a pickled (or copied) key would be the key's bytes outside this object.
    fn __reduce__(&self) -> PyResult<()> {
        Err(PyTypeError::new_err(
            "a TokenKey cannot be pickled or copied: its key stays in this object",
        ))
    }

    fn __reduce_ex__(&self, _protocol: i32) -> PyResult<()> {
        self.__reduce__()
    }
}

/// How a Kafka key's column is carried: in clear, or as its token under the column's `row_key` key.
pub(crate) enum KeyColumn {
    Clear,
    Token(Py<TokenKey>),
}

/// A JSON value orjson writes back as the same text: an integer that fits a long (not `-0`), or a
/// string without escapes (so without quotes, backslashes or control characters: orjson writes such a
/// string's UTF-8 as is). Anything else: None.
fn plain(raw: &RawValue) -> Option<&str> {
    let t = raw.get();
    match t.as_bytes().first() {
        Some(b'"') => (!t.contains('\\')).then_some(t),
        _ => match long(raw) {
            Ok(n) if n.to_string() == t => Some(t),
            _ => None,
        },
    }
}

/// A member name orjson writes as is (no character it escapes).
fn plain_name(name: &str) -> bool {
    !name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
}

/// The sanitized Kafka key (`guard.pipeline.protect.Protector.sanitize_key`) of a JSON-object key whose
/// values are integers and plain strings, each column in clear or as its token (`column(name)` says
/// which); `Ok(None)` for any other key (a schema wrapper, another JSON value, nested or float values,
/// escapes, repeated names, not JSON), which the Python callback then sanitizes.
pub(crate) fn sanitize_key(
    py: Python<'_>,
    raw: &[u8],
    mut column: impl FnMut(&str) -> PyResult<KeyColumn>,
) -> PyResult<Option<Vec<u8>>> {
    let Ok(text) = std::str::from_utf8(raw) else {
        return Ok(None);
    };
    let Ok(Members(members)) = serde_json::from_str::<Members>(text) else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(raw.len() + 48 * members.len());
    out.push(b'{');
    for (n, (name, value)) in members.iter().enumerate() {
        let Some(value) = plain(value) else {
            return Ok(None);
        };
        if !plain_name(name)
            || members[..n].iter().any(|(other, _)| other == name)
            || (name == "payload" && members.iter().any(|(other, _)| other == "schema"))
        {
            return Ok(None);
        }
        if n > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        match column(name)? {
            KeyColumn::Clear => out.extend_from_slice(value.as_bytes()),
            KeyColumn::Token(key) => {
                out.push(b'"');
                out.extend_from_slice(key.bind(py).get().token(value.as_bytes()).as_bytes());
                out.push(b'"');
            }
        }
    }
    out.push(b'}');
    Ok(Some(out))
}

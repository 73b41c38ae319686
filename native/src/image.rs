//! One image writer per table plan: a row's values in, the image's Avro bytes out
//! (`guard.records.encoders.ImageWriter`, whose output these bytes must equal).

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyFloat, PyInt, PyString};

use crate::avro::{put_long, put_str, str_enc};
use crate::json::{Members, Val};
use crate::mask::{fast_mask, MaskKind};
use crate::memo::{Memo, MemoBook, MEMO_MAX_BYTES};
use crate::token::TokenKey;
use crate::{Decline, Step};

/// Data-subject tokens computed here (`KeyManager.subject_token`): keyed BLAKE2b/128 under the tenant's
/// `subject_token` index key of `b"subject\0"`, the branch and the id's text, each u32-length-prefixed (the
/// prefix up to the id is kept). Without it (a `FastPath` built without `subject_key`) the sanitizer's
/// `subject_of` is called, once per distinct id.
pub struct SubjectTokens {
    pub key: Py<TokenKey>,
    /// `b"subject\0"`, the branch's length (u32 big-endian) and its UTF-8.
    pub prefix: Vec<u8>,
}

impl SubjectTokens {
    pub fn new(key: Py<TokenKey>, branch: &str) -> Self {
        let mut prefix = b"subject\0".to_vec();
        prefix.extend_from_slice(&(branch.len() as u32).to_be_bytes());
        prefix.extend_from_slice(branch.as_bytes());
        SubjectTokens { key, prefix }
    }

    /// The token of an integer or string id (Python's `str(id)` of either: an integer's decimal digits, a
    /// string itself); None for any other value, whose token the Python callback computes.
    pub fn of(&self, py: Python<'_>, id: &Val<'_, '_>) -> Option<String> {
        let digits;
        let text: &str = match id {
            Val::Int(n) => {
                digits = n.to_string();
                &digits
            }
            Val::Str(s) => s.as_ref(),
            _ => return None,
        };
        let mut data = Vec::with_capacity(self.prefix.len() + 4 + text.len());
        data.extend_from_slice(&self.prefix);
        data.extend_from_slice(&(text.len() as u32).to_be_bytes());
        data.extend_from_slice(text.as_bytes());
        Some(self.key.bind(py).get().token(&data))
    }
}

pub struct Column {
    pub name: Py<PyString>,
    /// The column name as an Avro string (map key).
    pub key: Vec<u8>,
    /// Position of the column in the plan's row layout.
    pub idx: usize,
}

impl Column {
    pub fn new(py: Python<'_>, name: &str, columns: &[String]) -> PyResult<Self> {
        let idx = columns.iter().position(|c| c == name).ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!(
                "column {name:?} is not in the plan's columns"
            ))
        })?;
        Ok(Column {
            name: PyString::intern(py, name).unbind(),
            key: str_enc(name),
            idx,
        })
    }
}

/// A row's values in the plan's column order.
pub type Values<'a, 'py> = Vec<Val<'a, 'py>>;

pub struct Plan {
    pub id: u64,
    pub schema_table_py: Py<PyString>,
    pub columns: Vec<String>,
    /// Position of the subject column in the row layout (None: the table has none, or not in this layout).
    pub subject_idx: Option<usize>,
    /// Whether events of this plan may take the native path at all (no unclassified columns).
    pub usable: bool,
    pub subject_root: bool,
    pub clear: Vec<Column>,
    /// Each masked column, its kind as the Python callback takes it, and as `mask::fast_mask` takes it.
    pub masks: Vec<(Column, Py<PyString>, MaskKind)>,
    pub index: Vec<Column>,
    /// Each index column's blind-index key (`KeyManager.index_for(column, "search")`), its tokens then
    /// computed here; empty when the plan was registered without them (the `token` callback then).
    pub index_keys: Vec<Py<TokenKey>>,
    pub hashed: Vec<Column>,
    pub dropped_enc: Vec<u8>,
    pub sealed: Vec<Column>,
    /// Union branch 1 + the array of sealed field names (the `sealed.fields` of the image).
    pub sealed_head: Vec<u8>,
    /// The field-list part of the associated data, length-prefixed (`guard.protect.aad.field_list_part`).
    pub sealed_fields_part: Vec<u8>,
    /// Each masked column's and index column's memo of encoded results by string value (`memo.rs`), for
    /// the values whose result comes from a call back into Python (`write_image`).
    pub mask_memo: Vec<Memo<String, Vec<u8>>>,
    pub index_memo: Vec<Memo<String, Vec<u8>>>,
    /// The young entries of all of this plan's memos, and their lookups and hits.
    pub memo_book: MemoBook,
    /// Data-subject tokens by subject id: `Sanitizer._subject_for` is called once per id, not per event.
    /// Rows without a usable id (null, empty, another type, no subject column) decline: the Python path
    /// gives them their per-row subject.
    pub subject_ints: Memo<i64, Py<PyString>>,
    pub subject_strs: Memo<String, Py<PyString>>,
    /// How long the table's data is kept (seconds): the value of its subject-activity entries.
    pub retention_s: i64,
    /// Columns with amount bands (catalog `bands`): a create hands their values back to the sanitizer,
    /// which reports the band a new row reaches (`Sanitizer._run_band_facts`).
    pub banded: Vec<Column>,
}

impl Plan {
    /// Forget every memoised value (both generations): they are keyed by plaintext.
    pub fn clear_memo(&mut self) {
        self.mask_memo.iter_mut().for_each(Memo::clear);
        self.index_memo.iter_mut().for_each(Memo::clear);
        self.subject_ints.clear();
        self.subject_strs.clear();
        self.memo_book.cleared();
    }

    /// Age this plan's memos when their young generations hold half of `memo_limit` (`memo.rs`): called
    /// before the inserts of an event or a record, so that the entries held stay within the limit.
    pub fn age_memo_if_full(&mut self, memo_limit: usize) {
        self.memo_book.age_if_full(memo_limit, || {
            self.mask_memo.iter_mut().for_each(Memo::age);
            self.index_memo.iter_mut().for_each(Memo::age);
            self.subject_ints.age();
            self.subject_strs.age();
        });
    }

    /// Entries held in this plan's memos (both generations).
    pub fn memo_len(&self) -> usize {
        self.mask_memo.iter().map(Memo::len).sum::<usize>()
            + self.index_memo.iter().map(Memo::len).sum::<usize>()
            + self.subject_ints.len()
            + self.subject_strs.len()
    }

    /// The data subject's token for a row of this plan: from the memo, else computed here (`native`), else
    /// by `compute(subject id)`.
    /// Only integer and non-empty string ids name a person (`guard.pipeline.plan.is_subject_id`); any
    /// other row declines (the Python path seals it under its per-row key).
    pub fn subject_token<'py>(
        &mut self,
        py: Python<'py>,
        values: &Values<'_, 'py>,
        memo_limit: usize,
        native: Option<&SubjectTokens>,
        compute: impl FnOnce(Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>>,
    ) -> Step<Bound<'py, PyAny>> {
        let id = match self.subject_idx.map(|i| &values[i]) {
            Some(v @ Val::Int(_)) => v,
            Some(v @ Val::Str(s)) if !s.is_empty() => v,
            // An integer beyond a long is an id too (Python's `int`), computed each time, never memoised.
            Some(v @ Val::Py(o)) if o.is_exact_instance_of::<PyInt>() => v,
            _ => return Err(Decline.into()),
        };
        let book = &mut self.memo_book;
        let hit = match id {
            Val::Int(n) => self.subject_ints.get(n, book),
            Val::Str(s) => self.subject_strs.get(s.as_ref(), book),
            _ => None,
        };
        if let Some(token) = hit {
            return Ok(token.bind(py).clone().into_any());
        }
        let token = match native.and_then(|n| n.of(py, id)) {
            Some(token) => PyString::new(py, &token).into_any(),
            None => compute(id.to_py(py)?)?,
        };
        let memo = token
            .downcast::<PyString>()
            .map_err(PyErr::from)?
            .clone()
            .unbind();
        self.age_memo_if_full(memo_limit);
        let book = &mut self.memo_book;
        match id {
            Val::Int(n) => self.subject_ints.insert(*n, memo, book),
            Val::Str(s) if s.len() <= MEMO_MAX_BYTES => {
                self.subject_strs.insert(s.clone().into_owned(), memo, book)
            }
            _ => {}
        }
        Ok(token)
    }

    /// Whether the row's columns are exactly this plan's, in order (the Python path's key is
    /// `tuple(row)`; a row with a repeated column never matches, so it declines).
    pub fn matches(&self, row: &Members<'_>) -> bool {
        row.0.len() == self.columns.len()
            && row.0.iter().zip(&self.columns).all(|((k, _), c)| k == c)
    }

    /// The row's values in column order (the row must match the plan).
    pub fn values<'a, 'py>(
        &self,
        row: &Members<'a>,
        loads: &Bound<'py, PyAny>,
    ) -> Step<Values<'a, 'py>> {
        // Not `collect()`: into a `Result` it loses the length hint and grows the vector four times.
        let mut values = Vec::with_capacity(row.0.len());
        for (_, raw) in &row.0 {
            values.push(Val::read(raw, loads)?);
        }
        Ok(values)
    }
}

/// The position of the plan among a table's plans that matches `row`, or a decline.
pub fn find_plan(candidates: &[Plan], row: &Members<'_>) -> Result<usize, Decline> {
    candidates
        .iter()
        .position(|p| p.matches(row))
        .ok_or(Decline)
}

pub struct Callbacks<'py> {
    pub dumps: Bound<'py, PyAny>,
    pub mask: Bound<'py, PyAny>,
    pub token: Bound<'py, PyAny>,
    pub keyed_hash: Bound<'py, PyAny>,
}

/// A callback's result as text: masks, tokens and keyed hashes are Python `str`.
fn text_of<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    obj.downcast::<PyString>()?.to_str()
}

/// A clear column as the ["null","boolean","long","double","string"] union (`avro_fast._clear_value`).
fn put_clear_value(out: &mut Vec<u8>, v: &Val<'_, '_>, dumps: &Bound<'_, PyAny>) -> PyResult<()> {
    match v {
        Val::Null => out.push(0),
        Val::Bool(b) => {
            out.push(2);
            out.push(u8::from(*b));
        }
        Val::Int(n) => {
            out.push(4);
            put_long(out, *n);
        }
        Val::Str(s) => {
            out.push(8);
            put_str(out, s.as_bytes());
        }
        Val::Py(o) if o.is_exact_instance_of::<PyFloat>() => {
            out.push(6);
            let f = o.downcast::<PyFloat>()?.value();
            out.extend_from_slice(&f.to_le_bytes());
        }
        Val::Py(o) if o.is_exact_instance_of::<PyInt>() => {
            // Beyond a long: carried as its decimal text, like the Python path.
            out.push(8);
            put_str(out, o.str()?.to_str()?.as_bytes());
        }
        Val::Py(o) => {
            // Nested JSON (objects, arrays): its compact JSON text, exactly as orjson writes it.
            out.push(8);
            put_str(out, dumps.call1((o,))?.downcast::<PyBytes>()?.as_bytes());
        }
    }
    Ok(())
}

/// One map of the image (masks, blind indexes or keyed hashes): an entry per non-null column value,
/// its text from `compute(slot, value, entries)`.
fn put_map<'a, 'py, C>(
    out: &mut Vec<u8>,
    entries: &mut Vec<u8>,
    values: &Values<'a, 'py>,
    columns: impl Iterator<Item = C>,
    key: impl Fn(&C) -> (usize, &[u8]),
    mut compute: impl FnMut(usize, &Val<'a, 'py>, &mut Vec<u8>) -> PyResult<()>,
) -> PyResult<()> {
    let mut count = 0;
    for (slot, column) in columns.enumerate() {
        let (idx, column_key) = key(&column);
        let v = &values[idx];
        if v.is_null() {
            continue;
        }
        count += 1;
        entries.extend_from_slice(column_key);
        compute(slot, v, entries)?;
    }
    if count > 0 {
        put_long(out, count as i64);
        out.extend_from_slice(entries);
    }
    out.push(0);
    entries.clear();
    Ok(())
}

/// Appends the encoded text of `value` through `memo` when it is a string (computing and remembering it
/// on a miss), else computes it each time: 1, 1.0 and True would be equal keys, and only strings repeat.
fn put_memoised<'py>(
    entries: &mut Vec<u8>,
    value: &Val<'_, 'py>,
    memo: &mut Memo<String, Vec<u8>>,
    book: &mut MemoBook,
    of_str: impl FnOnce(&str) -> PyResult<Vec<u8>>,
    of_other: impl FnOnce() -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<()> {
    if let Val::Str(s) = value {
        if let Some(enc) = memo.get(s.as_ref(), book) {
            entries.extend_from_slice(enc);
        } else {
            let enc = of_str(s)?;
            entries.extend_from_slice(&enc);
            if s.len() <= MEMO_MAX_BYTES {
                memo.insert(s.clone().into_owned(), enc, book);
            }
        }
    } else {
        put_str(entries, text_of(&of_other()?)?.as_bytes());
    }
    Ok(())
}

/// A blind-index token computed here, each time: of a string's UTF-8, or of any other value's JSON text
/// (`Val::value_bytes`, what the `token` callback is given). Not memoised: see `write_image`.
fn put_token(
    entries: &mut Vec<u8>,
    value: &Val<'_, '_>,
    key: &TokenKey,
    dumps: &Bound<'_, PyAny>,
) -> PyResult<()> {
    if let Val::Str(s) = value {
        put_str(entries, key.token(s.as_bytes()).as_bytes());
    } else {
        let bytes = value.value_bytes(dumps.py(), dumps)?;
        put_str(
            entries,
            key.token(bytes.downcast::<PyBytes>()?.as_bytes())
                .as_bytes(),
        );
    }
    Ok(())
}

/// The sanitized image of one row (Avro, the `guard.records` schema's layout), appended to a fresh buffer.
///
/// What the row's masks and blind indexes need of Python (a mask of a kind or shape `mask::fast_mask` does
/// not answer, a token whose key the plan does not hold) is memoised by string value; what is computed here
/// is not. Measured on the bench's realistic workload (docs/benchmark.md round 29): the memo lookups cost
/// about what they saved (fast masks and BLAKE2b tokens are a few hundred nanoseconds; ~50% of lookups hit),
/// while the memos kept up to `memo_limit` plaintext values per plan in the worker's memory, ~30 MiB of its
/// peak RSS. A value is held no longer than its event where the memo gains nothing.
pub fn write_image(
    plan: &mut Plan,
    values: &Values<'_, '_>,
    ciphertext: &[u8],
    cb: &Callbacks<'_>,
    memo_limit: usize,
) -> Step<Vec<u8>> {
    let py = cb.dumps.py();
    let mut out = Vec::with_capacity(1024 + ciphertext.len());
    out.push(2);
    if !plan.clear.is_empty() {
        put_long(&mut out, plan.clear.len() as i64);
        for col in &plan.clear {
            out.extend_from_slice(&col.key);
            put_clear_value(&mut out, &values[col.idx], &cb.dumps)?;
        }
    }
    out.push(0);
    plan.age_memo_if_full(memo_limit);
    let mut entries = Vec::with_capacity(256);
    let (memos, book) = (&mut plan.mask_memo, &mut plan.memo_book);
    put_map(
        &mut out,
        &mut entries,
        values,
        plan.masks.iter(),
        |(c, _, _)| (c.idx, &c.key[..]),
        |slot, v, e| {
            let (_, kind, fast) = &plan.masks[slot];
            if let Val::Str(s) = v {
                if let Some(masked) = fast_mask(*fast, s) {
                    put_str(e, masked.as_bytes());
                    return Ok(());
                }
            }
            let kind = kind.bind(py);
            put_memoised(
                e,
                v,
                &mut memos[slot],
                book,
                |s| Ok(str_enc(text_of(&cb.mask.call1((kind, s))?)?)),
                || cb.mask.call1((kind, v.py_str(py)?)),
            )
        },
    )?;
    let (memos, book) = (&mut plan.index_memo, &mut plan.memo_book);
    put_map(
        &mut out,
        &mut entries,
        values,
        plan.index.iter(),
        |c| (c.idx, &c.key[..]),
        |slot, v, e| {
            // One blind-index key per column (`KeyManager.search_token(column, value)`): its tokens are
            // computed here when the plan holds the key, else by the callback.
            if let Some(key) = plan.index_keys.get(slot) {
                return put_token(e, v, key.bind(py).get(), &cb.dumps);
            }
            let column = plan.index[slot].name.bind(py);
            put_memoised(
                e,
                v,
                &mut memos[slot],
                book,
                |s| {
                    Ok(str_enc(text_of(
                        &cb.token.call1((column, PyBytes::new(py, s.as_bytes())))?,
                    )?))
                },
                || cb.token.call1((column, v.value_bytes(py, &cb.dumps)?)),
            )
        },
    )?;
    // C3 keyed hashes: never memoised (authentication data is not kept beyond its event).
    put_map(
        &mut out,
        &mut entries,
        values,
        plan.hashed.iter(),
        |c| (c.idx, &c.key[..]),
        |slot, v, e| {
            let digest = cb.keyed_hash.call1((
                plan.hashed[slot].name.bind(py),
                v.value_bytes(py, &cb.dumps)?,
            ))?;
            put_str(e, text_of(&digest)?.as_bytes());
            Ok(())
        },
    )?;
    out.extend_from_slice(&plan.dropped_enc);
    out.push(0); // erased: none
    if plan.sealed.is_empty() {
        out.push(0);
    } else {
        out.extend_from_slice(&plan.sealed_head);
        put_str(&mut out, ciphertext);
    }
    Ok(out)
}

/// The JSON array of the sealed columns' values: the plaintext `Aead.seal` seals (`orjson.dumps(list)`).
pub fn sealed_plaintext(
    plan: &Plan,
    values: &Values<'_, '_>,
    dumps: &Bound<'_, PyAny>,
) -> PyResult<Vec<u8>> {
    let mut out = Vec::with_capacity(512);
    out.push(b'[');
    for (i, col) in plan.sealed.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        values[col.idx].put_json(&mut out, dumps)?;
    }
    out.push(b']');
    Ok(out)
}

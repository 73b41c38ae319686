//! BranchGuard's compiled hot path.
//!
//! Why it exists: in CPython the sanitizer spent 60-100 µs per change event on bookkeeping (dict walks,
//! Avro byte assembly, per-column dispatch), more than all its cryptography together. This module does
//! that bookkeeping for the common event (a create, read, update or delete of a row whose table plan is
//! known) and nothing else:
//!
//! * it never touches key material: data keys stay inside Python's `cryptography` objects, and sealing is
//!   a call back into `Aead.seal`; display masks, blind-index tokens and C3 keyed hashes are calls back
//!   into the Python functions (masks and tokens of string values are memoised per column, as in
//!   `guard.avro_fast.ImageWriter`);
//! * it declines (returns `None`) whenever an event is anything but well formed and ordinary: a schema
//!   wrapper, an unknown or special op, an unregistered column layout, a plan with unclassified columns,
//!   a delete of a subject's root row, a value of an unexpected type. The Python path then handles the
//!   event in full, DLQ and erasure included. The native path is therefore never the only judge of an
//!   input; it is a shortcut that must produce the same bytes as `guard.sanitizer.Sanitizer`'s Python
//!   path, which the differential tests in `tests/integration/test_native_path.py` check.
//!
//! The Avro encoding follows `guard/avro_fast.py` (zig-zag varints, length-prefixed strings, unions as
//! branch index then value, maps and arrays as one block then 0).

use std::collections::HashMap;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

// --- Avro primitives -------------------------------------------------------------------------------

fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_long(out, s.len() as i64);
    out.extend_from_slice(s);
}

fn str_enc(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    put_str(&mut out, s.as_bytes());
    out
}

fn name_array(items: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    if !items.is_empty() {
        put_long(&mut out, items.len() as i64);
        for item in items {
            put_str(&mut out, item.as_bytes());
        }
    }
    out.push(0);
    out
}

/// The event can't take the native path: the caller hands the whole event to the Python path.
struct Decline;

/// Why the native path stopped: a decline, or a Python exception (from a callback) propagated as is.
enum Stop {
    Decline,
    Py(PyErr),
}

/// The result of a native step.
type Step<T> = Result<T, Stop>;

impl From<PyErr> for Stop {
    fn from(e: PyErr) -> Self {
        Stop::Py(e)
    }
}

impl From<Decline> for Stop {
    fn from(_: Decline) -> Self {
        Stop::Decline
    }
}

/// Exact-type check (`type(v) is T`): orjson only produces exact built-in types, and the Python path
/// dispatches on exact types too (a bool is not an int there).
fn exact_i64(v: &Bound<'_, PyAny>) -> Option<Result<i64, ()>> {
    if v.is_exact_instance_of::<PyInt>() {
        Some(v.extract::<i64>().map_err(|_| ()))
    } else {
        None
    }
}

/// A clear column as the ["null","boolean","long","double","string"] union (`avro_fast._clear_value`).
fn put_clear_value(out: &mut Vec<u8>, v: &Bound<'_, PyAny>, dumps: &Bound<'_, PyAny>) -> Step<()> {
    if v.is_none() {
        out.push(0);
    } else if v.is_exact_instance_of::<PyString>() {
        out.push(8);
        let s = v.downcast::<PyString>().map_err(PyErr::from)?.to_str()?;
        put_str(out, s.as_bytes());
    } else if v.is_exact_instance_of::<PyBool>() {
        out.push(2);
        out.push(if v.is_truthy()? { 1 } else { 0 });
    } else if let Some(n) = exact_i64(v) {
        match n {
            Ok(n) => {
                out.push(4);
                put_long(out, n);
            }
            Err(()) => {
                // Beyond a long: carried as its decimal text, like the Python path.
                out.push(8);
                let text = v.str()?;
                put_str(out, text.to_str()?.as_bytes());
            }
        }
    } else if v.is_exact_instance_of::<PyFloat>() {
        out.push(6);
        let f = v.downcast::<PyFloat>().map_err(PyErr::from)?.value();
        out.extend_from_slice(&f.to_le_bytes());
    } else {
        // Nested JSON (objects, arrays): its compact JSON text, exactly as orjson writes it.
        let text = dumps.call1((v,))?;
        out.push(8);
        put_str(
            out,
            text.downcast::<PyBytes>().map_err(PyErr::from)?.as_bytes(),
        );
    }
    Ok(())
}

/// `avro_fast._value_bytes`: a string's UTF-8, anything else as orjson's JSON text.
fn value_bytes<'py>(
    v: &Bound<'py, PyAny>,
    dumps: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    if v.is_exact_instance_of::<PyString>() {
        let s = v.downcast::<PyString>()?.to_str()?;
        Ok(PyBytes::new(v.py(), s.as_bytes()).into_any())
    } else {
        dumps.call1((v,))
    }
}

// --- one image writer per table plan ----------------------------------------------------------------

struct Column {
    name: Py<PyString>,
    /// The column name as an Avro string (map key).
    key: Vec<u8>,
    /// Position of the column in the plan's row layout (rows are read once, in order, into a vector).
    idx: usize,
}

impl Column {
    fn new(py: Python<'_>, name: &str, columns: &[String]) -> PyResult<Self> {
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
type Values<'py> = Vec<Bound<'py, PyAny>>;

struct Plan {
    id: u64,
    schema_table_py: Py<PyString>,
    columns: Vec<String>,
    /// The key objects of the last row that matched, held so that their addresses can't be reused: orjson
    /// hands out the same key objects for every document, so an identity check usually settles a column.
    seen_keys: Vec<Py<PyString>>,
    /// Position of the subject column in the row layout (None: the table has none, or not in this layout).
    subject_idx: Option<usize>,
    /// Whether events of this plan may take the native path at all (no unclassified columns).
    usable: bool,
    subject_root: bool,
    clear: Vec<Column>,
    masks: Vec<(Column, Py<PyString>)>,
    index: Vec<Column>,
    hashed: Vec<Column>,
    dropped_enc: Vec<u8>,
    sealed: Vec<Column>,
    /// Union branch 1 + the array of sealed field names (the `sealed.fields` of the image).
    sealed_head: Vec<u8>,
    /// `",".join(sealed)` followed by `|`: the field-list part of the associated data.
    sealed_csv: Vec<u8>,
    mask_memo: Vec<HashMap<String, Vec<u8>>>,
    index_memo: Vec<HashMap<String, Vec<u8>>>,
    memo_entries: usize,
    /// How long the table's data is kept (seconds): the value of its subject-activity entries.
    retention_s: i64,
}

impl Plan {
    fn memo_size(&self) -> usize {
        self.memo_entries
    }

    fn clear_memo(&mut self) {
        self.mask_memo.iter_mut().for_each(HashMap::clear);
        self.index_memo.iter_mut().for_each(HashMap::clear);
        self.memo_entries = 0;
    }

    /// The row's values in column order if its columns are exactly this plan's, in order (the Python
    /// path's key is `tuple(row)`), else None.
    fn bind<'py>(&mut self, row: &Bound<'py, PyDict>) -> PyResult<Option<Values<'py>>> {
        if row.len() != self.columns.len() {
            return Ok(None);
        }
        let mut values = Vec::with_capacity(self.columns.len());
        for (i, (k, v)) in row.iter().enumerate() {
            if k.as_ptr() != self.seen_keys[i].as_ptr() {
                // Not the very object that matched before (kept alive by `seen_keys`): compare the text.
                let Ok(k) = k.downcast_into::<PyString>() else {
                    return Ok(None);
                };
                if k.to_str()? != self.columns[i].as_str() {
                    return Ok(None);
                }
                self.seen_keys[i] = k.unbind();
            }
            values.push(v);
        }
        Ok(Some(values))
    }
}

struct Callbacks<'py> {
    dumps: Bound<'py, PyAny>,
    mask: Bound<'py, PyAny>,
    token: Bound<'py, PyAny>,
    keyed_hash: Bound<'py, PyAny>,
}

/// A callback's result as text: masks, tokens and keyed hashes are Python `str`.
fn text_of<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    obj.downcast::<PyString>()?.to_str()
}

/// One map of the image (masks, blind indexes or keyed hashes): an entry per non-null column value,
/// its text from `compute(slot, value, memo)`; `memo` is the column's memo for string values, if any.
fn put_map<'py, C>(
    out: &mut Vec<u8>,
    entries: &mut Vec<u8>,
    values: &Values<'py>,
    columns: impl Iterator<Item = C>,
    key: impl Fn(&C) -> (usize, &[u8]),
    mut compute: impl FnMut(usize, &Bound<'py, PyAny>, &mut Vec<u8>) -> PyResult<()>,
) -> PyResult<()> {
    let mut count = 0;
    for (slot, column) in columns.enumerate() {
        let (idx, column_key) = key(&column);
        let v = &values[idx];
        if v.is_none() {
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
    value: &Bound<'py, PyAny>,
    memo: &mut HashMap<String, Vec<u8>>,
    memo_entries: &mut usize,
    of_str: impl FnOnce(&str) -> PyResult<Bound<'py, PyAny>>,
    of_other: impl FnOnce() -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<()> {
    if value.is_exact_instance_of::<PyString>() {
        let s = value.downcast::<PyString>()?.to_str()?;
        if let Some(enc) = memo.get(s) {
            entries.extend_from_slice(enc);
        } else {
            let enc = str_enc(text_of(&of_str(s)?)?);
            entries.extend_from_slice(&enc);
            memo.insert(s.to_owned(), enc);
            *memo_entries += 1;
        }
    } else {
        put_str(entries, text_of(&of_other()?)?.as_bytes());
    }
    Ok(())
}

fn write_image(
    plan: &mut Plan,
    values: &Values<'_>,
    ciphertext: &[u8],
    cb: &Callbacks<'_>,
    memo_limit: usize,
) -> Step<Vec<u8>> {
    let py = cb.dumps.py();
    let mut out = Vec::with_capacity(512 + ciphertext.len());
    out.push(2);
    if !plan.clear.is_empty() {
        put_long(&mut out, plan.clear.len() as i64);
        for col in &plan.clear {
            out.extend_from_slice(&col.key);
            put_clear_value(&mut out, &values[col.idx], &cb.dumps)?;
        }
    }
    out.push(0);
    if plan.memo_size() > memo_limit {
        plan.clear_memo();
    }
    let mut entries = Vec::with_capacity(256);
    let (memos, memo_entries) = (&mut plan.mask_memo, &mut plan.memo_entries);
    put_map(
        &mut out,
        &mut entries,
        values,
        plan.masks.iter(),
        |(c, _)| (c.idx, &c.key[..]),
        |slot, v, e| {
            let kind = plan.masks[slot].1.bind(py);
            put_memoised(
                e,
                v,
                &mut memos[slot],
                memo_entries,
                |_| cb.mask.call1((kind, v)),
                || cb.mask.call1((kind, v.str()?)),
            )
        },
    )?;
    let (memos, memo_entries) = (&mut plan.index_memo, &mut plan.memo_entries);
    put_map(
        &mut out,
        &mut entries,
        values,
        plan.index.iter(),
        |c| (c.idx, &c.key[..]),
        |slot, v, e| {
            put_memoised(
                e,
                v,
                &mut memos[slot],
                memo_entries,
                |s| cb.token.call1((PyBytes::new(py, s.as_bytes()),)),
                || cb.token.call1((value_bytes(v, &cb.dumps)?,)),
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
            let digest = cb
                .keyed_hash
                .call1((plan.hashed[slot].name.bind(py), value_bytes(v, &cb.dumps)?))?;
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

// --- the envelope ------------------------------------------------------------------------------------

/// The parts of a Debezium envelope the sanitized record carries, for the ops the native path takes.
struct Envelope<'py> {
    op: u8,
    before: Option<Bound<'py, PyDict>>,
    after: Option<Bound<'py, PyDict>>,
    namespace: String,
    table: String,
    database: String,
    ts_ms: Option<i64>,
    source_ts_ms: Option<i64>,
    position: String,
}

fn opt_ts(v: Option<Bound<'_, PyAny>>) -> Result<Option<i64>, Decline> {
    match v {
        None => Ok(None),
        Some(v) if v.is_exact_instance_of::<PyInt>() => {
            v.extract::<i64>().map(Some).map_err(|_| Decline)
        }
        Some(v) if v.is_instance_of::<PyInt>() => Err(Decline), // bool: the Python path decides
        Some(_) => Ok(None),
    }
}

/// `str(v)` for the scalars a position is made of; anything else declines.
fn scalar_text(v: &Bound<'_, PyAny>) -> Result<String, Decline> {
    if v.is_exact_instance_of::<PyString>() {
        return v.extract::<String>().map_err(|_| Decline);
    }
    if v.is_exact_instance_of::<PyInt>() {
        return v
            .extract::<i64>()
            .map(|n| n.to_string())
            .map_err(|_| Decline);
    }
    Err(Decline)
}

/// A strict reading of `guard.envelope.decode_document` for ops c/u/r/d without a schema wrapper.
fn read_envelope<'py>(doc: &Bound<'py, PyAny>) -> Step<Envelope<'py>> {
    let py = doc.py();
    let doc = doc.downcast::<PyDict>().map_err(|_| Decline)?;
    if doc.contains(intern!(py, "payload"))? || doc.contains(intern!(py, "schema"))? {
        return Err(Decline.into());
    }
    let op = doc.get_item(intern!(py, "op"))?.ok_or(Decline)?;
    if !op.is_exact_instance_of::<PyString>() {
        return Err(Decline.into());
    }
    let op = match op.downcast::<PyString>().map_err(PyErr::from)?.to_str()? {
        "c" => b'c',
        "u" => b'u',
        "r" => b'r',
        "d" => b'd',
        _ => return Err(Decline.into()),
    };
    let source = doc.get_item(intern!(py, "source"))?.ok_or(Decline)?;
    let source = source.downcast::<PyDict>().map_err(|_| Decline)?;
    let table = source.get_item(intern!(py, "table"))?.ok_or(Decline)?;
    if !table.is_exact_instance_of::<PyString>() {
        return Err(Decline.into());
    }
    let table: String = table.extract()?;
    if table.is_empty() {
        return Err(Decline.into());
    }
    let image = |name: &Bound<'py, PyString>| -> Step<Option<Bound<'py, PyDict>>> {
        match doc.get_item(name)? {
            None => Ok(None),
            Some(v) if v.is_none() => Ok(None),
            Some(v) => Ok(Some(
                v.downcast_into_exact::<PyDict>().map_err(|_| Decline)?,
            )),
        }
    };
    let before = image(intern!(py, "before"))?;
    let after = image(intern!(py, "after"))?;
    match op {
        b'c' | b'r' | b'u' if after.is_none() => return Err(Decline.into()),
        b'd' if before.is_none() => return Err(Decline.into()),
        _ => {}
    }
    // `source.get("schema") or source.get("db") or ""`, and it must be a string.
    let mut namespace = String::new();
    for key in [intern!(py, "schema"), intern!(py, "db")] {
        if let Some(v) = source.get_item(key)? {
            if v.is_truthy()? {
                if !v.is_exact_instance_of::<PyString>() {
                    return Err(Decline.into());
                }
                namespace = v.extract()?;
                break;
            }
        }
    }
    let database = match source.get_item(intern!(py, "db"))? {
        Some(v) if v.is_truthy()? => {
            if !v.is_exact_instance_of::<PyString>() {
                return Err(Decline.into());
            }
            v.extract()?
        }
        _ => String::new(),
    };
    let position = match source.get_item(intern!(py, "lsn"))? {
        Some(lsn) if !lsn.is_none() => format!("lsn:{}", scalar_text(&lsn)?),
        _ => match (
            source.get_item(intern!(py, "file"))?,
            source.get_item(intern!(py, "pos"))?,
        ) {
            (Some(file), Some(pos)) => {
                format!("binlog:{}:{}", scalar_text(&file)?, scalar_text(&pos)?)
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
        ts_ms: opt_ts(doc.get_item(intern!(py, "ts_ms"))?)?,
        source_ts_ms: opt_ts(source.get_item(intern!(py, "ts_ms"))?)?,
        position,
    })
}

// --- the fast path -----------------------------------------------------------------------------------

/// Audit-record parts fixed per (source topic, partition, plan, op, images): see `AuditTemplate.parts`.
struct AuditParts {
    a: Vec<u8>,
    b: Vec<u8>,
    c: Vec<u8>,
    key: Py<PyBytes>,
}

/// The sanitizer's native shortcut for ordinary change events; see the module documentation.
#[pyclass(module = "guard_native")]
struct FastPath {
    branch_enc: Vec<u8>,
    sanitized_header: Vec<u8>,
    audit_header: Vec<u8>,
    subject_of: PyObject,
    aead_for: PyObject,
    audit_parts: PyObject,
    dumps: PyObject,
    mask: PyObject,
    token: PyObject,
    keyed_hash: PyObject,
    memo_limit: usize,
    /// schema.table → the plans registered for it (one per column layout).
    plans: HashMap<String, Vec<Plan>>,
    audit: HashMap<(String, i64, u64, u8, u8), AuditParts>,
    /// Raw topic → where its records go (`run`), with the memo of its sanitized Kafka keys.
    topics: HashMap<String, TopicOut>,
}

/// A raw topic's output in `run`: the sanitized topic, its partition count, and the sanitized Kafka key
/// of each raw key seen (plaintext ids: emptied with the other memos, `clear_memos`).
struct TopicOut {
    out_topic: Py<PyString>,
    partitions: i64,
    keys: HashMap<Vec<u8>, Option<Py<PyBytes>>>,
}

/// What the native transform made of one event.
struct Done<'py> {
    sanitized: Vec<u8>,
    audit: Vec<u8>,
    audit_key: Bound<'py, PyBytes>,
    subject: Bound<'py, PyAny>,
    plan_id: u64,
    retention_s: i64,
}

/// `produce(*args)`, polling and retrying while the producer's local queue is full.
fn produce_retrying<'py>(
    produce: &Bound<'py, PyAny>,
    poll: &Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
) -> PyResult<()> {
    loop {
        match produce.call1(&args) {
            Ok(_) => return Ok(()),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyBufferError>(produce.py()) => {
                poll.call1((0.2,))?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The plan of `row` among a table's plans (its position) and the row's values, or a decline.
fn find_plan<'py>(candidates: &mut [Plan], row: &Bound<'py, PyDict>) -> Step<(usize, Values<'py>)> {
    for (i, plan) in candidates.iter_mut().enumerate() {
        if let Some(values) = plan.bind(row)? {
            return Ok((i, values));
        }
    }
    Err(Decline.into())
}

fn subject_value<'py>(py: Python<'py>, plan: &Plan, values: &Values<'py>) -> Bound<'py, PyAny> {
    match plan.subject_idx {
        Some(i) => values[i].clone(),
        None => py.None().into_bound(py),
    }
}

#[pymethods]
impl FastPath {
    #[new]
    #[pyo3(signature = (*, branch, sanitized_header, audit_header, subject_of, aead_for, audit_parts, dumps, mask,
                        token, keyed_hash, memo_limit = 100_000))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        branch: &str,
        sanitized_header: Vec<u8>,
        audit_header: Vec<u8>,
        subject_of: PyObject,
        aead_for: PyObject,
        audit_parts: PyObject,
        dumps: PyObject,
        mask: PyObject,
        token: PyObject,
        keyed_hash: PyObject,
        memo_limit: usize,
    ) -> Self {
        FastPath {
            branch_enc: str_enc(branch),
            sanitized_header,
            audit_header,
            subject_of,
            aead_for,
            audit_parts,
            dumps,
            mask,
            token,
            keyed_hash,
            memo_limit,
            plans: HashMap::new(),
            audit: HashMap::new(),
            topics: HashMap::new(),
        }
    }

    /// Make a table plan known (called by the Python path the first time it meets the plan).
    #[pyo3(signature = (plan_id, schema_table, columns, *, subject_column, usable, subject_root, clear, masks,
                        index, hashed, dropped, sealed, retention_s))]
    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        py: Python<'_>,
        plan_id: u64,
        schema_table: &str,
        columns: Vec<String>,
        subject_column: Option<&str>,
        usable: bool,
        subject_root: bool,
        clear: Vec<String>,
        masks: Vec<(String, String)>,
        index: Vec<String>,
        hashed: Vec<String>,
        dropped: Vec<String>,
        sealed: Vec<String>,
        retention_s: i64,
    ) -> PyResult<()> {
        let entry = self.plans.entry(schema_table.to_owned()).or_default();
        if entry
            .iter()
            .any(|p| p.id == plan_id || p.columns == columns)
        {
            return Ok(());
        }
        let col = |c: &String| Column::new(py, c, &columns);
        let clear_cols = clear.iter().map(col).collect::<PyResult<Vec<_>>>()?;
        let mask_cols = masks
            .iter()
            .map(|(c, k)| Ok((col(c)?, PyString::intern(py, k).unbind())))
            .collect::<PyResult<Vec<_>>>()?;
        let index_cols = index.iter().map(col).collect::<PyResult<Vec<_>>>()?;
        let hashed_cols = hashed.iter().map(col).collect::<PyResult<Vec<_>>>()?;
        let sealed_cols = sealed.iter().map(col).collect::<PyResult<Vec<_>>>()?;
        let mut sealed_csv = sealed.join(",").into_bytes();
        sealed_csv.push(b'|');
        let mut sealed_head = vec![2u8];
        sealed_head.extend(name_array(&sealed));
        entry.push(Plan {
            id: plan_id,
            schema_table_py: PyString::new(py, schema_table).unbind(),
            seen_keys: columns
                .iter()
                .map(|c| PyString::new(py, c).unbind())
                .collect(),
            subject_idx: subject_column.and_then(|c| columns.iter().position(|x| x == c)),
            columns,
            usable,
            subject_root,
            clear: clear_cols,
            mask_memo: mask_cols.iter().map(|_| HashMap::new()).collect(),
            masks: mask_cols,
            index_memo: index_cols.iter().map(|_| HashMap::new()).collect(),
            index: index_cols,
            hashed: hashed_cols,
            dropped_enc: name_array(&dropped),
            sealed: sealed_cols,
            sealed_head,
            sealed_csv,
            memo_entries: 0,
            retention_s,
        });
        Ok(())
    }

    /// (plan id, subject column value) of a decoded envelope whose plan is registered, else None.
    fn subject_value<'py>(
        &mut self,
        doc: &Bound<'py, PyAny>,
    ) -> PyResult<Option<(u64, Bound<'py, PyAny>)>> {
        let env = match read_envelope(doc) {
            Ok(env) => env,
            Err(Stop::Decline) => return Ok(None),
            Err(Stop::Py(e)) => return Err(e),
        };
        let row = env
            .after
            .as_ref()
            .or(env.before.as_ref())
            .expect("checked by read_envelope");
        let table = format!("{}.{}", env.namespace, env.table);
        let Some(candidates) = self.plans.get_mut(&table) else {
            return Ok(None);
        };
        let (idx, values) = match find_plan(candidates, row) {
            Ok(found) => found,
            Err(Stop::Decline) => return Ok(None),
            Err(Stop::Py(e)) => return Err(e),
        };
        let plan = &candidates[idx];
        Ok(Some((plan.id, subject_value(doc.py(), plan, &values))))
    }

    /// Sanitize one decoded change event: (sanitized value, audit value, audit key, subject, plan id),
    /// or None when the event must take the Python path.
    #[pyo3(signature = (doc, topic, partition, offset, out_topic, row_key, trace_id, now_ms))]
    #[allow(clippy::too_many_arguments)]
    fn process<'py>(
        &mut self,
        doc: &Bound<'py, PyAny>,
        topic: &str,
        partition: i64,
        offset: i64,
        out_topic: &str,
        row_key: &[u8],
        trace_id: Option<&str>,
        now_ms: i64,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let py = doc.py();
        match self.process_inner(
            doc, topic, partition, offset, out_topic, row_key, trace_id, now_ms,
        ) {
            Ok(done) => Ok(Some(PyTuple::new(
                py,
                [
                    PyBytes::new(py, &done.sanitized).into_any(),
                    PyBytes::new(py, &done.audit).into_any(),
                    done.audit_key.into_any(),
                    done.subject,
                    PyInt::new(py, done.plan_id).into_any(),
                ],
            )?)),
            Err(Stop::Decline) => Ok(None),
            Err(Stop::Py(e)) => Err(e),
        }
    }

    /// Sanitize and produce a run of ordinary records of a fetched batch, from `start` until the first
    /// record that needs the Python path; returns `(end, last offsets, events per plan, timestamps)`,
    /// where `end` is that record's index (`len(records)` when the run reached the end).
    ///
    /// Why: with the transform native, most of a worker's time went to the per-record glue around it in
    /// the runner (loop, outcome objects, two keyword `produce` calls, counters). Here a record costs a
    /// few C calls into confluent-kafka and two positional `produce` calls.
    ///
    /// `records` are the runner's `(message, topic, partition, offset, value)` tuples. A record's two
    /// outputs (sanitized, audit) are produced with the input's timestamp only after its transform has
    /// succeeded, so the run always stops *before* a record it can't finish, having produced nothing for
    /// it: declined by the transform, a callback error (an erased subject, a key store problem: the Python
    /// path meets the same condition and applies its policy), Kafka headers to carry on, an output over
    /// `max_record_bytes`, a panic. A `produce` error other than a full local queue (BufferError: poll,
    /// then retry) propagates, and the runner aborts the transaction.
    ///
    /// `hooks` supplies the sanitizer's side: `parse(value)` (JSON within the decoder's limits, or None),
    /// `out_topic(topic)`, `sanitize_key(topic, key)`, `load_keys(topic, partition, offset, value)`, the
    /// exception type `key_not_loaded`, the `activity` dict ((subject, sanitized topic) -> retention s)
    /// and `audit_topic`. `partitions(out_topic, topic)` is the sanitized topic's partition count.
    #[pyo3(signature = (records, start, *, produce, poll, partitions, hooks, now_ms, max_record_bytes))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        slf: &Bound<'py, Self>,
        records: &Bound<'py, PyList>,
        start: usize,
        produce: &Bound<'py, PyAny>,
        poll: &Bound<'py, PyAny>,
        partitions: &Bound<'py, PyAny>,
        hooks: &Bound<'py, PyAny>,
        now_ms: i64,
        max_record_bytes: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let py = records.py();
        let parse = hooks.getattr(intern!(py, "parse"))?;
        let out_topic_of = hooks.getattr(intern!(py, "out_topic"))?;
        let sanitize_key = hooks.getattr(intern!(py, "sanitize_key"))?;
        let load_keys = hooks.getattr(intern!(py, "load_keys"))?;
        let key_not_loaded = hooks.getattr(intern!(py, "key_not_loaded"))?;
        let activity = hooks.getattr(intern!(py, "activity"))?;
        let activity = activity.downcast::<PyDict>()?;
        let audit_topic = hooks.getattr(intern!(py, "audit_topic"))?;
        let mut last: Vec<(Bound<'py, PyString>, i64, i64)> = Vec::new();
        let mut counts: Vec<(u64, usize)> = Vec::new();
        let mut stamps: Vec<i64> = Vec::new();
        let mut i = start;
        while i < records.len() {
            let item = records.get_item(i)?;
            let item = item.downcast::<PyTuple>()?;
            let msg = item.get_item(0)?;
            let topic_obj = item.get_item(1)?;
            let topic_obj = topic_obj.downcast::<PyString>()?;
            let partition: i64 = item.get_item(2)?.extract()?;
            let offset: i64 = item.get_item(3)?.extract()?;
            let value = item.get_item(4)?;
            if value.is_none() || !msg.call_method0(intern!(py, "headers"))?.is_none() {
                break;
            }
            let doc = parse.call1((&value,))?;
            if doc.is_none() {
                break;
            }
            let topic = topic_obj.to_str()?;
            // The borrow of `self` is released while `load_keys` runs: it calls `subject_value`.
            let mut this = slf.borrow_mut();
            let memo_limit = this.memo_limit;
            if !this.topics.contains_key(topic) {
                let out = out_topic_of.call1((topic_obj,))?;
                let count: i64 = partitions.call1((&out, topic_obj))?.extract()?;
                let out = out.downcast_into::<PyString>()?.unbind();
                this.topics.insert(
                    topic.to_owned(),
                    TopicOut {
                        out_topic: out,
                        partitions: count.max(1),
                        keys: HashMap::new(),
                    },
                );
            }
            let state = this.topics.get_mut(topic).expect("inserted above");
            let out_py = state.out_topic.bind(py).clone();
            let out_partitions = state.partitions;
            let key = msg.call_method0(intern!(py, "key"))?;
            let out_key: Option<Bound<'py, PyBytes>> = if key.is_none() {
                None
            } else {
                let raw = key.downcast::<PyBytes>()?.as_bytes();
                match state.keys.get(raw) {
                    Some(k) => k.as_ref().map(|k| k.bind(py).clone()),
                    None => {
                        let k = sanitize_key.call1((topic_obj, &key))?;
                        let k = if k.is_none() {
                            None
                        } else {
                            Some(k.downcast_into::<PyBytes>()?)
                        };
                        if state.keys.len() >= memo_limit {
                            state.keys.clear();
                        }
                        state
                            .keys
                            .insert(raw.to_vec(), k.as_ref().map(|k| k.clone().unbind()));
                        k
                    }
                }
            };
            let row_key = out_key.as_ref().map(|k| k.as_bytes()).unwrap_or(b"");
            let out_topic = out_py.to_str()?;
            let attempt = |this: &mut FastPath| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    this.process_inner(
                        &doc, topic, partition, offset, out_topic, row_key, None, now_ms,
                    )
                }))
            };
            let done = match attempt(&mut this) {
                Ok(Ok(done)) => done,
                Ok(Err(Stop::Py(e))) if e.is_instance(py, &key_not_loaded) => {
                    drop(this);
                    if load_keys
                        .call1((topic_obj, partition, offset, &value))
                        .is_err()
                    {
                        break;
                    }
                    match attempt(&mut slf.borrow_mut()) {
                        Ok(Ok(done)) => done,
                        _ => break,
                    }
                }
                _ => break,
            };
            let audit_key_len = done.audit_key.as_bytes().len();
            if done.sanitized.len() + row_key.len() > max_record_bytes
                || done.audit.len() + audit_key_len > max_record_bytes
            {
                break;
            }
            let (kind, ts): (i64, i64) = msg.call_method0(intern!(py, "timestamp"))?.extract()?;
            let ts = if kind == 0 { 0 } else { ts };
            let none = py.None().into_bound(py);
            let key_arg = match &out_key {
                Some(k) => k.clone().into_any(),
                None => none.clone(),
            };
            produce_retrying(
                produce,
                poll,
                (
                    &out_py,
                    PyBytes::new(py, &done.sanitized),
                    key_arg,
                    partition.rem_euclid(out_partitions),
                    &none,
                    &none,
                    ts,
                )
                    .into_pyobject(py)?,
            )?;
            produce_retrying(
                produce,
                poll,
                (
                    &audit_topic,
                    PyBytes::new(py, &done.audit),
                    &done.audit_key,
                    -1,
                    &none,
                    &none,
                    ts,
                )
                    .into_pyobject(py)?,
            )?;
            activity.set_item((&done.subject, &out_py), done.retention_s)?;
            match last
                .iter_mut()
                .find(|(t, p, _)| *p == partition && t.to_str().ok() == Some(topic))
            {
                Some(entry) => entry.2 = offset,
                None => last.push((topic_obj.clone(), partition, offset)),
            }
            match counts.iter_mut().find(|(id, _)| *id == done.plan_id) {
                Some(entry) => entry.1 += 1,
                None => counts.push((done.plan_id, 1)),
            }
            stamps.push(ts);
            i += 1;
        }
        PyTuple::new(
            py,
            [
                i.into_pyobject(py)?.into_any(),
                PyList::new(py, last)?.into_any(),
                PyList::new(py, counts)?.into_any(),
                PyList::new(py, stamps)?.into_any(),
            ],
        )
    }

    /// Forget memoised masks and tokens: their keys are plaintext values (`Sanitizer.expire_value_caches`).
    fn clear_memos(&mut self) {
        for plans in self.plans.values_mut() {
            plans.iter_mut().for_each(Plan::clear_memo);
        }
        self.topics.values_mut().for_each(|t| t.keys.clear());
    }

    #[getter]
    fn memo_size(&self) -> usize {
        self.plans
            .values()
            .flatten()
            .map(Plan::memo_size)
            .sum::<usize>()
            + self.topics.values().map(|t| t.keys.len()).sum::<usize>()
    }
}

impl FastPath {
    #[allow(clippy::too_many_arguments)]
    fn process_inner<'py>(
        &mut self,
        doc: &Bound<'py, PyAny>,
        topic: &str,
        partition: i64,
        offset: i64,
        out_topic: &str,
        row_key: &[u8],
        trace_id: Option<&str>,
        now_ms: i64,
    ) -> Step<Done<'py>> {
        let py = doc.py();
        let env = read_envelope(doc)?;
        let schema_table = format!("{}.{}", env.namespace, env.table);
        let row = env
            .after
            .as_ref()
            .or(env.before.as_ref())
            .expect("checked by read_envelope");
        let candidates = self.plans.get_mut(&schema_table).ok_or(Decline)?;
        let (row_idx, row_values) = find_plan(candidates, row)?;
        let (plan_id, retention_s, subject, table_py) = {
            let plan = &candidates[row_idx];
            if !plan.usable || (env.op == b'd' && plan.subject_root) {
                return Err(Decline.into());
            }
            (
                plan.id,
                plan.retention_s,
                subject_value(py, plan, &row_values),
                plan.schema_table_py.clone_ref(py),
            )
        };
        let subject_obj = self.subject_of.bind(py).call1((subject, table_py))?;
        let subject = text_of(&subject_obj)?.to_owned();
        // Raises KeyShreddedError / KeyUnavailableError: the Python path then decides what they mean.
        let aead = self.aead_for.bind(py).call1((&subject_obj,))?;
        let version: i64 = aead.getattr(intern!(py, "version"))?.extract()?;
        let seal = aead.getattr(intern!(py, "seal"))?;
        let cb = Callbacks {
            dumps: self.dumps.bind(py).clone(),
            mask: self.mask.bind(py).clone(),
            token: self.token.bind(py).clone(),
            keyed_hash: self.keyed_hash.bind(py).clone(),
        };
        let mut images: [Option<Vec<u8>>; 2] = [None, None];
        for (slot, (name, image)) in [("before", &env.before), ("after", &env.after)]
            .into_iter()
            .enumerate()
        {
            let Some(image) = image else { continue };
            let found;
            let (plan_idx, values) = if image.is(row) {
                (row_idx, &row_values)
            } else {
                found = find_plan(candidates, image)?;
                (found.0, &found.1)
            };
            let plan = &mut candidates[plan_idx];
            if !plan.usable {
                return Err(Decline.into());
            }
            let ciphertext = if plan.sealed.is_empty() {
                Vec::new()
            } else {
                let sealed_values = PyList::empty(py);
                for col in &plan.sealed {
                    sealed_values.append(&values[col.idx])?;
                }
                let plaintext = cb.dumps.call1((sealed_values,))?;
                let mut aad =
                    Vec::with_capacity(96 + out_topic.len() + row_key.len() + subject.len());
                aad.extend_from_slice(b"bg1|");
                aad.extend_from_slice(out_topic.as_bytes());
                aad.push(b'|');
                aad.extend_from_slice(schema_table.as_bytes());
                aad.push(b'|');
                aad.extend_from_slice(row_key);
                aad.push(b'|');
                aad.extend_from_slice(name.as_bytes());
                aad.push(b'|');
                aad.extend_from_slice(subject.as_bytes());
                aad.push(b'|');
                aad.extend_from_slice(&plan.sealed_csv);
                aad.extend_from_slice(version.to_string().as_bytes());
                let sealed = seal.call1((plaintext, PyBytes::new(py, &aad)))?;
                sealed
                    .downcast::<PyBytes>()
                    .map_err(PyErr::from)?
                    .as_bytes()
                    .to_vec()
            };
            images[slot] = Some(write_image(
                plan,
                values,
                &ciphertext,
                &cb,
                self.memo_limit,
            )?);
        }
        // The SanitizedChange record (`avro_fast.encode_change`).
        let mut value = Vec::with_capacity(
            self.sanitized_header.len()
                + 128
                + images.iter().flatten().map(Vec::len).sum::<usize>(),
        );
        value.extend_from_slice(&self.sanitized_header);
        value.push(2);
        put_str(&mut value, &[env.op]);
        put_str(&mut value, schema_table.as_bytes());
        value.extend_from_slice(&self.branch_enc);
        put_str(&mut value, env.database.as_bytes());
        for ts in [env.ts_ms, env.source_ts_ms] {
            match ts {
                None => value.push(0),
                Some(ts) => {
                    value.push(2);
                    put_long(&mut value, ts);
                }
            }
        }
        put_str(&mut value, env.position.as_bytes());
        value.push(2);
        put_str(&mut value, subject.as_bytes());
        for image in &images {
            match image {
                None => value.push(0),
                Some(bytes) => value.extend_from_slice(bytes),
            }
        }
        value.push(0); // no unclassified columns on this path
                       // The AuditRecord (`avro_fast.AuditTemplate.encode`).
        let images_count = images.iter().flatten().count() as u8;
        let audit_key = (topic.to_owned(), partition, plan_id, env.op, images_count);
        if !self.audit.contains_key(&audit_key) {
            let parts = self.audit_parts.bind(py).call1((
                topic,
                partition,
                plan_id,
                PyString::new(py, std::str::from_utf8(&[env.op]).unwrap()),
                images_count,
            ))?;
            let (a, b, c, key): (Vec<u8>, Vec<u8>, Vec<u8>, Py<PyBytes>) = parts.extract()?;
            if self.audit.len() > 50_000 {
                self.audit.clear();
            }
            self.audit
                .insert(audit_key.clone(), AuditParts { a, b, c, key });
        }
        let parts = &self.audit[&audit_key];
        let mut audit = Vec::with_capacity(
            self.audit_header.len() + parts.a.len() + parts.b.len() + parts.c.len() + 160,
        );
        audit.extend_from_slice(&self.audit_header);
        audit.push(2);
        put_long(&mut audit, now_ms);
        audit.extend_from_slice(&parts.a);
        put_long(&mut audit, offset);
        audit.extend_from_slice(&parts.b);
        audit.push(2);
        put_str(&mut audit, subject.as_bytes());
        audit.extend_from_slice(&parts.c);
        match trace_id {
            None => audit.push(0),
            Some(t) => {
                audit.push(2);
                put_str(&mut audit, t.as_bytes());
            }
        }
        Ok(Done {
            sanitized: value,
            audit,
            audit_key: parts.key.bind(py).clone(),
            subject: subject_obj,
            plan_id,
            retention_s,
        })
    }
}

#[pymodule]
fn guard_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<FastPath>()?;
    m.add("ABI", 1)?;
    Ok(())
}

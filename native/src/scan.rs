//! Per-batch reading for the sanitizer's Python side (issue 17): the policy pre-scan of a run's writes
//! and the distinct data subjects of a batch whose keys are loaded together.
//!
//! Why: both ran as Python loops over every record of a batch (a call into the extension or a byte
//! search per record, then dict and set bookkeeping); with what they call, 16% and 11.5% of a worker's
//! main thread in a profile of `guard bench`'s realistic workload. Here one call reads the whole batch
//! and Python only does per-distinct work:
//!
//! * `scan_writes` reads each record's op, `updated_by` principal and source `ts_ms` exactly as
//!   `guard.pipeline.policy.scan_write` does (the same byte searches, so the same answer on any input,
//!   including the ones it can't read), and asks Python's `decide` once per distinct (op, topic,
//!   principal, second);
//! * `batch_subjects` reads the subject column of each record from a given one on and returns the
//!   distinct subjects' tokens (from the plan's memo, else `subject_of`, once per id), plus the records
//!   it can't read, which Python decodes as before; the envelopes it reads are kept for the run
//!   (`readahead`);
//! * `take_messages` is the runner's first pass over a fetched batch (offsets, rewind points).

use foldhash::{HashMap, HashSet};
use memchr::memmem;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyString, PyTuple};

use crate::image::find_plan;
use crate::json::Val;
use crate::memo::MEMO_MAX_BYTES;
use crate::readahead::ReadRecord;
use crate::{FastPath, Stop};

/// What the pre-scan read of a record value.
#[derive(Debug, PartialEq, Eq)]
pub enum Scanned<'a> {
    /// A snapshot read (`r`): no write of anybody.
    Read,
    /// A create or update: its op, the principal's raw bytes (None: null, absent, or empty) and the
    /// source's `ts_ms` (None: absent or zero).
    Write {
        op: u8,
        principal: Option<&'a [u8]>,
        when: Option<i64>,
    },
}

/// `guard.pipeline.policy.scan_write` on bytes: the last `"op":"`, the last `"updated_by":` if it comes
/// after the first `"after":{`, the first `"ts_ms":` from the first `"source":{` on. None: can't read it
/// this way (a delete, another op, an escaped or non-string principal, an unterminated string).
pub fn scan_write(value: &[u8]) -> Option<Scanned<'_>> {
    let i = memmem::rfind(value, b"\"op\":\"")?;
    let op = *value.get(i + 6)?;
    if op == b'r' {
        return Some(Scanned::Read);
    }
    if op != b'c' && op != b'u' {
        return None;
    }
    let mut principal = None;
    if let (Some(after), Some(j)) = (
        memmem::find(value, b"\"after\":{"),
        memmem::rfind(value, b"\"updated_by\":"),
    ) {
        if j > after {
            let k = j + 13; // within the value: the 13-byte needle ends there
            if value.get(k) == Some(&b'"') {
                let end = k + 1 + memchr::memchr(b'"', &value[k + 1..])?;
                let raw = &value[k + 1..end];
                if raw.contains(&b'\\') {
                    return None;
                }
                principal = (!raw.is_empty()).then_some(raw);
            } else if !value[k..].starts_with(b"null") {
                return None;
            }
        }
    }
    let mut when = None;
    if let Some(source) = memmem::find(value, b"\"source\":{") {
        if let Some(t) = memmem::find(&value[source..], b"\"ts_ms\":").map(|t| t + source) {
            if t > 0 {
                // Up to 16 leading digits (Python reads `value[t + 8:t + 24]`): no overflow in an i64.
                let digits = &value[t + 8..(t + 24).min(value.len())];
                let mut n: i64 = 0;
                for &ch in digits {
                    if !ch.is_ascii_digit() {
                        break;
                    }
                    n = n * 10 + i64::from(ch - b'0');
                }
                when = (n != 0).then_some(n);
            }
        }
    }
    Some(Scanned::Write {
        op,
        principal,
        when,
    })
}

/// `scan_write` for Python (the tests hold it to `guard.pipeline.policy.scan_write`): None, or
/// `(op, principal bytes or None, ts_ms or None)`.
#[pyfunction(name = "scan_write")]
pub fn py_scan_write<'py>(py: Python<'py>, value: &[u8]) -> PyResult<Option<Bound<'py, PyTuple>>> {
    let none = || py.None().into_bound(py);
    Ok(match scan_write(value) {
        None => None,
        Some(Scanned::Read) => Some(PyTuple::new(
            py,
            [PyString::new(py, "r").into_any(), none(), none()],
        )?),
        Some(Scanned::Write {
            op,
            principal,
            when,
        }) => Some(PyTuple::new(
            py,
            [
                PyString::new(py, if op == b'c' { "c" } else { "u" }).into_any(),
                principal.map_or_else(none, |p| PyBytes::new(py, p).into_any()),
                match when {
                    Some(n) => n.into_pyobject(py)?.into_any(),
                    None => none(),
                },
            ],
        )?),
    })
}

/// A distinct write of a run: (op, its topic's index in the run, principal, second of ts_ms).
type WriteKey = (u8, usize, Option<Vec<u8>>, Option<i64>);

/// The policy pre-scan of `records[start:stop]` (the runner's `(message, topic, partition, offset,
/// value)` tuples) in one call: `(end, reasons)`, where `records[start:end]` may take the native run and
/// `reasons[k]` is the write decision's text for the audit record of `records[start + k]` (None: a
/// snapshot read, no write). The scan stops at the first record with no value, on `skip_topic` (the
/// attribution messages), that `scan_write` can't read, or whose write `decide` doesn't allow.
///
/// `decide(op, topic, principal bytes or None, ts_ms or None)` returns the decision's text (bytes) when
/// the write is allowed, None when it isn't; it is called once per distinct (op, topic, principal, second
/// of ts_ms) of the call, the key of `WriteChecker.decide`'s own memo.
#[pyfunction]
#[pyo3(signature = (records, start, stop, skip_topic, decide))]
pub fn scan_writes<'py>(
    records: &Bound<'py, PyList>,
    start: usize,
    stop: usize,
    skip_topic: &str,
    decide: &Bound<'py, PyAny>,
) -> PyResult<(usize, Bound<'py, PyList>)> {
    let py = records.py();
    let stop = stop.min(records.len());
    let reasons = PyList::empty(py);
    // Each distinct write → the decision's text (None: not allowed).
    let mut decided: HashMap<WriteKey, Option<Bound<'py, PyAny>>> = HashMap::default();
    let mut topics: Vec<Bound<'py, PyString>> = Vec::new();
    let mut end = start;
    while end < stop {
        let item = records.get_item(end)?;
        let item = item.downcast::<PyTuple>()?;
        let topic = item.get_item(1)?;
        let topic = topic.downcast::<PyString>()?;
        let value = item.get_item(4)?;
        if value.is_none() || topic.to_str()? == skip_topic {
            break;
        }
        let value = value.downcast::<PyBytes>()?;
        let reason = match scan_write(value.as_bytes()) {
            None => break,
            Some(Scanned::Read) => py.None().into_bound(py),
            Some(Scanned::Write {
                op,
                principal,
                when,
            }) => {
                let name = topic.to_str()?;
                let at = match topics.iter().position(|t| t.to_str().ok() == Some(name)) {
                    Some(at) => at,
                    None => {
                        topics.push(topic.clone());
                        topics.len() - 1
                    }
                };
                let key = (
                    op,
                    at,
                    principal.map(<[u8]>::to_vec),
                    when.map(|n| n / 1000),
                );
                let text = match decided.get(&key) {
                    Some(text) => text.clone(),
                    None => {
                        let op_str = if op == b'c' { "c" } else { "u" };
                        let made = decide.call1((
                            op_str,
                            topic,
                            principal.map(|p| PyBytes::new(py, p)),
                            when,
                        ))?;
                        let made = (!made.is_none()).then_some(made);
                        decided.insert(key, made.clone());
                        made
                    }
                };
                match text {
                    Some(text) => text,
                    None => break,
                }
            }
        };
        reasons.append(reason)?;
        end += 1;
    }
    Ok((end, reasons))
}

/// The subject ids of a plan's rows met so far in a `batch_subjects` call.
#[derive(Default)]
struct Distinct {
    ints: HashSet<i64>,
    strs: HashSet<String>,
}

/// What `batch_subjects` finds: (tokens, records it can't read, each token's first record).
pub type BatchSubjects<'py> = (Bound<'py, PyList>, Bound<'py, PyList>, Bound<'py, PyList>);

/// `FastPath.batch_subjects`: see its documentation in `lib.rs`.
pub fn batch_subjects<'py>(
    slf: &Bound<'py, FastPath>,
    batch: &Bound<'py, PyList>,
    topic: &str,
    partition: i64,
    offset: i64,
) -> PyResult<Option<BatchSubjects<'py>>> {
    let py = batch.py();
    let mut first = None;
    for (i, item) in batch.iter().enumerate() {
        let item = item.downcast_into::<PyTuple>()?;
        if item.get_item(2)?.extract::<i64>()? == offset
            && item.get_item(1)?.extract::<i64>()? == partition
            && item.get_item(0)?.downcast::<PyString>()?.to_str()? == topic
        {
            first = Some(i);
            break;
        }
    }
    let Some(first) = first else {
        return Ok(None);
    };
    let tokens = PyList::empty(py);
    let rest = PyList::empty(py);
    let firsts = PyList::empty(py);
    let mut this = slf.borrow_mut();
    let this = &mut *this;
    let loads = this.loads.bind(py).clone();
    let subject_of = this.subject_of.bind(py).clone();
    let memo_limit = this.memo_limit;
    let mut seen: HashMap<u64, Distinct> = HashMap::default();
    // A new load: what an earlier one read ahead and no run took is not needed any more.
    this.read_ahead.clear();
    for i in first..batch.len() {
        let item = batch.get_item(i)?;
        let item = item.downcast::<PyTuple>()?;
        let value = item.get_item(3)?;
        if value.is_none() {
            rest.append(i)?;
            continue;
        }
        let value = value.downcast::<PyBytes>()?;
        if value.as_bytes().len() > this.max_value_bytes {
            rest.append(i)?;
            continue;
        }
        // Read once: the run that reaches this record takes this envelope (`readahead`).
        let Ok(record) = ReadRecord::read(value) else {
            rest.append(i)?;
            continue;
        };
        let env = this.read_ahead.keep(record).envelope();
        let Some(candidates) = this
            .plans
            .get_mut(&format!("{}.{}", env.namespace, env.table))
        else {
            rest.append(i)?;
            continue;
        };
        let row = env.row();
        let Ok(idx) = find_plan(candidates, row) else {
            rest.append(i)?;
            continue;
        };
        let plan = &mut candidates[idx];
        let Some(at) = plan.subject_idx else {
            continue; // rows without a subject load their per-row key on use
        };
        let id = match Val::read(row.0[at].1, &loads) {
            Ok(id) => id,
            Err(Stop::Decline) => {
                rest.append(i)?;
                continue;
            }
            Err(Stop::Py(_)) => continue, // as `_decode_and_load`: `process` meets it again
        };
        let distinct = seen.entry(plan.id).or_default();
        let token = match &id {
            Val::Int(n) => {
                if !distinct.ints.insert(*n) {
                    continue;
                }
                plan.subject_ints
                    .get(n, &mut plan.memo_book)
                    .map(|t| t.bind(py).clone())
            }
            Val::Str(s) if !s.is_empty() => {
                if !distinct.strs.insert(s.clone().into_owned()) {
                    continue;
                }
                plan.subject_strs
                    .get(s.as_ref(), &mut plan.memo_book)
                    .map(|t| t.bind(py).clone())
            }
            // An integer beyond a long is an id too (never memoised, as in `Plan::subject_token`).
            Val::Py(o) if o.is_exact_instance_of::<PyInt>() => None,
            _ => continue, // not a usable id: the row's own per-row key loads on use
        };
        let token = match token {
            Some(token) => token,
            None => {
                let made = match this.subject_tokens.as_ref().and_then(|n| n.of(py, &id)) {
                    Some(token) => PyString::new(py, &token),
                    None => {
                        let Ok(obj) = id.to_py(py) else { continue };
                        let Ok(made) = subject_of.call1((obj, plan.schema_table_py.bind(py)))
                        else {
                            continue; // as `_decode_and_load`: `process` meets the same error
                        };
                        let Ok(made) = made.downcast_into::<PyString>() else {
                            continue;
                        };
                        made
                    }
                };
                plan.age_memo_if_full(memo_limit);
                let book = &mut plan.memo_book;
                match &id {
                    Val::Int(n) => plan.subject_ints.insert(*n, made.clone().unbind(), book),
                    Val::Str(s) if s.len() <= MEMO_MAX_BYTES => plan.subject_strs.insert(
                        s.clone().into_owned(),
                        made.clone().unbind(),
                        book,
                    ),
                    _ => {}
                }
                made
            }
        };
        tokens.append(token)?;
        firsts.append(i)?;
    }
    Ok(Some((tokens, rest, firsts)))
}

/// `SanitizerWorker._process_batch`'s first pass over fetched messages, from `msgs[start]` on: each
/// message without an error joins `good` as `(message, topic, partition, offset, value)`, its partition's
/// first offset of the transaction is set in `first` (if not yet there) and its last in `ends`. Returns
/// the index of the first message with an error (the runner handles it, then calls again after it), or
/// `len(msgs)`. Why: the same loop in Python made five method calls and two dict writes per event.
#[pyfunction]
#[pyo3(signature = (msgs, start, good, first, ends))]
pub fn take_messages<'py>(
    msgs: &Bound<'py, PyList>,
    start: usize,
    good: &Bound<'py, PyList>,
    first: &Bound<'py, PyDict>,
    ends: &Bound<'py, PyDict>,
) -> PyResult<usize> {
    let py = msgs.py();
    let mut i = start;
    while i < msgs.len() {
        let msg = msgs.get_item(i)?;
        if !msg.call_method0(intern!(py, "error"))?.is_none() {
            return Ok(i);
        }
        let topic = msg.call_method0(intern!(py, "topic"))?;
        let partition = msg.call_method0(intern!(py, "partition"))?;
        let offset = msg.call_method0(intern!(py, "offset"))?;
        let tp = PyTuple::new(py, [&topic, &partition])?;
        if !first.contains(&tp)? {
            first.set_item(&tp, &offset)?;
        }
        ends.set_item(&tp, &offset)?;
        let value = msg.call_method0(intern!(py, "value"))?;
        good.append(PyTuple::new(
            py,
            [&msg, &topic, &partition, &offset, &value],
        )?)?;
        i += 1;
    }
    Ok(i)
}

/// Whether a Kafka message (confluent-kafka's `Message`, or None for bare test tuples) carries a
/// `traceparent` header: the one header the untraced Python path reads (it carries the trace context to
/// the outputs). A live Debezium connector's `__debezium.context.*` headers, on every record, don't count.
pub fn has_traceparent(msg: &Bound<'_, PyAny>) -> PyResult<bool> {
    if msg.is_none() {
        return Ok(false);
    }
    let py = msg.py();
    let headers = msg.call_method0(intern!(py, "headers"))?;
    if headers.is_none() {
        return Ok(false);
    }
    for header in headers.try_iter()? {
        let header = header?;
        let name = header.get_item(0)?;
        if let Ok(name) = name.downcast::<PyString>() {
            if name.to_str()? == "traceparent" {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The index of the first of `records[start:stop]` (the runner's `(message, topic, partition, offset,
/// value)` tuples) whose message carries a `traceparent` header, or `stop`: where a native run stops.
#[pyfunction]
#[pyo3(signature = (records, start, stop))]
pub fn first_traced(records: &Bound<'_, PyList>, start: usize, stop: usize) -> PyResult<usize> {
    let stop = stop.min(records.len());
    for i in start..stop {
        let item = records.get_item(i)?;
        if has_traceparent(&item.get_item(0)?)? {
            return Ok(i);
        }
    }
    Ok(stop)
}

//! BranchGuard's compiled hot path.
//!
//! Why it exists: in CPython the sanitizer spent 60-100 µs per change event on bookkeeping (JSON objects,
//! dict walks, Avro byte assembly, per-column dispatch, the runner's per-record glue), more than all its
//! cryptography together. This module does that bookkeeping for the common event (a create, read, update
//! or delete of a row whose table plan is known) and nothing else:
//!
//! * it seals images itself (`seal`: AES-256-GCM through OpenSSL under a `SealingKey`, the data key's
//!   native twin that the key manager's `Aead` holds; the key never leaves it) and tokenises ordinary
//!   Kafka keys (`token`: keyed BLAKE2b under a `TokenKey`, `BlindIndex`'s twin); display masks of the
//!   common shapes are computed here (`mask`, the rest by the Python function), blind-index tokens under
//!   the plan's `TokenKey`s, C3 keyed hashes by calls back into Python (what a call back into Python
//!   computes for a string value is memoised per column, as in `guard.records.encoders.ImageWriter`; what
//!   is computed here is not: `image::write_image`);
//! * it reads the record's JSON itself (`json`, `envelope`), building no Python object per field;
//! * it declines whenever an event is anything but well formed and ordinary: a schema wrapper, an unknown
//!   or special op, an unregistered column layout, a plan with unclassified columns, a delete of a
//!   subject's root row, a value it doesn't read the way orjson does. The Python path then handles the
//!   event in full, DLQ and erasure included. The native path is therefore never the only judge of an
//!   input; it is a shortcut that must produce the same bytes as the Python path of
//!   `guard.pipeline.sanitizer.Sanitizer`, which the differential tests in
//!   `tests/integration/test_native_path.py` check.
//!
//! Modules: `avro` (encoding primitives), `json` (reading values), `envelope` (the Debezium envelope),
//! `image` (table plans and image writing), `scan` (what the Python side needs of every record of a batch,
//! read in one call: the policy pre-scan, the batch's subjects), `readahead` (the envelopes read for the
//! batch's subjects, kept for the run), `memo` (memos aged in two generations), `seal` (`SealingKey`), `token`
//! (`TokenKey`, Kafka keys); this file holds `FastPath`, the Python-facing class.

mod avro;
mod envelope;
mod image;
mod json;
mod keycache;
mod mask;
mod memo;
mod readahead;
mod scan;
mod seal;
mod token;

use foldhash::HashMap;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyString, PyTuple, PyType};
use sha2::{Digest, Sha256};

use crate::avro::{name_array, put_long, put_str, str_enc};

/// Every event allocates a few dozen short-lived buffers (parsed values, image and record bytes); glibc's
/// malloc and free were ~7% of a worker's main thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use crate::envelope::Envelope;
use crate::image::{
    find_plan, sealed_plaintext, write_image, Callbacks, Column, Plan, SubjectTokens,
};
use crate::keycache::KeyCache;
use crate::mask::MaskKind;
use crate::memo::{Memo, MemoBook, KEY_MEMO_MAX_BYTES};
use crate::readahead::ReadAhead;
use crate::seal::SealingKey;
use crate::token::{KeyColumn, TokenKey};

/// Version byte of sealed images' associated data (`guard.protect.aad.AAD_VERSION`).
const AAD_VERSION: u8 = 2;
/// `v` of the sanitized change records this writes (`guard.protect.aad.RECORD_VERSION`).
const RECORD_VERSION: u8 = 2;

/// One length-prefixed part of the associated data: u32 big-endian length, then the bytes.
fn put_part(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The event can't take the native path: the caller hands the whole event to the Python path.
pub(crate) struct Decline;

/// Why the native path stopped: a decline, or a Python exception (from a callback) propagated as is.
pub(crate) enum Stop {
    Decline,
    Py(PyErr),
}

/// The result of a native step.
pub(crate) type Step<T> = Result<T, Stop>;

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

/// Audit-record parts fixed per (source topic, partition, plan, op, images): see `AuditTemplate.parts`.
struct AuditParts {
    topic: String,
    /// The record's format version `v`, encoded.
    v: Vec<u8>,
    a: Vec<u8>,
    b: Vec<u8>,
    /// The decision; the reason follows it (null, or the change's write decision), then `e`.
    d: Vec<u8>,
    e: Vec<u8>,
    key: Py<PyBytes>,
}

/// A raw topic's output in `run`: the sanitized topic, its partition count, and the sanitized Kafka key
/// of each raw key seen (plaintext ids: emptied with the other memos, `clear_memos`).
struct TopicOut {
    out_topic: Py<PyString>,
    partitions: i64,
    keys: Memo<Vec<u8>, Option<Py<PyBytes>>>,
    /// The young entries of `keys`, and its lookups and hits.
    keys_book: MemoBook,
    /// Kafka key column → how it is carried (`hooks.key_column`), for keys sanitized here (`token`).
    key_columns: HashMap<String, Option<Py<TokenKey>>>,
}

/// What the native transform made of one event.
struct Done<'py> {
    sanitized: Vec<u8>,
    audit: Vec<u8>,
    audit_key: Bound<'py, PyBytes>,
    subject: Bound<'py, PyAny>,
    plan_id: u64,
    retention_s: i64,
    /// A create of a table with amount bands: (source ts_ms, [(column, value)]) of its banded columns.
    banded: Option<(Option<i64>, Bound<'py, PyList>)>,
}

/// A partition's audit chain while a run appends to it (docs/audit.md, "Leaves"): the chain's constant
/// head (layout version, id length, id), the next sequence number, the previous leaf's hash, and the leaf
/// hashes of the run, which `AuditChains.fold` appends to the chain's Merkle frontier after the run.
struct RunChain {
    key: Vec<u8>,
    head: Vec<u8>,
    seq: u64,
    prev: [u8; 32],
    leaves: Vec<u8>,
}

impl RunChain {
    /// The chain of an audit key (`<raw topic>:<partition>`), from `AuditChains.open`.
    fn open(owner: &Bound<'_, PyAny>, key: &Bound<'_, PyBytes>) -> PyResult<Self> {
        let (head, seq, prev): (Vec<u8>, u64, Vec<u8>) = owner
            .call_method1(intern!(owner.py(), "open"), (key,))?
            .extract()?;
        let prev: [u8; 32] = prev.try_into().map_err(|_| {
            pyo3::exceptions::PyValueError::new_err("a chain's previous leaf hash is 32 bytes")
        })?;
        Ok(Self {
            key: key.as_bytes().to_vec(),
            head,
            seq,
            prev,
            leaves: Vec::new(),
        })
    }

    /// The next record's leaf prefix: head, u64 big-endian sequence number, previous leaf hash.
    fn prefix(&self) -> Vec<u8> {
        let mut prefix = Vec::with_capacity(self.head.len() + 40);
        prefix.extend_from_slice(&self.head);
        prefix.extend_from_slice(&self.seq.to_be_bytes());
        prefix.extend_from_slice(&self.prev);
        prefix
    }

    fn push(&mut self, digest: [u8; 32]) {
        self.prev = digest;
        self.seq += 1;
        self.leaves.extend_from_slice(&digest);
    }
}

/// RFC 6962 leaf hash of a chained record: SHA-256(0x00 || prefix || u32 len(key) || key || u32 len(value)
/// || value), a null key or value as length 0xFFFFFFFF (`guard.audit.chain.leaf_bytes`).
fn leaf_hash(prefix: &[u8], key: Option<&[u8]>, value: Option<&[u8]>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(prefix);
    for part in [key, value] {
        match part {
            None => h.update(u32::MAX.to_be_bytes()),
            Some(bytes) => {
                h.update((bytes.len() as u32).to_be_bytes());
                h.update(bytes);
            }
        }
    }
    h.finalize().into()
}

/// RFC 6962 interior node: SHA-256(0x01 || left || right) (`guard.audit.merkle.node_hash`).
fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// `guard.audit.merkle.Frontier.append` for many leaf hashes at once (a native run's, 32 bytes each, in
/// order): the frontier of a tree of `size` leaves (its perfect subtrees' roots, largest first) after
/// appending them, as (new size, nodes). Amortised one node hash per leaf, none of it in the interpreter.
#[pyfunction(name = "frontier_extend")]
#[pyo3(signature = (size, nodes, leaves))]
fn py_frontier_extend<'py>(
    py: Python<'py>,
    size: u64,
    nodes: Vec<Vec<u8>>,
    leaves: &[u8],
) -> PyResult<(u64, Vec<Bound<'py, PyBytes>>)> {
    let invalid = |what: String| pyo3::exceptions::PyValueError::new_err(what);
    if leaves.len() % 32 != 0 {
        return Err(invalid(format!(
            "leaf hashes are 32 bytes each, got {} bytes",
            leaves.len()
        )));
    }
    if nodes.len() != size.count_ones() as usize {
        return Err(invalid(format!(
            "a tree of {size} leaves has {} frontier nodes, not {}",
            size.count_ones(),
            nodes.len()
        )));
    }
    let mut frontier: Vec<[u8; 32]> = Vec::with_capacity(65);
    for node in &nodes {
        frontier.push(
            node.as_slice()
                .try_into()
                .map_err(|_| invalid("frontier nodes are 32-byte hashes".to_owned()))?,
        );
    }
    let mut n = size;
    for leaf in leaves.chunks_exact(32) {
        frontier.push(leaf.try_into().expect("chunks of 32"));
        let mut m = n;
        while m & 1 == 1 {
            let right = frontier.pop().expect("a node per set bit");
            let left = frontier.last_mut().expect("a node per set bit");
            *left = node_hash(left, &right);
            m >>= 1;
        }
        n += 1;
    }
    Ok((n, frontier.iter().map(|h| PyBytes::new(py, h)).collect()))
}

/// `leaf_hash` for Python (the tests hold it to `guard.audit.merkle.leaf_hash(leaf_bytes(...))`).
#[pyfunction(name = "leaf_hash")]
#[pyo3(signature = (prefix, key, value))]
fn py_leaf_hash<'py>(
    py: Python<'py>,
    prefix: &[u8],
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &leaf_hash(prefix, key, value))
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

/// The sanitizer's native shortcut for ordinary change events; see the module documentation.
#[pyclass(module = "guard_native")]
struct FastPath {
    branch_enc: Vec<u8>,
    sanitized_header: Vec<u8>,
    audit_header: Vec<u8>,
    subject_of: PyObject,
    audit_parts: PyObject,
    dumps: PyObject,
    loads: PyObject,
    mask: PyObject,
    token: PyObject,
    keyed_hash: PyObject,
    /// Data-subject tokens computed here instead of by `subject_of` (when built with `subject_key`).
    subject_tokens: Option<SubjectTokens>,
    memo_limit: usize,
    /// Values longer than this are the Python path's (it sends them to the DLQ).
    max_value_bytes: usize,
    /// schema.table → the plans registered for it (one per column layout).
    plans: HashMap<String, Vec<Plan>>,
    /// Keyed by (plan, partition, op, images); the source topic is checked on use (a plan's table
    /// normally arrives on one topic), so a lookup needs no allocation.
    audit: HashMap<(u64, i64, u8, u8), AuditParts>,
    /// Raw topic → where its records go (`run`), with the memo of its sanitized Kafka keys.
    topics: HashMap<String, TopicOut>,
    /// The envelopes `batch_subjects` read, which the run takes instead of reading them again.
    read_ahead: ReadAhead,
    /// The key manager's data-key cache, read here for each event's sealing key (`keycache`).
    key_cache: KeyCache,
}

#[pymethods]
impl FastPath {
    #[new]
    #[pyo3(signature = (*, branch, sanitized_header, audit_header, subject_of, key_cache, key_not_loaded, audit_parts,
                        dumps, loads, mask, token, keyed_hash, max_value_bytes, memo_limit = 100_000,
                        subject_key = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        branch: &str,
        sanitized_header: Vec<u8>,
        audit_header: Vec<u8>,
        subject_of: PyObject,
        key_cache: Py<PyDict>,
        key_not_loaded: Py<PyType>,
        audit_parts: PyObject,
        dumps: PyObject,
        loads: PyObject,
        mask: PyObject,
        token: PyObject,
        keyed_hash: PyObject,
        max_value_bytes: usize,
        memo_limit: usize,
        subject_key: Option<Py<TokenKey>>,
    ) -> PyResult<Self> {
        let key_cache = KeyCache::new(
            key_cache,
            PyString::new(py, branch).unbind(),
            py.import("time")?.getattr("monotonic")?.unbind(),
            key_not_loaded,
        );
        Ok(FastPath {
            subject_tokens: subject_key.map(|key| SubjectTokens::new(key, branch)),
            branch_enc: str_enc(branch),
            sanitized_header,
            audit_header,
            subject_of,
            audit_parts,
            dumps,
            loads,
            mask,
            token,
            keyed_hash,
            memo_limit,
            max_value_bytes,
            plans: HashMap::default(),
            audit: HashMap::default(),
            topics: HashMap::default(),
            read_ahead: ReadAhead::default(),
            key_cache,
        })
    }

    /// Make a table plan known (called by the Python path the first time it meets the plan).
    #[pyo3(signature = (plan_id, schema_table, columns, *, subject_column, usable, subject_root, clear, masks,
                        index, hashed, dropped, sealed, retention_s, banded=Vec::new(), index_keys=Vec::new()))]
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
        banded: Vec<String>,
        index_keys: Vec<Py<TokenKey>>,
    ) -> PyResult<()> {
        if !index_keys.is_empty() && index_keys.len() != index.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "index_keys: one blind-index key per index column, or none",
            ));
        }
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
            .map(|(c, k)| Ok((col(c)?, PyString::intern(py, k).unbind(), MaskKind::of(k))))
            .collect::<PyResult<Vec<_>>>()?;
        let index_cols = index.iter().map(col).collect::<PyResult<Vec<_>>>()?;
        let hashed_cols = hashed.iter().map(col).collect::<PyResult<Vec<_>>>()?;
        let sealed_cols = sealed.iter().map(col).collect::<PyResult<Vec<_>>>()?;
        let banded_cols = banded.iter().map(col).collect::<PyResult<Vec<_>>>()?;
        // The field-list part of the associated data (`guard.protect.aad.field_list_part`).
        let mut fields_blob = (sealed.len() as u32).to_be_bytes().to_vec();
        for f in &sealed {
            put_part(&mut fields_blob, f.as_bytes());
        }
        let mut sealed_fields_part = Vec::with_capacity(4 + fields_blob.len());
        put_part(&mut sealed_fields_part, &fields_blob);
        let mut sealed_head = vec![2u8];
        sealed_head.extend(name_array(&sealed));
        entry.push(Plan {
            id: plan_id,
            schema_table_py: PyString::new(py, schema_table).unbind(),
            subject_idx: subject_column.and_then(|c| columns.iter().position(|x| x == c)),
            columns,
            usable,
            subject_root,
            clear: clear_cols,
            mask_memo: mask_cols.iter().map(|_| Memo::default()).collect(),
            masks: mask_cols,
            index_memo: index_cols.iter().map(|_| Memo::default()).collect(),
            index: index_cols,
            index_keys,
            hashed: hashed_cols,
            dropped_enc: name_array(&dropped),
            sealed: sealed_cols,
            sealed_head,
            sealed_fields_part,
            memo_book: MemoBook::default(),
            subject_ints: Memo::default(),
            subject_strs: Memo::default(),
            retention_s,
            banded: banded_cols,
        });
        Ok(())
    }

    /// (plan id, subject column value) of a record value whose plan is registered, else None.
    fn subject_value<'py>(
        &self,
        py: Python<'py>,
        value: &[u8],
    ) -> PyResult<Option<(u64, Bound<'py, PyAny>)>> {
        if value.len() > self.max_value_bytes {
            return Ok(None);
        }
        let Ok(env) = envelope::read(value) else {
            return Ok(None);
        };
        let Some(candidates) = self.plans.get(&format!("{}.{}", env.namespace, env.table)) else {
            return Ok(None);
        };
        let row = env.row();
        let Ok(idx) = find_plan(candidates, row) else {
            return Ok(None);
        };
        let plan = &candidates[idx];
        let subject = match plan.subject_idx {
            None => py.None().into_bound(py),
            Some(i) => match json::Val::read(row.0[i].1, self.loads.bind(py)) {
                Ok(v) => v.to_py(py)?,
                Err(Stop::Decline) => return Ok(None),
                Err(Stop::Py(e)) => return Err(e),
            },
        };
        Ok(Some((plan.id, subject)))
    }

    /// Sanitize one record value: (sanitized value, audit value, audit key, subject, plan id), or None
    /// when the event must take the Python path.
    #[pyo3(signature = (value, topic, partition, offset, out_topic, row_key, trace_id, now_ms, reason=None))]
    #[allow(clippy::too_many_arguments)]
    fn process<'py>(
        &mut self,
        py: Python<'py>,
        value: &[u8],
        topic: &str,
        partition: i64,
        offset: i64,
        out_topic: &str,
        row_key: &[u8],
        trace_id: Option<&str>,
        now_ms: i64,
        reason: Option<&[u8]>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        if value.len() > self.max_value_bytes {
            return Ok(None);
        }
        let Ok(env) = envelope::read(value) else {
            return Ok(None);
        };
        match self.process_inner(
            py, &env, topic, partition, offset, out_topic, row_key, trace_id, now_ms, reason,
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
    /// record that needs the Python path; returns `(end, last offsets, events per plan, timestamps,
    /// banded)`, where `end` is that record's index (`len(records)` when the run reached the end) and
    /// `banded` lists the creates of tables with amount bands, `(topic, partition, offset, subject, source
    /// ts_ms, input timestamp, [(column, value)])`, whose facts the sanitizer adds (same transaction).
    ///
    /// Why: with the transform native, most of a worker's time went to the per-record glue around it in
    /// the runner (loop, outcome objects, two keyword `produce` calls, counters). Here a record costs a
    /// few C calls into confluent-kafka and two positional `produce` calls.
    ///
    /// `records` are the runner's `(message, topic, partition, offset, value)` tuples. A record's two
    /// outputs (sanitized, audit) are produced with the input's timestamp only after its transform has
    /// succeeded, so the run always stops *before* a record it can't finish, having produced nothing for
    /// it: declined by the transform, a callback error (an erased subject, a key store problem: the Python
    /// path meets the same condition and applies its policy), a `traceparent` header to carry on (no
    /// other header: the untraced Python path carries none), an output over `max_record_bytes`, a panic. A `produce` error other than a full local queue (BufferError: poll,
    /// then retry) propagates, and the runner aborts the transaction.
    ///
    /// `hooks` supplies the sanitizer's side: `out_topic(topic)`, `sanitize_key(topic, key)`, `load_keys(topic, partition, offset, value, index)`, the
    /// exception type `key_not_loaded`, the `activity` dict ((subject, sanitized topic) -> retention s)
    /// and `audit_topic`. `partitions(out_topic, topic)` is the sanitized topic's partition count.
    /// `reasons` (when the access policy is on): per record from `start`, its write decision as JSON
    /// (UTF-8), carried in the `reason` of its own audit record, or None (not a write).
    /// `chains` (a worker's `AuditChains`): each audit record joins its partition's chain here, its
    /// `bg-leaf` header and leaf hash computed in Rust (`RunChain`); `chains.open(key)` gives a chain's
    /// state, `chains.fold(key, leaf hashes)` takes the run's leaves back. Without it the records are
    /// produced unchained (a `produce` that chains them itself, or a test's).
    /// `stop`: the run ends before `records[stop]` at the latest, where the caller has found a record
    /// the run must not take (`Sanitizer._run_stop`: bound for a compacted topic, or traced); with it the
    /// run does not read the records' headers again, nor needs a copy of the batch cut at `stop`.
    /// Without it the run reads each record's headers for a `traceparent` itself.
    #[pyo3(signature = (records, start, *, produce, poll, partitions, hooks, now_ms, max_record_bytes,
                        reasons=None, chains=None, stop=None))]
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
        reasons: Option<&Bound<'py, PyList>>,
        chains: Option<&Bound<'py, PyAny>>,
        stop: Option<usize>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let mut run_chains: Vec<RunChain> = Vec::new();
        let out = Self::run_inner(
            slf,
            records,
            start,
            stop,
            produce,
            poll,
            partitions,
            hooks,
            now_ms,
            max_record_bytes,
            reasons,
            chains.map(|c| (c, &mut run_chains)),
        );
        // The leaves produced are folded into their chains whatever happened after them: they are in the
        // open transaction (an error aborts it, and the chains' snapshots are restored with it).
        if let Some(chains) = chains {
            for c in &run_chains {
                if !c.leaves.is_empty() {
                    chains.call_method1(
                        intern!(slf.py(), "fold"),
                        (
                            PyBytes::new(slf.py(), &c.key),
                            PyBytes::new(slf.py(), &c.leaves),
                        ),
                    )?;
                }
            }
        }
        out
    }

    /// Drop the envelopes read ahead for the current batch that no run took (`Sanitizer.forget_batch`:
    /// the runner is done with the batch, and an idle worker keeps none of its records).
    fn forget_read_ahead(&mut self) {
        self.read_ahead.clear();
    }

    /// The sealing-key lookups the native path made in the key manager's cache since the last call, and
    /// how many it answered: `(lookups, hits)`, which the sanitizer adds to the key manager's counters.
    fn take_key_counts(&mut self) -> (u64, u64) {
        self.key_cache.take_counts()
    }

    /// How many envelopes are held for runs to take (`forget_read_ahead`; tests).
    #[getter]
    fn read_ahead_size(&self) -> usize {
        self.read_ahead.len()
    }

    /// Forget memoised masks, tokens and Kafka keys: they are keyed by plaintext values
    /// (`Sanitizer.expire_value_caches`).
    fn clear_memos(&mut self) {
        for plans in self.plans.values_mut() {
            plans.iter_mut().for_each(Plan::clear_memo);
        }
        self.topics.values_mut().for_each(|t| {
            t.keys.clear();
            t.keys_book.cleared();
            t.key_columns.clear();
        });
    }

    /// The lookups of the memos (subject tokens, sanitized Kafka keys, masks and blind indexes computed by
    /// Python) since the last call, and how many they answered: `(lookups, hits)` (the benchmark reports the hit rate).
    fn take_memo_counts(&mut self) -> (u64, u64) {
        let plans = self.plans.values_mut().flatten().map(|p| &mut p.memo_book);
        let topics = self.topics.values_mut().map(|t| &mut t.keys_book);
        plans
            .chain(topics)
            .map(MemoBook::take_counts)
            .fold((0, 0), |(l, h), (dl, dh)| (l + dl, h + dh))
    }

    /// The data subjects of `batch[i:]`, where `batch[i]` is the record at (`topic`, `partition`,
    /// `offset`) of the runner's `(topic, partition, offset, value)` tuples: `(tokens, rest, at)`, the
    /// distinct subjects' tokens of the records whose plan is registered (each id's token from the plan's
    /// memo, else `subject_of`), in the order of the records that first name them, the indexes of the
    /// records it can't read (the Python path decodes those), and the index of each token's first record
    /// (`guard.pipeline.keyload` cuts the key load into chunks by them); None when no record is at that
    /// position. One call per batch instead of a `subject_value` per record (`Sanitizer._load_keys_from`;
    /// `scan.rs`).
    fn batch_subjects<'py>(
        slf: &Bound<'py, Self>,
        batch: &Bound<'py, PyList>,
        topic: &str,
        partition: i64,
        offset: i64,
    ) -> PyResult<Option<scan::BatchSubjects<'py>>> {
        scan::batch_subjects(slf, batch, topic, partition, offset)
    }

    #[getter]
    fn memo_size(&self) -> usize {
        self.plans
            .values()
            .flatten()
            .map(Plan::memo_len)
            .sum::<usize>()
            + self.topics.values().map(|t| t.keys.len()).sum::<usize>()
    }
}

impl FastPath {
    #[allow(clippy::too_many_arguments)]
    fn run_inner<'py>(
        slf: &Bound<'py, Self>,
        records: &Bound<'py, PyList>,
        start: usize,
        stop: Option<usize>,
        produce: &Bound<'py, PyAny>,
        poll: &Bound<'py, PyAny>,
        partitions: &Bound<'py, PyAny>,
        hooks: &Bound<'py, PyAny>,
        now_ms: i64,
        max_record_bytes: usize,
        reasons: Option<&Bound<'py, PyList>>,
        mut chains: Option<(&Bound<'py, PyAny>, &mut Vec<RunChain>)>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let py = records.py();
        let out_topic_of = hooks.getattr(intern!(py, "out_topic"))?;
        let sanitize_key = hooks.getattr(intern!(py, "sanitize_key"))?;
        let key_column = hooks.getattr(intern!(py, "key_column"))?;
        let load_keys = hooks.getattr(intern!(py, "load_keys"))?;
        let key_not_loaded = hooks.getattr(intern!(py, "key_not_loaded"))?;
        let activity = hooks.getattr(intern!(py, "activity"))?;
        let activity = activity.downcast::<PyDict>()?;
        let audit_topic = hooks.getattr(intern!(py, "audit_topic"))?;
        let mut last: Vec<(Bound<'py, PyString>, i64, i64)> = Vec::new();
        let mut counts: Vec<(u64, usize)> = Vec::new();
        let mut stamps: Vec<i64> = Vec::with_capacity(records.len().saturating_sub(start));
        let mut banded: Vec<Bound<'py, PyTuple>> = Vec::new();
        // With the caller's `stop`, traced records are already behind it (`run`'s docs).
        let read_headers = stop.is_none();
        let end = stop.map_or(records.len(), |s| s.min(records.len()));
        let mut i = start;
        while i < end {
            let item = records.get_item(i)?;
            let item = item.downcast::<PyTuple>()?;
            let msg = item.get_item(0)?;
            let topic_obj = item.get_item(1)?;
            let topic_obj = topic_obj.downcast::<PyString>()?;
            let partition: i64 = item.get_item(2)?.extract()?;
            let offset: i64 = item.get_item(3)?.extract()?;
            let value = item.get_item(4)?;
            if value.is_none() || (read_headers && scan::has_traceparent(&msg)?) {
                break;
            }
            let value_obj = value.downcast::<PyBytes>()?;
            let value_bytes = value_obj.as_bytes();
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
                        keys: Memo::default(),
                        keys_book: MemoBook::default(),
                        key_columns: HashMap::default(),
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
                match state.keys.get(raw, &mut state.keys_book) {
                    Some(k) => k.as_ref().map(|k| k.bind(py).clone()),
                    None => {
                        // The ordinary key (a JSON object of integers and plain strings) is
                        // sanitized here (`token::sanitize_key`), each column's way asked once per
                        // topic; any other key is the sanitizer's.
                        let columns = &mut state.key_columns;
                        let native = token::sanitize_key(py, raw, |name| {
                            let how = match columns.get(name) {
                                Some(how) => how.as_ref().map(|k| k.clone_ref(py)),
                                None => {
                                    let how = key_column.call1((topic_obj, name))?;
                                    let how = if how.is_none() {
                                        None
                                    } else {
                                        Some(how.downcast_into::<TokenKey>()?.unbind())
                                    };
                                    columns.insert(
                                        name.to_owned(),
                                        how.as_ref().map(|k| k.clone_ref(py)),
                                    );
                                    how
                                }
                            };
                            Ok(match how {
                                None => KeyColumn::Clear,
                                Some(k) => KeyColumn::Token(k),
                            })
                        });
                        let k = match native {
                            Ok(Some(bytes)) => Some(PyBytes::new(py, &bytes)),
                            // A key the sanitizer can't handle: stop here, so that the Python path
                            // meets the same error and sends the record to the DLQ.
                            Err(_) => break,
                            Ok(None) => {
                                let Ok(k) = sanitize_key.call1((topic_obj, &key)) else {
                                    break;
                                };
                                if k.is_none() {
                                    None
                                } else {
                                    let Ok(k) = k.downcast_into::<PyBytes>() else {
                                        break;
                                    };
                                    Some(k)
                                }
                            }
                        };
                        if raw.len() <= KEY_MEMO_MAX_BYTES {
                            let keys = &mut state.keys;
                            state.keys_book.age_if_full(memo_limit, || keys.age());
                            state.keys.insert(
                                raw.to_vec(),
                                k.as_ref().map(|k| k.clone().unbind()),
                                &mut state.keys_book,
                            );
                        }
                        k
                    }
                }
            };
            let row_key = out_key.as_ref().map(|k| k.as_bytes()).unwrap_or(b"");
            let out_topic = out_py.to_str()?;
            let reason_obj = match reasons {
                Some(list) if i - start < list.len() => Some(list.get_item(i - start)?),
                Some(_) => break,
                None => None,
            };
            let reason: Option<&[u8]> = match &reason_obj {
                Some(r) if !r.is_none() => Some(r.downcast::<PyBytes>()?.as_bytes()),
                _ => None,
            };
            // The envelope `batch_subjects` read for this record when it loaded the batch's keys, else
            // read here (values longer than the limit are the Python path's: it sends them to the DLQ).
            let read_ahead = this.read_ahead.take(value_obj);
            let read_here;
            let env = match &read_ahead {
                Some(record) => record.envelope(),
                None if value_bytes.len() > this.max_value_bytes => break,
                None => match envelope::read(value_bytes) {
                    Ok(env) => {
                        read_here = env;
                        &read_here
                    }
                    Err(_) => break,
                },
            };
            let attempt = |this: &mut FastPath| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    this.process_inner(
                        py, env, topic, partition, offset, out_topic, row_key, None, now_ms, reason,
                    )
                }))
            };
            let done = match attempt(&mut this) {
                Ok(Ok(done)) => done,
                Ok(Err(Stop::Py(e))) if e.is_instance(py, &key_not_loaded) => {
                    drop(this);
                    // `i`: where the miss is in the batch (the key load reads the chunks up to it).
                    if load_keys
                        .call1((topic_obj, partition, offset, &value, i))
                        .is_err()
                    {
                        break;
                    }
                    let mut this = slf.borrow_mut();
                    // The load read this record again with the rest of the batch: this run has it.
                    drop(this.read_ahead.take(value_obj));
                    match attempt(&mut this) {
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
            match chains.as_mut() {
                None => produce_retrying(
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
                )?,
                Some((owner, run_chains)) => {
                    // The record joins its partition's audit chain here, where its bytes were built:
                    // the leaf hash is computed once, in Rust, and Python only folds the frontier.
                    let key = done.audit_key.as_bytes();
                    let at = match run_chains.iter().position(|c| c.key == key) {
                        Some(at) => at,
                        None => {
                            run_chains.push(RunChain::open(owner, &done.audit_key)?);
                            run_chains.len() - 1
                        }
                    };
                    let chain = &mut run_chains[at];
                    let prefix = chain.prefix();
                    let digest = leaf_hash(&prefix, Some(key), Some(&done.audit));
                    let header = PyTuple::new(
                        py,
                        [
                            intern!(py, "bg-leaf").clone().into_any(),
                            PyBytes::new(py, &prefix).into_any(),
                        ],
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
                            PyList::new(py, [header])?,
                        )
                            .into_pyobject(py)?,
                    )?;
                    chain.push(digest);
                }
            }
            activity.set_item((&done.subject, &out_py), done.retention_s)?;
            if let Some((source_ts_ms, values)) = done.banded {
                banded.push(PyTuple::new(
                    py,
                    [
                        topic_obj.clone().into_any(),
                        partition.into_pyobject(py)?.into_any(),
                        offset.into_pyobject(py)?.into_any(),
                        done.subject.clone(),
                        source_ts_ms.into_pyobject(py)?.into_any(),
                        ts.into_pyobject(py)?.into_any(),
                        values.into_any(),
                    ],
                )?);
            }
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
                PyList::new(py, banded)?.into_any(),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn process_inner<'py>(
        &mut self,
        py: Python<'py>,
        env: &Envelope<'_>,
        topic: &str,
        partition: i64,
        offset: i64,
        out_topic: &str,
        row_key: &[u8],
        trace_id: Option<&str>,
        now_ms: i64,
        reason: Option<&[u8]>,
    ) -> Step<Done<'py>> {
        let schema_table = format!("{}.{}", env.namespace, env.table);
        let row = env.row();
        let loads = self.loads.bind(py).clone();
        let candidates = self.plans.get_mut(&schema_table).ok_or(Decline)?;
        let row_idx = find_plan(candidates, row)?;
        let (plan_id, retention_s, table_py, row_values) = {
            let plan = &candidates[row_idx];
            if !plan.usable || (env.op == b'd' && plan.subject_root) {
                return Err(Decline.into());
            }
            (
                plan.id,
                plan.retention_s,
                plan.schema_table_py.clone_ref(py),
                plan.values(row, &loads)?,
            )
        };
        // A new row of a table with amount bands: its banded values go back to the sanitizer, which
        // decides the band (`guard.pipeline.sanitizer.amount_band`, the one rule for both paths).
        let banded = {
            let plan = &candidates[row_idx];
            if env.op == b'c' && env.after.is_some() && !plan.banded.is_empty() {
                let pairs = plan
                    .banded
                    .iter()
                    .map(|c| {
                        PyTuple::new(
                            py,
                            [
                                c.name.bind(py).clone().into_any(),
                                row_values[c.idx].to_py(py)?,
                            ],
                        )
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                Some((env.source_ts_ms, PyList::new(py, pairs)?))
            } else {
                None
            }
        };
        let subject_of = self.subject_of.bind(py);
        let subject_obj = candidates[row_idx].subject_token(
            py,
            &row_values,
            self.memo_limit,
            self.subject_tokens.as_ref(),
            |v| subject_of.call1((v, table_py.bind(py))),
        )?;
        let subject = subject_obj
            .downcast::<PyString>()
            .map_err(PyErr::from)?
            .to_str()?
            .to_owned();
        // The subject's `SealingKey` (`Aead.sealing_key`) from the key manager's cache, else the
        // key-not-loaded signal: the run loads the batch's keys and tries again, and a key still missing
        // (an erased subject, an unreachable key store) sends the record to the Python path, which decides
        // what it means.
        let key = self.key_cache.sealing_key(&subject_obj)?;
        let key = key.get();
        let version: u32 = key.version;
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
            let other;
            let (plan_idx, values) = if std::ptr::eq(image, row) {
                (row_idx, &row_values)
            } else {
                let idx = find_plan(candidates, image)?;
                other = candidates[idx].values(image, &loads)?;
                (idx, &other)
            };
            if !std::ptr::eq(image, row) {
                // Each image is sealed under its own subject; a row that moved to another subject (or
                // whose other image names none) takes the Python path, which seals them apart.
                let other_subject = candidates[plan_idx].subject_token(
                    py,
                    values,
                    self.memo_limit,
                    self.subject_tokens.as_ref(),
                    |v| subject_of.call1((v, table_py.bind(py))),
                )?;
                if other_subject
                    .downcast::<PyString>()
                    .map_err(PyErr::from)?
                    .to_str()?
                    != subject
                {
                    return Err(Decline.into());
                }
            }
            let plan = &mut candidates[plan_idx];
            if !plan.usable {
                return Err(Decline.into());
            }
            let sealed = if plan.sealed.is_empty() {
                None
            } else {
                let plaintext = sealed_plaintext(plan, values, &cb.dumps)?;
                // Associated data format 2 (`guard.protect.aad.image_aad`): version byte, then every
                // part as a u32 big-endian length and its bytes.
                let mut aad = Vec::with_capacity(
                    160 + out_topic.len()
                        + row_key.len()
                        + subject.len()
                        + env.position.len()
                        + plan.sealed_fields_part.len(),
                );
                aad.push(AAD_VERSION);
                put_part(&mut aad, out_topic.as_bytes());
                put_part(&mut aad, schema_table.as_bytes());
                put_part(&mut aad, row_key);
                put_part(&mut aad, name.as_bytes());
                put_part(&mut aad, subject.as_bytes());
                put_part(&mut aad, &[env.op]);
                put_part(&mut aad, env.position.as_bytes());
                aad.extend_from_slice(&plan.sealed_fields_part);
                put_part(&mut aad, &version.to_be_bytes());
                Some(key.seal(&plaintext, &aad).map_err(|e| {
                    pyo3::exceptions::PyRuntimeError::new_err(format!(
                        "AES-256-GCM sealing failed: {e}"
                    ))
                })?)
            };
            let ciphertext = sealed.as_deref().unwrap_or(&[]);
            images[slot] = Some(write_image(plan, values, ciphertext, &cb, self.memo_limit)?);
        }
        // The SanitizedChange record (`avro_fast.encode_change`).
        let mut value = Vec::with_capacity(
            self.sanitized_header.len()
                + 128
                + images.iter().flatten().map(Vec::len).sum::<usize>(),
        );
        value.extend_from_slice(&self.sanitized_header);
        value.push(2 * RECORD_VERSION); // `v` (an Avro int: zig-zag)
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
        value.push(0); // before_subject: null (both images have `subject`, or this path declined)

        // The AuditRecord (`avro_fast.AuditTemplate.encode`).
        let images_count = images.iter().flatten().count() as u8;
        let audit_key = (plan_id, partition, env.op, images_count);
        if self.audit.get(&audit_key).is_none_or(|p| p.topic != topic) {
            let parts = self.audit_parts.bind(py).call1((
                topic,
                partition,
                plan_id,
                PyString::new(py, std::str::from_utf8(&[env.op]).unwrap()),
                images_count,
            ))?;
            #[allow(clippy::type_complexity)]
            let (v, a, b, d, e, key): (
                Vec<u8>,
                Vec<u8>,
                Vec<u8>,
                Vec<u8>,
                Vec<u8>,
                Py<PyBytes>,
            ) = parts.extract()?;
            if self.audit.len() > 50_000 {
                self.audit.clear();
            }
            let topic = topic.to_owned();
            self.audit.insert(
                audit_key,
                AuditParts {
                    topic,
                    v,
                    a,
                    b,
                    d,
                    e,
                    key,
                },
            );
        }
        let parts = &self.audit[&audit_key];
        let mut audit = Vec::with_capacity(
            self.audit_header.len()
                + parts.a.len()
                + parts.b.len()
                + parts.d.len()
                + parts.e.len()
                + reason.map_or(0, <[u8]>::len)
                + 160,
        );
        audit.extend_from_slice(&self.audit_header);
        audit.extend_from_slice(&parts.v);
        put_long(&mut audit, now_ms);
        audit.extend_from_slice(&parts.a);
        put_long(&mut audit, offset);
        audit.extend_from_slice(&parts.b);
        audit.push(2);
        put_str(&mut audit, subject.as_bytes());
        audit.extend_from_slice(&parts.d);
        match reason {
            None => audit.push(0),
            Some(r) => {
                audit.push(2);
                put_str(&mut audit, r);
            }
        }
        audit.extend_from_slice(&parts.e);
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
            banded,
        })
    }
}

#[pymodule]
fn guard_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<FastPath>()?;
    m.add_class::<SealingKey>()?;
    m.add_class::<TokenKey>()?;
    m.add_function(wrap_pyfunction!(py_leaf_hash, m)?)?;
    m.add_function(wrap_pyfunction!(mask::py_fast_mask, m)?)?;
    m.add_function(wrap_pyfunction!(py_frontier_extend, m)?)?;
    m.add_function(wrap_pyfunction!(scan::py_scan_write, m)?)?;
    m.add_function(wrap_pyfunction!(scan::scan_writes, m)?)?;
    m.add_function(wrap_pyfunction!(scan::take_messages, m)?)?;
    m.add_function(wrap_pyfunction!(scan::first_traced, m)?)?;
    m.add("ABI", 1)?;
    Ok(())
}

//! The subject's sealing key looked up in the worker's data-key cache without a Python call (issue 17).
//!
//! Why: every event sealed on the native path asked the sanitizer for its subject's key
//! (`Sanitizer._cached_aead` → `KeyManager.cached_subject_aead`): two Python frames, a tuple, a dict
//! lookup, a clock read and two counters per event, ~4% of a worker's samples (docs/benchmark.md,
//! round 18). Here the same lookup reads the key manager's own cache (the dict it fills, pops and
//! clears in place, never rebinds: `KeyManager.native_key_cache`) under the same rule: the entry of
//! (branch, subject) if its expiry is later than `time.monotonic()` now, else the sanitizer's key-not-loaded
//! signal, which makes the run load the batch's keys and try again (never a round trip per event). The
//! cache holds the keys as `SealingKey`s (`Aead.cache_entry`), so the key stays in it; only the reference
//! is taken. The lookups and hits are counted here and handed to the key manager's counters after each
//! call (`take_counts`).

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};

use crate::seal::SealingKey;

/// The key manager's data-key cache, as the native path reads it.
pub struct KeyCache {
    /// (branch, subject) → (SealingKey, monotonic expiry): `KeyManager._deks` itself (`Aead.cache_entry`).
    deks: Py<PyDict>,
    branch: Py<PyString>,
    /// `time.monotonic`: the clock the cache's expiries are on.
    monotonic: PyObject,
    /// Raised for a key this cache can't answer (`Sanitizer._KeyNotLoaded`).
    not_loaded: Py<PyType>,
    lookups: u64,
    hits: u64,
}

impl KeyCache {
    pub fn new(
        deks: Py<PyDict>,
        branch: Py<PyString>,
        monotonic: PyObject,
        not_loaded: Py<PyType>,
    ) -> Self {
        KeyCache {
            deks,
            branch,
            monotonic,
            not_loaded,
            lookups: 0,
            hits: 0,
        }
    }

    /// `KeyManager.cached_subject_aead(branch, subject).sealing_key`, or the key-not-loaded signal.
    pub fn sealing_key<'py>(
        &mut self,
        subject: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, SealingKey>> {
        let py = subject.py();
        self.lookups += 1;
        let at = PyTuple::new(py, [self.branch.bind(py).as_any(), subject])?;
        if let Some(hit) = self.deks.bind(py).get_item(&at)? {
            let hit = hit.downcast_into::<PyTuple>()?;
            let expiry: f64 = hit.get_item(1)?.extract()?;
            let now: f64 = self.monotonic.bind(py).call0()?.extract()?;
            if expiry > now {
                self.hits += 1;
                return Ok(hit.get_item(0)?.downcast_into::<SealingKey>()?);
            }
        }
        Err(PyErr::from_type(self.not_loaded.bind(py).clone(), ()))
    }

    /// The lookups and hits since the last call.
    pub fn take_counts(&mut self) -> (u64, u64) {
        let counts = (self.lookups, self.hits);
        self.lookups = 0;
        self.hits = 0;
        counts
    }
}

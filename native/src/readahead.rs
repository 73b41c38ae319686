//! A batch's record values read once (issue 17): the envelopes `batch_subjects` reads, kept for the run
//! that sanitizes the same records.
//!
//! Why: a native run loads the keys of the rest of its batch at its first key miss, and `batch_subjects`
//! reads every record from there on to find the subjects; the run then read each of them again. On a
//! branch's traffic (most customers' keys not cached) nearly every batch was parsed twice: the second
//! JSON parse was ~7% of a worker's samples (docs/benchmark.md, round 18). Now the envelope read for the
//! subjects is the one the run uses.
//!
//! An envelope borrows the bytes of its value (its strings and raw JSON values are slices of them), so
//! it is kept together with a strong reference to the value's `bytes` object (`self_cell`: no unsafe code
//! here): a Python `bytes` object's buffer neither moves nor changes while it is referenced. Records are
//! found again by the identity of their value object, which the map's reference keeps alive, so an
//! address can't be reused by another object while its entry exists. A run takes each entry it uses out
//! of the map; the rest are dropped by the next `batch_subjects` (a new load) and by `forget_batch`
//! (`FastPath.forget_read_ahead`), so an idle worker holds none of a batch's plaintext.

use foldhash::HashMap;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use self_cell::self_cell;

use crate::envelope::{self, Envelope};
use crate::Decline;

self_cell!(
    /// A record value and its envelope, read from it.
    pub struct ReadRecord {
        owner: Py<PyBytes>,
        #[covariant]
        dependent: Envelope,
    }
);

impl ReadRecord {
    /// Read `value` (`envelope::read`); a decline when it isn't an envelope the native path reads.
    pub fn read(value: &Bound<'_, PyBytes>) -> Result<Self, Decline> {
        let py = value.py();
        ReadRecord::try_new(value.clone().unbind(), |owner| {
            envelope::read(owner.as_bytes(py))
        })
    }

    pub fn envelope(&self) -> &Envelope<'_> {
        self.borrow_dependent()
    }
}

/// The envelopes read ahead of the run, by the address of their value object.
#[derive(Default)]
pub struct ReadAhead {
    by_value: HashMap<usize, ReadRecord>,
}

impl ReadAhead {
    /// Keep `record` for the run; the kept record.
    pub fn keep(&mut self, record: ReadRecord) -> &ReadRecord {
        let at = record.borrow_owner().as_ptr() as usize;
        self.by_value.insert(at, record);
        &self.by_value[&at]
    }

    /// The record read ahead from this very `value` object, taken out of the map.
    pub fn take(&mut self, value: &Bound<'_, PyBytes>) -> Option<ReadRecord> {
        self.by_value.remove(&(value.as_ptr() as usize))
    }

    pub fn clear(&mut self) {
        self.by_value.clear();
    }

    pub fn len(&self) -> usize {
        self.by_value.len()
    }
}

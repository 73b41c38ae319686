//! Sealing in the compiled path: AES-256-GCM under a data subject's key, the key held in Rust.
//!
//! Why: a native run used to call back into Python's `Aead.seal` for every sealed image (`os.urandom`,
//! `cryptography`'s AESGCM, a bytes join, and the interpreter frames around them: ~15% of a guard worker
//! in round 12 of docs/benchmark.md). `SealingKey` does the same through the same primitive, OpenSSL's
//! EVP AES-256-GCM (`cryptography` calls it too), with OpenSSL's CSPRNG (`RAND_bytes`) for the nonces
//! (`fresh_nonce`), and without leaving Rust.
//!
//! Sealed-value layout (the same bytes as `guard.keys.primitives.Aead.seal`; all integers big-endian):
//!
//! ```text
//! +---------+-------------------+-------------+--------------------------------+-----------+
//! | 0x01    | key version (u32) | nonce (12B) | AES-256-GCM ciphertext (len n) | tag (16B) |
//! +---------+-------------------+-------------+--------------------------------+-----------+
//!  format    which version of     random, from  n = plaintext length            GCM tag
//!  version   the data key         RAND_bytes
//! ```
//!
//! The associated data is the caller's (for images, format 2 of `guard.protect.aad`, built in `lib.rs`);
//! it is authenticated, never stored. The 5-byte header is not part of the associated data: the key
//! version is, inside the image's associated data, so a relabelled header fails to authenticate.
//!
//! Random 96-bit nonces are safe for up to 2^32 messages per key (NIST SP 800-38D, section 8.3); a key
//! per data subject keeps every key far below that.
//!
//! The key never leaves this object: no method or attribute returns it, its repr says `key=<hidden>`,
//! pickling and copying are refused, and its bytes are zeroed when the object is dropped.

use std::cell::RefCell;
use std::sync::OnceLock;

use openssl::cipher::{Cipher, CipherRef};
use openssl::cipher_ctx::CipherCtx;
use openssl::error::ErrorStack;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use zeroize::Zeroizing;

/// Format version of a sealed value (`guard.keys.primitives.FORMAT_V1`).
const FORMAT_V1: u8 = 1;
pub(crate) const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
const HEADER_BYTES: usize = 5 + NONCE_BYTES;

/// Nonces drawn from OpenSSL's CSPRNG per call to it.
const NONCES_PER_DRAW: usize = 64;

thread_local! {
    /// One encryption context per thread, set up for AES-256-GCM once; each seal sets its key and nonce.
    /// A context per key would keep OpenSSL's expanded key and GHASH tables (about 1 KiB) for each of
    /// the up to 200,000 cached data keys; setting the key is a fraction of a microsecond.
    static ENCRYPT: RefCell<Option<CipherCtx>> = const { RefCell::new(None) };
    /// Nonces of this thread not used yet (see `fresh_nonce`).
    static NONCES: RefCell<NoncePool> = const { RefCell::new(NoncePool {
        buf: [0; NONCE_BYTES * NONCES_PER_DRAW],
        next: NONCES_PER_DRAW,
        pid: 0,
    }) };
}

/// Random nonces drawn from OpenSSL's CSPRNG 64 at a time: a `RAND_bytes` call costs ~2 µs with
/// Debian's OpenSSL 3.0 (its locks and dispatch), more than the whole AES-GCM seal, whatever the length
/// asked for. Nonces are public (they are written in the clear in every sealed value); only their
/// uniqueness matters, so each is handed out once and wiped from the pool, and a pool inherited
/// through `fork` (another process id) is thrown away before any of it is used.
struct NoncePool {
    buf: [u8; NONCE_BYTES * NONCES_PER_DRAW],
    next: usize,
    pid: u32,
}

/// A nonce never handed out before (in this process or another), from OpenSSL's CSPRNG.
fn fresh_nonce() -> Result<[u8; NONCE_BYTES], ErrorStack> {
    NONCES.with(|cell| {
        let mut pool = cell.borrow_mut();
        let pid = std::process::id();
        if pool.next == NONCES_PER_DRAW || pool.pid != pid {
            openssl::rand::rand_bytes(&mut pool.buf)?;
            pool.next = 0;
            pool.pid = pid;
        }
        let at = pool.next * NONCE_BYTES;
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&pool.buf[at..at + NONCE_BYTES]);
        pool.buf[at..at + NONCE_BYTES].fill(0);
        pool.next += 1;
        Ok(nonce)
    })
}

/// AES-256-GCM, fetched from OpenSSL's default provider once (OpenSSL 3): a context set up with it
/// takes a new key in ~0.5 µs, against ~0.8 µs with the legacy `EVP_aes_256_gcm` handle.
fn aes_256_gcm() -> &'static CipherRef {
    static FETCHED: OnceLock<Option<Cipher>> = OnceLock::new();
    match FETCHED.get_or_init(|| Cipher::fetch(None, "AES-256-GCM", None).ok()) {
        Some(cipher) => cipher,
        None => Cipher::aes_256_gcm(),
    }
}

/// A data key for AES-256-GCM, held in Rust: seals (and opens) values in the layout above.
#[pyclass(module = "guard_native", frozen)]
pub(crate) struct SealingKey {
    key: Zeroizing<[u8; KEY_BYTES]>,
    pub(crate) version: u32,
}

impl SealingKey {
    /// Seal `plaintext` with `aad`: header, fresh nonce, ciphertext, tag.
    pub(crate) fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, ErrorStack> {
        let mut out = Vec::with_capacity(HEADER_BYTES + plaintext.len() + TAG_BYTES);
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.version.to_be_bytes());
        let nonce = fresh_nonce()?;
        out.extend_from_slice(&nonce);
        ENCRYPT.with(|cell| -> Result<(), ErrorStack> {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                let mut ctx = CipherCtx::new()?;
                ctx.encrypt_init(Some(aes_256_gcm()), None, None)?;
                *slot = Some(ctx);
            }
            let ctx = slot.as_mut().expect("set above");
            let sealed = (|| -> Result<(), ErrorStack> {
                ctx.encrypt_init(None, Some(&self.key[..]), Some(&nonce))?;
                ctx.cipher_update(aad, None)?;
                ctx.cipher_update_vec(plaintext, &mut out)?;
                ctx.cipher_final_vec(&mut out)?;
                let mut tag = [0u8; TAG_BYTES];
                ctx.tag(&mut tag)?;
                out.extend_from_slice(&tag);
                Ok(())
            })();
            if sealed.is_err() {
                // Never reuse a context OpenSSL reported an error in.
                *slot = None;
            }
            sealed
        })?;
        Ok(out)
    }

    /// Open a sealed value: Err(message) if its framing, version or tag is wrong.
    fn open_value(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.len() < HEADER_BYTES + TAG_BYTES {
            return Err("ciphertext too short to be a sealed value".into());
        }
        if sealed[0] != FORMAT_V1 {
            return Err(format!("unknown ciphertext format {}", sealed[0]));
        }
        let version = u32::from_be_bytes(sealed[1..5].try_into().expect("4 bytes"));
        if version != self.version {
            return Err(format!(
                "ciphertext is for key version {version}, this key is version {}",
                self.version
            ));
        }
        let nonce = &sealed[5..HEADER_BYTES];
        let (body, tag) = sealed[HEADER_BYTES..].split_at(sealed.len() - HEADER_BYTES - TAG_BYTES);
        let failed = || {
            "ciphertext failed authentication: it was altered, moved to another field, row or topic, \
             or sealed under another key"
                .to_string()
        };
        let mut out = Vec::with_capacity(body.len() + TAG_BYTES);
        let opened = (|| -> Result<(), ErrorStack> {
            let mut ctx = CipherCtx::new()?;
            ctx.decrypt_init(Some(aes_256_gcm()), Some(&self.key[..]), Some(nonce))?;
            ctx.cipher_update(aad, None)?;
            ctx.cipher_update_vec(body, &mut out)?;
            ctx.set_tag(tag)?;
            ctx.cipher_final_vec(&mut out)?;
            Ok(())
        })();
        match opened {
            Ok(()) => Ok(out),
            Err(_) => Err(failed()),
        }
    }
}

#[pymethods]
impl SealingKey {
    /// A key object of a 32-byte AES-256 data key and its version (the key bytes are copied in).
    #[new]
    fn new(key: &[u8], version: u32) -> PyResult<Self> {
        let key: [u8; KEY_BYTES] = key
            .try_into()
            .map_err(|_| PyValueError::new_err("AES-256-GCM needs a 32-byte key"))?;
        Ok(SealingKey {
            key: Zeroizing::new(key),
            version,
        })
    }

    #[getter]
    fn version(&self) -> u32 {
        self.version
    }

    /// Seal `plaintext` under this key with `associated_data` (the layout in the module documentation).
    #[pyo3(name = "seal")]
    fn py_seal<'py>(
        &self,
        py: Python<'py>,
        plaintext: &[u8],
        associated_data: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let sealed = self
            .seal(plaintext, associated_data)
            .map_err(|e| PyRuntimeError::new_err(format!("AES-256-GCM sealing failed: {e}")))?;
        Ok(PyBytes::new(py, &sealed))
    }

    /// Open a sealed value; ValueError if it does not authenticate under this key and `associated_data`.
    fn open<'py>(
        &self,
        py: Python<'py>,
        sealed: &[u8],
        associated_data: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let opened = Zeroizing::new(
            self.open_value(sealed, associated_data)
                .map_err(PyValueError::new_err)?,
        );
        Ok(PyBytes::new(py, &opened))
    }

    /// The data keys `wrapped` (each sealed under this key, the wrapping key, with its
    /// `associated_data`, in the layout above) as new `SealingKey`s of `versions`, in order.
    ///
    /// Why: unwrapped in Python, each data key loaded from the key store sat in a Python bytes object
    /// (which nothing zeroes) until the garbage collector freed it. Here each key goes from its wrapping
    /// to its `SealingKey` inside Rust; its bytes never reach Python and the buffer it was opened into
    /// is zeroed. (Not a speed change: a prefetch's CPU per key measured the same either way,
    /// docs/benchmark.md round 14.) ValueError, naming the position and never a key, if any wrapping
    /// does not open (then no key is returned).
    fn unwrap_keys(
        &self,
        wrapped: Vec<Bound<'_, PyBytes>>,
        associated_data: Vec<Bound<'_, PyBytes>>,
        versions: Vec<u32>,
    ) -> PyResult<Vec<SealingKey>> {
        if wrapped.len() != associated_data.len() || wrapped.len() != versions.len() {
            return Err(PyValueError::new_err(
                "unwrap_keys needs as many associated data and versions as wrapped keys",
            ));
        }
        let mut keys = Vec::with_capacity(wrapped.len());
        for (i, ((w, aad), version)) in wrapped
            .iter()
            .zip(&associated_data)
            .zip(versions)
            .enumerate()
        {
            let opened = Zeroizing::new(
                self.open_value(w.as_bytes(), aad.as_bytes())
                    .map_err(|e| PyValueError::new_err(format!("wrapped key {i}: {e}")))?,
            );
            if opened.len() != KEY_BYTES {
                return Err(PyValueError::new_err(format!(
                    "wrapped key {i} does not hold a 32-byte key"
                )));
            }
            let mut key = Zeroizing::new([0u8; KEY_BYTES]);
            key.copy_from_slice(&opened);
            keys.push(SealingKey { key, version });
        }
        Ok(keys)
    }

    /// New data keys of `version`, one per entry of `associated_data`, each drawn from OpenSSL's CSPRNG
    /// (`RAND_bytes`) and wrapped under this key (the wrapping key) with its associated data: returns
    /// (the wrapped keys, in the layout above, and the keys as `SealingKey`s), in order.
    ///
    /// Why: minted in Python, each new data key sat in a Python bytes object (`os.urandom`) that nothing
    /// zeroes, as loaded keys did before `unwrap_keys`. Here a new key goes from the CSPRNG to its wrapping
    /// and its `SealingKey` inside Rust, and the buffer it was drawn into is zeroed.
    fn mint_keys<'py>(
        &self,
        py: Python<'py>,
        associated_data: Vec<Bound<'py, PyBytes>>,
        version: u32,
    ) -> PyResult<(Vec<Bound<'py, PyBytes>>, Vec<SealingKey>)> {
        let mut wrapped = Vec::with_capacity(associated_data.len());
        let mut keys = Vec::with_capacity(associated_data.len());
        for aad in &associated_data {
            let mut key = Zeroizing::new([0u8; KEY_BYTES]);
            openssl::rand::rand_bytes(&mut key[..])
                .map_err(|e| PyRuntimeError::new_err(format!("drawing a data key failed: {e}")))?;
            let sealed = self
                .seal(&key[..], aad.as_bytes())
                .map_err(|e| PyRuntimeError::new_err(format!("wrapping a data key failed: {e}")))?;
            wrapped.push(PyBytes::new(py, &sealed));
            keys.push(SealingKey { key, version });
        }
        Ok((wrapped, keys))
    }

    fn __repr__(&self) -> String {
        format!("SealingKey(version={}, key=<hidden>)", self.version)
    }

    /// Refused: a pickled (or copied) key would be the key's bytes outside this object.
    fn __reduce__(&self) -> PyResult<()> {
        Err(PyTypeError::new_err(
            "a SealingKey cannot be pickled or copied: its key stays in this object",
        ))
    }

    fn __reduce_ex__(&self, _protocol: i32) -> PyResult<()> {
        self.__reduce__()
    }
}

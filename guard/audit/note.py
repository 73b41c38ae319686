"""Ed25519 keys, C2SP signed notes, tlog checkpoints and signed deletion confirmations.

Signed note (https://c2sp.org/signed-note): the text (UTF-8, ending in a newline), a blank line, then one
line per signature, ``— <key name> <base64(key id || signature)>``. For Ed25519 the key id is the first 4
bytes of SHA-256(key name || 0x0A || 0x01 || 32-byte public key) and the signature covers the text only.
A verifier key is written ``<name>+<key id hex>+<base64(0x01 || public key)>`` (the "vkey" encoding of
golang.org/x/mod/sumdb/note), so `guard audit verify --key FILE` needs nothing but that line.

Checkpoint (https://c2sp.org/tlog-checkpoint): the note text is the origin line, the tree size in
decimal, the base64 root hash, each on its own line; this guard adds no extension lines.

Deletion confirmations carry ``signature``: an Ed25519 signature over the confirmation's canonical
bytes (`confirmation_bytes`: the JSON object without its ``signature`` member, keys sorted, no
whitespace, UTF-8, as `orjson.dumps(..., option=OPT_SORT_KEYS)` writes it) prefixed by the context
string ``branchguard deletion confirmation v1\\n``, so that a signature made for one purpose (a
checkpoint) can never be presented as one for another. The member holds ``{"alg": "ed25519",
"key": <key name>+<key id hex>, "sig": base64}``.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guard.errors import ConfigError
from guard.secretfile import create_private, refuse_loose

#: The name the guard's key signs under (it appears in every signature line).
DEFAULT_KEY_NAME = "branchguard-audit"
ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "
CONFIRMATION_CONTEXT = b"branchguard deletion confirmation v1\n"


def key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public).digest()[:4]


def _check_name(name: str) -> None:
    if not name or "+" in name or any(c.isspace() for c in name):
        raise ValueError(f"a note key name has no spaces and no '+': {name!r}")


@dataclass(frozen=True)
class Verifier:
    """A public key that checks signed notes and confirmations (parsed from a vkey line)."""

    name: str
    id: bytes
    public: Ed25519PublicKey

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        try:
            name, hex_id, b64 = vkey.strip().split("+", 2)
            raw = base64.b64decode(b64, validate=True)
            if raw[0] != ALG_ED25519 or len(raw) != 33:
                raise ValueError("not an Ed25519 key")
            public = Ed25519PublicKey.from_public_bytes(raw[1:])
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"not a verifier key (name+keyid+base64): {exc}") from None
        kid = key_id(name, raw[1:])
        if kid.hex() != hex_id.lower():
            raise ConfigError("the verifier key's id does not match its name and public key")
        return cls(name, kid, public)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.public.verify(signature, message)
            return True
        except InvalidSignature:
            return False


class Signer:
    """The guard's Ed25519 private key under a name; never printed, never logged."""

    def __init__(self, private: Ed25519PrivateKey, name: str = DEFAULT_KEY_NAME) -> None:
        _check_name(name)
        self._private = private
        self.name = name
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.id = key_id(name, self.public)

    def __repr__(self) -> str:
        return f"Signer({self.name}+{self.id.hex()})"

    def vkey(self) -> str:
        return f"{self.name}+{self.id.hex()}+{base64.b64encode(bytes([ALG_ED25519]) + self.public).decode()}"

    def verifier(self) -> Verifier:
        return Verifier.parse(self.vkey())

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    # ---- signed notes ----------------------------------------------------------------------------
    def sign_note(self, text: str) -> str:
        if not text.endswith("\n"):
            raise ValueError("a note's text ends with a newline")
        sig = base64.b64encode(self.id + self.sign(text.encode())).decode()
        return f"{text}\n{SIG_PREFIX}{self.name} {sig}\n"

    # ---- deletion confirmations ------------------------------------------------------------------
    def sign_confirmation(self, confirmation: dict[str, Any]) -> dict[str, Any]:
        """The confirmation with its ``signature`` member (see the module docstring for the layout)."""
        sig = self.sign(CONFIRMATION_CONTEXT + confirmation_bytes(confirmation))
        return {**confirmation, "signature": {"alg": "ed25519", "key": f"{self.name}+{self.id.hex()}",
                                              "sig": base64.b64encode(sig).decode()}}


def open_note(note: str, verifier: Verifier) -> str:
    """The text of a signed note if `verifier`'s key signed it; ValueError otherwise."""
    text, sep, sigs = note.rpartition("\n\n")
    if not sep or not sigs.endswith("\n"):
        raise ValueError("not a signed note")
    text += "\n"
    for line in sigs[:-1].split("\n"):
        if not line.startswith(SIG_PREFIX):
            raise ValueError("malformed signature line")
        name, _, b64 = line[len(SIG_PREFIX):].rpartition(" ")
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError:
            raise ValueError("malformed signature") from None
        if name == verifier.name and raw[:4] == verifier.id and verifier.verify(text.encode(), raw[4:]):
            return text
    raise ValueError(f"no valid signature by {verifier.name}")


# ---- checkpoints -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def text(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise ValueError("a checkpoint has an origin, a size and a root hash line")
        origin, size, b64 = lines[0], lines[1], lines[2]
        if not size.isdigit() or (size != "0" and size.startswith("0")):
            raise ValueError("bad tree size")
        root = base64.b64decode(b64, validate=True)
        if len(root) != 32:
            raise ValueError("bad root hash")
        return cls(origin, int(size), root)


def sign_checkpoint(signer: Signer, checkpoint: Checkpoint) -> str:
    return signer.sign_note(checkpoint.text())


def open_checkpoint(note: str, verifier: Verifier) -> Checkpoint:
    return Checkpoint.parse(open_note(note, verifier))


# ---- confirmations -------------------------------------------------------------------------------------
def confirmation_bytes(confirmation: dict[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in confirmation.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS)


def verify_confirmation(confirmation: dict[str, Any], verifier: Verifier) -> bool:
    sig = confirmation.get("signature")
    key = f"{verifier.name}+{verifier.id.hex()}"
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519" or sig.get("key") != key:
        return False
    try:
        raw = base64.b64decode(str(sig.get("sig")), validate=True)
    except ValueError:
        return False
    return verifier.verify(CONFIRMATION_CONTEXT + confirmation_bytes(confirmation), raw)


# ---- key files -------------------------------------------------------------------------------------------
def generate_key_files(private_path: Path, name: str = DEFAULT_KEY_NAME) -> Signer:
    """Create a new private key (PKCS#8 PEM, mode 0600) and its verifier key next to it (`.pub`)."""
    private = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    if not create_private(private_path, pem):
        raise FileExistsError(f"{private_path} exists already: a signing key is never overwritten")
    signer = Signer(private, name)
    public_path(private_path).write_text(signer.vkey() + "\n", encoding="utf-8")
    return signer


def public_path(private_path: Path) -> Path:
    return private_path.with_suffix(".pub")


def load_signer(path: Path, name: str = DEFAULT_KEY_NAME) -> Signer:
    """The private key of a 0600 file; a file others can read is refused (fail closed)."""
    if not path.exists():
        raise ConfigError(f"no audit signing key at {path}: `guard stack up` makes one for the local stack, "
                          f"`guard audit keygen --out {path}` elsewhere")
    refuse_loose(path, "the audit signing key", ConfigError)
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not a PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return Signer(private, name)


def load_verifier(path: Path) -> Verifier:
    try:
        return Verifier.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no verifier key at {path}") from None

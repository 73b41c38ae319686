"""What every chain writer shares: the signing key's place, chain ids, checkpoint notes, one-shot chains.

`OneShotChains` serves writers that write a few records once and exit (`guard erase`, `guard retention`,
`guard hold --release`): each run is a chain of its own per kind (``<kind>/cli:<by>/<random>``),
checkpointed in the same write, so the run leaves no unanchored leaf behind.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from guard.audit.chain import LEAF_HEADER, Chain
from guard.audit.note import Checkpoint, Signer, load_signer
from guard.audit.verify import origin
from guard.config import Settings
from guard.kafka_security import stack_home

Headers = list[tuple[str, str | bytes | None]]


def signing_key_path(settings: Settings) -> Path:
    """The signing key file: the setting, else ``<stack home>/secrets/audit-signing.key``."""
    if settings.audit_signing_key:
        return Path(settings.audit_signing_key).expanduser()
    return stack_home() / "secrets" / "audit-signing.key"


def load_audit_signer(settings: Settings) -> Signer:
    return load_signer(signing_key_path(settings))


def note_for(signer: Signer, chain: Chain) -> str:
    """The signed checkpoint of a chain as it stands."""
    return signer.sign_note(Checkpoint(origin(chain.id), chain.size, chain.root()).text())


def new_chain_id(kind: str, base: str) -> str:
    """A fresh chain id: the random suffix keeps two trees from ever sharing one."""
    return f"{kind}/{base}/{uuid.uuid4().hex[:8]}"


class OneShotChains:
    """The chains of one short-lived writer: stamp its records, then checkpoint them all."""

    def __init__(self, settings: Settings, signer: Signer, writer: str) -> None:
        self.kinds = {settings.audit_topic: "audit", settings.deletions_topic: "deletions"}
        self.signer = signer
        self.writer = writer.replace(" ", "_").replace("/", "_")
        self.chains: dict[str, Chain] = {}

    def headers(self, topic: str, key: bytes | None, value: bytes | None,
                headers: Headers | None = None) -> Headers | None:
        kind = self.kinds.get(topic)
        if kind is None:
            return headers
        chain = self.chains.get(kind)
        if chain is None:
            chain = self.chains[kind] = Chain(new_chain_id(kind, f"cli:{self.writer}"))
        return [*(headers or ()), (LEAF_HEADER, chain.stamp(key, value))]

    def checkpoints(self, record: Callable[[str, int, str], object]) -> tuple[list[object], list[tuple[str, int, str]]]:
        """(checkpoint records built by `record(chain, size, note)`, (chain, size, note) for the second store)."""
        notes = [(c.id, c.size, note_for(self.signer, c)) for c in self.chains.values() if c.size]
        return [record(*n) for n in notes], notes

"""guard.secretfile: secret files are private from their first byte, replaced atomically, refused when loose."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from guard.errors import ConfigError
from guard.secretfile import create_private, read_private_text, refuse_loose, write_private


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_private_creates_0600_in_a_new_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "secret"
    old_umask = os.umask(0)  # a permissive umask must not widen the file
    try:
        write_private(path, "s3cret\n")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "s3cret\n"
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700


def test_write_private_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    write_private(path, b"one")
    write_private(path, b"two")
    assert path.read_bytes() == b"two" and mode_of(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_create_private_never_overwrites_and_one_racer_wins(tmp_path: Path) -> None:
    path = tmp_path / "key"
    won: list[bytes] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        if create_private(path, f"key-{i}".encode()):
            won.append(f"key-{i}".encode())

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and path.read_bytes() == won[0] and mode_of(path) == 0o600
    assert create_private(path, b"other") is False and path.read_bytes() == won[0]


def test_a_loose_secret_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "key"
    write_private(path, " value \n")
    assert read_private_text(path, "the key file", ConfigError) == "value"
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="readable by other users") as err:
        read_private_text(path, "the key file", ConfigError)
    assert f"chmod 600 {path}" in str(err.value) and "0640" in str(err.value)
    assert "value" not in str(err.value)  # the refusal never carries the secret
    os.chmod(path, 0o604)
    with pytest.raises(ConfigError):
        refuse_loose(path, "the key file", ConfigError)

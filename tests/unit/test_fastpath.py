"""The `hot_path` setting: which transform runs, and a clear refusal when the native one is demanded."""

from __future__ import annotations

import pytest

from guard.errors import ConfigError
from guard.protect import fastpath


def test_python_never_uses_the_native_path():
    assert fastpath.use_native("python") is False


def test_an_unknown_value_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="auto, native, python"):
        fastpath.use_native("fast")


def test_auto_follows_what_is_installed(monkeypatch):
    monkeypatch.setattr(fastpath, "_native", None)
    assert fastpath.use_native("auto") is False
    monkeypatch.setattr(fastpath, "_native", object())
    assert fastpath.use_native("auto") is True


def test_native_without_the_extension_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(fastpath, "_native", None)
    with pytest.raises(ConfigError, match="pip install ./native"):
        fastpath.use_native("native")

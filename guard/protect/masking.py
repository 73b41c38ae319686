"""Display masks for personal information (JR/T 0171-2020 Annex A 信息屏蔽, as commonly implemented).

A mask is the form of a field that downstream systems may *show* next to its ciphertext: enough for
a teller to recognise a customer (``138****1234``), never enough to recover the value.

Rules (see domain.md section 2.1):

=============  ==========================================================  ==========================
kind           rule                                                        example
=============  ==========================================================  ==========================
mobile         first 3 + last 4; a ``+86``/``0086`` prefix is kept         ``+86 138****5678``
bank_card      first 6 + last 4 (PCI-DSS), also used for account numbers   ``622588******7430``
resident_id    first 3 + last 4, hiding the birth date                     ``110***********002X``
name           surname only (compound surnames kept), ``*`` per other char ``欧阳**``
address        province / city / district, then ``***``                    ``上海市浦东新区***``
email          first char of the local part + ``***@domain``               ``z***@qq.com``
landline       area code + last 2                                          ``021-******34``
passport       first 1 + last 2 (also travel permits, kind ``permit``)     ``E******78``
ipv4           first two octets                                            ``10.12.*.*``
generic        nothing but a length class                                  ``***`` / ``******``
=============  ==========================================================  ==========================

C3 authentication data (passwords, PINs, CVN) has no mask on purpose: it is dropped or hashed, never
displayed, so asking for one raises.

Invariant (property-tested): for every input of length >= 4 the mask differs from the input and does
not contain it.  When a rule would keep too much (a short or malformed value, or a value that is
already masked) the function keeps less, falling back to the generic mask.

This runs per field per event, so the common shapes take a slicing fast path and regexes are
compiled once at import.  Every rule runs in time linear in its input, and inputs longer than
:data:`MAX_MASK_CHARS` are not inspected at all: they get the generic mask (``******``), so no value
can stall a worker or push a long stretch of itself into a display form.

The compiled path (``native/src/mask.rs``) computes the masks of the common shapes itself (a mobile of 11
ASCII digits, ASCII card/account numbers and resident IDs, names and e-mail addresses without surrounding
whitespace, ``generic``) and calls this module for everything else; this module stays the definition.
A change to one of those rules must be made there too: ``tests/unit/test_native_masks.py`` compares both.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["COMPOUND_SURNAMES", "MASK_KINDS", "MAX_MASK_CHARS", "mask"]

#: Longest value (in characters) a rule looks at; longer values get the generic mask. Every display
#: form in the catalog (mobile, card, ID, name, address, e-mail, ...) is far shorter.
MAX_MASK_CHARS = 256

_SEPARATORS = re.compile(r"[\s\-\u00a0]+")
# Applied to the value without its surrounding whitespace (`_mask_mobile` strips it), so no two `\s*`
# compete for the same run of spaces: each quantifier is followed by something it cannot match, which
# keeps the match linear. The `86` prefix without `+` counts only when the 11 digits end the value
# (or are followed by nothing but a final newline); `_MOBILE_NO_86` is used when trailing whitespace
# says otherwise.
_MOBILE = re.compile(r"(\+\s*86|0086|86(?=1[3-9]\d{9}$))?[\s\-]*(\d[\d\s\-]*\d)")
_MOBILE_NO_86 = re.compile(r"(\+\s*86|0086)?[\s\-]*(\d[\d\s\-]*\d)")
_LANDLINE = re.compile(
    r"^\s*(\(?0(?:10|2\d|[3-9]\d{2})\)?)([\s\-]?)(\d{7,8})(?:\s*(?:转|-|#|ext\.?)\s*\d{1,6})?\s*$"
)
# Province (optional) → prefecture city (optional) → district/county/banner (optional).  The name
# parts exclude markers, digits and road words so the match cannot run on into the street address;
# they are greedy so that 杭州市 is read as 杭州+市, not 杭+州.
_ADDR_HEAD = re.compile(
    r"^(?:[^省市区县旗路街巷弄号\d\s]{1,7}(?:省|自治区|特别行政区))?"
    r"(?:[^省市区县旗路街巷弄号\d\s]{1,9}(?:市|自治州|州|盟|地区))?"
    r"(?:[^省市区县旗路街巷弄号\d\s]{1,8}(?:区|县|旗|市))?"
)
_IPV4 = re.compile(r"^\s*(\d{1,3})\.(\d{1,3})\.\d{1,3}\.\d{1,3}\s*$")

COMPOUND_SURNAMES: frozenset[str] = frozenset(
    (
        "欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "慕容", "令狐", "司徒", "夏侯", "尉迟",
        "公孙", "长孙", "宇文", "轩辕", "端木", "独孤", "南宫", "西门", "万俟", "闻人", "赫连",
        "澹台", "公冶", "宗政", "濮阳", "淳于", "单于", "太叔", "申屠", "钟离", "呼延", "第五",
    )
)
"""Two-character surnames; the name mask keeps both characters (欧阳**), detectors reuse the list."""

_STARS = "*" * 64


def _stars(n: int) -> str:
    return _STARS[:n] if n <= 64 else "*" * n


def _generic(value: str) -> str:
    """Length class only: short values become ``***``, long ones ``******`` (always shorter than 4+)."""
    n = len(value)
    if n == 0:
        return ""
    return "***" if n < 16 else "******"


def _edges(s: str, head: int, tail: int, min_hidden: int) -> str:
    """Keep ``head`` and ``tail`` characters, star the middle; keep less when too little would be hidden."""
    n = len(s)
    if n - head - tail < min_hidden:
        head = min(head, n // 4)
        tail = min(tail, n // 4)
    return s[:head] + _stars(n - head - tail) + s[n - tail :] if tail else s[:head] + _stars(n - head)


def _compact_digits(value: str) -> str | None:
    """The value's digits if it is digits plus separators only; None otherwise."""
    if value.isdigit() and value.isascii():
        return value
    d = _SEPARATORS.sub("", value)
    return d if d.isdigit() and d.isascii() else None


def _mask_mobile(value: str) -> str:
    if len(value) == 11 and value.isdigit():
        return value[:3] + "****" + value[7:]
    s = value.strip()
    tail = value[len(value.rstrip()) :]
    m = (_MOBILE if tail in ("", "\n") else _MOBILE_NO_86).fullmatch(s)
    if m:
        digits = _SEPARATORS.sub("", m.group(2))
        prefix = m.group(1)
        body = _edges(digits, 3, 4, 4)
        if prefix:
            return "+86 " + body
        return body
    return _edges(value, 3, 4, 4)


def _mask_card(value: str) -> str:
    d = _compact_digits(value)
    return _edges(d if d is not None else value.strip(), 6, 4, 4)


def _mask_resident_id(value: str) -> str:
    d = _SEPARATORS.sub("", value) if not value.isalnum() else value
    return _edges(d, 3, 4, 8)


def _mask_name(value: str) -> str:
    s = value.strip()
    n = len(s)
    if n <= 1:
        return "*" if n else ""
    keep = 2 if n > 2 and s[:2] in COMPOUND_SURNAMES else 1
    return s[:keep] + _stars(n - keep)


def _mask_address(value: str) -> str:
    s = value.strip()
    m = _ADDR_HEAD.match(s)
    end = m.end() if m else 0
    if end == 0 or end >= len(s):
        end = len(s) // 3
    return s[:end] + "***"


def _mask_email(value: str) -> str:
    s = value.strip()
    at = s.rfind("@")
    if at < 0:
        return _edges(s, 1, 0, 3)
    domain = s[at + 1 :]
    return (s[:1] if at > 1 else "") + "***@" + domain


def _mask_landline(value: str) -> str:
    m = _LANDLINE.match(value)
    if m:
        local = m.group(3)
        area = m.group(1)
        sep = m.group(2) or ("" if area.endswith(")") else "-")
        return area + sep + _stars(len(local) - 2) + local[-2:]
    d = _compact_digits(value)
    if d is not None and d.startswith("0") and len(d) >= 10:
        area = 3 if d[1] in "12" else 4
        return d[:area] + "-" + _stars(len(d) - area - 2) + d[-2:]
    return _edges(value.strip(), 3, 2, 4)


def _mask_passport(value: str) -> str:
    return _edges(value.strip(), 1, 2, 4)


def _mask_ipv4(value: str) -> str:
    m = _IPV4.match(value)
    if m:
        return f"{m.group(1)}.{m.group(2)}.*.*"
    return _generic(value)


_MASKERS: dict[str, Callable[[str], str]] = {
    "mobile": _mask_mobile,
    "bank_card": _mask_card,
    "resident_id": _mask_resident_id,
    "name": _mask_name,
    "address": _mask_address,
    "email": _mask_email,
    "landline": _mask_landline,
    "passport": _mask_passport,
    "permit": _mask_passport,
    "ipv4": _mask_ipv4,
    "generic": _generic,
}

MASK_KINDS: frozenset[str] = frozenset(_MASKERS)
"""Every kind accepted by :func:`mask`; the catalog validates its ``mask`` entries against this."""


def mask(kind: str, value: str) -> str:
    """Display form of ``value`` under rule ``kind``; never the value itself.

    Non-string values (e.g. an integer card number from a CDC event) are masked as their ``str``.
    Raises ``ValueError`` (naming only the kind) for unknown kinds, including C3 authentication data,
    which has no display form.
    """
    try:
        fn = _MASKERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown mask kind {kind!r}; expected one of {sorted(MASK_KINDS)} "
            "(C3 authentication data is dropped or hashed, never masked)"
        ) from None
    if not isinstance(value, str):
        value = value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
    if len(value) > MAX_MASK_CHARS:
        return _generic(value)
    out = fn(value)
    # Safety net for already-masked or degenerate input: never hand back something that reveals it.
    if len(value) >= 2 and value in out:
        return _generic(value)
    return out

"""Content and column-name detectors for personal information in columns the catalog does not know.

The catalog classifies every known column; these detectors only describe *unknown* ones (schema
drift), so the guard can alert with a useful description.  The guard fails closed regardless: an
unknown column is encrypted whether or not anything here matches, and never gets a display mask from
what is found here (``Detection.mask`` names the mask a catalog entry for such a column could use).

Two entry points:

* :func:`detect_value` looks at one value (str, int, bytes, ...) and says what identifier it is,
  using the checks of domain.md section 3: GB 11643 MOD 11-2 for resident IDs, Luhn + BIN for bank
  cards, allocated mobile segments, GB 32100 for USCCs, document formats for passports and permits,
  ordered administrative markers for addresses, a surname dictionary for names.  Longer strings are
  scanned for identifiers embedded in free text (``转账给138...``).
* :func:`detect_column` combines a column-name hint (``sfzh``, ``sjhm``, ``pwd``, ...) with the
  content of sampled values and returns the strongest finding, ID > bank card > phone on overlap.

Confidence follows the Purview ladder (domain.md 3.8): shape only is low, shape + checksum medium,
checksum + agreeing column name high.  ``Detection.reason`` and any exception text describe *why*
(lengths, checks, column names) and never contain an inspected value.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache

from stdnum import numdb
from stdnum.cn import uscc as _stdnum_uscc

from guard.protect.masking import COMPOUND_SURNAMES

__all__ = ["KINDS", "Detection", "detect_column", "detect_value", "hint_for_column"]


def _words(text: str) -> frozenset[str]:
    """A frozenset from a whitespace-separated word list (keeps long vocabularies readable)."""
    return frozenset(text.split())


@dataclass(frozen=True, slots=True)
class Detection:
    """What a detector found.  ``reason`` explains the evidence and never contains the value."""

    kind: str
    data_class: str
    category: str
    sensitive: bool
    mask: str | None
    confidence: float
    reason: str


@dataclass(frozen=True, slots=True)
class _KindInfo:
    data_class: str
    category: str
    sensitive: bool
    mask: str | None
    label: str
    priority: int  # lower wins on overlap (domain.md 3.8: ID > bank card > phone > ...)


# ``sensitive`` is PIPL Art. 28 sensitive PI.  Financial accounts and authentication data are; the ID
# number on its own no longer is under GB/T 45574-2025 (domain.md 2.5), though it stays C2 (JR/T 0171).
_KINDS: dict[str, _KindInfo] = {
    "auth_secret": _KindInfo("C3", "authentication", True, None, "authentication secret", 0),
    "resident_id": _KindInfo("C2", "identity", False, "resident_id", "resident ID number", 1),
    "bank_card": _KindInfo("C2", "account", True, "bank_card", "bank card number", 2),
    "bank_account": _KindInfo("C2", "account", True, "bank_card", "bank account number", 3),
    "mobile": _KindInfo("C2", "contact", False, "mobile", "mobile number", 4),
    "landline": _KindInfo("C2", "contact", False, "landline", "landline number", 5),
    "passport": _KindInfo("C2", "identity", False, "passport", "passport number", 6),
    "permit": _KindInfo("C2", "identity", False, "permit", "travel permit number", 7),
    "email": _KindInfo("C2", "contact", False, "email", "e-mail address", 8),
    "address": _KindInfo("C2", "location", False, "address", "postal address", 9),
    "person_name": _KindInfo("C2", "identity", False, "name", "personal name", 10),
    "login_name": _KindInfo("C2", "account", False, None, "login name", 11),
    "free_text_pii": _KindInfo("C2", "free_text", False, None, "free text with embedded identifiers", 12),
    "ipv4": _KindInfo("C2", "network", False, "ipv4", "IPv4 address", 13),
    "uscc": _KindInfo("C1", "organization", False, None, "unified social credit code (legal person)", 14),
}
KINDS: frozenset[str] = frozenset(_KINDS)
"""Every ``Detection.kind`` this module can return."""


def _make(kind: str, confidence: float, reason: str, *, sensitive: bool | None = None) -> Detection:
    info = _KINDS[kind]
    return Detection(
        kind=kind,
        data_class=info.data_class,
        category=info.category,
        sensitive=info.sensitive if sensitive is None else sensitive,
        mask=info.mask,
        confidence=round(min(max(confidence, 0.0), 1.0), 3),
        reason=reason,
    )


# ==================================================================================================
# Value checks.  Each returns (confidence, reason) or None; inputs are already compacted strings.
# ==================================================================================================

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# 11-15, 21-23, 31-37, 41-46, 50-54, 61-65, 71 Taiwan, 81/82/83 HK/Macau/Taiwan residence permits.
_PROVINCES = _words(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 61 62 63 64 65 "
    "71 81 82 83"
)
_MMDD = r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
_ID18 = re.compile(r"[1-9]\d{5}(?:18|19|20)\d{2}" + _MMDD + r"\d{3}[\dXx]", re.ASCII)
_ID15 = re.compile(r"[1-9]\d{5}\d{2}" + _MMDD + r"\d{3}", re.ASCII)


@lru_cache(maxsize=8192)
def _area_known(code: str) -> bool:
    """True when the 6-digit division code is in GB/T 2260 (python-stdnum's cn/loc.dat, any year).

    stdnum's own ``ric.validate`` additionally requires the code to have existed in the birth year;
    that is too strict for real data (codes are reassigned on re-issue), so only membership is used.
    """
    return any("county" in props for _part, props in numdb.get("cn/loc").info(code))


def _real_past_date(year: int, month: int, day: int) -> bool:
    try:
        d = _dt.date(year, month, day)
    except ValueError:
        return False
    return d <= _dt.date.today()


_ID_REASON = "18-char value with valid GB 11643 check digit, real birth date and "


def _check_resident_id(s: str) -> tuple[float, str] | None:
    n = len(s)
    if n == 18:
        if not _ID18.fullmatch(s) or s[:2] not in _PROVINCES:
            return None
        if not _real_past_date(int(s[6:10]), int(s[10:12]), int(s[12:14])):
            return None
        total = sum(int(c) * w for c, w in zip(s, _ID_WEIGHTS, strict=False))
        if _ID_CHECK[total % 11] != s[17].upper():
            return None
        if _area_known(s[:6]):
            return 0.95, _ID_REASON + "GB/T 2260 area code"
        return 0.85, _ID_REASON + "province code"
    if n == 15:
        # Legacy 15-digit IDs have no check digit: require a known area code and a real 19YY date.
        if not _ID15.fullmatch(s) or s[:2] not in _PROVINCES or not _area_known(s[:6]):
            return None
        if not _real_past_date(1900 + int(s[6:8]), int(s[8:10]), int(s[10:12])):
            return None
        return 0.6, "15-digit legacy resident ID shape with GB/T 2260 area code and real date (no checksum)"
    return None


def luhn_valid(digits: str) -> bool:
    """ISO/IEC 7812 Luhn check (same result as ``stdnum.luhn.is_valid``, without its exceptions)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# Bank BINs of large Chinese banks (MingJing / domain.md 3.4) — matching one boosts confidence.
_BANK_BINS = _words(
    "622202 622203 621226 621225 622208 621700 622700 436742 622848 622849 621660 621661 622588 622580 "
    "621286 622260 622262 622188 621096 621799 625802 622609 622150 622155"
)


def _check_card(d: str) -> tuple[float, str] | None:
    n = len(d)
    if not 16 <= n <= 19 or not luhn_valid(d):
        return None
    if d[:6] in _BANK_BINS:
        return 0.95, f"{n}-digit value passing Luhn with a known Chinese bank BIN"
    if d.startswith("62"):
        return 0.9, f"{n}-digit value passing Luhn with UnionPay BIN range 62"
    if d[0] == "4" or "51" <= d[:2] <= "55" or "2221" <= d[:4] <= "2720" or d[:2] == "35":
        return 0.75, f"{n}-digit value passing Luhn with an international co-branded BIN range"
    if d[0] == "9":
        return 0.7, f"{n}-digit value passing Luhn with a legacy domestic '9' BIN"
    return None  # Luhn alone is a 1-in-10 coincidence; without a plausible BIN it is not a card


_MOBILE_STRICT = re.compile(r"1(?:3\d|4[5-9]|5[0-35-9]|6[2567]|7[0-8]|8\d|9[0-35-9])\d{8}", re.ASCII)
_MOBILE_LOOSE = re.compile(r"1[3-9]\d{9}", re.ASCII)


def _strip_cc(d: str) -> str:
    if len(d) == 13 and d.startswith("86"):
        return d[2:]
    if len(d) == 15 and d.startswith("0086"):
        return d[4:]
    return d


def _check_mobile(d: str) -> tuple[float, str] | None:
    d = _strip_cc(d)
    if len(d) != 11 or d.count(d[0]) == 11:
        return None
    if _MOBILE_STRICT.fullmatch(d):
        return 0.85, "11-digit value on an allocated mainland mobile segment"
    if _MOBILE_LOOSE.fullmatch(d):
        return 0.6, "11-digit value shaped like a mainland mobile number (segment not in allocation table)"
    return None


_LANDLINE = re.compile(r"\(?0(?:10|2\d|[3-9]\d{2})\)?([\s\-]?)[2-9]\d{6,7}", re.ASCII)


def _check_landline(s: str) -> tuple[float, str] | None:
    m = _LANDLINE.fullmatch(s)
    if not m:
        return None
    if m.group(1) or s.startswith("("):
        return 0.75, "area code plus 7-8 digit local number"
    return 0.5, "digits shaped like an area code plus local number (no separator)"


_USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_VALUES = {c: i for i, c in enumerate(_USCC_ALPHABET)}
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_USCC_SHAPE = re.compile(r"[1-9A-GY][0-9A-HJ-NPQRTUWXY]\d{6}[0-9A-HJ-NPQRTUWXY]{10}", re.ASCII)


def uscc_valid(code: str) -> bool:
    """GB 32100-2015 check, accepting codes whose registration authority is a letter (e.g. ``Y``).

    python-stdnum is used when the first 8 characters are digits, where it is correct; it rejects
    valid codes such as ``Y...`` (it requires digits there), so those get this module's own check.
    """
    if len(code) != 18 or not _USCC_SHAPE.fullmatch(code):
        return False
    if code[:8].isdigit():
        return bool(_stdnum_uscc.is_valid(code))
    total = sum(_USCC_VALUES[c] * w for c, w in zip(code, _USCC_WEIGHTS, strict=False))
    return _USCC_ALPHABET[(31 - total % 31) % 31] == code[17]


def _check_uscc(s: str) -> tuple[float, str] | None:
    if uscc_valid(s):
        return 0.9, "18-char value with valid GB 32100 check character (identifies a legal person)"
    return None


_PASSPORT = re.compile(
    r"E\d{8}|E[A-HJ-NP-Z]\d{7}|[DSPG]\d{8}|(?:DE|SE|PE)\d{7}|1[45]\d{7}|K\d{8}|MA\d{7}", re.ASCII
)
_PERMIT = re.compile(r"C\d{8}|C[A-HJ-NP-Z]\d{7}|[HM]\d{8}(?:\d{2})?|L\d{8}", re.ASCII)
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+", re.ASCII)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}", re.ASCII)

# -- names ------------------------------------------------------------------------------------------
# Common single surnames (roughly the top 200).  A narrower set is trusted for *values* on their own;
# the others begin too many ordinary words (高, 金, 方, 文, 成, 时, 安, ...) to count without context.
_COMMON_SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡杜叶程苏魏吕丁任沈姚卢"
    "姜崔钟谭陆汪范廖贾夏韦付傅邹孟熊秦邱江尹薛闫阎段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔汤"
)
_OTHER_SURNAMES = frozenset(
    "于余金石白方高常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚"
    "符舒阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农"
    "司卓古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁"
    "沙荣巫寇桑郎甄丛仲虞敖巩明佘池查麻苑迟邝向"
)
# Ordinary words that start with a trusted surname.  Names are only reported for a column with a
# name-like column name or many diverse name-shaped values, so this list only needs the frequent ones.
_NOT_NAMES = _words(
    "马上 周末 周年 周期 周转 黄金 黄色 任务 任何 任意 程序 程度 夏天 夏季 叶子 许多 许可 范围 钟表 陆地 "
    "张贴 何时 何必 谢谢 曾经 董事 董事会 田地 王国 林业 罗列 郑重 宋体 唐朝 韩国 韩元 江南 江湖 龙头 "
    "史上 雷达 毛利 毛巾 万元 万一 钱包 严重 严格 武器 熊猫 贺卡 顾客 顾问 孙子 胡同 杨树 陈述 陈列 "
    "付款 付费 付息 汪洋 沈阳 肖像 杜绝 卢布 段落 黎明 陶瓷 莫非 汤圆 邮件 孔雀 朱红 李子 苏醒"
)
_CJK = "\u4e00-\u9fff\u3400-\u4dbf"
_NAME_SHAPE = re.compile(f"[{_CJK}]{{2,4}}")


def _name_surname(s: str, *, strict: bool) -> str | None:
    """The surname if ``s`` is shaped like a Chinese personal name, else None."""
    n = len(s)
    if not 2 <= n <= 4 or not _NAME_SHAPE.fullmatch(s) or s in _NOT_NAMES:
        return None
    if s[:2] in COMPOUND_SURNAMES and 3 <= n <= 4:
        return s[:2]
    if n > 3:
        return None
    if s[0] in _COMMON_SURNAMES or (not strict and s[0] in _OTHER_SURNAMES):
        return s[0]
    return None


# -- addresses --------------------------------------------------------------------------------------
_PROVINCE_NAMES = _words(
    "北京 天津 上海 重庆 河北 山西 内蒙古 辽宁 吉林 黑龙江 江苏 浙江 安徽 福建 江西 山东 河南 湖北 湖南 广东 "
    "广西 海南 四川 贵州 云南 西藏 陕西 甘肃 青海 宁夏 新疆 台湾 香港 澳门"
)
_PROVINCE_START = re.compile("|".join(sorted(_PROVINCE_NAMES)))
# Marker → the address levels it can close (1 province, 2 city, 3 district, 4 town, 5 road, 6 house).
_MARKER_LEVELS: dict[str, tuple[int, ...]] = {
    "省": (1,), "自治区": (1,), "特别行政区": (1,),
    "市": (1, 2, 3), "州": (2,), "自治州": (2,), "盟": (2,), "地区": (2,),
    "区": (3,), "县": (3,), "旗": (3,),
    "镇": (4,), "乡": (4,), "街道": (4,),
    "路": (5,), "街": (5,), "巷": (5,), "弄": (5,), "村": (5,), "大道": (5,),
    "号": (6,), "栋": (6,), "幢": (6,), "单元": (6,), "室": (6,), "楼": (6,),
}
_ADDR_MARKERS = re.compile("|".join(sorted(_MARKER_LEVELS, key=len, reverse=True)))  # longest first
_CJK_CHAR = re.compile(f"[{_CJK}]")


def _check_address(s: str) -> tuple[float, str] | None:
    n = len(s)
    if n < 6 or n > 120:
        return None
    last = 0
    levels = 0
    admin = 0
    for m in _ADDR_MARKERS.finditer(s):
        nxt = next((lv for lv in _MARKER_LEVELS[m.group()] if lv > last), None)
        if nxt is None:
            continue
        last = nxt
        levels += 1
        admin += nxt <= 3
    anchored = _PROVINCE_START.match(s) is not None
    if len(_CJK_CHAR.findall(s)) * 2 < n:
        return None
    if levels >= 3 and admin >= 1 and last >= 5:
        conf = 0.85 if anchored else 0.75
        where = " from a province name" if anchored else ""
        return conf, f"{levels} ordered administrative/street markers{where}"
    if anchored and levels >= 2 and admin >= 2:
        return 0.6, "province name followed by ordered administrative markers"
    return None


# -- free text --------------------------------------------------------------------------------------
_FT_ID = re.compile(
    r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])",
    re.ASCII,
)
_FT_CARD = re.compile(r"(?<![0-9])(?:\d{16,19}|\d{4}(?:[ \-]\d{4}){3}(?:[ \-]?\d{1,3})?)(?![0-9])", re.ASCII)
_FT_MOBILE = re.compile(r"(?<![0-9])(?:(?:\+|00)?86[ \-]?)?(1[3-9]\d(?:[ \-]?\d{4}){2})(?![0-9])", re.ASCII)
_FT_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])" + _EMAIL.pattern, re.ASCII)
_SEPARATORS = re.compile(r"[\s\-()（）]+")
_FREE_TEXT_MAX = 4000  # characters scanned per value; memo fields are short, bound the worst case


def _scan_free_text(s: str) -> Detection | None:
    """Identifiers embedded in a longer string (ID > bank card > mobile > e-mail on overlap)."""
    text = s[:_FREE_TEXT_MAX]
    found: list[str] = []
    best = 0.0
    spans: list[tuple[int, int]] = []
    sensitive = False
    for m in _FT_ID.finditer(text):
        r = _check_resident_id(m.group())
        if r:
            found.append("resident ID")
            best = max(best, r[0])
            spans.append(m.span())
            break
    for m in _FT_CARD.finditer(text):
        if any(a < m.end() and m.start() < b for a, b in spans):
            continue
        r = _check_card(_SEPARATORS.sub("", m.group()))
        if r:
            found.append("bank card number")
            best = max(best, r[0])
            spans.append(m.span())
            sensitive = True
            break
    for m in _FT_MOBILE.finditer(text):
        if any(a < m.end() and m.start() < b for a, b in spans):
            continue
        r = _check_mobile(_SEPARATORS.sub("", m.group(1)))
        if r:
            found.append("mobile number")
            best = max(best, r[0])
            break
    if "@" in text and _FT_EMAIL.search(text):
        found.append("e-mail address")
        best = max(best, 0.85)
    if not found:
        return None
    return _make(
        "free_text_pii",
        best * 0.9,
        "free text containing an embedded " + ", ".join(found),
        sensitive=sensitive,
    )


# ==================================================================================================
# detect_value
# ==================================================================================================


def _as_text(value: object) -> str | None:
    """The value as text, or None when it cannot be an identifier (None, bool, float, dates, ...)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value) if value >= 0 else None
    if isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value() and value >= 0:
            return str(int(value))
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _detect_digits(d: str) -> Detection | None:
    """Identifiers that are digits (an 18-char ID may end in X) after removing separators.

    Order is the overlap priority (ID > bank card > phone), except that an 18-digit value with a
    valid GB 32100 check is taken as a USCC before trying Luhn: that check is the stronger evidence.
    """
    n = len(d)
    if n in (15, 18):
        r = _check_resident_id(d)
        if r:
            return _make("resident_id", *r)
    if n == 18:
        r = _check_uscc(d)
        if r:
            return _make("uscc", *r)
    if 16 <= n <= 19 and d.isdigit():
        r = _check_card(d)
        if r:
            return _make("bank_card", *r)
    if n in (11, 13, 15) and d.isdigit():
        r = _check_mobile(d)
        if r:
            return _make("mobile", *r)
    return None


def detect_value(value: object) -> Detection | None:
    """Classify one value on its own, or return None.

    Strings, non-negative ints, integral Decimals and UTF-8 bytes are inspected; anything else
    (None, floats, dates, containers) is not an identifier.  Whole-value checks run first, cheapest
    prefilter first (length and character class before any checksum); strings that are not an
    identifier as a whole are scanned for embedded ones.
    """
    text = _as_text(value)
    if text is None:
        return None
    s = text.strip()
    n = len(s)
    if n < 2:
        return None
    if n <= 25:
        compact = _SEPARATORS.sub("", s).lstrip("+") if not s.isalnum() else s
        if compact.isascii():
            upper = compact.upper()
            if compact[:-1].isdigit():
                det = _detect_digits(upper)
                if det:
                    return det
                r = _check_landline(s)
                if r:
                    return _make("landline", *r)
            if n == 18 or len(upper) == 18:
                r = _check_uscc(upper)
                if r:
                    return _make("uscc", *r)
            if 8 <= len(upper) <= 11 and upper.isalnum():
                if _PASSPORT.fullmatch(upper):
                    return _make("passport", 0.4, "document-number shape of a PRC passport (has no checksum)")
                if _PERMIT.fullmatch(upper):
                    return _make("permit", 0.35, "document-number shape of a HK/Macau/Taiwan travel permit")
        if "." in s and _IPV4.fullmatch(s):
            return _make("ipv4", 0.6, "dotted quad with octets in 0-255")
        if n <= 4:
            sn = _name_surname(s, strict=True)
            if sn:
                return _make("person_name", 0.3, "2-4 CJK characters starting with a common surname")
    if "@" in s and n <= 254 and _EMAIL.fullmatch(s):
        return _make("email", 0.9, "RFC-style e-mail address")
    r = _check_address(s)
    if r:
        return _make("address", *r)
    if n >= 11:
        return _scan_free_text(s)
    return None


# ==================================================================================================
# Column-name hints
# ==================================================================================================

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_TOKEN_SPLIT = re.compile(r"[^a-z]+")

# (kind, exact tokens or adjacent-token joins, substrings of the whole compacted name)
_HINTS: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    (
        "auth_secret",
        _words(
            "passwd password pwd pin pinblock cvn cvv cvc cvn2 cvv2 secret token otp mm jymm cxmm dlmm zfmm "
            "smscode verifycode yzm salt track2 trackdata magstripe cardexpiry cardexp expdate apikey "
            "privatekey accesskey"
        ),
        ("password", "passwd", "secret", "token", "cvv", "cvn"),
    ),
    (
        "resident_id",
        _words(
            "idno idcard idnumber idnum idcardno sfz sfzh sfzhm sfzhao zjhm zjh certno certnum certid "
            "identity identityno citizenid residentid"
        ),
        ("idcard", "sfzh", "zjhm", "certno", "identityno", "residentid"),
    ),
    ("passport", _words("passport passportno hz hzh hzhm"), ("passport",)),
    ("permit", _words("permit permitno txz txzh hxz tbz gatxz hkmopermit"), ("permit", "txzh")),
    ("bank_card", _words("card cardno cardnum cardnumber bankcard kh yhkh pan"), ("cardno", "bankcard")),
    (
        "bank_account",
        _words("acct acctno account accountno accountnum accno zh zhanghao yhzh"),
        ("acctno", "accountno"),
    ),
    ("email", _words("email mail yx yxdz emailaddr"), ("email",)),
    ("ipv4", _words("ip ipaddr ipaddress ipv4 clientip loginip"), ()),
    (
        "mobile",
        _words("phone mobile tel telephone telno sjhm sjh cellphone cell mob mobileno phoneno lxdh dh lxfs"),
        ("mobile", "phone", "sjhm", "lxdh"),
    ),
    ("landline", _words("landline gddh fixedtel fax zjdh"), ("landline",)),
    (
        "address",
        _words("addr address dz dizhi zz jtzz zzdz txdz lxdz hjdz"),
        ("address", "addr", "dizhi"),
    ),
    ("login_name", _words("username loginname login userid loginid dlm"), ("username", "loginname")),
    (
        "person_name",
        _words("name xm hm nm custnm acctnm custname realname fullname xingming huming khmc"),
        ("custname", "realname", "fullname", "xingming"),
    ),
)
# A name hint means something else when qualified by one of these (branch_name, card_type, ...).
_HINT_VETO = _words(
    "type status flag cnt count level kind mode len length valid verified exists enabled branch bank "
    "product prod file table column col org company corp dept city province tag channel host schema "
    "event topic merchant shop store brand item goods app device server db field class module job task "
    "role group key sheet category plan project street road district building region country site "
    "domain currency format policy rule version hint question template"
)
# Secret names are vetoed only by qualifiers that make the column metadata *about* a secret
# (``token_type``, ``password_changed_at``); ``card_pin`` or ``password_hint`` stay C3.
_SECRET_VETO = _words(
    "type status flag cnt count len length enabled at time date updated changed expires expire expired "
    "retry retries attempts errors policy version"
)


@lru_cache(maxsize=4096)
def hint_for_column(column: str) -> str | None:
    """The detector kind a column name suggests (``sfzh`` → ``resident_id``), or None.

    Names are split on ``_``, digits and camelCase; short pinyin abbreviations (``xm``, ``dz``) must be
    a whole token, longer words may also appear inside a compound name (``custmobileno``).  Qualifiers
    such as ``type``/``status``/``branch`` veto a hint (``card_type``, ``branch_name``).
    """
    tokens = [t for t in _TOKEN_SPLIT.split(_CAMEL.sub("_", column).lower()) if t]
    if not tokens:
        return None
    compact = "".join(tokens)
    candidates = set(tokens)
    candidates.update(a + b for a, b in zip(tokens, tokens[1:], strict=False))
    candidates.add(compact)
    token_set = set(tokens)
    for kind, exact, substrings in _HINTS:
        veto = _SECRET_VETO if kind == "auth_secret" else _HINT_VETO
        if token_set & veto:
            continue
        if candidates & exact or any(sub in compact for sub in substrings):
            return kind
    return None


# ==================================================================================================
# detect_column
# ==================================================================================================

MAX_SAMPLE = 500
"""Values inspected per column; enough for a stable share, bounded for huge samples."""

# Share of non-empty values a content kind needs for full confidence.  Checksummed kinds are rarely
# coincidental, so a minority of hits already means a column carries them.
_SUPPORT: dict[str, float] = {
    "resident_id": 0.3, "bank_card": 0.3, "uscc": 0.3, "mobile": 0.5, "landline": 0.5, "email": 0.5,
    "ipv4": 0.5, "address": 0.5, "passport": 0.8, "permit": 0.8, "person_name": 0.8, "free_text_pii": 0.05,
}
_COMPATIBLE: dict[str, frozenset[str]] = {
    "mobile": frozenset({"mobile", "landline"}),
    "landline": frozenset({"mobile", "landline"}),
    "bank_account": frozenset({"bank_account", "bank_card"}),
    "bank_card": frozenset({"bank_card"}),
    "resident_id": frozenset({"resident_id", "passport", "permit"}),
    "passport": frozenset({"passport", "permit"}),
    "permit": frozenset({"passport", "permit", "resident_id"}),
    "address": frozenset({"address"}),
    "person_name": frozenset({"person_name"}),
    "email": frozenset({"email"}),
    "ipv4": frozenset({"ipv4"}),
    "login_name": frozenset({"login_name", "email", "mobile"}),
}
_HINT_CONFIDENCE = 0.6
_HINT_UNCONFIRMED = 0.5
_AGREED_CONFIDENCE = 0.85  # content shape + agreeing column name ("keyword" rung of the Purview ladder)


# Bank account numbers (对公/存折) have no checksum (domain.md 3.4): a digit run is all that can agree.
_ACCOUNT_SHAPE = re.compile(r"\d{12,25}", re.ASCII)


@dataclass(slots=True)
class _ColumnStats:
    """Per-kind tallies over a column sample.  Holds hashes, never values."""

    total: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    conf_sum: dict[str, float] = field(default_factory=dict)
    sensitive: dict[str, bool] = field(default_factory=dict)
    name_hits: int = 0
    account_shapes: int = 0
    surnames: set[int] = field(default_factory=set)
    name_values: set[int] = field(default_factory=set)

    def add(self, value: object) -> None:
        text = _as_text(value)
        if text is None or not text.strip():
            return
        self.total += 1
        det = detect_value(value)
        if det is None and _ACCOUNT_SHAPE.fullmatch(text.strip()):
            self.account_shapes += 1
        if det is None or det.kind == "person_name":
            # Names are judged per column (diversity), so count the loose shape here, not detect_value's.
            surname = _name_surname(text.strip(), strict=False)
            if surname:
                self.name_hits += 1
                self.surnames.add(hash(surname))
                self.name_values.add(hash(text.strip()))
            return
        self.hits[det.kind] = self.hits.get(det.kind, 0) + 1
        self.conf_sum[det.kind] = self.conf_sum.get(det.kind, 0.0) + det.confidence
        self.sensitive[det.kind] = self.sensitive.get(det.kind, False) or det.sensitive

    def strong_name_shape(self) -> bool:
        """Many diverse name-shaped values, not one word that happens to start with a surname."""
        return (
            self.total >= 5
            and self.name_hits >= 0.8 * self.total
            and len(self.surnames) >= 3
            and len(self.name_values) >= 5
        )


def _content_detection(stats: _ColumnStats, name_hinted: bool) -> Detection | None:
    """The strongest kind the sampled values support, or None."""
    if not stats.total:
        return None
    ranked: list[tuple[float, int, str]] = []
    for kind, count in stats.hits.items():
        share = count / stats.total
        score = (stats.conf_sum[kind] / count) * min(1.0, share / _SUPPORT.get(kind, 0.5))
        ranked.append((score, -_KINDS[kind].priority, kind))
    name_share = stats.name_hits / stats.total
    if name_hinted and name_share >= 0.5:
        ranked.append((0.65, -_KINDS["person_name"].priority, "person_name"))
    elif stats.strong_name_shape():
        ranked.append((0.7, -_KINDS["person_name"].priority, "person_name"))
    if not ranked:
        return None
    score, _prio, kind = max(ranked)
    if score < 0.3:
        return None
    if kind == "person_name":
        reason = (
            f"{stats.name_hits} of {stats.total} sampled values are 2-4 CJK characters starting with a "
            f"common surname ({len(stats.surnames)} distinct surnames)"
        )
        return _make(kind, score, reason)
    count = stats.hits[kind]
    reason = (
        f"{count} of {stats.total} sampled values matched: {_KINDS[kind].label}"
        f" (mean confidence {stats.conf_sum[kind] / count:.2f})"
    )
    return _make(kind, score, reason, sensitive=_KINDS[kind].sensitive or stats.sensitive[kind])


def detect_column(column: str, values: Iterable[object]) -> Detection | None:
    """Classify a column from its name and up to :data:`MAX_SAMPLE` of its non-empty values.

    Content with checksums beats a misleading name (``remark2`` holding resident IDs); a sensitive
    name is kept even when the values do not confirm it, because they may be masked, tokenised or
    corrupt (domain.md 3.8.4).  A C3 name (``pwd``, ``pin``, ``cvv``) always wins: nothing in the
    content can show that a column is *not* a secret.  On overlap: ID > bank card > phone > others.
    """
    hint = hint_for_column(column)
    stats = _ColumnStats()
    for i, value in enumerate(values):
        if stats.total >= MAX_SAMPLE or i >= 4 * MAX_SAMPLE:
            break
        stats.add(value)
    content = _content_detection(stats, hint == "person_name")

    if hint is None:
        return content
    hint_info = _KINDS[hint]
    if hint == "auth_secret":
        reason = f"column name {column!r} suggests an {hint_info.label} (C3: never carried in clear)"
        return _make(hint, 0.9, reason)
    if content is not None and content.kind in _COMPATIBLE.get(hint, frozenset({hint})):
        return _make(
            content.kind,
            max(min(0.99, content.confidence + 0.25), _AGREED_CONFIDENCE),
            f"{content.reason}; column name {column!r} agrees",
            sensitive=content.sensitive,
        )
    if hint == "bank_account" and content is None and stats.total and stats.account_shapes >= 0.8 * stats.total:
        reason = (
            f"{stats.account_shapes} of {stats.total} sampled values are 12-25 digit account-number shapes "
            f"(account numbers carry no checksum); column name {column!r} agrees"
        )
        return _make(hint, _AGREED_CONFIDENCE, reason)
    unconfirmed = bool(stats.total) and content is None
    hint_det = _make(
        hint,
        _HINT_UNCONFIRMED if unconfirmed else _HINT_CONFIDENCE,
        f"column name {column!r} suggests a {hint_info.label}"
        + ("; sampled values did not confirm it (they may be masked, tokenised or empty)" if unconfirmed else ""),
    )
    if content is None:
        return hint_det
    # Name and content disagree: the stronger wins, the higher-priority kind on a tie.
    if (content.confidence, -_KINDS[content.kind].priority) > (hint_det.confidence, -hint_info.priority):
        return _make(
            content.kind,
            content.confidence,
            f"{content.reason}; overrides column name {column!r}",
            sensitive=content.sensitive,
        )
    return hint_det

//! Display masks of the common shapes, computed here instead of by a call into `guard.protect.masking`.
//!
//! Why: on a branch's real traffic nearly every value is new to the worker's memo, so each customer event
//! called back into Python once per masked column (a call, the rule, a `str` built and read back): the
//! mask and hash callbacks were about 5% of a worker's main thread (docs/benchmark.md, round 22).
//!
//! The Python function stays the definition. This module answers only for values whose shape makes the
//! rule a slice: a mobile of 11 ASCII digits, a card or account number of ASCII digits, a resident ID of
//! ASCII letters and digits, a name or an e-mail address with no surrounding whitespace. For anything else
//! (separators, a `+86` prefix, other kinds: addresses, landlines, passports, ...) it answers `None` and
//! the caller asks Python, so no rule is implemented twice for the hard cases. `mask`'s own guards apply
//! as there: a value longer than `MAX_MASK_CHARS` characters gets the generic mask, and a mask that would
//! contain the value (an already-masked input) falls back to it too. A property test compares this with
//! the Python function on generated and adversarial values (tests/unit/test_native_masks.py).

use pyo3::prelude::*;

/// `guard.protect.masking.MAX_MASK_CHARS`: longer values get the generic mask.
const MAX_MASK_CHARS: usize = 256;

/// `guard.protect.masking.COMPOUND_SURNAMES`: the name mask keeps both characters of these.
const COMPOUND_SURNAMES: [&str; 33] = [
    "欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "慕容", "令狐", "司徒", "夏侯", "尉迟", "公孙",
    "长孙", "宇文", "轩辕", "端木", "独孤", "南宫", "西门", "万俟", "闻人", "赫连", "澹台", "公冶",
    "宗政", "濮阳", "淳于", "单于", "太叔", "申屠", "钟离", "呼延", "第五",
];

/// The mask kinds answered here; every other kind of the catalog is `Python`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    Mobile,
    BankCard,
    ResidentId,
    Name,
    Email,
    Generic,
    /// Computed by the Python function only.
    Python,
}

impl MaskKind {
    /// The kind of a catalog `mask` entry (`guard.protect.masking.MASK_KINDS`).
    pub fn of(kind: &str) -> MaskKind {
        match kind {
            "mobile" => MaskKind::Mobile,
            "bank_card" => MaskKind::BankCard,
            "resident_id" => MaskKind::ResidentId,
            "name" => MaskKind::Name,
            "email" => MaskKind::Email,
            "generic" => MaskKind::Generic,
            _ => MaskKind::Python,
        }
    }
}

/// `mask(kind, value)` for a value of a common shape, or `None` (ask the Python function).
pub fn fast_mask(kind: MaskKind, value: &str) -> Option<String> {
    if kind == MaskKind::Python {
        return None;
    }
    let chars = value.chars().count();
    if chars > MAX_MASK_CHARS {
        return Some(generic(chars));
    }
    let out = match kind {
        MaskKind::Mobile => mobile(value)?,
        MaskKind::BankCard => card(value)?,
        MaskKind::ResidentId => resident_id(value)?,
        MaskKind::Name => name(value)?,
        MaskKind::Email => email(value)?,
        MaskKind::Generic => generic(chars),
        MaskKind::Python => return None,
    };
    // `mask`'s safety net: never a display form that contains the value (an already-masked input).
    if chars >= 2 && out.contains(value) {
        return Some(generic(chars));
    }
    Some(out)
}

/// `fast_mask` for Python (the tests compare it with `guard.protect.masking.mask`).
#[pyfunction]
#[pyo3(name = "fast_mask")]
pub fn py_fast_mask(kind: &str, value: &str) -> Option<String> {
    fast_mask(MaskKind::of(kind), value)
}

/// `_generic`: a length class only.
fn generic(chars: usize) -> String {
    match chars {
        0 => String::new(),
        1..=15 => "***".to_string(),
        _ => "******".to_string(),
    }
}

/// `_edges` on an ASCII string: keep `head` and `tail` bytes, star the middle; keep less when fewer
/// than `min_hidden` would be hidden.
fn ascii_edges(s: &str, head: usize, tail: usize, min_hidden: usize) -> String {
    let n = s.len();
    let (mut head, mut tail) = (head, tail);
    if n < head + tail + min_hidden {
        head = head.min(n / 4);
        tail = tail.min(n / 4);
    }
    let mut out = String::with_capacity(n);
    out.push_str(&s[..head]);
    out.extend(std::iter::repeat_n('*', n - head - tail));
    out.push_str(&s[n - tail..]);
    out
}

fn all_ascii_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `_mask_mobile`'s fast path: exactly 11 ASCII digits.
fn mobile(value: &str) -> Option<String> {
    (value.len() == 11 && all_ascii_digits(value))
        .then(|| format!("{}****{}", &value[..3], &value[7..]))
}

/// `_mask_card` for ASCII digits (`_compact_digits` returns the value itself).
fn card(value: &str) -> Option<String> {
    all_ascii_digits(value).then(|| ascii_edges(value, 6, 4, 4))
}

/// `_mask_resident_id` for ASCII letters and digits (`str.isalnum`: used as it is).
fn resident_id(value: &str) -> Option<String> {
    (!value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| ascii_edges(value, 3, 4, 8))
}

/// Whether `str.strip()` would leave the value as it is: its first and last characters are neither
/// Unicode whitespace nor a control character (Python's `str.isspace` also counts U+001C–U+001F, which
/// `char::is_whitespace` doesn't; every character below `!` is left to Python).
fn unstripped(value: &str) -> bool {
    let plain = |c: char| c > ' ' && !c.is_whitespace();
    match (value.chars().next(), value.chars().next_back()) {
        (Some(first), Some(last)) => plain(first) && plain(last),
        _ => false,
    }
}

/// `_mask_name` for a name with no surrounding whitespace: the surname (compound surnames kept whole),
/// a `*` per other character.
fn name(value: &str) -> Option<String> {
    if !unstripped(value) {
        return None;
    }
    let n = value.chars().count();
    if n <= 1 {
        return Some("*".to_string());
    }
    let two = value.char_indices().nth(2).map_or(value.len(), |(i, _)| i);
    let keep = if n > 2 && COMPOUND_SURNAMES.contains(&&value[..two]) {
        2
    } else {
        1
    };
    let cut = value
        .char_indices()
        .nth(keep)
        .map_or(value.len(), |(i, _)| i);
    let mut out = String::with_capacity(cut + n - keep);
    out.push_str(&value[..cut]);
    out.extend(std::iter::repeat_n('*', n - keep));
    Some(out)
}

/// `_mask_email` for an address with an `@` and no surrounding whitespace: the local part's first
/// character when it has two or more, then `***@` and the domain.
fn email(value: &str) -> Option<String> {
    if !unstripped(value) {
        return None;
    }
    let at = value.rfind('@')?;
    let local = &value[..at];
    let mut out = String::with_capacity(value.len() + 4);
    if local.chars().nth(1).is_some() {
        out.extend(local.chars().next());
    }
    out.push_str("***@");
    out.push_str(&value[at + 1..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_shapes() {
        assert_eq!(
            fast_mask(MaskKind::Mobile, "13812345678").as_deref(),
            Some("138****5678")
        );
        assert_eq!(fast_mask(MaskKind::Mobile, "+8613812345678"), None);
        assert_eq!(
            fast_mask(MaskKind::BankCard, "6225880137427430").as_deref(),
            Some("622588******7430")
        );
        assert_eq!(
            fast_mask(MaskKind::BankCard, "12345").as_deref(),
            Some("1***5")
        );
        assert_eq!(
            fast_mask(MaskKind::ResidentId, "11010519491231002X").as_deref(),
            Some("110***********002X")
        );
        assert_eq!(
            fast_mask(MaskKind::Name, "欧阳娜娜").as_deref(),
            Some("欧阳**")
        );
        assert_eq!(fast_mask(MaskKind::Name, "欧阳").as_deref(), Some("欧*"));
        assert_eq!(fast_mask(MaskKind::Name, " 王五"), None);
        assert_eq!(
            fast_mask(MaskKind::Email, "zhang@qq.com").as_deref(),
            Some("z***@qq.com")
        );
        assert_eq!(
            fast_mask(MaskKind::Email, "z@qq.com").as_deref(),
            Some("***@qq.com")
        );
        assert_eq!(fast_mask(MaskKind::Email, "zhang"), None);
        assert_eq!(fast_mask(MaskKind::Python, "上海市浦东新区"), None);
        assert_eq!(fast_mask(MaskKind::Name, "王*").as_deref(), Some("***"));
    }
}

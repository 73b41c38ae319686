//! Avro binary primitives, as `guard/records/encoders.py` writes them: zig-zag varints, length-prefixed
//! strings, unions as branch index then value, maps and arrays as one block then 0.

pub fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

pub fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_long(out, s.len() as i64);
    out.extend_from_slice(s);
}

/// A string's Avro encoding on its own (map keys and memoised values are kept encoded).
pub fn str_enc(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    put_str(&mut out, s.as_bytes());
    out
}

/// An array of strings (one block, then the end marker).
pub fn name_array(items: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    if !items.is_empty() {
        put_long(&mut out, items.len() as i64);
        for item in items {
            put_str(&mut out, item.as_bytes());
        }
    }
    out.push(0);
    out
}

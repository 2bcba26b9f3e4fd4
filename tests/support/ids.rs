//! Ids shaped like the message ids producers use, shared by the store bench and the examples
//! (which include this file alone with `#[path]`: they need nothing else of the harness).

/// A UUID-shaped 36-byte id from a number: distinct numbers give distinct, random-looking ids.
pub fn uuid_id(n: u128) -> String {
    let x = xxhash_rust::xxh3::xxh3_128(&n.to_le_bytes());
    let h = format!("{x:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

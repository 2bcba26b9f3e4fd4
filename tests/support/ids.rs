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

/// Records the [`uuid_id`]s of `from..to` in `store`, durably, in commits of `batch`, as new ids
/// (a panic otherwise): how the examples fill a store.
#[allow(dead_code)] // the examples use it; the store bench, which includes this file too, does not
pub fn record_uuid_ids(store: &dedupd::Store, from: u64, to: u64, batch: u64, now: u64) {
    let mut next = from;
    while next < to {
        let hi = (next + batch).min(to);
        let claims = (next..hi)
            .map(
                |i| match store.claim(uuid_id(i.into()).as_bytes(), now).unwrap() {
                    dedupd::Verdict::New(c) => c,
                    other => panic!("id {i} not new: {other:?}"),
                },
            )
            .collect();
        store.commit(claims, now).unwrap();
        next = hi;
    }
}

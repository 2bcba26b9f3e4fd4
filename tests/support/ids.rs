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

/// Claims `ids` for the store's window as one batch, as the relay claims a read's deliveries,
/// and returns the claims: all new (a panic names the first id that is not).
#[allow(dead_code)] // the integration tests include this file too and do not fill stores
pub fn claim_fresh(store: &dedupd::Store, ids: &[String], now: u64) -> Vec<dedupd::Claim> {
    let window = store.ttl();
    store
        .claim_all(ids.iter().map(|id| (id.as_bytes(), window)), now)
        .into_iter()
        .zip(ids)
        .map(|(verdict, id)| match verdict.unwrap() {
            dedupd::Verdict::New(c) => c,
            other => panic!("id {id} not new: {other:?}"),
        })
        .collect()
}

/// Records the [`uuid_id`]s of `from..to` in `store`, durably, in commits of `batch`, each
/// claimed with [`claim_fresh`]: how the store bench and the examples fill a store.
#[allow(dead_code)] // as above
pub fn record_uuid_ids(store: &dedupd::Store, from: u64, to: u64, batch: u64, now: u64) {
    let mut next = from;
    while next < to {
        let hi = (next + batch).min(to);
        let ids: Vec<String> = (next..hi).map(|i| uuid_id(i.into())).collect();
        store.commit(claim_fresh(store, &ids, now), now).unwrap();
        next = hi;
    }
}

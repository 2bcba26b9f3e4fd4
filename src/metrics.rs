//! What dedupd counts, and its Prometheus exposition (the `metrics` facade with
//! `metrics-exporter-prometheus` rendering the text format).
//!
//! [`Metrics`] is the relay's own view (health, totals for the log summary); each of its updates
//! is also recorded through the `metrics` facade, which the exporter renders at `/metrics`. Store
//! figures are gauges refreshed from [`Stats`] at each scrape rather than pushed on every change.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::Stats;

/// Histogram buckets (seconds) for the latencies: a flush is milliseconds, a relay round trip
/// tens of them, a confirm timeout up to tens of seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why a message went to the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// No id, and the missing-id policy says dead-letter.
    NoId,
    /// The id was refused by the store (too long).
    BadId,
    /// The destination nacked the publish.
    Nacked,
    /// The destination returned it as unroutable.
    Returned,
    /// No confirm within the confirm timeout.
    Timeout,
    /// The AMQP client could not decode it (a non-UTF-8 message id, header or routing key).
    Undecodable,
    /// Returned to a quorum source at its last allowed delivery (`DEDUPD_DELIVERY_LIMIT`): the
    /// broker dead-letters it, not dedupd.
    DeliveryLimit,
    /// Its TTL header is not a positive whole number of milliseconds.
    BadTtl,
    /// Its TTL header asks for a window longer than `DEDUPD_MAX_TTL`.
    TtlOverMax,
}

impl DeadLetterReason {
    const ALL: [DeadLetterReason; 9] = [
        DeadLetterReason::NoId,
        DeadLetterReason::BadId,
        DeadLetterReason::Nacked,
        DeadLetterReason::Returned,
        DeadLetterReason::Timeout,
        DeadLetterReason::Undecodable,
        DeadLetterReason::DeliveryLimit,
        DeadLetterReason::BadTtl,
        DeadLetterReason::TtlOverMax,
    ];

    /// The label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            DeadLetterReason::NoId => "no_id",
            DeadLetterReason::BadId => "bad_id",
            DeadLetterReason::Nacked => "nacked",
            DeadLetterReason::Returned => "returned",
            DeadLetterReason::Timeout => "confirm_timeout",
            DeadLetterReason::Undecodable => "undecodable",
            DeadLetterReason::DeliveryLimit => "delivery_limit",
            DeadLetterReason::BadTtl => "bad_ttl",
            DeadLetterReason::TtlOverMax => "ttl_over_max",
        }
    }
}

/// The process-wide Prometheus recorder, installed on first use.
///
/// If the embedding program installed a recorder of its own first, dedupd's figures go to that
/// one and this handle renders an empty page: a library must not take the global slot by force.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("bucket list is not empty");
        match builder.install_recorder() {
            Ok(handle) => {
                describe();
                zero();
                handle
            }
            Err(e) => {
                tracing::warn!(cause = %e, "another metrics recorder is installed; /metrics stays empty");
                PrometheusBuilder::new().build_recorder().handle()
            }
        }
    })
}

fn describe() {
    describe_counter!(
        "dedupd_messages_total",
        "Source messages settled, by outcome."
    );
    describe_counter!(
        "dedupd_dead_lettered_total",
        "Messages rejected to <source>.dead, by reason."
    );
    describe_counter!(
        "dedupd_forwarded_without_id_total",
        "Messages forwarded undeduplicated because they had no id."
    );
    describe_counter!(
        "dedupd_duplicate_copies_total",
        "Copies of duplicates published to the duplicates exchange."
    );
    describe_counter!(
        "dedupd_reconnects_total",
        "Broker connections opened after the first."
    );
    describe_counter!(
        "dedupd_forget_all_total",
        "Times an operator forgot every id (dedupd forget --all)."
    );
    describe_counter!(
        "dedupd_forgotten_ids_total",
        "Ids forgotten by an operator, one by one or all at once."
    );
    describe_gauge!(
        "dedupd_connected",
        "1 while connected to the broker and consuming."
    );
    describe_gauge!(
        "dedupd_publishes_in_flight",
        "Publishes waiting for their confirm."
    );
    describe_histogram!(
        "dedupd_commit_seconds",
        Unit::Seconds,
        "From claiming a new id to its record being durable."
    );
    describe_histogram!(
        "dedupd_relay_seconds",
        Unit::Seconds,
        "From receiving a source delivery to acking it."
    );
    describe_gauge!(
        "dedupd_store_live_ids",
        "Ids recorded in the store (expired ones not yet swept included)."
    );
    describe_gauge!(
        "dedupd_store_in_flight",
        "Ids claimed, not yet committed or released."
    );
    describe_gauge!(
        "dedupd_store_disk_bytes",
        Unit::Bytes,
        "Bytes the store occupies on disk."
    );
    describe_gauge!(
        "dedupd_bloom_bytes",
        Unit::Bytes,
        "Bytes of Bloom filter in memory."
    );
    describe_gauge!(
        "dedupd_bloom_generations",
        "Bloom generations a lookup queries."
    );
    describe_gauge!(
        "dedupd_bloom_false_positive_ratio",
        "Measured: Bloom 'maybe's that the store answered absent, over lookups of absent ids."
    );
    describe_gauge!(
        "dedupd_oldest_live_id_age_seconds",
        Unit::Seconds,
        "Age of the oldest id still on disk: the dedup window actually kept."
    );
    describe_counter!(
        "dedupd_compaction_swept_ids_total",
        "Expired ids deleted by the compactor."
    );
    describe_counter!(
        "dedupd_bloom_rebuilds_total",
        "Bloom filter rebuilds from the store (at start-up included)."
    );
    describe_gauge!(
        "dedupd_bloom_false_positive_target",
        "The configured Bloom false-positive rate (DEDUPD_BLOOM_FP_RATE)."
    );
    describe_gauge!(
        "dedupd_window_seconds",
        Unit::Seconds,
        "The configured dedup window (DEDUPD_TTL)."
    );
    describe_gauge!(
        "dedupd_start_time_seconds",
        Unit::Seconds,
        "When this process started, seconds since the Unix epoch."
    );
    describe_gauge!(
        "dedupd_ha_active",
        "DEDUPD_HA=on: 1 while this instance is the active consumer, 0 as a standby."
    );
    describe_gauge!(
        "dedupd_ha_applied_offset",
        "Offset in <source>.ids of the last commit batch applied to this store."
    );
    describe_gauge!(
        "dedupd_ha_lag_ids",
        "Ids read from <source>.ids and not yet applied."
    );
    describe_gauge!(
        "dedupd_ha_lag_seconds",
        Unit::Seconds,
        "Age of the oldest commit batch read from <source>.ids and not yet applied; 0 when none."
    );
    describe_gauge!(
        "dedupd_ha_catch_up_seconds",
        Unit::Seconds,
        "At the last takeover: from the first delivery to the end of the id stream applied."
    );
    describe_counter!(
        "dedupd_ha_applied_ids_total",
        "Ids applied from <source>.ids (batches of this instance's own not counted)."
    );
    describe_counter!(
        "dedupd_ha_takeovers_total",
        "Times this instance became the active consumer."
    );
    describe_gauge!("dedupd_build_info", "Always 1; the version is a label.");
    gauge!("dedupd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Registers every counter, gauge and histogram at zero, so dashboards and alerts find the series
/// before the first event (a reconnect, a dead letter, a commit) instead of "no data".
fn zero() {
    for outcome in ["forwarded", "duplicate", "dead_lettered"] {
        counter!("dedupd_messages_total", "outcome" => outcome).absolute(0);
    }
    for reason in DeadLetterReason::ALL {
        counter!("dedupd_dead_lettered_total", "reason" => reason.label()).absolute(0);
    }
    for name in [
        "dedupd_reconnects_total",
        "dedupd_forwarded_without_id_total",
        "dedupd_duplicate_copies_total",
        "dedupd_forget_all_total",
        "dedupd_forgotten_ids_total",
    ] {
        counter!(name).absolute(0);
    }
    gauge!("dedupd_connected").set(0.0);
    gauge!("dedupd_publishes_in_flight").set(0.0);
    // A registered histogram renders its buckets at zero count until the first observation.
    for name in ["dedupd_commit_seconds", "dedupd_relay_seconds"] {
        let _ = metrics::histogram!(name);
    }
}

/// What this instance does among those consuming one source (`DEDUPD_HA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `DEDUPD_HA=off`: the only consumer.
    Alone,
    /// Consuming, not chosen by the broker: applies the id stream.
    Standby,
    /// The single active consumer: forwards, and appends its ids to the stream.
    Active,
}

impl Role {
    /// As `/healthz` and the log name it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Alone => "alone",
            Role::Standby => "standby",
            Role::Active => "active",
        }
    }
}

/// The relay's counters and health, shared by the relay (writer), the HTTP endpoint and the log
/// summary (readers).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connected to the broker and consuming the source queue.
    healthy: AtomicBool,
    /// The [`Role`], as `0` alone, `1` standby, `2` active.
    role: std::sync::atomic::AtomicU8,
    /// Messages forwarded to the destination and acked at the source.
    forwarded: AtomicU64,
    /// Duplicates acked at the source without forwarding.
    duplicate: AtomicU64,
    /// Messages rejected to the dead-letter queue.
    dead_lettered: AtomicU64,
}

impl Metrics {
    /// A fresh set of counters; installs the Prometheus recorder if nothing has yet.
    pub fn new() -> Metrics {
        prometheus();
        Metrics::default()
    }

    /// Publishes the settings alerts compare the measurements with: the Bloom target rate and
    /// the window, and when the process started (so an alert can wait one window after it).
    pub fn settings(&self, fp_target: f64, window: Duration, started_ms: u64) {
        gauge!("dedupd_bloom_false_positive_target").set(fp_target);
        gauge!("dedupd_window_seconds").set(window.as_secs_f64());
        gauge!("dedupd_start_time_seconds").set(started_ms as f64 / 1000.0);
    }

    /// Whether `/healthz` answers 200.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        gauge!("dedupd_connected").set(if healthy { 1.0 } else { 0.0 });
        if healthy && !was {
            // systemd (Type=notify): ready once consuming; harmless when not under systemd.
            let _ = sd_notify::notify(
                false,
                &[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status("connected and consuming"),
                ],
            );
        } else if !healthy && was {
            let _ = sd_notify::notify(
                false,
                &[sd_notify::NotifyState::Status(
                    "not consuming (reconnecting or stopping)",
                )],
            );
        }
    }

    /// The instance's role.
    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            1 => Role::Standby,
            2 => Role::Active,
            _ => Role::Alone,
        }
    }

    pub(crate) fn set_role(&self, role: Role) {
        let n = match role {
            Role::Alone => 0,
            Role::Standby => 1,
            Role::Active => 2,
        };
        self.role.store(n, Ordering::Relaxed);
        if role != Role::Alone {
            gauge!("dedupd_ha_active").set(if role == Role::Active { 1.0 } else { 0.0 });
        }
    }

    /// A takeover done: the stream's end applied after `catch_up`.
    pub(crate) fn took_over(&self, catch_up: Duration) {
        self.set_role(Role::Active);
        counter!("dedupd_ha_takeovers_total").increment(1);
        gauge!("dedupd_ha_catch_up_seconds").set(catch_up.as_secs_f64());
    }

    /// The id stream read up to a batch of `ids` ids, the oldest published `age` ago, not applied.
    pub(crate) fn ha_lag(ids: u64, age: Duration) {
        gauge!("dedupd_ha_lag_ids").set(ids as f64);
        gauge!("dedupd_ha_lag_seconds").set(age.as_secs_f64());
    }

    /// The id stream applied up to `offset`, `ids` more ids applied.
    pub(crate) fn ha_applied(offset: u64, ids: u64) {
        gauge!("dedupd_ha_applied_offset").set(offset as f64);
        counter!("dedupd_ha_applied_ids_total").increment(ids);
        Metrics::ha_lag(0, Duration::ZERO);
    }

    pub(crate) fn forwarded(&self, n: u64, without_id: u64) {
        self.forwarded.fetch_add(n, Ordering::Relaxed);
        counter!("dedupd_messages_total", "outcome" => "forwarded").increment(n);
        if without_id > 0 {
            counter!("dedupd_forwarded_without_id_total").increment(without_id);
        }
    }

    pub(crate) fn duplicates(&self, n: u64) {
        self.duplicate.fetch_add(n, Ordering::Relaxed);
        counter!("dedupd_messages_total", "outcome" => "duplicate").increment(n);
    }

    pub(crate) fn dead_lettered(&self, reason: DeadLetterReason) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        counter!("dedupd_messages_total", "outcome" => "dead_lettered").increment(1);
        counter!("dedupd_dead_lettered_total", "reason" => reason.label()).increment(1);
    }

    pub(crate) fn duplicate_copied(&self) {
        counter!("dedupd_duplicate_copies_total").increment(1);
    }

    pub(crate) fn reconnected(&self) {
        counter!("dedupd_reconnects_total").increment(1);
    }

    pub(crate) fn set_publishes_in_flight(&self, n: usize) {
        gauge!("dedupd_publishes_in_flight").set(n as f64);
    }

    /// Counts ids an operator forgot one by one.
    pub(crate) fn forgotten(n: u64) {
        counter!("dedupd_forgotten_ids_total").increment(n);
    }

    /// Counts a bulk forget and the ids it forgot.
    pub(crate) fn forgot_all(n: u64) {
        counter!("dedupd_forget_all_total").increment(1);
        counter!("dedupd_forgotten_ids_total").increment(n);
    }

    /// Records how long each claimed id of a commit took to become durable. One registry
    /// look-up for the batch: per id, it was a visible share of the commit thread's time.
    pub(crate) fn committed_after(latencies: impl IntoIterator<Item = Duration>) {
        let histogram = metrics::histogram!("dedupd_commit_seconds");
        for latency in latencies {
            histogram.record(latency.as_secs_f64());
        }
    }

    /// Records how long each source delivery took from receipt to ack (one look-up for all).
    pub(crate) fn acked_after(latencies: impl IntoIterator<Item = Duration>) {
        let histogram = metrics::histogram!("dedupd_relay_seconds");
        for latency in latencies {
            histogram.record(latency.as_secs_f64());
        }
    }

    /// Messages forwarded so far.
    pub fn forwarded_total(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Duplicates removed so far.
    pub fn duplicate_total(&self) -> u64 {
        self.duplicate.load(Ordering::Relaxed)
    }

    /// Messages dead-lettered so far, all reasons.
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition, with the store gauges refreshed from `stats`.
    pub fn render(&self, stats: Option<&Stats>, ttl: Duration, now_ms: u64) -> String {
        if let Some(s) = stats {
            store_gauges(s, ttl, now_ms);
        }
        let handle = prometheus();
        // Histograms keep raw samples until upkeep folds them into buckets.
        handle.run_upkeep();
        handle.render()
    }
}

/// Sets the store's gauges (and its monotonic totals) from `stats`.
fn store_gauges(s: &Stats, ttl: Duration, now_ms: u64) {
    gauge!("dedupd_store_live_ids").set(s.live_ids as f64);
    gauge!("dedupd_store_in_flight").set(s.in_flight as f64);
    gauge!("dedupd_store_disk_bytes").set(s.disk_bytes as f64);
    gauge!("dedupd_bloom_bytes").set(s.bloom_bytes as f64);
    gauge!("dedupd_bloom_generations").set(s.bloom_generations as f64);
    gauge!("dedupd_bloom_false_positive_ratio").set(s.false_positive_rate);
    gauge!("dedupd_oldest_live_id_age_seconds").set(oldest_age(s, ttl, now_ms).as_secs_f64());
    counter!("dedupd_compaction_swept_ids_total").absolute(s.swept_ids);
    counter!("dedupd_bloom_rebuilds_total").absolute(s.bloom_rebuilds);
}

/// Age of the oldest record on disk, from its expiry and the window (zero for an empty store).
pub(crate) fn oldest_age(s: &Stats, ttl: Duration, now_ms: u64) -> Duration {
    s.oldest_expiry_ms.map_or(Duration::ZERO, |expires| {
        let first_seen = expires.saturating_sub(ttl.as_millis() as u64);
        Duration::from_millis(now_ms.saturating_sub(first_seen))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_the_outcomes_and_the_build() {
        let m = Metrics::new();
        m.forwarded(3, 1);
        m.duplicates(2);
        m.dead_lettered(DeadLetterReason::Returned);
        Metrics::committed_after([Duration::from_millis(3)]);
        let text = m.render(None, Duration::from_secs(60), 0);
        // The recorder is process-wide: other tests may have counted too, so check presence.
        for name in [
            "dedupd_messages_total{outcome=\"forwarded\"}",
            "dedupd_messages_total{outcome=\"duplicate\"}",
            "dedupd_messages_total{outcome=\"dead_lettered\"}",
            "dedupd_dead_lettered_total{reason=\"returned\"}",
            "dedupd_forwarded_without_id_total",
            "dedupd_commit_seconds_bucket{le=\"0.005\"}",
            "dedupd_build_info{version=\"",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert_eq!(m.forwarded_total(), 3);
        assert_eq!(m.dead_lettered_total(), 1);
    }

    #[test]
    fn oldest_age_is_measured_from_first_seen() {
        let stats = Stats {
            live_ids: 1,
            redis_keys: 0,
            in_flight: 0,
            bloom_generations: 1,
            bloom_bytes: 0,
            index_bytes: 0,
            segments: 0,
            disk_bytes: 0,
            absent_lookups: 0,
            false_positives: 0,
            false_positive_rate: 0.0,
            swept_ids: 0,
            bloom_rebuilds: 0,
            oldest_expiry_ms: Some(100_000),
            bloom_loaded_from: crate::store::BloomOrigin::Rebuilt,
        };
        // Recorded at 40 000 (expiry 100 000 minus a 60 s window), now 70 000: 30 s old.
        assert_eq!(
            oldest_age(&stats, Duration::from_secs(60), 70_000),
            Duration::from_secs(30)
        );
    }
}

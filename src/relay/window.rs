//! How long a message's id stays a duplicate: the configured window, or the one its TTL header
//! asks for (`x-dedup-ttl`, milliseconds, like the peer plugin's `x-cache-ttl`), within the cap.
//!
//! A header that cannot be read as a window is never guessed at: the message is dead-lettered
//! with the reason counted, since forwarding it with some other window could let a duplicate
//! through (too short) or hold an id far longer than its publisher meant (too long).

use std::time::Duration;

use amqprs::{BasicProperties, FieldName, FieldValue};

use crate::metrics::DeadLetterReason;

/// The window of each message, per `DEDUPD_TTL`, `DEDUPD_TTL_HEADER` and `DEDUPD_MAX_TTL`.
#[derive(Debug, Clone)]
pub(crate) struct Windows {
    /// The header read, prebuilt as the AMQP short string the field table is keyed by; `None`:
    /// every message gets `default`.
    header: Option<FieldName>,
    /// `DEDUPD_TTL`.
    default: Duration,
    /// `DEDUPD_MAX_TTL`: the longest window a header may ask for.
    max: Duration,
}

impl Windows {
    /// Windows of `default`, or of `header`'s value up to `max`.
    ///
    /// # Panics
    ///
    /// If the header name is over 255 bytes (config parsing refuses those).
    pub(crate) fn new(header: Option<&str>, default: Duration, max: Duration) -> Windows {
        let header = header.map(|name| {
            name.try_into()
                .expect("config limits header names to 255 bytes")
        });
        Windows {
            header,
            default,
            max,
        }
    }

    /// The window of a message with these properties, or why it is dead-lettered.
    pub(crate) fn decide(&self, props: &BasicProperties) -> Result<Duration, DeadLetterReason> {
        let Some(value) = self
            .header
            .as_ref()
            .and_then(|name| props.headers().and_then(|h| h.get(name)))
        else {
            return Ok(self.default);
        };
        let ms = millis(value).ok_or(DeadLetterReason::BadTtl)?;
        // A number of milliseconds past u64 is a window over any cap.
        let window = ms
            .map(Duration::from_millis)
            .ok_or(DeadLetterReason::TtlOverMax)?;
        if window > self.max {
            return Err(DeadLetterReason::TtlOverMax);
        }
        Ok(window)
    }
}

/// A header value as a positive whole number of milliseconds: `Some(Some(ms))`; `Some(None)`
/// for a positive integer too large for a u64; `None` for anything else (zero, negative,
/// fractional, not a number). Integer types are taken as they are; strings and byte arrays when
/// they are nothing but ASCII digits (clients that only send strings, as some bridges do).
fn millis(value: &FieldValue) -> Option<Option<u64>> {
    let signed = |n: i64| u64::try_from(n).ok().filter(|n| *n > 0).map(Some);
    match value {
        FieldValue::b(n) => signed(i64::from(*n)),
        FieldValue::B(n) => signed(i64::from(*n)),
        FieldValue::s(n) => signed(i64::from(*n)),
        FieldValue::u(n) => signed(i64::from(*n)),
        FieldValue::I(n) => signed(i64::from(*n)),
        FieldValue::i(n) => signed(i64::from(*n)),
        FieldValue::l(n) => signed(*n),
        FieldValue::S(s) => digits(AsRef::<String>::as_ref(s).as_bytes()),
        FieldValue::x(bytes) => digits(&Vec::<u8>::from(bytes.clone())),
        _ => None,
    }
}

/// `text` as a positive decimal integer: see [`millis`].
fn digits(text: &[u8]) -> Option<Option<u64>> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if text.iter().all(|d| *d == b'0') {
        return None; // zero: not positive
    }
    // All digits, not zero: either it fits or it is too large.
    let text = std::str::from_utf8(text).expect("ASCII digits");
    Some(text.parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use amqprs::FieldTable;

    use super::*;

    const DEFAULT: Duration = Duration::from_secs(3600);
    const MAX: Duration = Duration::from_secs(86_400);

    fn windows() -> Windows {
        Windows::new(Some("x-dedup-ttl"), DEFAULT, MAX)
    }

    fn with(name: &str, value: FieldValue) -> BasicProperties {
        let mut headers = FieldTable::new();
        headers.insert(name.try_into().unwrap(), value);
        BasicProperties::default().with_headers(headers).finish()
    }

    fn decide(value: FieldValue) -> Result<Duration, DeadLetterReason> {
        windows().decide(&with("x-dedup-ttl", value))
    }

    #[test]
    fn without_the_header_the_default_window() {
        assert_eq!(windows().decide(&BasicProperties::default()), Ok(DEFAULT));
        let other = with("x-other", FieldValue::l(5));
        assert_eq!(windows().decide(&other), Ok(DEFAULT));
    }

    #[test]
    fn integer_headers_of_every_width_are_milliseconds() {
        let ms = Duration::from_millis;
        assert_eq!(decide(FieldValue::b(5)), Ok(ms(5)));
        assert_eq!(decide(FieldValue::B(200)), Ok(ms(200)));
        assert_eq!(decide(FieldValue::s(1500)), Ok(ms(1500)));
        assert_eq!(decide(FieldValue::u(60_000)), Ok(ms(60_000)));
        assert_eq!(decide(FieldValue::I(90_000)), Ok(ms(90_000)));
        assert_eq!(decide(FieldValue::i(3_600_000)), Ok(ms(3_600_000)));
        assert_eq!(
            decide(FieldValue::l(86_400_000)),
            Ok(MAX),
            "the cap itself is allowed"
        );
        // Longer than the default is fine under the cap.
        assert_eq!(decide(FieldValue::l(7_200_000)), Ok(ms(7_200_000)));
    }

    #[test]
    fn digit_strings_are_milliseconds_too() {
        assert_eq!(
            decide(FieldValue::from("2500")),
            Ok(Duration::from_millis(2500))
        );
        let bytes = FieldValue::x(b"0042".to_vec().try_into().unwrap());
        assert_eq!(decide(bytes), Ok(Duration::from_millis(42)));
    }

    #[test]
    fn anything_but_a_positive_integer_is_a_bad_ttl() {
        for value in [
            FieldValue::l(0),
            FieldValue::l(-1),
            FieldValue::b(-5),
            FieldValue::from("0"),
            FieldValue::from("000"),
            FieldValue::from(""),
            FieldValue::from("-5"),
            FieldValue::from("+5"),
            FieldValue::from("1.5"),
            FieldValue::from("5s"),
            FieldValue::from(" 5"),
            FieldValue::from("१२"), // digits, but not ASCII ones
            FieldValue::d(1500.0),
            FieldValue::f(1500.0),
            FieldValue::t(true),
            FieldValue::V,
            FieldValue::F(FieldTable::new()),
        ] {
            assert_eq!(
                decide(value.clone()),
                Err(DeadLetterReason::BadTtl),
                "{value:?}"
            );
        }
    }

    #[test]
    fn over_the_cap_is_refused_not_clamped() {
        assert_eq!(
            decide(FieldValue::l(86_400_001)),
            Err(DeadLetterReason::TtlOverMax)
        );
        assert_eq!(
            decide(FieldValue::l(i64::MAX)),
            Err(DeadLetterReason::TtlOverMax)
        );
        // Too large for any integer type: still a positive integer, still over the cap.
        let huge = FieldValue::from("99999999999999999999999999");
        assert_eq!(decide(huge), Err(DeadLetterReason::TtlOverMax));
    }

    #[test]
    fn header_off_ignores_it() {
        let off = Windows::new(None, DEFAULT, MAX);
        let props = with("x-dedup-ttl", FieldValue::from("garbage"));
        assert_eq!(off.decide(&props), Ok(DEFAULT));
    }

    proptest::proptest! {
        /// Every positive i64 is a window when under the cap and refused as over it otherwise;
        /// the others are bad.
        #[test]
        fn any_long_is_judged_by_sign_and_cap(n: i64) {
            let got = decide(FieldValue::l(n));
            let want = if n <= 0 {
                Err(DeadLetterReason::BadTtl)
            } else if n as u64 > MAX.as_millis() as u64 {
                Err(DeadLetterReason::TtlOverMax)
            } else {
                Ok(Duration::from_millis(n as u64))
            };
            proptest::prop_assert_eq!(got, want);
        }

        /// A string reads as the same integer would, and never panics.
        #[test]
        fn any_string_never_panics(s in ".{0,30}") {
            let _ = decide(FieldValue::from(s.as_str()));
        }
    }
}

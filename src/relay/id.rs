//! Which id a message carries, decided from its properties and body alone.

use amqprs::{BasicProperties, FieldName, FieldValue};
use sha2::{Digest, Sha256};

use crate::config::{IdSource, MissingId};

/// What the relay does with a delivery, as far as its id says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdDecision {
    /// Claim this id (its length is the store's to judge).
    Claim(Vec<u8>),
    /// No id: forward it without deduplication.
    ForwardUnchecked,
    /// No id: reject it to the dead-letter queue.
    DeadLetter,
}

/// Extracts ids per the configured source and missing-id policy.
#[derive(Debug, Clone)]
pub(crate) struct IdExtractor {
    source: Source,
    missing: MissingId,
}

#[derive(Debug, Clone)]
enum Source {
    MessageId,
    /// The header name, prebuilt as the AMQP short string the field table is keyed by.
    Header(FieldName),
    BodySha256,
}

impl IdExtractor {
    /// An extractor for `source` and `missing`.
    ///
    /// # Panics
    ///
    /// If a header name is over 255 bytes (config parsing refuses those).
    pub(crate) fn new(source: &IdSource, missing: MissingId) -> IdExtractor {
        let source = match source {
            IdSource::MessageId => Source::MessageId,
            IdSource::Header(name) => Source::Header(
                name.as_str()
                    .try_into()
                    .expect("config limits header names to 255 bytes"),
            ),
            IdSource::BodySha256 => Source::BodySha256,
        };
        IdExtractor { source, missing }
    }

    /// What to do with a message of these properties and body.
    pub(crate) fn decide(&self, props: &BasicProperties, body: &[u8]) -> IdDecision {
        let id = match &self.source {
            Source::MessageId => props.message_id().map(|s| s.as_bytes().to_vec()),
            Source::Header(name) => props
                .headers()
                .and_then(|h| h.get(name))
                .and_then(header_id),
            Source::BodySha256 => Some(body_sha256(body)),
        };
        // An empty id is no id: it cannot tell two messages apart.
        match id.filter(|id| !id.is_empty()) {
            Some(id) => IdDecision::Claim(id),
            None => match self.missing {
                MissingId::DeadLetter => IdDecision::DeadLetter,
                MissingId::Forward => IdDecision::ForwardUnchecked,
                MissingId::BodySha256 => IdDecision::Claim(body_sha256(body)),
            },
        }
    }
}

/// The bytes of a header used as an id: strings and byte arrays as they are, integers in decimal.
/// Other types (booleans, floats, tables...) are no id.
fn header_id(value: &FieldValue) -> Option<Vec<u8>> {
    Some(match value {
        FieldValue::S(s) => AsRef::<String>::as_ref(s).as_bytes().to_vec(),
        FieldValue::x(bytes) => Vec::<u8>::from(bytes.clone()),
        FieldValue::b(n) => n.to_string().into_bytes(),
        FieldValue::B(n) => n.to_string().into_bytes(),
        FieldValue::s(n) => n.to_string().into_bytes(),
        FieldValue::u(n) => n.to_string().into_bytes(),
        FieldValue::I(n) => n.to_string().into_bytes(),
        FieldValue::i(n) => n.to_string().into_bytes(),
        FieldValue::l(n) => n.to_string().into_bytes(),
        _ => return None,
    })
}

/// The SHA-256 of `body`, 32 raw bytes.
pub(crate) fn body_sha256(body: &[u8]) -> Vec<u8> {
    Sha256::digest(body).to_vec()
}

#[cfg(test)]
mod tests {
    use amqprs::FieldTable;

    use super::*;

    fn props_with_header(name: &str, value: FieldValue) -> BasicProperties {
        let mut headers = FieldTable::new();
        headers.insert(name.try_into().unwrap(), value);
        BasicProperties::default().with_headers(headers).finish()
    }

    fn decide(source: IdSource, missing: MissingId, props: &BasicProperties) -> IdDecision {
        IdExtractor::new(&source, missing).decide(props, b"body")
    }

    #[test]
    fn message_id_is_the_default_source() {
        let props = BasicProperties::default().with_message_id("m-1").finish();
        let got = decide(IdSource::MessageId, MissingId::DeadLetter, &props);
        assert_eq!(got, IdDecision::Claim(b"m-1".to_vec()));
    }

    #[test]
    fn missing_id_follows_the_policy() {
        let none = BasicProperties::default();
        let empty = BasicProperties::default().with_message_id("").finish();
        for props in [&none, &empty] {
            assert_eq!(
                decide(IdSource::MessageId, MissingId::DeadLetter, props),
                IdDecision::DeadLetter
            );
            assert_eq!(
                decide(IdSource::MessageId, MissingId::Forward, props),
                IdDecision::ForwardUnchecked
            );
            assert_eq!(
                decide(IdSource::MessageId, MissingId::BodySha256, props),
                IdDecision::Claim(body_sha256(b"body"))
            );
        }
    }

    #[test]
    fn header_ids_of_each_usable_type() {
        let source = IdSource::Header("x-id".into());
        let cases = [
            (FieldValue::from("abc"), b"abc".to_vec()),
            (
                FieldValue::x(vec![0u8, 255].try_into().unwrap()),
                vec![0u8, 255],
            ),
            (FieldValue::l(-42), b"-42".to_vec()),
            (FieldValue::i(7), b"7".to_vec()),
        ];
        for (value, want) in cases {
            let props = props_with_header("x-id", value);
            assert_eq!(
                decide(source.clone(), MissingId::DeadLetter, &props),
                IdDecision::Claim(want)
            );
        }
    }

    #[test]
    fn header_of_unusable_type_or_other_name_is_no_id() {
        let source = IdSource::Header("x-id".into());
        let boolean = props_with_header("x-id", FieldValue::t(true));
        let other = props_with_header("x-other", FieldValue::from("abc"));
        for props in [&boolean, &other] {
            assert_eq!(
                decide(source.clone(), MissingId::DeadLetter, props),
                IdDecision::DeadLetter
            );
        }
    }

    proptest::proptest! {
        /// Any non-empty message_id is the id, byte for byte; an empty one is no id.
        #[test]
        fn message_id_is_taken_byte_for_byte(id in ".{0,100}") {
            let props = BasicProperties::default().with_message_id(&id).finish();
            let got = decide(IdSource::MessageId, MissingId::DeadLetter, &props);
            let want = if id.is_empty() {
                IdDecision::DeadLetter
            } else {
                IdDecision::Claim(id.into_bytes())
            };
            proptest::prop_assert_eq!(got, want);
        }

        /// Integer headers of every width are their decimal text.
        #[test]
        fn integer_headers_are_decimal(n: i64) {
            let source = IdSource::Header("x-id".into());
            let mut cases = vec![(FieldValue::l(n), n.to_string())];
            if let Ok(n) = i32::try_from(n) {
                cases.push((FieldValue::I(n), n.to_string()));
            }
            if let Ok(n) = i16::try_from(n) {
                cases.push((FieldValue::s(n), n.to_string()));
            }
            for (value, want) in cases {
                let props = props_with_header("x-id", value);
                let got = decide(source.clone(), MissingId::DeadLetter, &props);
                proptest::prop_assert_eq!(got, IdDecision::Claim(want.into_bytes()));
            }
        }

        /// Byte-array headers are the id as they are, UTF-8 or not; empty is no id.
        #[test]
        fn byte_array_headers_are_taken_as_they_are(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let source = IdSource::Header("x-id".into());
            let props = props_with_header("x-id", FieldValue::x(bytes.clone().try_into().unwrap()));
            let got = decide(source, MissingId::Forward, &props);
            let want = if bytes.is_empty() {
                IdDecision::ForwardUnchecked
            } else {
                IdDecision::Claim(bytes)
            };
            proptest::prop_assert_eq!(got, want);
        }

        /// Body hashes tell bodies apart and only bodies.
        #[test]
        fn body_sha256_depends_on_the_body_alone(a: Vec<u8>, b: Vec<u8>, id in "[a-z]{1,8}") {
            let ids = IdExtractor::new(&IdSource::BodySha256, MissingId::DeadLetter);
            let with_id = BasicProperties::default().with_message_id(&id).finish();
            let plain = BasicProperties::default();
            proptest::prop_assert_eq!(ids.decide(&with_id, &a), ids.decide(&plain, &a));
            proptest::prop_assert_eq!(ids.decide(&plain, &a) == ids.decide(&plain, &b), a == b);
        }
    }

    #[test]
    fn body_sha256_ignores_properties() {
        let props = BasicProperties::default().with_message_id("m-1").finish();
        let got = decide(IdSource::BodySha256, MissingId::DeadLetter, &props);
        assert_eq!(got, IdDecision::Claim(body_sha256(b"body")));
        assert_eq!(body_sha256(b"body").len(), 32);
    }
}

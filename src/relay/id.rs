//! Which id a message carries, decided from its routing key, properties and body alone.
//!
//! One part and no scope: the id is that part's bytes as they are (what `dedupd check` takes).
//! Several parts, or a scope: the id is the SHA-256 of the scope and the parts, each
//! length-prefixed so that no two different tuples hash the same bytes, written as 64 hex digits
//! so it fits any id limit and an operator can still type it.

use amqprs::{BasicProperties, FieldName, FieldValue};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{IdPart, IdScope, IdSource, MissingId, HASHED_ID_BYTES};

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

/// Extracts ids per the configured source, scope and missing-id policy.
#[derive(Debug, Clone)]
pub(crate) struct IdExtractor {
    parts: Vec<Part>,
    scope: Scope,
    missing: MissingId,
    /// Several parts or a scope: the id is [`hashed_id`] of them.
    hashed: bool,
}

#[derive(Debug, Clone)]
enum Part {
    MessageId,
    /// The header name, prebuilt as the AMQP short string the field table is keyed by.
    Header(FieldName),
    BodySha256,
    /// An RFC 6901 pointer into the body parsed as JSON.
    Json(String),
}

#[derive(Debug, Clone)]
enum Scope {
    None,
    RoutingKey,
    Header(FieldName),
}

/// What a hashed id is the hash of: the parts as configured, or the body alone when the parts
/// are missing and the policy falls back to the body's hash. The kind is hashed too, so the two
/// can never meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Parts = b'p',
    BodyFallback = b'b',
}

/// Domain separation: these digests are ours, version 1 of the encoding.
const HASH_DOMAIN: &[u8] = b"dedupd id v1\0";

fn field_name(name: &str) -> FieldName {
    name.try_into()
        .expect("config limits header names to 255 bytes")
}

impl IdExtractor {
    /// An extractor for `source`, `scope` and `missing`.
    ///
    /// # Panics
    ///
    /// If a header name is over 255 bytes (config parsing refuses those).
    pub(crate) fn new(source: &IdSource, scope: &IdScope, missing: MissingId) -> IdExtractor {
        let parts: Vec<Part> = source
            .parts()
            .iter()
            .map(|part| match part {
                IdPart::MessageId => Part::MessageId,
                IdPart::Header(name) => Part::Header(field_name(name)),
                IdPart::BodySha256 => Part::BodySha256,
                IdPart::Json(pointer) => Part::Json(pointer.clone()),
            })
            .collect();
        let scope = match scope {
            IdScope::None => Scope::None,
            IdScope::RoutingKey => Scope::RoutingKey,
            IdScope::Header(name) => Scope::Header(field_name(name)),
        };
        let hashed = parts.len() > 1 || !matches!(scope, Scope::None);
        IdExtractor {
            parts,
            scope,
            missing,
            hashed,
        }
    }

    /// What to do with a message published with `routing_key`, of these properties and body.
    pub(crate) fn decide(
        &self,
        routing_key: &str,
        props: &BasicProperties,
        body: &[u8],
    ) -> IdDecision {
        let scope = match &self.scope {
            Scope::None => Some(Vec::new()),
            Scope::RoutingKey => Some(routing_key.as_bytes().to_vec()),
            // An empty scope is no scope: like an empty id, it cannot tell messages apart.
            Scope::Header(name) => header(props, name).filter(|s| !s.is_empty()),
        };
        // The body is parsed at most once, and only if a part asks for it.
        let mut json: Option<Option<Value>> = None;
        let mut parts = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            let value = match part {
                Part::MessageId => props.message_id().map(|s| s.as_bytes().to_vec()),
                Part::Header(name) => header(props, name),
                Part::BodySha256 => Some(body_sha256(body)),
                Part::Json(pointer) => json
                    .get_or_insert_with(|| serde_json::from_slice(body).ok())
                    .as_ref()
                    .and_then(|doc| doc.pointer(pointer))
                    .and_then(json_id),
            };
            // An empty part is no part: it cannot tell two messages apart.
            match value.filter(|v| !v.is_empty()) {
                Some(v) => parts.push(v),
                None => return self.missing(scope.as_deref(), body),
            }
        }
        match scope {
            None => self.missing(None, body),
            Some(_) if !self.hashed => IdDecision::Claim(parts.pop().expect("one part")),
            Some(scope) => IdDecision::Claim(hashed_id(Kind::Parts, &scope, &parts)),
        }
    }

    /// The id the relay records for a message of these part values (in the configured order) in
    /// this scope (`None` when `DEDUPD_ID_SCOPE=none`): what `dedupd id` prints, so an operator
    /// can `check` or `forget` a hashed id from its parts.
    ///
    /// # Errors
    ///
    /// Not as many parts as configured, a scope given or missing against the configuration, or
    /// an empty value (which no message's id has).
    pub(crate) fn id_of(&self, scope: Option<&[u8]>, parts: &[&[u8]]) -> Result<Vec<u8>, String> {
        if parts.len() != self.parts.len() {
            return Err(format!(
                "DEDUPD_ID_SOURCE has {} part(s), {} given",
                self.parts.len(),
                parts.len()
            ));
        }
        if parts.iter().any(|p| p.is_empty()) || scope.is_some_and(|s| s.is_empty()) {
            return Err("an empty part or scope is no id".into());
        }
        let scope = match (&self.scope, scope) {
            (Scope::None, None) => Vec::new(),
            (Scope::None, Some(_)) => return Err("DEDUPD_ID_SCOPE is none: no --scope".into()),
            (_, None) => return Err("DEDUPD_ID_SCOPE is set: give the message's --scope".into()),
            (_, Some(scope)) => scope.to_vec(),
        };
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        Ok(if self.hashed {
            hashed_id(Kind::Parts, &scope, &parts)
        } else {
            parts.into_iter().next().expect("one part")
        })
    }

    /// The decision for a message without a usable id (a part missing, or its scope).
    fn missing(&self, scope: Option<&[u8]>, body: &[u8]) -> IdDecision {
        match self.missing {
            MissingId::DeadLetter => IdDecision::DeadLetter,
            MissingId::Forward => IdDecision::ForwardUnchecked,
            MissingId::BodySha256 if !self.hashed => IdDecision::Claim(body_sha256(body)),
            // In the message's scope; a message without one gets the empty scope, which no
            // scoped message has.
            MissingId::BodySha256 => IdDecision::Claim(hashed_id(
                Kind::BodyFallback,
                scope.unwrap_or_default(),
                &[body_sha256(body)],
            )),
        }
    }
}

/// The value of header `name` as id bytes, if present and of a usable type.
fn header(props: &BasicProperties, name: &FieldName) -> Option<Vec<u8>> {
    props
        .headers()
        .and_then(|h| h.get(name))
        .and_then(header_id)
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

/// The bytes of a JSON field used as an id: a string's text, a number's JSON text. Other values
/// (null, booleans, arrays, objects) are no id.
fn json_id(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Number(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

/// The bytes a hashed id is the hash of: the domain, the kind, then the scope and each part,
/// every one of them preceded by its length (8 bytes, little-endian). Since each length says
/// where its element ends, the bytes decode back to one tuple only: two different tuples never
/// give the same bytes (a test decodes them back).
fn encode(kind: Kind, scope: &[u8], parts: &[Vec<u8>]) -> Vec<u8> {
    let len = parts.iter().map(|p| 8 + p.len()).sum::<usize>() + 8 + scope.len();
    let mut out = Vec::with_capacity(HASH_DOMAIN.len() + 1 + len);
    out.extend_from_slice(HASH_DOMAIN);
    out.push(kind as u8);
    for element in std::iter::once(scope).chain(parts.iter().map(Vec::as_slice)) {
        out.extend_from_slice(&(element.len() as u64).to_le_bytes());
        out.extend_from_slice(element);
    }
    out
}

/// The id of a scope and parts: SHA-256 of [`encode`], as lowercase hex.
fn hashed_id(kind: Kind, scope: &[u8], parts: &[Vec<u8>]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(encode(kind, scope, parts));
    let mut id = Vec::with_capacity(HASHED_ID_BYTES);
    for byte in digest {
        id.push(HEX[usize::from(byte >> 4)]);
        id.push(HEX[usize::from(byte & 0xf)]);
    }
    id
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
        IdExtractor::new(&source, &IdScope::None, missing).decide("rk", props, b"body")
    }

    fn single(part: IdPart) -> IdSource {
        IdSource::single(part)
    }

    fn message_id() -> IdSource {
        single(IdPart::MessageId)
    }

    fn header_source(name: &str) -> IdSource {
        single(IdPart::Header(name.into()))
    }

    #[test]
    fn message_id_is_the_default_source() {
        let props = BasicProperties::default().with_message_id("m-1").finish();
        let got = decide(message_id(), MissingId::DeadLetter, &props);
        assert_eq!(got, IdDecision::Claim(b"m-1".to_vec()));
    }

    #[test]
    fn missing_id_follows_the_policy() {
        let none = BasicProperties::default();
        let empty = BasicProperties::default().with_message_id("").finish();
        for props in [&none, &empty] {
            assert_eq!(
                decide(message_id(), MissingId::DeadLetter, props),
                IdDecision::DeadLetter
            );
            assert_eq!(
                decide(message_id(), MissingId::Forward, props),
                IdDecision::ForwardUnchecked
            );
            assert_eq!(
                decide(message_id(), MissingId::BodySha256, props),
                IdDecision::Claim(body_sha256(b"body"))
            );
        }
    }

    #[test]
    fn header_ids_of_each_usable_type() {
        let source = header_source("x-id");
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
        let source = header_source("x-id");
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
            let got = decide(message_id(), MissingId::DeadLetter, &props);
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
            let source = header_source("x-id");
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
            let source = header_source("x-id");
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
            let ids = IdExtractor::new(&single(IdPart::BodySha256), &IdScope::None, MissingId::DeadLetter);
            let with_id = BasicProperties::default().with_message_id(&id).finish();
            let plain = BasicProperties::default();
            proptest::prop_assert_eq!(ids.decide("rk", &with_id, &a), ids.decide("other", &plain, &a));
            proptest::prop_assert_eq!(ids.decide("rk", &plain, &a) == ids.decide("rk", &plain, &b), a == b);
        }
    }

    #[test]
    fn body_sha256_ignores_properties() {
        let props = BasicProperties::default().with_message_id("m-1").finish();
        let got = decide(single(IdPart::BodySha256), MissingId::DeadLetter, &props);
        assert_eq!(got, IdDecision::Claim(body_sha256(b"body")));
        assert_eq!(body_sha256(b"body").len(), 32);
    }

    // Composite ids, JSON fields and scopes.

    fn extractor(source: &str, scope: &str, missing: MissingId) -> IdExtractor {
        let config = crate::config::Config::from_vars([
            ("DEDUPD_ID_SOURCE", source),
            ("DEDUPD_ID_SCOPE", scope),
        ])
        .unwrap();
        IdExtractor::new(&config.relay.id_source, &config.relay.id_scope, missing)
    }

    fn tenant_props(tenant: Option<&str>, id: Option<&str>) -> BasicProperties {
        let mut headers = FieldTable::new();
        if let Some(t) = tenant {
            headers.insert("tenant".try_into().unwrap(), FieldValue::from(t));
        }
        let mut props = BasicProperties::default();
        props.with_headers(headers);
        if let Some(id) = id {
            props.with_message_id(id);
        }
        props
    }

    /// The claimed id, or a panic naming what was decided instead.
    fn claimed(decision: IdDecision) -> Vec<u8> {
        match decision {
            IdDecision::Claim(id) => id,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    /// Decodes [`encode`]'s bytes back into (kind, scope, parts); `None` if they are not such
    /// bytes. Its existence is the proof that the encoding is injective.
    fn decode(bytes: &[u8]) -> Option<(u8, Vec<u8>, Vec<Vec<u8>>)> {
        let rest = bytes.strip_prefix(HASH_DOMAIN)?;
        let (&kind, mut rest) = rest.split_first()?;
        let mut elements = Vec::new();
        while !rest.is_empty() {
            let (len, tail) = rest.split_at_checked(8)?;
            let len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
            let (element, tail) = tail.split_at_checked(len)?;
            elements.push(element.to_vec());
            rest = tail;
        }
        let mut elements = elements.into_iter();
        let scope = elements.next()?;
        Some((kind, scope, elements.collect()))
    }

    #[test]
    fn parts_that_only_concatenate_alike_are_different_ids() {
        // ("ab", "c") and ("a", "bc") concatenate to the same bytes; prefixed, they differ.
        let x = |a: &str, b: &str| vec![a.as_bytes().to_vec(), b.as_bytes().to_vec()];
        assert_ne!(
            encode(Kind::Parts, b"", &x("ab", "c")),
            encode(Kind::Parts, b"", &x("a", "bc"))
        );
        assert_ne!(
            hashed_id(Kind::Parts, b"", &x("ab", "c")),
            hashed_id(Kind::Parts, b"", &x("a", "bc"))
        );
        // A scope is not a part, and a body fallback is not an id of parts.
        assert_ne!(
            encode(Kind::Parts, b"t", &x("a", "b")),
            encode(
                Kind::Parts,
                b"",
                &[b"t".to_vec(), b"a".to_vec(), b"b".to_vec()]
            )
        );
        assert_ne!(
            encode(Kind::Parts, b"s", &[b"h".to_vec()]),
            encode(Kind::BodyFallback, b"s", &[b"h".to_vec()])
        );
        let id = hashed_id(Kind::Parts, b"", &x("a", "b"));
        assert_eq!(id.len(), HASHED_ID_BYTES);
        assert!(id
            .iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    proptest::proptest! {
        /// The encoding decodes back to the tuple it came from, so two different tuples never
        /// meet before hashing.
        #[test]
        fn encoding_decodes_back_to_its_tuple(
            fallback: bool,
            scope in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
            parts in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..20), 0..5),
        ) {
            let kind = if fallback { Kind::BodyFallback } else { Kind::Parts };
            let got = decode(&encode(kind, &scope, &parts));
            proptest::prop_assert_eq!(got, Some((kind as u8, scope, parts)));
        }

        /// Equal encodings only for equal tuples, however the bytes are split between parts.
        #[test]
        fn different_tuples_encode_differently(
            a in proptest::collection::vec("[ab]{0,3}", 1..4),
            b in proptest::collection::vec("[ab]{0,3}", 1..4),
            sa in "[ab]{0,2}",
            sb in "[ab]{0,2}",
        ) {
            let bytes = |v: &[String]| v.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
            let ea = encode(Kind::Parts, sa.as_bytes(), &bytes(&a));
            let eb = encode(Kind::Parts, sb.as_bytes(), &bytes(&b));
            proptest::prop_assert_eq!(ea == eb, (a, sa) == (b, sb));
        }
    }

    #[test]
    fn composite_id_changes_with_every_part() {
        let ids = extractor("header:tenant+message_id", "none", MissingId::DeadLetter);
        let id = |t, m| claimed(ids.decide("rk", &tenant_props(Some(t), Some(m)), b"{}"));
        let a = id("t1", "order-1");
        assert_eq!(a.len(), HASHED_ID_BYTES);
        assert_eq!(a, id("t1", "order-1"), "same parts, same id");
        assert_ne!(a, id("t2", "order-1"), "another tenant");
        assert_ne!(a, id("t1", "order-2"), "another message id");
        // The same concatenation split differently is another id.
        assert_ne!(id("t1o", "rder-1"), a);
        // Part order is the configuration's: reversed, another id.
        let reversed = extractor("message_id+header:tenant", "none", MissingId::DeadLetter);
        let b = claimed(reversed.decide("rk", &tenant_props(Some("t1"), Some("order-1")), b"{}"));
        assert_ne!(a, b);
    }

    /// With id source `source` and scope `scope`, `props` has no usable id: the policy decides,
    /// dead-lettered by one and forwarded unchecked by the other.
    fn assert_no_usable_id(source: &str, scope: &str, props: &BasicProperties) {
        let dead = extractor(source, scope, MissingId::DeadLetter);
        assert_eq!(dead.decide("rk", props, b"x"), IdDecision::DeadLetter);
        let forward = extractor(source, scope, MissingId::Forward);
        assert_eq!(
            forward.decide("rk", props, b"x"),
            IdDecision::ForwardUnchecked
        );
    }

    #[test]
    fn composite_id_missing_a_part_follows_the_policy() {
        let missing = [
            tenant_props(None, Some("order-1")),
            tenant_props(Some("t1"), None),
            tenant_props(Some(""), Some("order-1")),
        ];
        for props in &missing {
            assert_no_usable_id("header:tenant+message_id", "none", props);
            let body = extractor("header:tenant+message_id", "none", MissingId::BodySha256);
            let id = claimed(body.decide("rk", props, b"x"));
            assert_eq!(id.len(), HASHED_ID_BYTES, "hashed, within any limit");
            assert_eq!(
                id,
                claimed(body.decide("rk", props, b"x")),
                "the body decides"
            );
            assert_ne!(id, claimed(body.decide("rk", props, b"y")));
        }
    }

    #[test]
    fn json_field_is_the_id() {
        let ids = extractor("json:/order/id", "none", MissingId::DeadLetter);
        let props = BasicProperties::default();
        let decide = |body: &str| ids.decide("rk", &props, body.as_bytes());
        assert_eq!(
            decide(r#"{"order":{"id":"o-7"}}"#),
            IdDecision::Claim(b"o-7".to_vec())
        );
        assert_eq!(
            decide(r#"{"order":{"id":42,"x":1}}"#),
            IdDecision::Claim(b"42".to_vec())
        );
        assert_eq!(
            decide(r#"{"order":{"id":-1.5}}"#),
            IdDecision::Claim(b"-1.5".to_vec())
        );
        // Not JSON, no such field, a value that is no id: the missing-id policy.
        for body in [
            "not json",
            r#"{"order":{"id":""}}"#,
            r#"{"order":{}}"#,
            r#"{"order":{"id":null}}"#,
            r#"{"order":{"id":true}}"#,
            r#"{"order":{"id":{"a":1}}}"#,
            r#"["order"]"#,
            "",
        ] {
            assert_eq!(decide(body), IdDecision::DeadLetter, "{body}");
        }
        // RFC 6901 escapes: ~1 is a /, ~0 a ~; array indices by number.
        let ids = extractor("json:/a~1b/~0c/1", "none", MissingId::DeadLetter);
        let body = br#"{"a/b":{"~c":["zero","one"]}}"#;
        assert_eq!(
            ids.decide("rk", &props, body),
            IdDecision::Claim(b"one".to_vec())
        );
    }

    #[test]
    fn json_and_header_parts_combine() {
        let ids = extractor("header:tenant+json:/id", "none", MissingId::Forward);
        let props = tenant_props(Some("t1"), None);
        let a = claimed(ids.decide("rk", &props, br#"{"id":"1"}"#));
        assert_ne!(a, claimed(ids.decide("rk", &props, br#"{"id":"2"}"#)));
        // The number 1 and the string "1" are the same text: the same id (documented).
        assert_eq!(a, claimed(ids.decide("rk", &props, br#"{"id":1}"#)));
        assert_eq!(
            ids.decide("rk", &props, b"{}"),
            IdDecision::ForwardUnchecked
        );
    }

    #[test]
    fn scope_makes_the_same_id_two_ids() {
        let props = tenant_props(Some("t1"), Some("order-1"));
        let by_key = extractor("message_id", "routing_key", MissingId::DeadLetter);
        let eu = claimed(by_key.decide("eu", &props, b""));
        assert_eq!(eu.len(), HASHED_ID_BYTES);
        assert_eq!(eu, claimed(by_key.decide("eu", &props, b"other body")));
        assert_ne!(eu, claimed(by_key.decide("us", &props, b"")));
        // An empty routing key is a scope like any other.
        assert_ne!(eu, claimed(by_key.decide("", &props, b"")));

        let by_header = extractor("message_id", "header:tenant", MissingId::DeadLetter);
        let t1 = claimed(by_header.decide("rk", &props, b""));
        let t2 = tenant_props(Some("t2"), Some("order-1"));
        assert_ne!(t1, claimed(by_header.decide("rk", &t2, b"")));
        assert_eq!(
            t1,
            claimed(by_header.decide("other-rk", &props, b"")),
            "routing key ignored"
        );
        // Scope "eu" with id "order-1" is not scope "" with a part "eu": kinds of element differ.
        assert_ne!(t1, eu);
    }

    #[test]
    fn message_without_its_scope_has_no_usable_id() {
        let no_scope = tenant_props(None, Some("order-1"));
        let empty_scope = tenant_props(Some(""), Some("order-1"));
        for props in [&no_scope, &empty_scope] {
            assert_no_usable_id("message_id", "header:tenant", props);
        }
        // The body fallback without a scope: the same body is the same id, and not the id of a
        // scoped message with that body.
        let body = extractor("message_id", "header:tenant", MissingId::BodySha256);
        let unscoped = claimed(body.decide("rk", &no_scope, b"x"));
        assert_eq!(unscoped, claimed(body.decide("rk", &empty_scope, b"x")));
        let scoped_no_id = tenant_props(Some("t1"), None);
        assert_ne!(unscoped, claimed(body.decide("rk", &scoped_no_id, b"x")));
    }

    #[test]
    fn id_of_parts_is_the_id_of_a_message_with_them() {
        let ids = extractor(
            "header:tenant+message_id",
            "routing_key",
            MissingId::DeadLetter,
        );
        let props = tenant_props(Some("t1"), Some("order-1"));
        let from_message = claimed(ids.decide("eu", &props, b""));
        let scope: &[u8] = b"eu";
        assert_eq!(
            ids.id_of(Some(scope), &[b"t1", b"order-1"]),
            Ok(from_message)
        );
        assert!(
            ids.id_of(None, &[b"t1", b"order-1"]).is_err(),
            "scope missing"
        );
        assert!(ids.id_of(Some(scope), &[b"t1"]).is_err(), "a part missing");
        assert!(
            ids.id_of(Some(scope), &[b"t1", b""]).is_err(),
            "an empty part"
        );
        let plain = extractor("message_id", "none", MissingId::DeadLetter);
        assert_eq!(plain.id_of(None, &[b"order-1"]), Ok(b"order-1".to_vec()));
        assert!(
            plain.id_of(Some(scope), &[b"order-1"]).is_err(),
            "no scope here"
        );
    }

    #[test]
    fn one_part_without_scope_stays_the_raw_id() {
        // Data dirs written before composite ids existed keep matching.
        let ids = extractor("message_id", "none", MissingId::DeadLetter);
        let props = tenant_props(Some("t1"), Some("order-1"));
        assert_eq!(
            ids.decide("rk", &props, b""),
            IdDecision::Claim(b"order-1".to_vec())
        );
    }
}

//! Parsing the variables: defaults, types, refusals with one-line errors, the README table.

use super::*;

fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_vars(vars.iter().copied())
}

/// The error for one bad variable; its one-line message names variable, value and form.
fn refused(name: &str, value: &str) -> String {
    let err = parse(&[(name, value)]).expect_err("should be refused");
    let line = err.to_string();
    assert!(!line.contains('\n'), "one line: {line}");
    assert!(line.contains(name), "names the variable: {line}");
    assert!(line.contains("expected"), "says the expected form: {line}");
    line
}

#[test]
fn defaults_run_against_the_local_broker() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.amqp.url.host, "127.0.0.1");
    assert_eq!(c.amqp.url.port, 5672);
    assert_eq!(c.amqp.url.user, "guest");
    assert_eq!(c.amqp.url.password(), "guest");
    assert_eq!(c.amqp.url.vhost, "/");
    assert_eq!(c.relay.source_queue, "dedupd.in");
    assert_eq!(c.relay.dest_exchange, "dedupd.out");
    assert_eq!(c.relay.dest_exchange_type, "fanout");
    assert_eq!(c.relay.dest_routing_key, None);
    assert!(c.relay.declare);
    assert_eq!(c.store.data_dir, PathBuf::from("./data"));
    assert_eq!(c.store.ttl, Duration::from_secs(86400));
    assert_eq!(c.relay.id_source, IdSource::single(IdPart::MessageId));
    assert_eq!(c.relay.id_scope, IdScope::None);
    assert!(!c.relay.ids_hashed());
    assert_eq!(c.relay.missing_id, MissingId::DeadLetter);
    assert_eq!(c.store.max_id_bytes.get(), 256);
    assert_eq!(c.relay.prefetch.get(), 1000);
    assert_eq!(c.relay.queue_type, QueueType::Classic);
    assert_eq!(c.relay.duplicates_exchange, None);
    assert_eq!(c.relay.confirm_timeout, Duration::from_secs(30));
    assert_eq!(c.relay.shutdown_grace, Duration::from_secs(10));
    assert_eq!(c.http.addr, Some("127.0.0.1:9476".parse().unwrap()));
    assert_eq!(c.log.filter, "info");
    assert_eq!(c.store.expected_ids.get(), 1_000_000);
    assert_eq!(c.store.bloom_fp_rate, 0.01);
    assert_eq!(c.store.cache_bytes, 8 << 20);
    assert_eq!(c.store.durability, Durability::Process);
    assert_eq!(c.relay.dead_letter_exchange(), "dedupd.in.dlx");
    assert_eq!(c.relay.dead_letter_queue(), "dedupd.in.dead");
}

#[test]
fn quorum_takes_a_delivery_limit_of_20_unless_told() {
    let c = parse(&[("DEDUPD_QUEUE_TYPE", "quorum")]).unwrap();
    assert_eq!(c.relay.queue_type.name(), "quorum");
    assert_eq!(
        c.relay.queue_type.delivery_limit().map(|n| n.get()),
        Some(20)
    );
    let c = parse(&[
        ("DEDUPD_QUEUE_TYPE", "quorum"),
        ("DEDUPD_DELIVERY_LIMIT", "2"),
    ])
    .unwrap();
    assert_eq!(
        c.relay.queue_type.delivery_limit().map(|n| n.get()),
        Some(2)
    );
    refused("DEDUPD_QUEUE_TYPE", "stream");
    // HA makes quorum the default; classic stays possible.
    let c = parse(&[("DEDUPD_HA", "on")]).unwrap();
    assert!(c.relay.ha);
    assert_eq!(c.relay.queue_type.name(), "quorum");
    assert_eq!(c.relay.ids_stream(), "dedupd.in.ids");
    let c = parse(&[("DEDUPD_HA", "on"), ("DEDUPD_QUEUE_TYPE", "classic")]).unwrap();
    assert_eq!(c.relay.queue_type, QueueType::Classic);
    refused("DEDUPD_HA", "yes");
    // A limit the broker would not apply is refused rather than ignored.
    let line = refused("DEDUPD_DELIVERY_LIMIT", "5");
    assert!(line.contains("DEDUPD_QUEUE_TYPE=quorum"), "{line}");
    let err = parse(&[
        ("DEDUPD_QUEUE_TYPE", "quorum"),
        ("DEDUPD_DELIVERY_LIMIT", "0"),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("DEDUPD_DELIVERY_LIMIT"), "{err}");
}

#[test]
fn every_default_in_the_table_parses_to_the_default_config() {
    // Setting each variable to its documented default changes nothing.
    let explicit: Vec<(&str, String)> = variables()
        .into_iter()
        .filter_map(|v| match v.default {
            DefaultValue::Value(d) => Some((v.name, d)),
            DefaultValue::Unset(_) => None,
        })
        .collect();
    let a = Config::from_vars(explicit).unwrap();
    let b = parse(&[]).unwrap();
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[test]
fn values_are_parsed_into_types() {
    let c = parse(&[
        (
            "DEDUPD_AMQP_URL",
            "amqp://u%40x:p%3Ass@rabbit:5673/prod?heartbeat=10",
        ),
        ("DEDUPD_DEST_ROUTING_KEY", ""),
        ("DEDUPD_DECLARE", "false"),
        ("DEDUPD_TTL", "7d"),
        ("DEDUPD_ID_SOURCE", "header:x-id"),
        ("DEDUPD_MISSING_ID", "body-sha256"),
        ("DEDUPD_DUPLICATES_EXCHANGE", "audit"),
        ("DEDUPD_METRICS_ADDR", "off"),
        ("DEDUPD_CACHE_SIZE", "1G"),
        ("DEDUPD_DURABILITY", "power"),
        ("DEDUPD_SHUTDOWN_GRACE", "0s"),
        ("PATH", "/bin"),
    ])
    .unwrap();
    assert_eq!(c.amqp.url.user, "u@x");
    assert_eq!(c.amqp.url.password(), "p:ss");
    assert_eq!(c.amqp.url.host, "rabbit");
    assert_eq!(c.amqp.url.port, 5673);
    assert_eq!(c.amqp.url.vhost, "prod");
    assert_eq!(c.amqp.url.heartbeat, Some(10));
    assert_eq!(c.relay.dest_routing_key.as_deref(), Some(""));
    assert!(!c.relay.declare);
    assert_eq!(c.store.ttl, Duration::from_secs(7 * 86400));
    assert_eq!(
        c.relay.id_source,
        IdSource::single(IdPart::Header("x-id".into()))
    );
    assert_eq!(c.relay.missing_id, MissingId::BodySha256);
    assert_eq!(c.relay.duplicates_exchange.as_deref(), Some("audit"));
    assert_eq!(c.http.addr, None);
    assert_eq!(c.store.cache_bytes, 1 << 30);
    assert_eq!(c.store.durability, Durability::Power);
    assert_eq!(c.store_config().durability, Durability::Power);
    assert_eq!(c.relay.shutdown_grace, Duration::ZERO);
}

#[test]
fn redis_endpoint_settings_parse() {
    let c = parse(&[]).unwrap();
    assert!(c.relay.enabled);
    assert_eq!(c.redis.addr, None);
    assert_eq!(c.redis.password, None);
    assert_eq!(c.redis.max_clients.get(), 10_000);
    assert_eq!(c.redis.max_value, 1 << 20);
    assert_eq!(c.redis.script_timeout, Duration::from_secs(5));
    let c = parse(&[
        ("DEDUPD_RELAY", "off"),
        ("DEDUPD_REDIS_ADDR", "0.0.0.0:6380"),
        ("DEDUPD_REDIS_PASSWORD", "s3cret"),
        ("DEDUPD_REDIS_MAX_VALUE", "4K"),
    ])
    .unwrap();
    assert!(!c.relay.enabled);
    assert_eq!(c.redis.addr, Some("0.0.0.0:6380".parse().unwrap()));
    assert_eq!(c.redis.password.as_deref(), Some("s3cret"));
    // Debug output (a stray `{:?}` in a log line) never shows a secret.
    assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
    assert_eq!(c.redis.max_value, 4096);
    let shown = format!("{:?}", c.effective());
    assert!(!shown.contains("s3cret"), "{shown}");
    refused("DEDUPD_RELAY", "maybe");
    refused("DEDUPD_REDIS_ADDR", "localhost");
    refused("DEDUPD_REDIS_MAX_CLIENTS", "0");
    refused("DEDUPD_REDIS_SCRIPT_TIMEOUT", "0s");
}

#[test]
fn non_loopback_redis_endpoint_needs_a_password() {
    let line = refused("DEDUPD_REDIS_ADDR", "0.0.0.0:6380");
    assert!(line.contains("DEDUPD_REDIS_PASSWORD"), "{line}");
    assert!(parse(&[("DEDUPD_REDIS_ADDR", "127.0.0.1:6380")]).is_ok());
    assert!(parse(&[("DEDUPD_REDIS_ADDR", "[::1]:6380")]).is_ok());
}

#[test]
fn bad_duration_is_refused() {
    let line = refused("DEDUPD_TTL", "banana");
    assert!(line.contains("banana") && line.contains("90s"), "{line}");
}

#[test]
fn zero_ttl_is_refused() {
    refused("DEDUPD_TTL", "0s");
}

#[test]
fn ttl_header_and_its_cap_parse() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.store.ttl_header.as_deref(), Some("x-dedup-ttl"));
    assert_eq!(
        c.store.max_ttl, c.store.ttl,
        "without a cap a header may only shorten the window"
    );
    let c = parse(&[
        ("DEDUPD_TTL", "1h"),
        ("DEDUPD_TTL_HEADER", "x-cache-ttl"),
        ("DEDUPD_MAX_TTL", "7d"),
    ])
    .unwrap();
    assert_eq!(c.store.ttl_header.as_deref(), Some("x-cache-ttl"));
    assert_eq!(c.store.max_ttl, Duration::from_secs(7 * 86400));
    let shown: BTreeMap<_, _> = c.effective().iter().cloned().collect();
    assert_eq!(shown["DEDUPD_MAX_TTL"], "7d");
    let c = parse(&[("DEDUPD_TTL_HEADER", "off")]).unwrap();
    assert_eq!(c.store.ttl_header, None);
    assert_eq!(
        c.effective()
            .iter()
            .find(|(k, _)| *k == "DEDUPD_TTL_HEADER")
            .unwrap()
            .1,
        "off"
    );
    refused("DEDUPD_TTL_HEADER", "");
    refused("DEDUPD_TTL_HEADER", &"h".repeat(256));
    refused("DEDUPD_MAX_TTL", "0s");
    // A cap under the default window would make the default itself over the cap.
    let line = refused("DEDUPD_MAX_TTL", "1h");
    assert!(line.contains("DEDUPD_TTL"), "{line}");
}

#[test]
fn bad_numbers_are_refused() {
    refused("DEDUPD_PREFETCH", "0");
    refused("DEDUPD_PREFETCH", "70000");
    refused("DEDUPD_MAX_ID_BYTES", "0");
    refused("DEDUPD_MAX_ID_BYTES", "65536");
    refused("DEDUPD_EXPECTED_IDS", "lots");
    refused("DEDUPD_BLOOM_FP_RATE", "1.5");
    refused("DEDUPD_CACHE_SIZE", "64Q");
}

#[test]
fn bad_enums_are_refused() {
    refused("DEDUPD_ID_SOURCE", "header:");
    refused("DEDUPD_ID_SOURCE", "uuid");
    refused("DEDUPD_MISSING_ID", "drop");
    refused("DEDUPD_DEST_EXCHANGE_TYPE", "fan");
    refused("DEDUPD_DURABILITY", "fsync");
    refused("DEDUPD_DECLARE", "maybe");
    refused("DEDUPD_METRICS_ADDR", "localhost");
    refused("DEDUPD_LOG", "dedupd=loud");
}

#[test]
fn composite_sources_and_scopes_parse() {
    let c = parse(&[
        (
            "DEDUPD_ID_SOURCE",
            "header:tenant+message_id+json:/order/id",
        ),
        ("DEDUPD_ID_SCOPE", "routing_key"),
    ])
    .unwrap();
    assert_eq!(
        c.relay.id_source.parts(),
        [
            IdPart::Header("tenant".into()),
            IdPart::MessageId,
            IdPart::Json("/order/id".into())
        ]
    );
    assert_eq!(c.relay.id_scope, IdScope::RoutingKey);
    assert!(c.relay.ids_hashed());
    let shown: BTreeMap<_, _> = c.effective().iter().cloned().collect();
    assert_eq!(
        shown["DEDUPD_ID_SOURCE"],
        "header:tenant+message_id+json:/order/id"
    );
    assert_eq!(shown["DEDUPD_ID_SCOPE"], "routing_key");

    let c = parse(&[("DEDUPD_ID_SOURCE", "json:/a~1b/~0c/0")]).unwrap();
    assert_eq!(
        c.relay.id_source.parts(),
        [IdPart::Json("/a~1b/~0c/0".into())]
    );
    assert!(!c.relay.ids_hashed(), "one part, no scope: the id as it is");
    let c = parse(&[("DEDUPD_ID_SCOPE", "header:x-tenant")]).unwrap();
    assert_eq!(c.relay.id_scope, IdScope::Header("x-tenant".into()));
    assert!(c.relay.ids_hashed(), "a scope makes a hashed id");
}

#[test]
fn bad_composite_sources_and_scopes_are_refused() {
    refused("DEDUPD_ID_SOURCE", "message_id+");
    refused("DEDUPD_ID_SOURCE", "+message_id");
    refused("DEDUPD_ID_SOURCE", "message_id+message_id");
    refused("DEDUPD_ID_SOURCE", "header:a+uuid");
    refused("DEDUPD_ID_SOURCE", "json:order/id");
    refused("DEDUPD_ID_SOURCE", "json:");
    refused("DEDUPD_ID_SOURCE", "json:/a~2");
    refused("DEDUPD_ID_SOURCE", "json:/a~");
    refused("DEDUPD_ID_SCOPE", "queue");
    refused("DEDUPD_ID_SCOPE", "header:");
    // Hashed ids are 64 bytes: a lower limit would refuse every one of them.
    let err = parse(&[
        ("DEDUPD_ID_SOURCE", "header:t+message_id"),
        ("DEDUPD_MAX_ID_BYTES", "32"),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("DEDUPD_MAX_ID_BYTES"), "{err}");
    assert!(parse(&[("DEDUPD_MAX_ID_BYTES", "32")]).is_ok());
}

#[test]
fn names_must_fit_amqp_short_strings() {
    refused("DEDUPD_SOURCE_QUEUE", "");
    refused("DEDUPD_SOURCE_QUEUE", &"q".repeat(251));
    refused("DEDUPD_DEST_EXCHANGE", &"x".repeat(256));
}

#[test]
fn unknown_variable_is_refused() {
    let err = parse(&[("DEDUPD_TLL", "24h")]).unwrap_err();
    assert!(matches!(err, ConfigError::Unknown { .. }));
    assert!(err.to_string().contains("DEDUPD_TLL"));
}

#[test]
fn bad_url_error_masks_the_password() {
    let line = refused("DEDUPD_AMQP_URL", "http://me:s3cret@host/");
    assert!(!line.contains("s3cret"), "{line}");
    assert!(line.contains("me:***@host"), "{line}");
}

#[test]
fn url_display_masks_the_password() {
    let url = AmqpUrl::parse("amqp://me:s3cret@[::1]:5672/%2f").unwrap();
    assert_eq!(url.host, "::1");
    assert_eq!(url.to_string(), "amqp://me:***@[::1]:5672/%2f");
    assert!(!format!("{url:?}").contains("s3cret"));
}

#[test]
fn several_urls_are_the_nodes_of_one_cluster_in_order() {
    let c = parse(&[(
        "DEDUPD_AMQP_URL",
        "amqp://u:p,w@n1:5672/%2f, amqp://u:p@n2:5673/%2f,amqp://n3",
    )])
    .unwrap();
    assert_eq!(c.amqp.url.host, "n1");
    // A comma inside a password does not split.
    assert_eq!(c.amqp.url.password(), "p,w");
    let others: Vec<(&str, u16)> = c
        .amqp
        .others
        .iter()
        .map(|u| (u.host.as_str(), u.port))
        .collect();
    assert_eq!(others, [("n2", 5673), ("n3", 5672)]);
    assert_eq!(c.amqp.urls().count(), 3);
    assert!(parse(&[]).unwrap().amqp.others.is_empty());
}

#[test]
fn a_bad_url_in_a_list_is_refused_masking_every_password() {
    let line = refused("DEDUPD_AMQP_URL", "amqp://a:s3cret@n1/,amqp://b:t0p@/");
    assert!(!line.contains("s3cret") && !line.contains("t0p"), "{line}");
    let line = refused("DEDUPD_AMQP_URL", "amqp://n1/,amqps://n2/");
    assert!(line.contains("all amqp:// or all amqps://"), "{line}");
}

#[test]
fn url_query_without_value_is_refused_not_a_panic() {
    refused("DEDUPD_AMQP_URL", "amqp://h/?heartbeat");
}

#[test]
fn amqps_url_means_tls_on_port_5671() {
    let url = AmqpUrl::parse("amqps://me:s3cret@broker.example/prod").unwrap();
    assert!(url.tls);
    assert_eq!((url.host.as_str(), url.port), ("broker.example", 5671));
    assert_eq!(url.to_string(), "amqps://me:***@broker.example:5671/prod");
    let plain = AmqpUrl::parse("amqp://h").unwrap();
    assert!(!plain.tls);
    assert_eq!(plain.port, 5672);
    assert_eq!(AmqpUrl::parse("amqps://h:5999").unwrap().port, 5999);
}

/// A tempdir with a CA file, a certificate file and a key file (PEM-shaped, enough for the
/// config's checks; the TLS tests use real ones).
fn pem_files() -> (tempfile::TempDir, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let cert = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
    let key = "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n";
    let path = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let ca = path("ca.pem", cert);
    let crt = path("c.pem", cert);
    let k = path("k.pem", key);
    (dir, ca, crt, k)
}

#[test]
fn tls_files_are_taken_with_an_amqps_url() {
    let (_dir, ca, cert, key) = pem_files();
    let c = parse(&[
        ("DEDUPD_AMQP_URL", "amqps://u:p@localhost/"),
        ("DEDUPD_AMQP_CA_FILE", &ca),
        ("DEDUPD_AMQP_CERT_FILE", &cert),
        ("DEDUPD_AMQP_KEY_FILE", &key),
    ])
    .unwrap();
    assert_eq!(c.amqp.tls.ca_file, Some(PathBuf::from(&ca)));
    assert_eq!(c.amqp.tls.client, Some((cert.into(), key.into())));
    // Without any: the system's store, no client certificate.
    let c = parse(&[("DEDUPD_AMQP_URL", "amqps://u:p@localhost/")]).unwrap();
    assert_eq!(c.amqp.tls, TlsFiles::default());
}

#[test]
fn tls_files_with_a_plain_url_are_refused() {
    // Asking for TLS and getting plaintext without a word is what this refuses.
    let (_dir, ca, _, _) = pem_files();
    let line = refused("DEDUPD_AMQP_CA_FILE", &ca);
    assert!(line.contains("amqps://"), "{line}");
}

#[test]
fn client_cert_without_key_is_refused() {
    let (_dir, _, cert, key) = pem_files();
    let url = ("DEDUPD_AMQP_URL", "amqps://localhost");
    let err = parse(&[url, ("DEDUPD_AMQP_CERT_FILE", &cert)]).unwrap_err();
    assert!(err.to_string().contains("DEDUPD_AMQP_KEY_FILE"), "{err}");
    let err = parse(&[url, ("DEDUPD_AMQP_KEY_FILE", &key)]).unwrap_err();
    assert!(err.to_string().contains("DEDUPD_AMQP_CERT_FILE"), "{err}");
}

#[test]
fn tls_file_missing_or_of_the_wrong_kind_is_refused() {
    let (_dir, _, cert, key) = pem_files();
    let url = ("DEDUPD_AMQP_URL", "amqps://localhost");
    let err = parse(&[url, ("DEDUPD_AMQP_CA_FILE", "/nonexistent/ca.pem")]).unwrap_err();
    assert!(err.to_string().contains("readable"), "{err}");
    // The key where the certificate should be, and the other way round.
    let err = parse(&[
        url,
        ("DEDUPD_AMQP_CERT_FILE", &key),
        ("DEDUPD_AMQP_KEY_FILE", &cert),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("DEDUPD_AMQP_CERT_FILE"), "{err}");
}

#[test]
fn url_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("url");
    std::fs::write(&path, "amqp://a:b@h:1/v\n").unwrap();
    let c = parse(&[("DEDUPD_AMQP_URL_FILE", path.to_str().unwrap())]).unwrap();
    assert_eq!((c.amqp.url.host.as_str(), c.amqp.url.port), ("h", 1));
    assert_eq!(c.amqp.url.password(), "b");
}

#[test]
fn url_file_missing_is_refused() {
    refused("DEDUPD_AMQP_URL_FILE", "/nonexistent/dedupd-url");
}

#[test]
fn url_and_url_file_conflict() {
    let err = parse(&[
        ("DEDUPD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ("DEDUPD_AMQP_URL_FILE", "/x"),
    ])
    .unwrap_err();
    assert!(matches!(err, ConfigError::Conflict { .. }), "{err}");
}

#[test]
fn sizes_parse_with_binary_suffixes() {
    assert_eq!(size("512K"), Ok(512 << 10));
    assert_eq!(size("64MiB"), Ok(64 << 20));
    assert_eq!(size("4096"), Ok(4096));
    assert!(size("").is_err());
    assert!(size("0").is_err());
    assert!(size("M").is_err());
}

#[test]
fn table_lists_every_variable_once() {
    let table = markdown_table();
    let vars = variables();
    for v in &vars {
        let row = format!("| `{}` |", v.name);
        let rows = table.lines().filter(|l| l.starts_with(&row)).count();
        assert_eq!(rows, 1, "{}", v.name);
    }
    assert!(!vars.iter().any(|v| v.doc.contains('|')));
}

#[test]
fn readme_configuration_table_is_the_one_in_code() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    assert!(
        readme.contains(&markdown_table()),
        "README.md's configuration table differs from the variables the config sections declare; paste this:\n{}",
        markdown_table()
    );
}

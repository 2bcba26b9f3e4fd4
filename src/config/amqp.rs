//! The broker connection's settings: `DEDUPD_AMQP_*`, used by the relay and by the shard
//! commands alike.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use super::vars::{invalid, DefaultValue, Vars};
use super::ConfigError;

/// The broker when `DEDUPD_AMQP_URL` is unset: the local one, default vhost.
const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `DEDUPD_AMQP_URL` (or the file of `DEDUPD_AMQP_URL_FILE`): the broker; with several
    /// URLs (comma-separated), the first.
    pub url: AmqpUrl,
    /// The URLs after the first: other nodes of the same cluster, tried in turn when the one in
    /// use does not answer, so that a node going away does not take dedupd with it.
    pub others: Vec<AmqpUrl>,
    /// `DEDUPD_AMQP_CA_FILE`, `DEDUPD_AMQP_CERT_FILE`, `DEDUPD_AMQP_KEY_FILE`: the TLS files of an
    /// `amqps://` broker URL.
    pub tls: TlsFiles,
}

impl AmqpConfig {
    /// Reads the `DEDUPD_AMQP_*` variables.
    pub(crate) fn read(vars: &mut Vars) -> Result<AmqpConfig, ConfigError> {
        let text = vars.secret(
            "DEDUPD_AMQP_URL",
            "DEDUPD_AMQP_URL_FILE",
            DefaultValue::Value(DEFAULT_URL.into()),
            "broker URL (`amqp://user:password@host:port/vhost`, `amqps://` for TLS), or several nodes of one cluster comma-separated; never logged with its password",
            "the broker URL",
        )?;
        let urls = match (text, vars.get("DEDUPD_AMQP_URL_FILE")) {
            (Some(text), Some(file)) => AmqpUrl::parse_list(&text).map_err(|expected| {
                invalid(
                    "DEDUPD_AMQP_URL_FILE",
                    file,
                    format!("a file holding an amqp:// URL ({expected})"),
                )
            })?,
            (text, _) => {
                let text = text.as_deref().unwrap_or(DEFAULT_URL);
                AmqpUrl::parse_list(text).map_err(|expected| {
                    let shown: Vec<String> = split_urls(text).map(redact_url).collect();
                    invalid("DEDUPD_AMQP_URL", &shown.join(","), expected)
                })?
            }
        };
        let shown: Vec<String> = urls.iter().map(ToString::to_string).collect();
        vars.show("DEDUPD_AMQP_URL", shown.join(","));
        let mut urls = urls.into_iter();
        let url = urls.next().expect("parse_list returns one URL at least");
        let others: Vec<AmqpUrl> = urls.collect();
        if let Some(other) = others.iter().find(|o| o.tls != url.tls) {
            return Err(invalid(
                "DEDUPD_AMQP_URL",
                &shown.join(","),
                format!("URLs all amqp:// or all amqps:// ({other} differs from {url})"),
            ));
        }
        let tls = TlsFiles::read(vars, url.tls)?;
        Ok(AmqpConfig { url, others, tls })
    }

    /// Every broker URL, the first one first.
    pub fn urls(&self) -> impl Iterator<Item = &AmqpUrl> {
        std::iter::once(&self.url).chain(&self.others)
    }
}

/// The URLs of a comma-separated list. A comma splits only where the next URL starts (a
/// password may hold a comma).
fn split_urls(text: &str) -> impl Iterator<Item = &str> {
    let mut starts: Vec<usize> = text
        .match_indices(',')
        .map(|(i, _)| i)
        .filter(|&i| {
            let rest = text[i + 1..].trim_start();
            rest.starts_with("amqp://") || rest.starts_with("amqps://")
        })
        .collect();
    starts.push(text.len());
    let mut from = 0;
    starts.into_iter().map(move |end| {
        let url = text[from..end].trim();
        from = end + 1;
        url
    })
}

/// The files for TLS to the broker. Read at each connection, so renewed certificates are used
/// from the next reconnect on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `DEDUPD_AMQP_CA_FILE`: CA certificates (PEM) trusted instead of the system's store.
    pub ca_file: Option<PathBuf>,
    /// `DEDUPD_AMQP_CERT_FILE` and `DEDUPD_AMQP_KEY_FILE`: the client certificate chain and its
    /// private key (PEM), for a broker that requires mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    /// The TLS files from their variables. Each must be a readable PEM file of the right kind,
    /// the certificate and the key go together, and none is accepted with a plain `amqp://` URL:
    /// a setting that says "TLS" must never leave the connection in plaintext without a word.
    fn read(vars: &mut Vars, url_is_tls: bool) -> Result<TlsFiles, ConfigError> {
        const CERT: &str = "-----BEGIN CERTIFICATE-----";
        let mut pem = |name: &'static str,
                       unset: &str,
                       doc: &str,
                       marker: &'static str,
                       what: &'static str| {
            vars.opt(name, unset, doc, |path| {
                if !url_is_tls {
                    return Err(format!(
                        "{what} for an amqps:// broker URL, but DEDUPD_AMQP_URL is amqp:// (plaintext)"
                    ));
                }
                let text = std::fs::read(path)
                    .map_err(|e| format!("a readable PEM file holding {what} ({e})"))?;
                if !String::from_utf8_lossy(&text).contains(marker) {
                    return Err(format!("a PEM file holding {what} (no `{marker}` in it)"));
                }
                Ok(PathBuf::from(path))
            })
        };
        let ca_file = pem(
            "DEDUPD_AMQP_CA_FILE",
            "the system's CA store",
            "PEM file of the CA certificates that sign the broker's certificate (`amqps://` only)",
            CERT,
            "CA certificates",
        )?;
        let cert = pem(
            "DEDUPD_AMQP_CERT_FILE",
            "no client certificate",
            "PEM client certificate chain for mutual TLS (`amqps://` only; with `DEDUPD_AMQP_KEY_FILE`)",
            CERT,
            "a client certificate",
        )?;
        let key = pem(
            "DEDUPD_AMQP_KEY_FILE",
            "no client certificate",
            "PEM private key of that client certificate (with `DEDUPD_AMQP_CERT_FILE`)",
            "PRIVATE KEY-----",
            "a private key",
        )?;
        // One half of the client certificate set without the other.
        let missing = |set: &str, unset: &str| {
            invalid(
                set,
                vars.get(set).unwrap_or_default(),
                format!("{unset} set too (mutual TLS needs the certificate and its key)"),
            )
        };
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(missing("DEDUPD_AMQP_CERT_FILE", "DEDUPD_AMQP_KEY_FILE"))
            }
            (None, Some(_)) => {
                return Err(missing("DEDUPD_AMQP_KEY_FILE", "DEDUPD_AMQP_CERT_FILE"))
            }
        };
        Ok(TlsFiles { ca_file, client })
    }
}

/// The broker's address and credentials. Its `Debug` and `Display` mask the password.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    /// `amqps://`: TLS, with the broker's certificate verified for `host`.
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name.
    pub user: String,
    password: String,
    /// Virtual host.
    pub vhost: String,
    /// Heartbeat in seconds from `?heartbeat=`, if given.
    pub heartbeat: Option<u16>,
    /// Connection timeout from `?connection_timeout=` (milliseconds, as the URI spec says).
    pub connection_timeout: Option<Duration>,
}

impl AmqpUrl {
    /// Parses `amqp://user:password@host:port/vhost?heartbeat=N&connection_timeout=MS`, with
    /// percent-decoding of user, password and vhost (`%2f` is the default vhost `/`). A missing
    /// user or password is `guest`, a missing port 5672 (5671 for `amqps://`), a missing vhost
    /// `/`.
    ///
    /// # Errors
    ///
    /// The expected form, for the config error.
    pub fn parse(text: &str) -> Result<AmqpUrl, String> {
        const FORM: &str = "amqp://user:password@host:port/vhost";
        let bad = |why: &str| format!("a URL like {FORM} ({why})");
        let url = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        let tls = match url.scheme() {
            "amqp" => false,
            "amqps" => true,
            _ => return Err(bad("scheme must be amqp or amqps")),
        };
        let decode = |s: &str, what: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| bad(&format!("bad percent-encoding in {what}")))
        };
        let user = match url.username() {
            "" => "guest".to_string(),
            user => decode(user, "user")?,
        };
        let password = decode(url.password().unwrap_or("guest"), "password")?;
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) if !host.to_string().is_empty() => host.to_string(),
            _ => return Err(bad("no host")),
        };
        let port = url.port().unwrap_or(if tls { 5671 } else { 5672 });
        let vhost = match url.path().strip_prefix('/').unwrap_or(url.path()) {
            "" => "/".to_string(),
            path => decode(path, "vhost")?,
        };
        let mut heartbeat = None;
        let mut connection_timeout = None;
        for (k, v) in url.query_pairs() {
            match &*k {
                "heartbeat" => {
                    heartbeat = Some(v.parse().map_err(|_| bad("heartbeat is not a number"))?)
                }
                "connection_timeout" => {
                    let ms: u64 = v
                        .parse()
                        .map_err(|_| bad("connection_timeout is not a number"))?;
                    connection_timeout = Some(Duration::from_millis(ms));
                }
                // Other URI-spec parameters (channel_max, auth_mechanism...) keep their defaults.
                _ => {}
            }
        }
        Ok(AmqpUrl {
            tls,
            host,
            port,
            user,
            password,
            vhost,
            heartbeat,
            connection_timeout,
        })
    }

    /// Parses one URL or several separated by commas (nodes of one cluster), each as
    /// [`AmqpUrl::parse`] does.
    ///
    /// # Errors
    ///
    /// The expected form, for the config error.
    pub fn parse_list(text: &str) -> Result<Vec<AmqpUrl>, String> {
        split_urls(text).map(AmqpUrl::parse).collect()
    }

    /// The password, for opening the connection (and nothing else).
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "{}://{}:***@{}:{}/{}",
            if self.tls { "amqps" } else { "amqp" },
            self.user,
            host,
            self.port,
            self.vhost.replace('%', "%25").replace('/', "%2f")
        )
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({self})")
    }
}

/// A URL as given, with the password (if any) masked, for error messages.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_string(),
    }
}

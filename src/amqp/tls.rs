//! TLS to the broker, for `amqps://` URLs.
//!
//! The client configuration is built afresh for every connection attempt from the files the
//! configuration names, so a renewed certificate or CA bundle is used from the next reconnect on
//! without a restart. Verification is rustls' own WebPKI verifier (chain to a trusted root,
//! validity dates, host name or IP address of the URL); we only wrap it to remember *why* it
//! refused a certificate, because amqprs turns every I/O error into a string and the operator
//! deserves "expired" rather than "invalid peer certificate" somewhere in a long message.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use amqprs::tls::TlsAdaptor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_rustls::TlsConnector;

use crate::config::{AmqpUrl, TlsFiles};

/// One connection attempt's TLS setup, and what its certificate check concluded.
pub(crate) struct Tls {
    /// What amqprs needs to wrap the TCP stream.
    adaptor: TlsAdaptor,
    /// The verifier's refusal, if it refused the broker's certificate.
    refusal: Arc<Mutex<Option<rustls::Error>>>,
    /// Where trusted roots came from, for the message on an unknown CA.
    roots: String,
    /// Host the certificate must name.
    host: String,
    /// Whether we present a client certificate.
    client_cert: bool,
}

impl Tls {
    /// Reads the CA and client files and builds the TLS client for `url`.
    ///
    /// # Errors
    ///
    /// A file that cannot be read or holds no usable certificate or key, or no CA certificate at
    /// all in the system's store: a message naming the file and the cause.
    pub(crate) fn new(url: &AmqpUrl, files: &TlsFiles) -> Result<Tls, String> {
        // One provider, chosen here and not process-wide, so nothing depends on which crate
        // installed a default first.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (roots, from) = match &files.ca_file {
            Some(path) => (
                roots_from_file(path)?,
                format!("DEDUPD_AMQP_CA_FILE={}", path.display()),
            ),
            None => (system_roots()?, "the system's CA store".to_string()),
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("TLS: cannot use the trusted CA certificates ({from}): {e}"))?;
        let refusal = Arc::new(Mutex::new(None));
        let verifier = Recording {
            inner: webpki,
            refusal: refusal.clone(),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: no usable protocol version: {e}"))?
            // Not "dangerous" in effect: the verifier is the standard WebPKI one, wrapped only to
            // keep its error.
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let config = match &files.client {
            Some((cert, key)) => {
                let chain = certs_from_file(cert, "DEDUPD_AMQP_CERT_FILE")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!(
                        "TLS: no private key in DEDUPD_AMQP_KEY_FILE={}: {e}",
                        key.display()
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!("TLS: the client certificate and key do not go together: {e}")
                })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Tls {
            adaptor: TlsAdaptor::new(TlsConnector::from(Arc::new(config)), url.host.clone()),
            refusal,
            roots: from,
            host: url.host.clone(),
            client_cert: files.client.is_some(),
        })
    }

    /// The adaptor to give amqprs' connection arguments.
    pub(crate) fn adaptor(&self) -> TlsAdaptor {
        self.adaptor.clone()
    }

    /// Why opening the connection failed, in words an operator can act on: the verifier's
    /// refusal if there was one, a hint when the broker refused the handshake, or `error` as is.
    pub(crate) fn explain(&self, error: &str) -> String {
        if let Some(refusal) = self.refusal.lock().expect("refusal lock").take() {
            return format!(
                "TLS: {}",
                Refusal {
                    tls: self,
                    error: &refusal
                }
            );
        }
        // The broker's side of a refused handshake arrives as an alert, as text inside amqprs'
        // error. Without a certificate of ours, the likely cause is that it wants one.
        if error.contains("received fatal alert") {
            let hint = if self.client_cert {
                "the broker refused our client certificate (DEDUPD_AMQP_CERT_FILE): is it signed by a CA the broker trusts, and still valid?"
            } else {
                "the broker refused the handshake; if it requires a client certificate, set DEDUPD_AMQP_CERT_FILE and DEDUPD_AMQP_KEY_FILE"
            };
            return format!("TLS: {hint} ({error})");
        }
        error.to_string()
    }
}

/// The verifier's error as a sentence naming the cause.
struct Refusal<'a> {
    tls: &'a Tls,
    error: &'a rustls::Error,
}

impl fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Refusal { tls, error } = self;
        let rustls::Error::InvalidCertificate(cert) = error else {
            return write!(f, "the broker's certificate was refused: {error}");
        };
        match cert {
            CertificateError::UnknownIssuer => write!(
                f,
                "the broker's certificate is signed by an unknown CA (not in {}); \
                 set DEDUPD_AMQP_CA_FILE to the CA that signed it",
                tls.roots
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                write!(f, "the broker's certificate has expired ({error})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => write!(
                f,
                "the broker's certificate is not valid yet; check this host's clock ({error})"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                write!(
                    f,
                    "host name mismatch: the broker's certificate is not valid for {:?}, the \
                     host of DEDUPD_AMQP_URL ({error})",
                    tls.host
                )
            }
            _ => write!(f, "the broker's certificate was refused: {error}"),
        }
    }
}

/// The WebPKI verifier, keeping the reason of a refusal where [`Tls::explain`] finds it.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    refusal: Arc<Mutex<Option<rustls::Error>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| *self.refusal.lock().expect("refusal lock") = Some(e.clone()))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Every certificate in a PEM file, at least one.
fn certs_from_file(path: &Path, var: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |why: String| format!("TLS: cannot read {var}={}: {why}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

/// The CA certificates of `DEDUPD_AMQP_CA_FILE` as trust anchors.
fn roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_file(path, "DEDUPD_AMQP_CA_FILE")? {
        roots.add(cert).map_err(|e| {
            format!(
                "TLS: a certificate in DEDUPD_AMQP_CA_FILE={} is not a usable CA: {e}",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// The operating system's trusted CA certificates (`/etc/ssl/certs` on Debian, or what
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` name).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _unusable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(String::new, |e| format!(" ({e})"));
        return Err(format!(
            "TLS: no CA certificate found in the system's store{why}; install ca-certificates \
             or set DEDUPD_AMQP_CA_FILE"
        ));
    }
    Ok(roots)
}

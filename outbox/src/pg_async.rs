//! Connecting diesel-async (tokio-postgres underneath) to PostgreSQL the
//! way libpq does, `sslmode` and all, so a URL that works for the sync
//! paths (libpq) works for the async ones too.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |-----------|-----|--------------------------|
//! | `disable` | never | - |
//! | `allow`, `prefer` (default) | when the server offers it | checked as for `require` |
//! | `require` | always | not checked, unless a root certificate is found (`sslrootcert`, or `~/.postgresql/root.crt`): then as `verify-ca` |
//! | `verify-ca` | always | signed by a root of `sslrootcert` (or `~/.postgresql/root.crt`, or `sslrootcert=system`: the system's roots) |
//! | `verify-full` | always | as `verify-ca`, and issued for the host connected to |
//!
//! `sslcert` and `sslkey` give a client certificate. TLS is rustls (no
//! OpenSSL to build); without the `tls` feature a URL that needs TLS is an
//! error, never a plain connection.

use std::path::PathBuf;

use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it (libpq's `allow` and `prefer`).
    Prefer,
    /// TLS, certificate not checked (unless a root certificate is found).
    Require,
    /// TLS, certificate signed by a trusted root.
    VerifyCa,
    /// TLS, certificate signed by a trusted root and issued for the host.
    VerifyFull,
}

/// The TLS settings of a connection URL, and the URL without them (for
/// tokio-postgres, which knows only some of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`; `prefer` when absent.
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file, or `system`.
    pub root_cert: Option<String>,
    /// `sslcert` and `sslkey`: a client certificate and its key (PEM).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The URL without the `ssl*` parameters.
    pub url: String,
}

/// Reads the `ssl*` parameters of a `postgres://` URL.
///
/// # Errors
///
/// A URL that does not parse, or an `sslmode` libpq does not know; the
/// message never holds the password.
pub fn tls_settings(url: &str) -> Result<TlsSettings, String> {
    let mut parsed =
        url::Url::parse(url).map_err(|e| format!("the database URL does not parse: {e}"))?;
    let mut mode = SslMode::Prefer;
    let (mut root_cert, mut cert, mut key) = (None, None, None);
    let mut kept = Vec::new();
    for (name, value) in parsed.query_pairs() {
        match name.as_ref() {
            "sslmode" => {
                mode = match value.as_ref() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode {other:?} is not one of disable, allow, prefer, require, \
                             verify-ca, verify-full"
                        ));
                    }
                }
            }
            "sslrootcert" => root_cert = Some(value.into_owned()),
            "sslcert" => cert = Some(PathBuf::from(value.as_ref())),
            "sslkey" => key = Some(PathBuf::from(value.as_ref())),
            // Others libpq knows that tokio-postgres does not.
            "sslcrl" | "sslcompression" | "sslsni" | "sslpassword" => {}
            _ => kept.push((name.into_owned(), value.into_owned())),
        }
    }
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("sslcert and sslkey go together".into()),
    };
    Ok(TlsSettings {
        mode,
        root_cert,
        client_cert,
        url: parsed.into(),
    })
}

/// Connects to `url` with TLS as its `sslmode` says (see the module docs).
///
/// # Errors
///
/// The URL's TLS settings are bad or need the `tls` feature, a certificate
/// file cannot be read, the server cannot be reached, refuses TLS under
/// `require`, presents a certificate the mode refuses, or refuses the login.
pub async fn connect(url: &str) -> Result<AsyncPgConnection, ConnectionError> {
    let settings = tls_settings(url).map_err(ConnectionError::BadConnection)?;
    let mut config: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectionError::BadConnection(e.to_string()))?;
    if settings.mode == SslMode::Disable {
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
        return AsyncPgConnection::try_from_client_and_connection(client, connection).await;
    }
    connect_tls(config, &settings).await
}

#[cfg(feature = "tls")]
async fn connect_tls(
    mut config: tokio_postgres::Config,
    settings: &TlsSettings,
) -> Result<AsyncPgConnection, ConnectionError> {
    config.ssl_mode(match settings.mode {
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    let tls = tls::client_config(settings).map_err(ConnectionError::BadConnection)?;
    let (client, connection) = config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        .await
        .map_err(|e| ConnectionError::BadConnection(describe(&e)))?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

/// Without TLS support, `prefer` connects in plain text (as a libpq built
/// without TLS does) and anything stricter is refused.
#[cfg(not(feature = "tls"))]
async fn connect_tls(
    mut config: tokio_postgres::Config,
    settings: &TlsSettings,
) -> Result<AsyncPgConnection, ConnectionError> {
    if settings.mode != SslMode::Prefer {
        return Err(ConnectionError::BadConnection(format!(
            "sslmode {:?} needs TLS, and this build has no TLS support (the `tls` feature)",
            settings.mode
        )));
    }
    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

/// A connection error with its cause (tokio-postgres keeps the TLS
/// failure in the source, which is what says why).
#[cfg(feature = "tls")]
fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// The root certificate file libpq reads when none is named.
#[cfg(feature = "tls")]
fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = std::path::Path::new(&home).join(".postgresql/root.crt");
    path.exists().then_some(path)
}

#[cfg(feature = "tls")]
mod tls {
    //! The rustls client of each `sslmode`.

    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::WebPkiSupportedAlgorithms;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

    use super::{SslMode, TlsSettings, default_root_cert};

    /// The client configuration `settings` call for.
    pub(super) fn client_config(settings: &TlsSettings) -> Result<ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let root = settings
            .root_cert
            .clone()
            .or_else(|| default_root_cert().map(|p| p.to_string_lossy().into_owned()));
        let verifying = match settings.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            // libpq: with a root certificate at hand, require checks the chain.
            SslMode::Require | SslMode::Prefer => root.is_some(),
            SslMode::Disable => false,
        };
        let chain = if verifying {
            let roots = Arc::new(roots(root.as_deref())?);
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| format!("building the certificate verifier: {e}"))?;
            Some(webpki)
        } else {
            None
        };
        let builder = match chain {
            Some(webpki) if settings.mode == SslMode::VerifyFull => {
                builder.with_webpki_verifier(webpki)
            }
            chain => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    chain,
                    algorithms: provider.signature_verification_algorithms,
                })),
        };
        match &settings.client_cert {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("reading sslcert {}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("reading sslkey {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("the client certificate: {e}"))
            }
        }
    }

    /// The trusted roots: a PEM file, or the system's.
    fn roots(root: Option<&str>) -> Result<RootCertStore, String> {
        let mut store = RootCertStore::empty();
        match root {
            None | Some("system") => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = store.add(cert);
                }
            }
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("reading sslrootcert {path}: {e}"))?;
                for cert in certs {
                    store
                        .add(cert)
                        .map_err(|e| format!("sslrootcert {path}: {e}"))?;
                }
            }
        }
        if store.is_empty() {
            return Err("no trusted root certificate (sslrootcert)".into());
        }
        Ok(store)
    }

    /// `verify-ca` (`chain`: the certificate must lead to a trusted root,
    /// its name is not checked) and `require` without a root certificate
    /// (no `chain`: not checked at all, libpq's behaviour). The handshake's
    /// signatures are checked either way.
    #[derive(Debug)]
    struct Lenient {
        chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
        algorithms: WebPkiSupportedAlgorithms,
    }

    impl ServerCertVerifier for Lenient {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let Some(chain) = &self.chain else {
                return Ok(ServerCertVerified::assertion());
            };
            match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_parameters_are_read_and_taken_out_of_the_url() {
        let s = tls_settings(
            "postgres://u:p%40ss@db:5433/app?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some("/ca.pem"));
        assert_eq!(s.url, "postgres://u:p%40ss@db:5433/app?application_name=x");
        let s = tls_settings("postgres://db/app").unwrap();
        assert_eq!(
            (s.mode, s.url.as_str()),
            (SslMode::Prefer, "postgres://db/app")
        );
        assert!(tls_settings("postgres://db/app?sslmode=sometimes").is_err());
        assert!(tls_settings("postgres://db/app?sslcert=/c.pem").is_err());
        let e = tls_settings("postgres://u:secret@db:notaport/app").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    proptest::proptest! {
        /// A URL from a flag or the environment: any text gives settings or
        /// an error, never a panic, and an error never holds the password.
        #[test]
        fn any_url_is_read_without_panic_or_leak(
            password in "[A-Za-z0-9]{8,16}",
            before in "\\PC{0,40}",
            after in "\\PC{0,40}",
        ) {
            let url = format!("postgres://{before}u:{password}@{after}");
            if let Err(e) = tls_settings(&url) {
                proptest::prop_assert!(!e.contains(&password), "{}", e);
            }
            let _ = tls_settings(&before);
        }
    }
}

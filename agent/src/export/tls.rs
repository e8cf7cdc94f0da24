//! TLS for the OTLP senders: the collector's CA (or the system's roots)
//! and an optional client identity, from `[export.tls]` or the standard
//! `OTEL_EXPORTER_OTLP_{CERTIFICATE,CLIENT_CERTIFICATE,CLIENT_KEY}`
//! variables. An `https://` endpoint always verifies the server.
use std::{path::PathBuf, sync::Arc};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM CA certificate(s) that sign the collector's certificate; none:
    /// the system's roots.
    pub certificate: Option<PathBuf>,
    /// PEM client certificate and key, for collectors that want mTLS.
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {0}")]
    Pem(PathBuf, #[source] rustls_pki_types::pem::Error),
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("a client certificate needs its key, and a key its certificate")]
    HalfIdentity,
    #[error("no usable root certificates on this system")]
    NoRoots,
    #[error("TLS settings")]
    Rustls(#[from] rustls::Error),
}

impl TlsFiles {
    /// PEM bytes of the CA file, and of the client (certificate, key).
    #[allow(clippy::type_complexity)]
    pub fn read(&self) -> Result<(Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>), TlsError> {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| TlsError::Pem(p.clone(), rustls_pki_types::pem::Error::Io(e)))
        };
        let ca = self.certificate.as_ref().map(read).transpose()?;
        let identity = match (&self.client_certificate, &self.client_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => return Err(TlsError::HalfIdentity),
        };
        Ok((ca, identity))
    }

    /// A rustls client configuration offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.certificate {
            Some(p) => {
                let certs = CertificateDer::pem_file_iter(p)
                    .map_err(|e| TlsError::Pem(p.clone(), e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| TlsError::Pem(p.clone(), e))?;
                if certs.is_empty() {
                    return Err(TlsError::NoCertificate(p.clone()));
                }
                for c in certs {
                    roots.add(c)?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(TlsError::NoRoots);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut cfg = match (&self.client_certificate, &self.client_key) {
            (Some(c), Some(k)) => {
                let chain = CertificateDer::pem_file_iter(c)
                    .map_err(|e| TlsError::Pem(c.clone(), e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| TlsError::Pem(c.clone(), e))?;
                let key =
                    PrivateKeyDer::from_pem_file(k).map_err(|e| TlsError::Pem(k.clone(), e))?;
                builder.with_client_auth_cert(chain, key)?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::HalfIdentity),
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// An endpoint with its scheme: `host:port` alone is https unless the
/// exporter was told it is insecure (`OTEL_EXPORTER_OTLP_INSECURE`).
pub fn with_scheme(endpoint: &str, insecure: bool) -> String {
    if endpoint.contains("://") {
        return endpoint.to_string();
    }
    let scheme = if insecure { "http" } else { "https" };
    format!("{scheme}://{endpoint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_an_identity_or_a_missing_file_is_a_clear_error() {
        let half = TlsFiles {
            client_certificate: Some("/nonexistent/c.pem".into()),
            ..Default::default()
        };
        assert!(matches!(
            half.client_config(&[]),
            Err(TlsError::HalfIdentity)
        ));
        let missing = TlsFiles {
            certificate: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = missing.client_config(&[]).unwrap_err();
        assert!(crate::report(&e).contains("/nonexistent/ca.pem"), "{e}");
        let empty = std::env::temp_dir().join(format!("tagflow-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = TlsFiles {
            certificate: Some(empty.clone()),
            ..Default::default()
        }
        .client_config(&[])
        .unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate(_)), "{e}");
        let _ = std::fs::remove_file(empty);
    }

    #[test]
    fn a_bare_endpoint_is_https_unless_insecure() {
        assert_eq!(
            with_scheme("collector:4317", false),
            "https://collector:4317"
        );
        assert_eq!(with_scheme("collector:4317", true), "http://collector:4317");
        assert_eq!(with_scheme("http://c:4317", false), "http://c:4317");
    }
}

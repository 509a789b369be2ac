//! TLS to upstreams: the client configuration of a service's `https` endpoints — the system's
//! root certificates or a configured CA, an optional client certificate (mutual TLS), and for
//! tests only, a verification override. Built when the config is compiled, so file errors are
//! config errors.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::UpstreamTlsConfig;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's roots (read once per process).
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut store = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                "no system root certificates found; https endpoints need [services.X.tls] ca"
            );
        }
        store
    })
}

/// A `[services.X.tls]` table that cannot become a client configuration.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsConfigError {
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls.{key} {}: cannot read {what}: {source}", path.display())]
    Read {
        key: &'static str,
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("tls.ca {}: no usable CA certificate", .0.display())]
    NoCa(PathBuf),
    #[error("tls.cert and tls.key do not form a usable pair: {0}")]
    Pair(rustls::Error),
    #[error("tls.cert and tls.key go together (mutual TLS)")]
    HalfPair,
}

/// Builds the client configuration. `resolve` makes config paths absolute.
pub(crate) fn client_config(
    tls: Option<&UpstreamTlsConfig>,
    resolve: impl Fn(&Path) -> PathBuf,
) -> Result<ClientConfig, TlsConfigError> {
    let read = |key, what, path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsConfigError::Read {
            key,
            what,
            path,
            source,
        }
    };
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match tls {
        Some(t) if t.insecure_skip_verify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider()))),
        Some(UpstreamTlsConfig { ca: Some(ca), .. }) => {
            let path = resolve(ca);
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
                .and_then(|it| it.collect())
                .map_err(read("ca", "PEM certificates", &path))?;
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsConfigError::NoCa(path));
            }
            builder.with_root_certificates(store)
        }
        _ => builder.with_root_certificates(system_roots().clone()),
    };
    let config = match tls.map(|t| (&t.cert, &t.key)) {
        Some((Some(cert), Some(key))) => {
            let (cp, kp) = (resolve(cert), resolve(key));
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cp)
                .and_then(|it| it.collect())
                .map_err(read("cert", "PEM certificates", &cp))?;
            let key =
                PrivateKeyDer::from_pem_file(&kp).map_err(read("key", "a PEM private key", &kp))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsConfigError::Pair)?
        }
        Some((None, None)) | None => builder.with_no_client_auth(),
        Some(_) => return Err(TlsConfigError::HalfPair),
    };
    // ALPN is left to hyper-rustls, which sets it from the protocols the connector enables.
    Ok(config)
}

/// Accepts any server certificate (signatures are still checked). Only for tests and
/// development: `insecure_skip_verify = true`.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

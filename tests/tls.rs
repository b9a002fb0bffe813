//! TLS termination for clients (issue #3): ALPN `h2`, and a renewed
//! certificate is picked up without a restart.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::{CertificateDer, ServerName};

/// Writes a fresh self-signed pair for 127.0.0.1; returns the certificate.
fn write_pair(dir: &std::path::Path) -> CertificateDer<'static> {
    let pair = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    // Write-then-rename, as certificate renewers do.
    std::fs::write(dir.join("cert.pem.new"), pair.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem.new"), pair.signing_key.serialize_pem()).unwrap();
    std::fs::rename(dir.join("key.pem.new"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.new"), dir.join("cert.pem")).unwrap();
    pair.cert.der().clone()
}

fn client_config(trusted: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// The certificate the gateway presents on a new handshake.
async fn presented(
    addr: std::net::SocketAddr,
    trusted: &[CertificateDer<'static>],
) -> CertificateDer<'static> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(trusted)));
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), stream)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_alpn_h2_and_certificates_renewed_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("teamgate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = write_pair(&dir);
    let tls = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"50ms\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    let h = Harness::start_with_config("", &tls).await;

    // hyper-rustls offers ALPN h2 + http/1.1 itself (enable_http1/2 below).
    let mut config = client_config(std::slice::from_ref(&first));
    config.alpn_protocols.clear();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let request = Request::get(format!(
        "https://127.0.0.1:{}/api/assets?limit=1",
        h.gateway.port()
    ))
    .header("x-api-key", DESIGN_KEY)
    .body(Full::new(Bytes::new()))
    .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2, "ALPN chose h2");
    let seen = h.emulator.recorded().pop().unwrap();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(
        presented(h.gateway, std::slice::from_ref(&first)).await,
        first
    );

    // Renewal: new files on disk; new handshakes get the new certificate.
    let second = write_pair(&dir);
    let trusted = [first.clone(), second.clone()];
    eventually(
        "the renewed certificate is served without a restart",
        async || presented(h.gateway, &trusted).await == second,
    )
    .await;
    // A half-written renewal (garbage) is ignored: the current pair stays.
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(presented(h.gateway, &trusted).await, second);
    h.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_names_an_unreadable_certificate() {
    let text = "[upstreams.comfy]\nbase_url = \"http://127.0.0.1:1\"\n[server.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n";
    let error = teamgate::config::load_str(
        text,
        "t.toml",
        None,
        &|_| None,
        teamgate::config::Secrets::Resolve,
    )
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("server.tls: cannot read certificates from `/nonexistent/cert.pem`"),
        "{error}"
    );
}

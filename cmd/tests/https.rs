//! `https://` node URLs, as the README's operator sets them up: a TLS
//! proxy in front of a node's API. The proxy here is a real TLS terminator
//! (rustls) with a certificate from a private CA made for the test; the
//! client trusts that CA only through `SSL_CERT_FILE`.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

mod common;
use common::*;

/// A private CA, and a server certificate it signed for `localhost`.
struct TestPki {
    ca_pem: String,
    server: tokio_rustls::rustls::ServerConfig,
}

fn new_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "xe test CA");
    let ca_key = KeyPair::generate().expect("ca key");
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .expect("leaf cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
    TestPki {
        ca_pem: ca_cert.pem(),
        server,
    }
}

/// TLS on a loopback port, each connection copied to `backend` (the node's
/// plain-HTTP API). Aborted when the handle drops at the end of the test.
async fn tls_proxy(server: rustls::ServerConfig, backend: String) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let backend = backend.clone();
            tokio::spawn(async move {
                // A handshake the client refused is the point of one check.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_node_urls_work_for_requests_and_the_ssh_tunnel() {
    if !openssh_available("https_node_urls_work_for_requests_and_the_ssh_tunnel") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(
        dir.path(),
        &["--provide", "--vm-backend", "sshd", "--sshd", SSHD],
    )
    .await;
    let provider = node.account();
    let backend = node.url().trim_start_matches("http://").to_string();
    let pki = new_pki();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).expect("write CA");
    let ca = ca.to_str().expect("utf-8");
    let (port, _proxy) = tls_proxy(pki.server, backend).await;
    let url = format!("https://localhost:{port}");
    let trust = [("SSL_CERT_FILE", ca)];

    // A certificate nobody told the client to trust is refused, and the
    // error says how to trust a private CA.
    let empty = dir.path().join("no-roots.pem");
    std::fs::write(&empty, "").expect("write");
    let out = xe_env(
        &["providers", "--node", &url],
        &[("SSL_CERT_FILE", empty.to_str().expect("utf-8"))],
    )
    .await;
    assert!(!out.status.success(), "untrusted certificate accepted");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("SSL_CERT_FILE"), "{stderr}");
    let other = new_pki();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, &other.ca_pem).expect("write");
    let out = xe_env(
        &["providers", "--node", &url],
        &[("SSL_CERT_FILE", other_ca.to_str().expect("utf-8"))],
    )
    .await;
    assert!(!out.status.success(), "certificate of another CA accepted");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("not trusted"), "{stderr}");

    // Trusted: every request, the lease's wait, and ssh through the
    // HTTP-upgrade tunnel all go over TLS.
    let out = ok(
        &xe_env(&["providers", "--node", &url], &trust).await,
        "xe providers over https",
    );
    assert!(out.contains(&provider), "{out}");
    let wallet = dir.path().join("me.seed");
    let wallet = wallet.to_str().expect("utf-8");
    ok(
        &xe(&["wallet", "create", "--wallet", wallet]).await,
        "xe wallet create",
    );
    let out = xe_env(
        &[
            "lease",
            "create",
            "--provider",
            &provider,
            "--vcpus",
            "1",
            "--memory-mb",
            "256",
            "--disk-gb",
            "1",
            "--wait",
            "--timeout",
            "60",
            "--node",
            &url,
            "--wallet",
            wallet,
        ],
        &trust,
    )
    .await;
    let lease = last_line(&ok(&out, "xe lease create over https"));
    let user = xe_vm::default_vm_user("sshd");
    let out = xe_env(
        &[
            "ssh",
            "--http",
            "--node",
            &url,
            "--wallet",
            wallet,
            "--user",
            &user,
            "--known-hosts",
            dir.path().join("known_hosts").to_str().expect("utf-8"),
            &lease,
            "--",
            "echo",
            "via-tls",
        ],
        &trust,
    )
    .await;
    let stdout = ok(&out, "xe ssh --http over https");
    assert_eq!(stdout.trim(), "via-tls", "{}", text(&out.stderr));

    let mut node = node;
    let st = terminate(&mut node.child).await;
    assert!(st.success(), "xe node exit {st}:\n{}", node.log_text());
}

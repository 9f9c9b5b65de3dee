//! gRPC over TLS (rustls), with and without client certificates.

mod common;

use std::time::Duration;

use common::certificates::Pki;
use common::*;
use proto::v1::journal_client::JournalClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Starts a server with `tls`; returns its address and the shutdown token.
async fn start(prefix: &str, tls: config::ServerTlsSettings) -> (String, CancellationToken) {
    let mut settings = test_settings(&unique_database(prefix));
    settings.server.tls = tls;
    let listener = TcpListener::bind(settings.server.listen).await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(eventjournal::run(settings, listener, shutdown.clone()));
    (format!("https://localhost:{}", address.port()), shutdown)
}

/// Connects, trying `attempts` times (the server may still be starting).
async fn connect_within(
    url: &str,
    tls: ClientTlsConfig,
    attempts: u32,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Channel::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5));
    let mut last = None;
    for _ in 0..attempts {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(error) => last = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last.unwrap())
}

/// A connection to a server that has already been reached once.
async fn connect(url: &str, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    connect_within(url, tls, 1).await
}

fn trusting(pki: &Pki) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(Pki::read(&pki.ca)))
        .domain_name("localhost")
}

async fn write_one(channel: Channel) -> Result<(), tonic::Status> {
    let mut client = JournalClient::new(channel);
    client
        .write_events(proto::v1::WriteEventsRequest {
            writes: vec![atomic(vec![event("tls", 1, "secret")])],
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn grpc_is_served_over_tls() {
    let pki = Pki::generate("grpc");
    let (url, shutdown) = start(
        "tls",
        config::ServerTlsSettings {
            enabled: true,
            certificate_file: Some(pki.server_certificate.clone()),
            key_file: Some(pki.server_key.clone()),
            client_ca_file: None,
        },
    )
    .await;
    let channel = connect_within(&url, trusting(&pki), 200)
        .await
        .expect("TLS connection");
    write_one(channel).await.expect("a call over TLS");

    // A client that does not trust the server's CA cannot talk to it.
    let stranger = Pki::generate("stranger");
    let refused = match connect(&url, trusting(&stranger)).await {
        Err(_) => true,
        Ok(channel) => write_one(channel).await.is_err(),
    };
    assert!(
        refused,
        "a server certificate from an unknown CA was accepted"
    );
    // Plain-text gRPC does not get through either.
    let plain = Channel::from_shared(url.replace("https", "http"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(write_one(channel).await.is_err());
    }
    shutdown.cancel();
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_configured_ca() {
    let pki = Pki::generate("mtls");
    let (url, shutdown) = start(
        "mtls",
        config::ServerTlsSettings {
            enabled: true,
            certificate_file: Some(pki.server_certificate.clone()),
            key_file: Some(pki.server_key.clone()),
            client_ca_file: Some(pki.ca.clone()),
        },
    )
    .await;
    let with_certificate = trusting(&pki).identity(Identity::from_pem(
        Pki::read(&pki.client_certificate),
        Pki::read(&pki.client_key),
    ));
    let channel = connect(&url, with_certificate)
        .await
        .expect("mTLS connection");
    write_one(channel)
        .await
        .expect("a call with a client certificate");

    let anonymous = match connect(&url, trusting(&pki)).await {
        Err(_) => true,
        Ok(channel) => write_one(channel).await.is_err(),
    };
    assert!(anonymous, "a client without a certificate got through");

    let stranger = Pki::generate("stranger-client");
    let foreign = trusting(&pki).identity(Identity::from_pem(
        Pki::read(&stranger.client_certificate),
        Pki::read(&stranger.client_key),
    ));
    let refused = match connect(&url, foreign).await {
        Err(_) => true,
        Ok(channel) => write_one(channel).await.is_err(),
    };
    assert!(refused, "a client certificate from another CA got through");
    shutdown.cancel();
}

#[tokio::test]
async fn mongodb_connections_use_tls_with_a_ca_file_and_a_client_certificate() {
    use common::own_mongod::OwnMongod;
    let pki = Pki::generate("mongodb");
    let path = |path: &std::path::PathBuf| path.display().to_string();
    let mongod = OwnMongod::start(
        "tls",
        &[
            "--tlsMode".into(),
            "requireTLS".into(),
            "--tlsCertificateKeyFile".into(),
            path(&pki.server_combined),
            // With a CA file, mongod requires client certificates signed by it.
            "--tlsCAFile".into(),
            path(&pki.ca),
        ],
        &format!(
            "&tls=true&tlsCAFile={}&tlsCertificateKeyFile={}",
            path(&pki.ca),
            path(&pki.client_combined)
        ),
    )
    .await;
    let settings = |certificate_key_file: Option<std::path::PathBuf>| {
        let mut settings = test_settings(&unique_database("mongodb_tls"));
        settings.mongodb.uri = format!("mongodb://127.0.0.1:{}/?replicaSet=rs0", mongod.port);
        settings.mongodb.server_selection_timeout = Duration::from_secs(3);
        settings.mongodb.tls = config::MongoTlsSettings {
            enabled: true,
            ca_file: Some(pki.ca.clone()),
            certificate_key_file,
        };
        settings
    };

    let server = TestServer::start_on_database(settings(Some(pki.client_combined.clone()))).await;
    let mut client = server.journal().await;
    assert!(is_written(
        &write(&mut client, vec![atomic(vec![event("m", 1, "over tls")])]).await[0]
    ));
    let (events, _) = replay(&mut client, "m", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1]);

    // Without its client certificate the server cannot reach MongoDB, and says so at start-up.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = eventjournal::run(settings(None), listener, CancellationToken::new()).await;
    let error = format!(
        "{:#}",
        refused.expect_err("connected without a client certificate")
    );
    assert!(error.contains("cannot reach MongoDB"), "{error}");
}

//! HTTP/2 keep-alive at both ends: a connection whose peer vanished without closing it is
//! found by unanswered pings and closed. The TCP proxy plays the vanished peer: it holds
//! everything in both directions, as a dropped NAT entry or a dead host does, and closes
//! nothing. In a test binary of its own: the live-subscriber gauge is global to the process.

mod common;

use std::time::Duration;

use common::proxy::CuttableProxy;
use common::read::fast;
use common::*;
use eventjournal_client::{Client, Error, Offset};
use futures::StreamExt;
use proto::v1 as pb;
use proto::v1::read_journal_client::ReadJournalClient;
use tonic::transport::Channel;

const SUBSCRIBERS: &str = "eventjournal_live_subscribers{query=\"EventsByTag\"}";
const PINGS: Duration = Duration::from_millis(250);
/// Generous: on a loaded machine an answered ping must not look like a vanished peer.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_vanished_peers_are_closed_with_their_live_queries() {
    let port = free_port();
    let server = TestServer::start_with("keep_alive", |settings| {
        fast(settings);
        settings.server.metrics_listen = Some(([127, 0, 0, 1], port).into());
        settings.server.keep_alive_interval = PINGS;
        settings.server.keep_alive_timeout = ANSWER_WITHIN;
    })
    .await;
    let subscribers = || async move { metric(&fetch_metrics(port).await, SUBSCRIBERS) };

    // 1. The server: a client that sends no pings of its own follows a tag through the proxy.
    // While the pings are answered the connection stays; once they are not, the server closes
    // it, and the live query stops (it would poll MongoDB for nobody for ever otherwise).
    let proxy = CuttableProxy::start(server.address).await;
    let channel = Channel::from_shared(format!("http://{}", proxy.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let _live = ReadJournalClient::new(channel)
        .events_by_tag(pb::EventsByTagRequest {
            tag: "k".into(),
            offset: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(subscribers().await, Some(1.0));
    tokio::time::sleep(PINGS * 6).await;
    assert_eq!(
        subscribers().await,
        Some(1.0),
        "a connection whose pings are answered stays open"
    );
    proxy.set_delay(Duration::from_secs(3600));
    wait_until(
        "the server closes the silent connection and its live query",
        Duration::from_secs(10),
        || async { subscribers().await == Some(0.0) },
    )
    .await;

    // 2. The client: its live stream through a silent connection ends with an error once its
    // pings go unanswered (instead of waiting for events that never come), and it connects
    // again for the next call.
    let proxy = CuttableProxy::start(server.address).await;
    let client = Client::builder(format!("http://{}", proxy.address))
        .keep_alive(PINGS, ANSWER_WITHIN)
        .connect()
        .await
        .unwrap();
    let mut live = client.events_by_tag("k", Offset::start()).await.unwrap();
    assert!(
        tokio::time::timeout(PINGS * 6, live.next()).await.is_err(),
        "a stream whose connection answers pings stays open"
    );
    proxy.set_delay(Duration::from_secs(3600));
    let ended = tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .expect("the client closes the silent connection");
    assert!(
        matches!(ended, Some(Err(Error::Unavailable { .. }))),
        "{ended:?}"
    );
    proxy.set_delay(Duration::ZERO);
    assert_eq!(client.highest_sequence_nr("k").await.unwrap(), 0);
}

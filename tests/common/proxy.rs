//! A TCP proxy in front of mongod that a test can cut, restore, or slow down, to make MongoDB
//! unreachable or slow for one server without touching the shared test mongod.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CuttableProxy {
    pub address: SocketAddr,
    cut: watch::Sender<bool>,
    delay_millis: Arc<AtomicU64>,
}

impl CuttableProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (cut, cut_seen) = watch::channel(false);
        let delay_millis = Arc::new(AtomicU64::new(0));
        let delay = delay_millis.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if *cut_seen.borrow() {
                    continue; // dropped: the connection closes at once
                }
                let mut cut_seen = cut_seen.clone();
                let delay = delay.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (inbound_read, inbound_write) = inbound.into_split();
                    let (outbound_read, outbound_write) = outbound.into_split();
                    tokio::select! {
                        () = forward(inbound_read, outbound_write, delay.clone()) => {}
                        () = forward(outbound_read, inbound_write, delay) => {}
                        _ = cut_seen.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self {
            address,
            cut,
            delay_millis,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// Holds every chunk this long before passing it on, in both directions.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_millis
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

async fn forward(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    delay_millis: Arc<AtomicU64>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let delay = delay_millis.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

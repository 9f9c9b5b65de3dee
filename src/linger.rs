//! Lingering close of client connections, so that no response is cut short.
//!
//! When the server ends a connection (graceful shutdown, or an HTTP/2 GOAWAY after an error)
//! its last response can still sit in the socket's send buffer while the client reads and
//! acknowledges what came before (HTTP/2 window updates). A socket closed with unread input,
//! or receiving input after its close, is reset by the kernel, which drops that unsent tail:
//! the client sees "connection reset" instead of the end of its replay. Like nginx's
//! `lingering_close`, a connection the server ends keeps being read (and the input discarded)
//! after its write side is shut, until the client closes its side or [`LINGER_LIMIT`] passes.
//! The lingering tasks are tracked so that shutdown waits for them within its grace period.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The longest a closed connection is read for its client to close its side.
pub(crate) const LINGER_LIMIT: Duration = Duration::from_secs(30);

/// An accepted connection that, once the server is done with it, lingers until the client
/// has closed its side (see the module documentation).
pub(crate) struct LingeringStream {
    /// `None` only once dropped.
    stream: Option<TcpStream>,
    /// The client closed its side: nothing more can arrive, no need to linger.
    client_closed: bool,
    lingering: TaskTracker,
}

impl LingeringStream {
    pub(crate) fn new(stream: TcpStream, lingering: TaskTracker) -> Self {
        Self {
            stream: Some(stream),
            client_closed: false,
            lingering,
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("used after drop"))
    }
}

impl Drop for LingeringStream {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.client_closed {
            return;
        }
        // Without a runtime (process exit) there is nothing to linger with.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.lingering.spawn(linger(stream));
        }
    }
}

/// Shuts the write side (the client reads what is buffered, then end of stream) and discards
/// the client's input until it closes its side, for at most [`LINGER_LIMIT`].
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut discard = [0u8; 8192];
    let _ = tokio::time::timeout(LINGER_LIMIT, async {
        while let Ok(read) = stream.read(&mut discard).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
}

impl AsyncRead for LingeringStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.stream().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            self.client_closed = true;
        }
        polled
    }
}

impl AsyncWrite for LingeringStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(|stream| stream.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Connected for LingeringStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream
            .as_ref()
            .expect("used after drop")
            .connect_info()
    }
}

//! Plumbing shared by the listeners: accept loops, shutdown, answer delays.

use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Resolves once the simulator is shutting down (or its handle is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped: that is a shutdown too.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Accept connections until shutdown, serving each with `serve`; on shutdown every
/// connection task is aborted and awaited, so the port is free when this returns.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, mut shutdown: watch::Receiver<bool>, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "connection");
                    // Request/response traffic: do not let Nagle hold answers back.
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve(stream));
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

/// Wait `ms` milliseconds, if any.
pub(crate) async fn delay(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// What to do next on a connection driven by a sans-I/O link.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Need more bytes.
    Idle,
    /// The stream is broken: close it.
    Close,
    /// A request was consumed and gets no answer.
    Silent,
    /// Send `bytes` after `delay_ms`.
    Answer { bytes: Vec<u8>, delay_ms: u32 },
}

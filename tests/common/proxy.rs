//! A TCP proxy that can cut every connection through it: a meter or modem that drops
//! the line between requests.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// A proxy to one target.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut: broadcast::Sender<()>,
    accepted: tokio::sync::watch::Receiver<usize>,
    open: tokio::sync::watch::Receiver<usize>,
}

impl Proxy {
    /// Start forwarding `127.0.0.1:0` to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, _) = broadcast::channel(4);
        let (count_tx, accepted) = tokio::sync::watch::channel(0usize);
        let (open_tx, open) = tokio::sync::watch::channel(0usize);
        let cut2 = cut.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut client, _)) = listener.accept().await {
                n += 1;
                let _ = count_tx.send(n);
                let mut stop = cut2.subscribe();
                let open_tx = open_tx.clone();
                open_tx.send_modify(|n| *n += 1);
                tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            _ = stop.recv() => {}
                        }
                    }
                    // Both sockets are dropped here, before the count says so.
                    drop(client);
                    open_tx.send_modify(|n| *n -= 1);
                });
            }
        });
        Self { addr, cut, accepted, open }
    }

    /// Close every connection now open, and return once they are closed.
    pub async fn cut_all(&self) {
        let _ = self.cut.send(());
        let mut open = self.open.clone();
        let _ = open.wait_for(|n| *n == 0).await;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }
}

//! A TCP proxy in front of the API server whose forwarding can be paused, to simulate an
//! unreachable API server for the kubelet, the tests and the pods (the control plane's own
//! components talk to it directly and keep working).

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Pauses and resumes a running proxy. Usable from any thread or runtime.
#[derive(Clone)]
pub(crate) struct ProxySwitch {
    paused: watch::Sender<bool>,
}

impl ProxySwitch {
    /// Cuts every open connection and closes new ones at once, until [`ProxySwitch::resume`].
    pub(crate) fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub(crate) fn resume(&self) {
        self.paused.send_replace(false);
    }
}

/// Listens on a free port of 127.0.0.1 and forwards to `upstream`, on the current runtime.
pub(crate) async fn start(upstream: SocketAddr) -> io::Result<(SocketAddr, ProxySwitch)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let address = listener.local_addr()?;
    let (paused, _) = watch::channel(false);
    let switch = ProxySwitch { paused };
    let accepting = switch.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let mut paused = accepting.paused.subscribe();
            if *paused.borrow_and_update() {
                continue; // dropping the connection closes it
            }
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                forward(client, server, &mut paused).await;
            });
        }
    });
    Ok((address, switch))
}

async fn forward(mut client: TcpStream, mut server: TcpStream, paused: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = paused.wait_for(|paused| *paused) => {}
    }
}

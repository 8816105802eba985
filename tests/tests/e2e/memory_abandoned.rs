//! A waiting Allocate whose caller vanished (its host died, or the network dropped it, so no
//! reset or FIN ever arrives) is found out by HTTP/2 keepalive and leaves the queue: room freed
//! later goes to live callers, never to a grant nobody will receive and that would sit until its
//! TTL. Before transport keepalive, such a waiter stayed up to the 300 s maximum wait and was then
//! granted into the void.

use std::{net::SocketAddr, time::Duration};

use e2e::{MemoryServer, alloc, config_with_pools, pb_duration, stats};
use proto::memory::v1::{FreeRequest, memory_service_client::MemoryServiceClient};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tonic::transport::Channel;

/// A loopback TCP proxy to `target` that, once frozen, stops forwarding in both directions but
/// keeps its sockets open: to the server, the client is silent, not gone.
async fn freezable_proxy(target: SocketAddr) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let (freeze, frozen) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(target).await.expect("connect server");
            let mut frozen = frozen.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = tokio::io::copy(&mut client_read, &mut server_write);
                let down = tokio::io::copy(&mut server_read, &mut client_write);
                let froze = tokio::select! {
                    _ = up => false,
                    _ = down => false,
                    changed = frozen.wait_for(|f| *f) => changed.is_ok(),
                };
                if froze {
                    // Hold every socket open, forwarding nothing, until the test ends.
                    std::future::pending::<()>().await;
                }
                drop((client_read, client_write, server_read, server_write));
            });
        }
    });
    (addr, freeze)
}

#[tokio::test]
async fn a_waiter_whose_caller_vanished_leaves_the_queue_and_gets_nothing() {
    let mut config = config_with_pools(&[("kv-cache", 1000)]);
    config.security.transport.http2_keepalive_interval_ms = 100;
    config.security.transport.http2_keepalive_timeout_ms = 100;
    let server = MemoryServer::start(config).await;
    let mut observer = server.client().await;
    let blocker = observer.allocate(alloc(&[("kv-cache", 1000)])).await.expect("fills").into_inner();

    let (proxy, freeze) = freezable_proxy(server.addr).await;
    let channel =
        Channel::from_shared(format!("http://{proxy}")).expect("uri").connect().await.expect("connect");
    let mut victim = MemoryServiceClient::new(channel);
    let mut ask = alloc(&[("kv-cache", 500)]);
    ask.holder = "vanishes".into();
    ask.max_wait = Some(pb_duration(Duration::from_secs(10)));
    let waiting = tokio::spawn(async move { victim.allocate(ask).await });
    assert!(e2e::wait_for_waiters(&mut observer, "kv-cache", 1).await, "the victim never queued");

    freeze.send(true).expect("proxy alive");
    // Keepalive (100 ms pings, 100 ms to answer) finds the silent peer; the queue empties.
    // Bounded polling of the pool's state: the departure publishes no event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while stats(&mut observer, "kv-cache").await.waiters != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the vanished waiter is still queued");
        tokio::task::yield_now().await;
    }
    // The room freed now cannot go to the vanished caller: all of it is free for others.
    let lease_id = blocker.leases[0].lease_id.clone();
    observer.free(FreeRequest { lease_id }).await.expect("freed");
    assert_eq!(stats(&mut observer, "kv-cache").await.used_bytes, 0);
    assert!(observer.allocate(alloc(&[("kv-cache", 1000)])).await.is_ok());
    waiting.abort();
}

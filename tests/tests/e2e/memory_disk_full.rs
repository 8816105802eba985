//! A state directory that stops accepting writes (a full disk): changes are refused with
//! UNAVAILABLE and a message naming the store, no grant or renewal is acknowledged that is not
//! durable, no watcher hears of a grant that was not kept, the service accepts changes again
//! once there is room, and after a kill -9 exactly the acknowledged leases come back and a
//! watcher resumes by (epoch, sequence) with nothing missed. The disk is a 1 MiB tmpfs of the
//! test's own (this machine's tests run as root, as CI does).

use std::{collections::HashMap, process::Command, time::Duration};

use e2e::{alloc, certs::TempDir, pb_duration, process::Process};
use proto::memory::v1::{
    Event, EventKind, GetPoolStatsRequest, ListPoolsRequest, RenewLeaseRequest, WatchEventsRequest,
    memory_service_client::MemoryServiceClient, watch_events_response::Item,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

const LOG: &[(&str, &str)] = &[("RUST_LOG", "warn,memory_service=info")];

/// A 1 MiB tmpfs mounted on a fresh directory, unmounted on drop.
struct SmallDisk(TempDir);

impl SmallDisk {
    fn mount() -> Self {
        let dir = TempDir::new("memory-small-disk");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "cannot mount a tmpfs (this test needs root, as the project's CI has)");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Watches every event from `after` (0: from now) on a task of its own, so the watcher keeps up
/// with the load; a lag would fail the test, since then it could prove nothing.
async fn watch(addr: &str, epoch: u64, after: u64) -> mpsc::UnboundedReceiver<Event> {
    let request =
        WatchEventsRequest { resume_after_sequence: after, resume_epoch: epoch, ..Default::default() };
    let mut stream = connect(addr).await.watch_events(request).await.expect("watch").into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Ends with the stream: when the server is killed.
        while let Some(Ok(reply)) = stream.next().await {
            match reply.item {
                Some(Item::Event(event)) => {
                    if tx.send(event).is_err() {
                        return;
                    }
                }
                other => panic!("the watcher lagged: {other:?}"),
            }
        }
    });
    rx
}

/// Events already received.
fn drain(events: &mut mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

async fn connect(addr: &str) -> MemoryServiceClient<Channel> {
    let channel =
        Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
    MemoryServiceClient::new(channel)
}

#[tokio::test]
async fn a_full_disk_refuses_changes_acknowledges_nothing_it_did_not_keep_and_recovers() {
    let disk = SmallDisk::mount();
    let state = disk.0.path().join("state");
    let state = state.to_str().expect("utf-8").to_owned();
    let memory = Process::start(
        "memory-service",
        &["--pool", "kv-cache=1GiB", "--state-dir", &state, "--event-buffer", "65536"],
        LOG,
        false,
    );
    let mut client = connect(&memory.addr).await;
    let epoch = client.list_pools(ListPoolsRequest {}).await.expect("list").into_inner().server_epoch;
    let mut events = watch(&memory.addr, 0, 0).await;
    // A lease renewed before the disk fills, again while it is full.
    let renewed = client.allocate(alloc(&[("kv-cache", 1)])).await.expect("granted").into_inner().leases;
    let renewed = renewed[0].lease_id.clone();
    // Fill the rest of the disk, leaving a little room.
    let filler = disk.0.path().join("filler");
    let free = 1 << 20;
    let _ = std::fs::write(&filler, vec![0u8; free - (160 << 10)]);

    let mut acknowledged = HashMap::new();
    let mut refusal = None;
    for i in 0..20_000 {
        let mut ask = alloc(&[("kv-cache", 1); 64]);
        ask.holder = format!("holder-with-a-long-name-to-fill-the-disk-sooner-{i}");
        match client.allocate(ask).await {
            Ok(reply) => {
                for lease in reply.into_inner().leases {
                    acknowledged.insert(lease.lease_id, lease.size_bytes);
                }
            }
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("the disk never filled");
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(refusal.message().contains("state store"), "{}", refusal.message());
    // While it cannot write, every change is refused up front, saying why.
    let again = client.allocate(alloc(&[("kv-cache", 1)])).await.unwrap_err();
    assert_eq!(again.code(), Code::Unavailable);
    // A renewal is a change like any other: not acknowledged unless kept.
    let renewal = client.renew_lease(RenewLeaseRequest { lease_id: renewed.clone() }).await.unwrap_err();
    assert_eq!(renewal.code(), Code::Unavailable, "{renewal:?}");
    // The refused grant was taken back: only acknowledged leases hold memory.
    let used = |client: &mut MemoryServiceClient<Channel>| {
        let mut client = client.clone();
        async move {
            let stats = client.get_pool_stats(GetPoolStatsRequest { name: "kv-cache".into() }).await;
            stats.expect("reads still work").into_inner().pool.expect("pool").used_bytes
        }
    };
    assert_eq!(used(&mut client).await, acknowledged.len() as u64 + 1);

    // Room again: the service retries every second and accepts changes once a commit succeeds.
    std::fs::remove_file(&filler).expect("free the disk");
    let mut recovered = None;
    for _ in 0..1000 {
        let mut ask = alloc(&[("kv-cache", 1)]);
        ask.holder = "after".into();
        match client.allocate(ask).await {
            Ok(reply) => {
                recovered = Some(reply.into_inner().leases.remove(0));
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let recovered = recovered.expect("the service never accepted changes again");
    acknowledged.insert(recovered.lease_id.clone(), recovered.size_bytes);

    // A lease that runs out while the server is down, after the watcher heard of it. Every
    // grant the watcher heard of was acknowledged: the refused one never reached it.
    let mut short = alloc(&[("kv-cache", 1)]);
    short.ttl = Some(pb_duration(Duration::from_millis(200)));
    let short = client.allocate(short).await.expect("granted").into_inner().leases.remove(0);
    let mut heard = Vec::new();
    while !heard.iter().any(|e: &Event| e.lease_id == short.lease_id) {
        heard.push(events.recv().await.expect("the watcher hears of the short lease"));
    }
    for event in heard.iter().filter(|e| e.kind() == EventKind::Allocated) {
        let known = acknowledged.contains_key(&event.lease_id)
            || [&renewed, &short.lease_id].contains(&&event.lease_id);
        assert!(known, "a watcher heard of a grant nobody was told of: {event:?}");
    }
    assert!(
        !heard.iter().any(|e| e.kind() == EventKind::Freed),
        "a grant taken back is not an event: nothing was freed by a caller"
    );
    let last_seen = heard.last().expect("events").sequence;

    // A crash now: exactly the acknowledged leases come back.
    let addr = memory.addr.clone();
    memory.kill();
    assert!(drain(&mut events).is_empty(), "nothing changed after the short lease's grant");
    let deadline: std::time::SystemTime = short.expire_time.expect("expiry").try_into().expect("timestamp");
    if let Ok(left) = deadline.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }
    let memory = Process::start_at(
        "memory-service",
        &["--pool", "kv-cache=1GiB", "--state-dir", &state, "--listen", &addr],
        LOG,
    );
    let mut client = connect(&addr).await;
    // The watcher resumes where it was: the restore's expiry of the short lease is the next
    // event, numbered after the last one it saw in the previous life.
    let mut resumed = watch(&addr, epoch, last_seen).await;
    let next = tokio::time::timeout(Duration::from_secs(10), resumed.recv())
        .await
        .expect("the restore's expiry is replayed to a resuming watcher")
        .expect("the watch stays open");
    assert_eq!(
        (next.sequence, next.kind(), next.lease_id.as_str()),
        (last_seen + 1, EventKind::Expired, short.lease_id.as_str()),
        "{next:?}"
    );
    let other_epoch =
        WatchEventsRequest { resume_after_sequence: 1, resume_epoch: epoch ^ 1, ..Default::default() };
    let refused = client.watch_events(other_epoch).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(used(&mut client).await, acknowledged.values().sum::<u64>() + 1);
    for lease_id in acknowledged.keys() {
        client
            .renew_lease(RenewLeaseRequest { lease_id: lease_id.clone() })
            .await
            .expect("acknowledged lease kept");
    }
    memory.stop();
}

//! A state directory that stops accepting writes (a full disk): changes are refused with
//! UNAVAILABLE and a message naming the store, no grant is acknowledged that is not durable, the
//! service accepts changes again once there is room, and after a kill -9 exactly the
//! acknowledged leases come back. The disk is a 1 MiB tmpfs of the test's own (this machine's
//! tests run as root, as CI does).

use std::{collections::HashMap, process::Command, time::Duration};

use e2e::{alloc, certs::TempDir, process::Process};
use proto::memory::v1::{GetPoolStatsRequest, RenewLeaseRequest, memory_service_client::MemoryServiceClient};
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
    let memory =
        Process::start("memory-service", &["--pool", "kv-cache=1GiB", "--state-dir", &state], LOG, false);
    let mut client = connect(&memory.addr).await;
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
    // The refused grant was taken back: only acknowledged leases hold memory.
    let used = |client: &mut MemoryServiceClient<Channel>| {
        let mut client = client.clone();
        async move {
            let stats = client.get_pool_stats(GetPoolStatsRequest { name: "kv-cache".into() }).await;
            stats.expect("reads still work").into_inner().pool.expect("pool").used_bytes
        }
    };
    assert_eq!(used(&mut client).await, acknowledged.len() as u64);

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
    acknowledged.insert(recovered.lease_id, recovered.size_bytes);

    // A crash now: exactly the acknowledged leases come back.
    let addr = memory.addr.clone();
    memory.kill();
    let memory = Process::start_at(
        "memory-service",
        &["--pool", "kv-cache=1GiB", "--state-dir", &state, "--listen", &addr],
        LOG,
    );
    let mut client = connect(&addr).await;
    assert_eq!(used(&mut client).await, acknowledged.values().sum::<u64>());
    for lease_id in acknowledged.keys() {
        client
            .renew_lease(RenewLeaseRequest { lease_id: lease_id.clone() })
            .await
            .expect("acknowledged lease kept");
    }
    memory.stop();
}

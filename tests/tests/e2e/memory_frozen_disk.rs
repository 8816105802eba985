//! An Allocate whose caller resets the call while its grant waits for the commit (a disk that
//! stalls: an ext4 image frozen with fsfreeze, so the commit's fsync blocks) gets nothing: the
//! grant goes back at once, not at its TTL. Needs root for the loop mount, as CI has.

use std::{process::Command, time::Duration};

use e2e::{alloc, certs::TempDir, pb_duration, process::Process};
use proto::memory::v1::{GetPoolStatsRequest, memory_service_client::MemoryServiceClient};
use tonic::transport::Channel;

const LOG: &[(&str, &str)] = &[("RUST_LOG", "warn,memory_service=info")];

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed (this test needs root, as the project's CI has)");
}

/// A 64 MiB ext4 image loop-mounted on a fresh directory, unmounted on drop.
struct Disk {
    dir: TempDir,
}

impl Disk {
    fn mount() -> Self {
        let dir = TempDir::new("memory-frozen-disk");
        let image = dir.path().join("image");
        std::fs::File::create(&image).expect("image").set_len(64 << 20).expect("size");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        run("mkfs.ext4", &["-q", "-F", image.to_str().expect("utf-8")]);
        run("mount", &["-o", "loop", image.to_str().expect("utf-8"), mnt.to_str().expect("utf-8")]);
        Disk { dir }
    }

    fn mnt(&self) -> String {
        self.dir.path().join("mnt").to_str().expect("utf-8").to_owned()
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mnt()).status();
    }
}

/// The disk frozen: writes and fsyncs block until it is thawed, on drop whatever happens (a
/// process blocked on the disk cannot even be killed before).
struct Frozen(String);

impl Frozen {
    fn freeze(disk: &Disk) -> Self {
        run("fsfreeze", &["-f", &disk.mnt()]);
        Frozen(disk.mnt())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").args(["-u", &self.0]).status();
    }
}

async fn used(client: &mut MemoryServiceClient<Channel>) -> u64 {
    let stats = client.get_pool_stats(GetPoolStatsRequest { name: "kv-cache".into() }).await;
    stats.expect("stats").into_inner().pool.expect("pool").used_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_whose_caller_left_during_the_commit_goes_back_at_once() {
    let disk = Disk::mount();
    let state = format!("{}/state", disk.mnt());
    let memory =
        Process::start("memory-service", &["--pool", "kv-cache=1GiB", "--state-dir", &state], LOG, false);
    let channel = Channel::from_shared(format!("http://{}", memory.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = MemoryServiceClient::new(channel);
    assert_eq!(used(&mut client).await, 0);

    let frozen = Frozen::freeze(&disk);
    // The grant is made in memory, then waits for a commit that cannot reach the disk; the
    // caller gives up (its call is reset) while it waits. A long TTL: only the reset can free it.
    let mut ask = alloc(&[("kv-cache", 4096)]);
    ask.ttl = Some(pb_duration(Duration::from_secs(300)));
    let gave_up = tokio::time::timeout(Duration::from_millis(500), client.clone().allocate(ask)).await;
    assert!(gave_up.is_err(), "the grant cannot have been acknowledged while the disk is frozen");
    // A read does not hang with the disk: it waits a bounded time for the commit, then answers
    // from memory (with or without the grant: the reset may not have reached the server yet).
    let stalled = tokio::time::timeout(Duration::from_secs(5), used(&mut client)).await;
    assert!(stalled.expect("a read answers while the disk is stalled") <= 4096);
    drop(frozen);

    // Thawed: the commit goes through, with the grant already taken back.
    let mut left = used(&mut client).await;
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = used(&mut client).await;
    }
    assert_eq!(left, 0, "the grant nobody received still holds memory (until its 300 s TTL)");
    memory.stop();
}

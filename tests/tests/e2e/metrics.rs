//! Both admin ports serve Prometheus text, and the values move as a generation runs.

use e2e::{
    MemoryServer, RuntimeServer, TEST_BLOCK_BYTES, config_with_pools, runtime_config, sample, wait_for_used,
};
use proto::{
    memory::v1::CreatePoolRequest,
    runtime::v1::{GenerateRequest, generate_response::Item},
};
use tokio_stream::StreamExt;

#[tokio::test(start_paused = true)]
async fn metrics_follow_a_generation_in_both_services() {
    let memory = MemoryServer::start(config_with_pools(&[
        ("kv-cache", 64 << 20),
        ("activations", 64 << 20),
        ("uniforms", 64 << 20),
    ]))
    .await;
    let runtime = RuntimeServer::start(runtime_config(memory.addr)).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    let request = GenerateRequest {
        model: "test-webllm".into(),
        prompt: "Count the tokens.".into(),
        max_tokens: 50,
        seed: 1,
        ..GenerateRequest::default()
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    for _ in 0..5 {
        assert!(matches!(stream.next().await.unwrap().unwrap().item, Some(Item::Token(_))));
    }

    // Mid-stream. Runtime series are per model.
    let rt = runtime.scrape().await;
    let model = r#"model="test-webllm""#;
    assert_eq!(sample(&rt, "runtime_active_streams", &[]), Some(1.0), "{rt}");
    assert!(sample(&rt, "runtime_tokens_generated_total", &[model]).unwrap() >= 5.0);
    assert_eq!(sample(&rt, "runtime_time_to_first_token_seconds_count", &[model]), Some(1.0));
    assert_eq!(sample(&rt, "runtime_waiting_sequences", &[model]), Some(0.0));
    assert_eq!(sample(&rt, "runtime_running_sequences", &[model]), Some(1.0));
    assert_eq!(sample(&rt, "runtime_kv_blocks", &[model, r#"state="total""#]), Some(16.0), "one slab");
    let used = sample(&rt, "runtime_kv_blocks", &[model, r#"state="used""#]).unwrap();
    assert!((1.0..=2.0).contains(&used), "4 prompt + 5 tokens: one or two blocks ({used})");
    // Utilisation is against the whole pool (64 MiB of 4 KiB blocks), what a router compares.
    assert_eq!(sample(&rt, "runtime_kv_blocks", &[model, r#"state="capacity""#]), Some(16384.0));
    assert_eq!(sample(&rt, "runtime_kv_utilization", &[model]), Some(used / 16384.0));
    assert_eq!(sample(&rt, "runtime_kv_slabs", &[model]), Some(1.0));
    // Started calls are counted at once, with go-grpc-prometheus's grpc_type label.
    let started = [r#"grpc_type="server_stream""#, r#"grpc_method="Generate""#];
    assert_eq!(sample(&rt, "grpc_server_started_total", &started), Some(1.0));
    assert_eq!(sample(&rt, "build_info", &[r#"service="runtime-service""#]), Some(1.0));
    assert!(sample(&rt, "process_resident_memory_bytes", &[]).is_some_and(|b| b > 0.0));
    assert_eq!(
        sample(&rt, "runtime_requests_total", &[model, r#"outcome="shed""#]),
        Some(0.0),
        "present from the start"
    );
    let generate_any = [r#"grpc_method="Generate""#];
    assert_eq!(
        sample(&rt, "grpc_server_handled_total", &generate_any),
        Some(0.0),
        "present from the start, not counted before the stream ends"
    );
    let mem = memory.scrape().await;
    let kv = r#"pool="kv-cache""#;
    let slab = (16 * TEST_BLOCK_BYTES) as f64;
    assert_eq!(sample(&mem, "memory_pool_used_bytes", &[kv]), Some(slab), "{mem}");
    assert_eq!(sample(&mem, "memory_pool_live_leases", &[r#"pool="activations""#]), Some(1.0));
    assert_eq!(sample(&mem, "memory_pool_capacity_bytes", &[kv]), Some(f64::from(64 << 20)));
    let allocate_ok =
        [r#"grpc_service="memory.v1.MemoryService""#, r#"grpc_method="Allocate""#, r#"grpc_code="OK""#];
    let allocated = sample(&mem, "grpc_server_handled_total", &allocate_ok).unwrap();
    assert_eq!(allocated, 3.0, "weights, activations and one kv-cache slab");

    while let Some(item) = stream.next().await {
        item.unwrap();
    }

    // After the stream.
    let rt = runtime.scrape().await;
    assert_eq!(sample(&rt, "runtime_active_streams", &[]), Some(0.0));
    assert_eq!(sample(&rt, "runtime_tokens_generated_total", &[model]), Some(50.0));
    assert_eq!(sample(&rt, "runtime_requests_total", &[model, r#"outcome="ok""#]), Some(1.0));
    assert_eq!(sample(&rt, "runtime_inter_token_seconds_count", &[model]), Some(49.0));
    assert_eq!(sample(&rt, "runtime_memory_wait_seconds_count", &[model]), Some(1.0));
    let gpu = [r#"stage="gpu""#, r#"state="busy""#];
    let gpu_busy = sample(&rt, "runtime_device_seconds_total", &gpu).unwrap();
    assert!((gpu_busy - 0.150).abs() < 0.001, "50 steps of about 3 ms: {gpu_busy}");
    let stall = [r#"stage="gpu""#, r#"state="waiting_for_cpu""#];
    assert_eq!(sample(&rt, "runtime_device_seconds_total", &stall), Some(0.002), "only the first step's CPU");
    assert_eq!(sample(&rt, "runtime_batch_size_count", &[]), Some(50.0));
    assert_eq!(sample(&rt, "runtime_step_seconds_count", &[r#"phase="decode""#]), Some(49.0));
    assert_eq!(sample(&rt, "runtime_preemptions_total", &[]), Some(0.0));
    assert_eq!(sample(&rt, "runtime_running_sequences", &[model]), Some(0.0));
    let generate_ok = [r#"grpc_method="Generate""#, r#"grpc_code="OK""#];
    assert_eq!(
        sample(&rt, "grpc_server_handled_total", &generate_ok),
        Some(1.0),
        "counted when the stream ended"
    );
    wait_for_used(&memory, "kv-cache", 0).await;
    let mem = memory.scrape().await;
    assert_eq!(sample(&mem, "memory_pool_used_bytes", &[kv]), Some(0.0));
    assert_eq!(sample(&mem, "memory_leases_freed_total", &[kv]), Some(1.0));
    assert_eq!(sample(&mem, "memory_lease_lifetime_seconds_count", &[kv, r#"reason="freed""#]), Some(1.0));

    // A failing call is counted with its code.
    let mut pools = memory.client().await;
    let bad = pools.create_pool(CreatePoolRequest { name: "Bad Name".into(), capacity_bytes: 1 }).await;
    assert!(bad.is_err());
    let mem = memory.scrape().await;
    let invalid = [r#"grpc_method="CreatePool""#, r#"grpc_code="INVALID_ARGUMENT""#];
    assert_eq!(sample(&mem, "grpc_server_handled_total", &invalid), Some(1.0), "{mem}");
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test]
async fn a_durable_server_counts_its_group_commits() {
    let dir = e2e::certs::TempDir::new("metrics-state");
    let mut config = config_with_pools(&[("kv-cache", 64 << 20)]);
    config.state_dir = Some(dir.path().to_path_buf());
    let memory = MemoryServer::start(config).await;
    let mut client = memory.client().await;
    let granted = client.allocate(e2e::alloc(&[("kv-cache", 4096)])).await.unwrap().into_inner();
    let lease_id = granted.leases[0].lease_id.clone();
    client.free(proto::memory::v1::FreeRequest { lease_id }).await.unwrap();

    // Both changes were on disk before their replies: each took a commit of its lease and pool.
    let mem = memory.scrape().await;
    let commits = sample(&mem, "memory_store_commit_seconds_count", &[]).unwrap();
    assert!(commits >= 2.0, "{mem}");
    assert!(sample(&mem, "memory_store_commit_records_sum", &[]).unwrap() >= 4.0, "{mem}");
    memory.stop().await;

    // In memory nothing is committed.
    let memory = MemoryServer::start(config_with_pools(&[("kv-cache", 64 << 20)])).await;
    let mut client = memory.client().await;
    client.allocate(e2e::alloc(&[("kv-cache", 4096)])).await.unwrap();
    let mem = memory.scrape().await;
    assert_eq!(sample(&mem, "memory_store_commit_seconds_count", &[]), Some(0.0), "{mem}");
    memory.stop().await;
}

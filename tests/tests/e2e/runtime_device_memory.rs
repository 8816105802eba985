//! The simulated device has memory of its own: a runtime never holds more than its device does
//! (weights + activations + kv-cache ≤ 90% of it, vLLM's default gpu_memory_utilization), however
//! much memory-service's pools would grant, and says so in ListModels and its metrics.

use e2e::{MemoryServer, RuntimeServer, config_with_pools, runtime_config, sample, stats};
use proto::runtime::v1::{GenerateRequest, ListModelsRequest, generate_response::Item};
use tokio_stream::StreamExt;

/// A device of 4 MiB: 3.77 MB usable; test-webllm's weights take 1 MB and the activation
/// buffers (256 bytes a token × 2,048 tokens × 2) 1 MB, which leaves about 1.7 MB, some 6,900
/// tokens, for the kv-cache.
const DEVICE_BYTES: u64 = 4 << 20;

#[tokio::test(start_paused = true)]
async fn a_small_device_holds_at_most_its_memory_against_a_big_memory_service() {
    // memory-service has far more kv-cache than the device: 64 MiB.
    let pools = [("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];
    let memory = MemoryServer::start(config_with_pools(&pools)).await;
    let mut config = runtime_config(memory.addr);
    config.device.memory_bytes = DEVICE_BYTES;
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let client = runtime.client().await;

    // 24 generations of 256 + 256 tokens: 12,288 tokens of KV, nearly twice what fits.
    let mut streams = Vec::new();
    for seed in 0..24 {
        let request = GenerateRequest {
            model: "test-webllm".into(),
            prompt: vec!["word"; 250].join(" "),
            max_tokens: 256,
            seed,
            ..GenerateRequest::default()
        };
        streams.push(client.clone().generate(request).await.expect("accepted").into_inner());
    }
    let mut completed = 0;
    for mut stream in streams {
        while let Some(item) = stream.next().await {
            if let Some(Item::Summary(_)) = item.expect("no error").item {
                completed += 1;
            }
        }
    }
    assert_eq!(completed, 24, "every generation completes, preempted or queued as the device fills");

    // memory-service saw the runtime's kv-cache peak: never above what the device has room for.
    let kv_room = (DEVICE_BYTES - DEVICE_BYTES / 10) - 1_000_000 - 256 * 2048 * 2;
    let mut memory_client = memory.client().await;
    let kv = stats(&mut memory_client, "kv-cache").await;
    assert!(kv.peak_used_bytes > kv_room / 2, "the load filled the device: peak {}", kv.peak_used_bytes);
    assert!(
        kv.peak_used_bytes <= kv_room,
        "the runtime held {} bytes of kv-cache; its device has room for {kv_room}",
        kv.peak_used_bytes
    );
    let listed = client.clone().list_models(ListModelsRequest {}).await.expect("list").into_inner();
    let device = listed.device.expect("device");
    assert_eq!(device.usable_memory_bytes, (DEVICE_BYTES - DEVICE_BYTES / 10));
    assert_eq!(device.weights_bytes, 1_000_000, "test-webllm's weights");
    assert_eq!(device.activations_bytes, 256 * 2048 * 2);
    assert!(device.kv_cache_bytes <= kv_room);
    let metrics = runtime.scrape().await;
    let usable = sample(&metrics, "runtime_device_memory_bytes", &["use=\"usable\""]).expect("usable");
    assert_eq!(usable as u64, device.usable_memory_bytes);
    let weights = sample(&metrics, "runtime_device_memory_bytes", &["use=\"weights\""]).expect("weights");
    assert_eq!(weights as u64, 1_000_000);
    runtime.stop().await;
    memory.stop().await;
}

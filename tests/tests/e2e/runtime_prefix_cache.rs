//! The prefix cache end to end: a prompt that starts like an earlier one prefills only the rest
//! (cached tokens reported, TTFT lower, vLLM's prefix-cache counters), routers follow the cache
//! through SubscribeKvEvents (snapshot, live batches, resume, refusal), and an idle runtime's
//! cache goes back to another tenant that waits for memory, no more than that tenant needed.

use e2e::{MemoryServer, RuntimeServer, config_with_pools, runtime_config, stats};
use proto::{
    runtime::v1::{
        GenerateRequest as V1Request, Summary, generate_response::Item,
        runtime_service_client::RuntimeServiceClient,
    },
    smg::grpc::common::{SubscribeKvEventsRequest, kv_cache_event::Data},
    vllm::grpc::engine::{
        GenerateComplete, GenerateRequest, SamplingParams, TokenizedInput, generate_request::Input,
        generate_response::Response, vllm_engine_client::VllmEngineClient,
    },
};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

const POOLS: &[(&str, u64)] = &[("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];
/// A system prompt of the test model's own words, long enough for several full blocks.
const SYSTEM: &str = "She quietly opens the tensor. Their distant kernel prepares the cache. \
    It computes the steady batch. He writes the careful scheduler and she streams the token. \
    The model from a fast pipeline holds one lease. Every kernel keeps the idle pipeline.";

async fn cached_runtime(memory: &MemoryServer, instance: &str) -> RuntimeServer {
    let config = runtime_service::Config {
        prefix_caching: true,
        kv_slab_blocks: 4,
        instance: instance.into(),
        ..runtime_config(memory.addr)
    };
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    runtime
}

async fn summary(client: &mut RuntimeServiceClient<Channel>, prompt: &str) -> Summary {
    let request = V1Request {
        model: "test-webllm".into(),
        prompt: prompt.into(),
        max_tokens: 4,
        seed: 1,
        ..Default::default()
    };
    let mut stream = client.generate(request).await.expect("accepted").into_inner();
    while let Some(item) = stream.next().await {
        if let Some(Item::Summary(summary)) = item.expect("no error").item {
            return summary;
        }
    }
    panic!("no summary")
}

fn tokenized(id: &str, input_ids: Vec<u32>) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        input: Some(Input::Tokenized(TokenizedInput { original_text: String::new(), input_ids })),
        sampling_params: Some(SamplingParams {
            max_tokens: Some(2),
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..GenerateRequest::default()
    }
}

async fn complete(client: &mut VllmEngineClient<Channel>, req: GenerateRequest) -> GenerateComplete {
    let mut stream = client.generate(req).await.expect("accepted").into_inner();
    while let Some(message) = stream.next().await {
        if let Some(Response::Complete(done)) = message.expect("no error").response {
            return done;
        }
    }
    panic!("no GenerateComplete")
}

/// A prompt of `n` ids from family `family`: prompts of one family share every block.
fn ids(family: u32, n: u32) -> Vec<u32> {
    (0..n).map(|i| (family * 31 + i * 7) % 180 + 1).collect()
}

/// The kv-cache pool's stats once no lease memory-service asked for is still on its way back,
/// woken by its FREED and REVOKED events (no polling; bounded).
async fn settled(memory: &MemoryServer) -> proto::memory::v1::PoolStats {
    use proto::memory::v1::{EventKind, WatchEventsRequest};
    let mut client = memory.client().await;
    let filter = WatchEventsRequest {
        pools: vec!["kv-cache".into()],
        kinds: vec![EventKind::Freed.into(), EventKind::Revoked.into()],
        ..Default::default()
    };
    let mut events = client.watch_events(filter).await.expect("watch events").into_inner();
    loop {
        let now = stats(&mut client, "kv-cache").await;
        if now.reclaiming_bytes == 0 {
            return now;
        }
        let next = tokio::time::timeout(std::time::Duration::from_secs(60), events.next()).await;
        assert!(matches!(next, Ok(Some(Ok(_)))), "asked-for leases never came back: {now:?}");
    }
}

fn ttft(summary: &Summary) -> std::time::Duration {
    summary.time_to_first_token.and_then(|d| d.try_into().ok()).expect("a TTFT")
}

#[tokio::test(start_paused = true)]
async fn a_prompt_that_starts_like_an_earlier_one_prefills_only_the_rest() {
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    // A slow GPU, so a prefill's compute (not the weights' read) sets its time.
    let config = runtime_service::Config {
        prefix_caching: true,
        device: serving::device::DeviceSpec { flops_per_s: 1e9, ..e2e::test_device() },
        ..runtime_config(memory.addr)
    };
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let mut v1 = RuntimeServiceClient::new(runtime.channel().await);
    let first = summary(&mut v1, &format!("{SYSTEM} Explain the first thing.")).await;
    let second = summary(&mut v1, &format!("{SYSTEM} Now the second one, please.")).await;
    assert_eq!(first.cached_tokens, 0, "nothing cached yet");
    assert!(second.cached_tokens >= 16 && second.cached_tokens % 16 == 0, "{second:?}");
    assert!(second.cached_tokens < second.prompt_tokens);
    assert!(
        ttft(&second) < ttft(&first),
        "the hit shortens the prefill: {:?} vs {:?}",
        ttft(&second),
        ttft(&first)
    );
    // vLLM's counters, in tokens.
    let page = runtime.scrape().await;
    let queries = format!(
        "vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"test-webllm\"}} {}",
        first.prompt_tokens + second.prompt_tokens
    );
    let hits = format!(
        "vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"test-webllm\"}} {}",
        second.cached_tokens
    );
    assert!(page.contains(&queries) && page.contains(&hits), "{queries} / {hits} in\n{page}");
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn routers_follow_the_cache_through_kv_events() {
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let config = runtime_service::Config {
        prefix_caching: true,
        engine_model: Some("test-webllm".into()),
        ..runtime_config(memory.addr)
    };
    let runtime = RuntimeServer::start(config).await;
    e2e::wait_serving(runtime.channel().await, "vllm.grpc.engine.VllmEngine").await;
    let mut engine = VllmEngineClient::new(runtime.channel().await);
    let first = complete(&mut engine, tokenized("warm", ids(1, 40))).await;
    assert_eq!(first.cached_tokens, 0);

    // From 0: the current content first (cleared, then the two full blocks of the first prompt).
    let mut events = engine
        .subscribe_kv_events(SubscribeKvEventsRequest { start_sequence_number: 0 })
        .await
        .expect("subscribed")
        .into_inner();
    let snapshot = events.next().await.expect("a batch").expect("no error");
    let kinds: Vec<&Data> = snapshot.events.iter().filter_map(|e| e.data.as_ref()).collect();
    assert!(matches!(kinds[0], Data::Cleared(_)), "{snapshot:?}");
    let stored: Vec<_> = kinds[1..]
        .iter()
        .map(|d| match d {
            Data::Stored(s) => s.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(stored.len(), 2, "40 tokens are two full blocks of 16");
    assert_eq!(stored[0].blocks[0].token_ids, ids(1, 40)[..16]);
    assert_eq!((stored[0].blocks[0].block_size, stored[0].parent_block_hash), (16, None));
    assert_eq!(stored[1].parent_block_hash, Some(stored[0].blocks[0].block_hash), "chained");

    // Live: another prompt of the same family hits both blocks and stores its third.
    let again = complete(&mut engine, tokenized("hit", ids(1, 56))).await;
    assert_eq!(again.cached_tokens, 32);
    let live = events.next().await.expect("a batch").expect("no error");
    assert_eq!(live.sequence_number, snapshot.sequence_number + 1, "no gap after the snapshot");
    let Some(Data::Stored(third)) = live.events[0].data.clone() else { panic!("{live:?}") };
    assert_eq!(
        (third.blocks[0].token_ids.as_slice(), third.parent_block_hash),
        (&ids(1, 56)[32..48], Some(stored[1].blocks[0].block_hash))
    );

    // A router that saw `live` resumes from its number and gets it again, then what follows.
    let mut resumed = engine
        .subscribe_kv_events(SubscribeKvEventsRequest { start_sequence_number: live.sequence_number })
        .await
        .expect("kept")
        .into_inner();
    assert_eq!(
        resumed.next().await.expect("a batch").expect("no error").sequence_number,
        live.sequence_number
    );
    // A number from before this runtime's life is refused, not silently skipped.
    let old = engine
        .subscribe_kv_events(SubscribeKvEventsRequest { start_sequence_number: 1 })
        .await
        .expect_err("too old");
    assert_eq!(old.code(), Code::OutOfRange, "{old:?}");
    assert!(old.message().contains("subscribe from 0"), "{old:?}");
    runtime.stop().await;
    memory.stop().await;
}

/// Runtime A fills the kv-cache pool with cached prefixes and goes idle; B then needs memory.
/// memory-service asks A for cache-only slabs, A evicts and frees them, and B is served: within
/// the time A takes to answer (measured, printed), not A's lease TTL; A gives back what was
/// asked, no more; A's next prompt on an evicted prefix recomputes it, one on a kept prefix hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cache_goes_back_to_a_tenant_that_waits_for_memory() {
    // 8 slabs of 4 blocks (16 KiB each): A's cache takes them all.
    let slab = 4 * e2e::TEST_BLOCK_BYTES;
    let memory = MemoryServer::start(config_with_pools(&[
        ("kv-cache", 8 * slab),
        ("activations", 64 << 20),
        ("uniforms", 64 << 20),
    ]))
    .await;
    let a = cached_runtime(&memory, "a").await;
    let mut engine_a = VllmEngineClient::new(a.channel().await);
    // Ten prompts of 60 tokens (3 full blocks each, 4 blocks while running), one at a time.
    for family in 0..10 {
        complete(&mut engine_a, tokenized(&format!("fill-{family}"), ids(family, 60))).await;
    }
    let mut mem = memory.client().await;
    let full = stats(&mut mem, "kv-cache").await;
    assert!(full.used_bytes > full.capacity_bytes / 2, "A's idle cache holds most of the pool: {full:?}");
    assert!(full.reclaimable_bytes > 0, "and offers it as reclaimable: {full:?}");

    // B: caching off, one prompt needing four slabs more than the pool has free.
    let b_config =
        runtime_service::Config { kv_slab_blocks: 4, instance: "b".into(), ..runtime_config(memory.addr) };
    let b = RuntimeServer::start(b_config).await;
    b.ready().await;
    let mut engine_b = VllmEngineClient::new(b.channel().await);
    let blocks = full.available_bytes / e2e::TEST_BLOCK_BYTES + 4 * 4;
    let prompt = u32::try_from(blocks * 16 - 8).expect("small").min(250);
    let started = tokio::time::Instant::now();
    let served = complete(&mut engine_b, tokenized("tenant-b", ids(50, prompt))).await;
    eprintln!("B's {prompt}-token prompt served {:?} after asking, A's cache giving way", started.elapsed());
    assert_eq!(served.completion_tokens, 2);

    let after = settled(&memory).await;
    let returned = after.reclaim_returned_total - full.reclaim_returned_total;
    assert!(returned >= 1, "A gave slabs back for B: {after:?}");
    assert_eq!(after.revoked_total, 0, "A answered in time: nothing was revoked ({after:?})");
    // A is the only holder offering: every lease memory-service asked for (during A's own fill
    // too), A gave back, and none other.
    assert_eq!(
        after.reclaim_returned_total, after.reclaim_asked_total,
        "A gave what was asked, no more: {after:?}"
    );
    assert_eq!(after.reclaim_declined_total, 0, "{after:?}");
    let page = a.scrape().await;
    assert!(page.contains("runtime_kv_reclaimed_blocks_total{model=\"test-webllm\"}"), "{page}");

    // The oldest prefixes were evicted (LRU), the newest kept.
    let oldest = complete(&mut engine_a, tokenized("old", ids(0, 60))).await;
    let newest = complete(&mut engine_a, tokenized("new", ids(9, 60))).await;
    assert_eq!(oldest.cached_tokens, 0, "its blocks went back to memory-service: recomputed");
    assert_eq!(newest.cached_tokens, 48, "kept");
    b.stop().await;
    a.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn runtime_v1_watches_the_same_batches_and_bounds_its_subscribers() {
    use proto::runtime::v1::{WatchKvEventsRequest, kv_event::Kind};
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let runtime = cached_runtime(&memory, "watch").await;
    let mut v1 = RuntimeServiceClient::new(runtime.channel().await);
    let watch = |model: &str| WatchKvEventsRequest { model: model.into(), start_sequence_number: 0 };
    let mut batches = v1.watch_kv_events(watch("test-webllm")).await.expect("watching").into_inner();
    let snapshot = batches.next().await.expect("a batch").expect("no error");
    assert!(matches!(snapshot.events[..], [proto::runtime::v1::KvEvent { kind: Some(Kind::Cleared(_)) }]));
    let done = summary(&mut v1, SYSTEM).await;
    let live = batches.next().await.expect("a batch").expect("no error");
    assert_eq!(live.sequence_number, snapshot.sequence_number + 1);
    let stored = live.events.iter().filter(|e| matches!(e.kind, Some(Kind::Stored(_)))).count();
    assert_eq!(stored as u32, done.prompt_tokens / 16, "every full prompt block, in one step's batch");
    assert_eq!(live.block_tokens, 16);

    let unknown = v1.watch_kv_events(watch("nope")).await.expect_err("unknown model");
    assert_eq!(unknown.code(), Code::NotFound);
    let missing = v1.watch_kv_events(watch("")).await.expect_err("no model");
    assert_eq!(missing.code(), Code::InvalidArgument);
    // 64 subscriptions at once, both doors together: the next is refused until one closes.
    let mut open = Vec::new();
    for _ in 1..runtime_service::kv_events::MAX_SUBSCRIBERS {
        open.push(v1.watch_kv_events(watch("test-webllm")).await.expect("under the limit").into_inner());
    }
    let refused = v1.watch_kv_events(watch("test-webllm")).await.expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop(batches);
    tokio::task::yield_now().await;
    let _again = v1.watch_kv_events(watch("test-webllm")).await.expect("a place came free");
    runtime.stop().await;
    memory.stop().await;

    // With the cache off there is nothing to follow.
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let runtime = RuntimeServer::start(runtime_config(memory.addr)).await;
    runtime.ready().await;
    let mut v1 = RuntimeServiceClient::new(runtime.channel().await);
    let off = v1.watch_kv_events(watch("test-webllm")).await.expect_err("cache off");
    assert_eq!(off.code(), Code::FailedPrecondition);
    runtime.stop().await;
    memory.stop().await;
}

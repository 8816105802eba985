//! Generate end to end: both services on loopback, a full stream and its summary, the device's
//! scheduler, determinism, validation, and memory returned to the pools after every generation.

use std::time::Duration;

use e2e::{
    MemoryServer, RuntimeServer, TEST_BLOCK_BYTES, config_with_pools, runtime_config, stats, wait_for_used,
};
use proto::runtime::v1::{
    CancelRequest, FinishReason, GenerateRequest, GenerateResponse, ListModelsRequest, PipelineMode, Summary,
    generate_response::Item,
};
use runtime_service::core::SchedulerMode;
use tokio_stream::StreamExt;
use tonic::{Code, Status, Streaming};

/// Pools large enough for every test here.
const POOLS: &[(&str, u64)] = &[("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];

fn request(prompt: &str, max_tokens: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        model: "test-webllm".into(),
        prompt: prompt.into(),
        max_tokens,
        seed,
        temperature: 0.8,
        ..GenerateRequest::default()
    }
}

/// Reads a stream to its end: the tokens' texts and the summary, or the status it ended with.
async fn collect(mut stream: Streaming<GenerateResponse>) -> Result<(Vec<String>, Summary), Status> {
    let mut texts = Vec::new();
    while let Some(item) = stream.next().await {
        match item?.item {
            Some(Item::Token(token)) => {
                assert_eq!(token.index as usize, texts.len(), "tokens arrive in order");
                texts.push(token.text);
            }
            Some(Item::Summary(summary)) => {
                assert!(stream.next().await.is_none(), "the summary is the last item");
                return Ok((texts, summary));
            }
            None => panic!("empty item"),
        }
    }
    panic!("stream ended without a summary or a status")
}

async fn stack() -> (MemoryServer, RuntimeServer) {
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let runtime = RuntimeServer::start(runtime_config(memory.addr)).await;
    runtime.ready().await;
    (memory, runtime)
}

fn ms(d: Option<prost_types::Duration>) -> f64 {
    Duration::try_from(d.expect("duration set")).expect("non-negative").as_secs_f64() * 1e3
}

#[tokio::test(start_paused = true)]
async fn a_generation_streams_tokens_then_a_summary_and_returns_its_memory() {
    let (memory, runtime) = stack().await;
    let mut client = runtime.client().await;
    let mut pools = memory.client().await;
    let uniforms_loaded = stats(&mut pools, "uniforms").await.used_bytes;
    assert_eq!(uniforms_loaded, 1_000_000, "the preload model holds its weights");
    let activations = stats(&mut pools, "activations").await.used_bytes;
    assert_eq!(activations, 256 * 2048 * 2, "the device's double-buffered activations");

    let stream =
        client.generate(request("Explain pipelining in one paragraph.", 40, 7)).await.unwrap().into_inner();
    let (texts, summary) = collect(stream).await.unwrap();

    assert_eq!(texts.len(), 40);
    assert!(texts[0].chars().next().is_some_and(char::is_uppercase), "{texts:?}");
    assert_eq!(summary.finish_reason(), FinishReason::Length);
    assert_eq!((summary.prompt_tokens, summary.completion_tokens), (6, 40));
    assert_eq!(summary.pipeline_mode(), PipelineMode::Pipelined);
    assert_eq!(summary.scheduler, "overlapped");
    // Paged: 6 prompt tokens + 39 decoded ones hold ceil(45 / 16) = 3 blocks at the end.
    assert_eq!((summary.peak_kv_blocks, summary.kv_block_tokens), (3, 16));
    assert_eq!(summary.kv_cache_bytes, 3 * TEST_BLOCK_BYTES);
    assert_eq!(summary.activation_bytes, activations);
    assert_eq!((summary.mean_batch_size, summary.preemptions), (1.0, 0));
    assert!(!summary.request_id.is_empty());
    // Paused clock, no jitter: a decode step is 1 ms of weights + 2 ms launch (+ a few µs of
    // KV); the 2 ms CPU stage hides behind it. The first token pays CPU 2 ms + prefill 3 ms.
    let tpot = ms(summary.time_per_output_token);
    assert!((3.0..3.05).contains(&tpot), "TPOT {tpot} ms");
    let ttft = ms(summary.time_to_first_token);
    assert!((5.0..=6.0).contains(&ttft), "TTFT {ttft} ms (plus up to a 1 ms timer tick)");
    assert!((summary.tokens_per_second - 1000.0 / tpot).abs() < 0.5, "{}", summary.tokens_per_second);
    assert!((ms(summary.gpu_busy) - 40.0 * 3.0).abs() < 1.0, "{}", ms(summary.gpu_busy));
    assert!((ms(summary.gpu_idle_waiting_for_cpu) - 2.0).abs() < 1e-6, "only the first step waits");

    // The blocks went back to the device at once; the idle model's slab goes back to
    // memory-service right after (the tests' linger is zero).
    wait_for_used(&memory, "kv-cache", 0).await;
    let kv = stats(&mut pools, "kv-cache").await;
    assert_eq!((kv.granted_total, kv.live_leases), (1, 0), "one 16-block slab, no per-token calls");
    runtime.stop().await;
    for pool in ["uniforms", "activations", "kv-cache"] {
        assert_eq!(stats(&mut pools, pool).await.used_bytes, 0, "shutdown returns {pool}");
    }
    memory.stop().await;
}

/// The deprecated request field is ignored whatever it says: a value this version does not
/// know (a newer client's, as open enums allow) is served, not refused.
#[tokio::test(start_paused = true)]
async fn a_request_with_an_unknown_pipeline_mode_value_is_served() {
    let (memory, runtime) = stack().await;
    let mut client = runtime.client().await;
    #[allow(deprecated)]
    let unknown = GenerateRequest { pipeline_mode: 9, ..request("hi", 3, 0) };
    let stream = client.generate(unknown).await.expect("not refused").into_inner();
    let (texts, summary) = collect(stream).await.expect("served");
    assert_eq!((texts.len(), summary.scheduler.as_str()), (3, "overlapped"));
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_devices_scheduler_overlaps_or_not_and_never_changes_the_tokens() {
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let mut runs = Vec::new();
    for scheduler in [SchedulerMode::Overlapped, SchedulerMode::Sequential] {
        let config = runtime_service::Config { scheduler, ..runtime_config(memory.addr) };
        let runtime = RuntimeServer::start(config).await;
        runtime.ready().await;
        let mut client = runtime.client().await;
        // The request's pipeline_mode is deprecated and ignored: the device decides.
        #[allow(deprecated)]
        let req = GenerateRequest {
            pipeline_mode: PipelineMode::Pipelined.into(),
            ..request("Same prompt.", 30, 1)
        };
        runs.push(collect(client.generate(req).await.unwrap().into_inner()).await.unwrap());
        runtime.stop().await;
    }
    let ((overlapped, fast), (sequential, slow)) = (&runs[0], &runs[1]);
    assert_eq!(overlapped, sequential, "the schedule changes the timing, never the tokens");
    assert_eq!((fast.scheduler.as_str(), slow.scheduler.as_str()), ("overlapped", "sequential"));
    assert_eq!(slow.pipeline_mode(), PipelineMode::Sequential);
    // Overlapped: max(cpu 2, gpu 3) per step; sequential: cpu + gpu = 5.
    let (fast, slow) = (ms(fast.time_per_output_token), ms(slow.time_per_output_token));
    assert!((3.0..3.05).contains(&fast) && (5.0..5.05).contains(&slow), "{fast} vs {slow} ms");
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_tokens() {
    let (memory, runtime) = stack().await;
    let mut client = runtime.client().await;
    let run = |seed, model: &'static str| {
        let mut client = client.clone();
        async move {
            let mut req = request("Tell me about memory pools.", 25, seed);
            req.model = model.into();
            collect(client.generate(req).await.unwrap().into_inner()).await.unwrap().0
        }
    };
    assert_eq!(run(42, "test-webllm").await, run(42, "test-webllm").await);
    assert_ne!(run(42, "test-webllm").await, run(43, "test-webllm").await);
    // The Transformers.js-like engine loads on first use and splits long words.
    let tjs = run(42, "test-tjs").await;
    assert_eq!(tjs, run(42, "test-tjs").await);
    let listed = client.list_models(ListModelsRequest {}).await.unwrap().into_inner();
    let device = listed.device.expect("the device is described");
    assert_eq!(
        (device.name.as_str(), device.scheduler.as_str(), device.kv_block_tokens),
        ("test-gpu", "overlapped", 16)
    );
    let models = listed.models;
    assert_eq!(models.len(), 2);
    let webllm = &models[1];
    assert_eq!((webllm.uniform_bytes, webllm.kv_cache_bytes_per_token, webllm.layers), (1_000_000, 256, 2));
    // Its decode step on this device: 1 ms of weights at 1 GB/s plus the 2 ms launch.
    assert!((ms(webllm.gpu_per_token) - 3.0).abs() < 0.01);
    assert!((ms(webllm.decode_floor) - 1.0).abs() < 1e-9);
    assert!(models.iter().all(|m| m.loaded), "{models:?}");
    assert_eq!(models.iter().map(|m| m.engine.as_str()).collect::<Vec<_>>(), ["transformers-js", "webllm"]);
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_requests_are_refused_with_what_to_change() {
    let (memory, runtime) = stack().await;
    let mut client = runtime.client().await;
    let cases: Vec<(GenerateRequest, Code, &str)> = vec![
        (GenerateRequest { model: "nope".into(), ..request("hi", 1, 0) }, Code::NotFound, "ListModels"),
        (GenerateRequest { model: String::new(), ..request("hi", 1, 0) }, Code::InvalidArgument, "model"),
        (request("", 5, 0), Code::InvalidArgument, "prompt"),
        (request("   ", 5, 0), Code::InvalidArgument, "prompt"),
        (request(&"word ".repeat(300), 5, 0), Code::InvalidArgument, "at most 256"),
        (request(&"x".repeat(70_000), 5, 0), Code::InvalidArgument, "65536"),
        (request("hi", 0, 0), Code::InvalidArgument, "max_tokens"),
        (request("hi", 513, 0), Code::InvalidArgument, "1..=512"),
        (GenerateRequest { temperature: 3.0, ..request("hi", 1, 0) }, Code::InvalidArgument, "temperature"),
        (
            GenerateRequest { temperature: f32::NAN, ..request("hi", 1, 0) },
            Code::InvalidArgument,
            "temperature",
        ),
        (GenerateRequest { top_p: 1.5, ..request("hi", 1, 0) }, Code::InvalidArgument, "top_p"),
        (
            GenerateRequest { request_id: "a\nb".into(), ..request("hi", 1, 0) },
            Code::InvalidArgument,
            "request_id",
        ),
    ];
    for (req, code, needle) in cases {
        let err = client.generate(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(needle), "{needle:?} not in {:?}", err.message());
    }
    // Every violation is listed at once, in the message and as BadRequest field violations.
    let many = GenerateRequest { temperature: 3.0, top_p: 1.5, max_tokens: 0, ..request("hi", 1, 0) };
    let err = client.generate(many).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(e2e::bad_request_fields(&err), ["max_tokens", "temperature", "top_p"], "{}", err.message());
    let cancel = client.cancel(CancelRequest { request_id: "missing".into() }).await.unwrap_err();
    assert_eq!(cancel.code(), Code::NotFound);
    // An unknown model named by a megabyte is quoted cut short (its trailers would otherwise
    // overflow the client's header-list limit and hide the NOT_FOUND).
    let huge_model = GenerateRequest { model: "m".repeat(1 << 20), ..request("hi", 1, 0) };
    let err = client.generate(huge_model).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().len() + err.details().len() < 1024, "{} bytes of message", err.message().len());
    // An id no generation could have is the caller's mistake, and is not echoed at full size.
    for malformed in ["x".repeat(1 << 20), "line\nbreak".to_owned()] {
        let cancel = client.cancel(CancelRequest { request_id: malformed }).await.unwrap_err();
        assert_eq!(cancel.code(), Code::InvalidArgument, "{cancel:?}");
        assert!(cancel.message().len() < 512, "{} bytes of message", cancel.message().len());
    }
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_generation_larger_than_the_kv_pool_fails_at_once() {
    // Two 4 KiB blocks: 32 tokens, less than the 2 + 100 this generation would reach.
    let memory = MemoryServer::start(config_with_pools(&[
        ("kv-cache", 2 * TEST_BLOCK_BYTES + 100),
        ("activations", 1 << 20),
        ("uniforms", 8 << 20),
    ]))
    .await;
    let runtime = RuntimeServer::start(runtime_config(memory.addr)).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    let stream = client.generate(request("hi there", 100, 0)).await.unwrap().into_inner();
    let err = collect(stream).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("lower max_tokens"), "{}", err.message());
    // One that fits in the two blocks runs (greedy: it never ends before max_tokens).
    let greedy = GenerateRequest { temperature: 0.0, ..request("hi there", 30, 0) };
    let stream = client.generate(greedy).await.unwrap().into_inner();
    assert_eq!(collect(stream).await.unwrap().0.len(), 30);
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn reflection_lists_the_runtime_api_and_its_engine_dialect_and_resolves_error_details() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let (memory, runtime) = stack().await;
    assert_eq!(
        e2e::reflected_services(runtime.channel().await).await,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "runtime.v1.RuntimeService",
            "vllm.grpc.engine.VllmEngine"
        ]
    );
    let mut reflection = ServerReflectionClient::new(runtime.channel().await);
    let ask = |message| ServerReflectionRequest { host: String::new(), message_request: Some(message) };
    let requests = [
        ask(MessageRequest::FileContainingSymbol("google.rpc.BadRequest".into())),
        ask(MessageRequest::FileContainingSymbol("memory.v1.MemoryService".into())),
    ];
    let mut replies =
        reflection.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let details = replies.next().await.unwrap().unwrap().message_response;
    assert!(matches!(details, Some(MessageResponse::FileDescriptorResponse(_))), "{details:?}");
    let other = replies.next().await.unwrap().expect_err("memory.v1 is not served here");
    assert_eq!(other.code(), Code::NotFound, "{other:?}");
    runtime.stop().await;
    memory.stop().await;
}

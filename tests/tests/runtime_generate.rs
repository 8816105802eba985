//! Generate end to end: both services on loopback, a full stream and its summary, determinism,
//! validation, and memory returned to the pools after every generation.

use std::time::Duration;

use e2e::{MemoryServer, RuntimeServer, config_with_pools, runtime_config, stats};
use proto::runtime::v1::{
    CancelRequest, FinishReason, GenerateRequest, GenerateResponse, ListModelsRequest, PipelineMode, Summary,
    generate_response::Item,
};
use tokio::time::Instant;
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

#[tokio::test(start_paused = true)]
async fn a_generation_streams_tokens_then_a_summary_and_returns_its_memory() {
    let (memory, runtime) = stack().await;
    let mut client = runtime.client().await;
    let mut pools = memory.client().await;
    let uniforms_loaded = stats(&mut pools, "uniforms").await.used_bytes;
    assert_eq!(uniforms_loaded, 1 << 20, "the preload model holds its uniforms");

    let started = Instant::now();
    let stream =
        client.generate(request("Explain pipelining in one paragraph.", 40, 7)).await.unwrap().into_inner();
    let (texts, summary) = collect(stream).await.unwrap();
    let took = Instant::now() - started;

    assert_eq!(texts.len(), 40);
    assert!(texts[0].chars().next().is_some_and(char::is_uppercase), "{texts:?}");
    assert_eq!(summary.finish_reason(), FinishReason::Length);
    assert_eq!((summary.prompt_tokens, summary.completion_tokens), (6, 40));
    assert_eq!(summary.pipeline_mode(), PipelineMode::Pipelined);
    assert_eq!(summary.pipeline_depth, 2);
    assert_eq!(summary.kv_cache_bytes, 1024 * (6 + 40));
    assert_eq!(summary.activation_bytes, 2 * 4096);
    assert!(!summary.request_id.is_empty());
    // Paused clock, no jitter: prefill 6 × 1 ms, then min(cpu, gpu) 2 ms + 40 × max(cpu, gpu) 3 ms.
    let ms = |v: f64| Duration::from_secs_f64(v / 1000.0);
    assert_eq!(took, ms(6.0) + ms(2.0) + ms(3.0) * 40);
    let ttft = Duration::try_from(summary.time_to_first_token.unwrap()).unwrap();
    assert_eq!(ttft, ms(6.0) + ms(2.0) + ms(3.0));
    assert!((summary.tokens_per_second - 1000.0 / 3.0).abs() < 0.01, "{}", summary.tokens_per_second);
    assert_eq!(Duration::try_from(summary.gpu_idle_waiting_for_cpu.unwrap()).unwrap(), ms(2.0));

    for pool in ["kv-cache", "activations"] {
        let s = stats(&mut pools, pool).await;
        assert_eq!((s.used_bytes, s.live_leases), (0, 0), "{pool} returned before the summary was sent");
        assert_eq!(s.granted_total, 1, "{pool}: one reservation, no per-token calls");
    }
    runtime.stop().await;
    assert_eq!(stats(&mut pools, "uniforms").await.used_bytes, 0, "shutdown unloads the model");
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn sequential_mode_takes_the_sum_of_the_stages() {
    let (memory, runtime) = stack().await;
    let mut client = runtime.client().await;
    let mut req = request("Same prompt.", 30, 1);
    req.pipeline_mode = PipelineMode::Sequential.into();
    let started = Instant::now();
    let (texts, summary) = collect(client.generate(req.clone()).await.unwrap().into_inner()).await.unwrap();
    let took = Instant::now() - started;
    assert_eq!(summary.pipeline_mode(), PipelineMode::Sequential);
    let ms = |v: f64| Duration::from_secs_f64(v / 1000.0);
    assert_eq!(took, ms(3.0) + ms(5.0) * 30, "prefill + n·(cpu + gpu)");

    req.pipeline_mode = PipelineMode::Pipelined.into();
    let (pipelined, _) = collect(client.generate(req).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(texts, pipelined, "the schedule changes the timing, never the tokens");
    runtime.stop().await;
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
    let models = client.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models.len(), 2);
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
        (GenerateRequest { pipeline_mode: 9, ..request("hi", 1, 0) }, Code::InvalidArgument, "pipeline_mode"),
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
    let cancel = client.cancel(CancelRequest { request_id: "missing".into() }).await.unwrap_err();
    assert_eq!(cancel.code(), Code::NotFound);
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_generation_larger_than_a_pool_fails_at_once() {
    let memory = MemoryServer::start(config_with_pools(&[
        ("kv-cache", 10 * 1024),
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
    runtime.stop().await;
    memory.stop().await;
}

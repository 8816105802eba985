//! The engine dialect (`vllm.grpc.engine.VllmEngine`) driven from its generated stubs, as a
//! gateway drives it: exact prompt lengths, early stop against ignore_eos, Abort and dropped
//! streams returning the memory, refusals of what the simulator does not do, and GetLoads from
//! the live scheduler.

use e2e::{
    MemoryServer, RuntimeServer, bad_request_fields, config_with_pools, runtime_config, wait_for_used,
};
use proto::vllm::grpc::engine::{
    AbortRequest, GenerateComplete, GenerateRequest, GenerateResponse, GenerateStreamChunk, GetLoadsRequest,
    GetModelInfoRequest, GetServerInfoRequest, HealthCheckRequest, MultimodalInputs, SamplingParams,
    SchedulerLoad, TokenizedInput, generate_complete::MatchedStop, generate_request::Input,
    generate_response::Response, sampling_params::Constraint, vllm_engine_client::VllmEngineClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming, transport::Channel};

const POOLS: &[(&str, u64)] = &[("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];
/// "." in the test model's vocabulary (see runtime-service's engine::text).
const PERIOD: u32 = 93;

async fn stack(max_batch_size: usize) -> (MemoryServer, RuntimeServer, VllmEngineClient<Channel>) {
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let config = runtime_service::Config { max_batch_size, ..runtime_config(memory.addr) };
    let runtime = RuntimeServer::start(config).await;
    e2e::wait_serving(runtime.channel().await, "vllm.grpc.engine.VllmEngine").await;
    let client = VllmEngineClient::new(runtime.channel().await);
    (memory, runtime, client)
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| i * 7 % 90).collect()
}

fn request(id: &str, input_ids: Vec<u32>, params: SamplingParams, stream: bool) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        input: Some(Input::Tokenized(TokenizedInput { original_text: String::new(), input_ids })),
        sampling_params: Some(params),
        stream,
        ..GenerateRequest::default()
    }
}

fn params(max_tokens: u32, temperature: f32, seed: i32) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: Some(temperature),
        seed: Some(seed),
        ..Default::default()
    }
}

/// The chunks of a stream, then its GenerateComplete (which must be last).
async fn collect(mut stream: Streaming<GenerateResponse>) -> (Vec<GenerateStreamChunk>, GenerateComplete) {
    let mut chunks = Vec::new();
    while let Some(message) = stream.next().await {
        match message.expect("no error").response.expect("a response") {
            Response::Chunk(chunk) => chunks.push(chunk),
            Response::Complete(complete) => {
                assert!(stream.next().await.is_none(), "GenerateComplete is the last message");
                return (chunks, complete);
            }
        }
    }
    panic!("the stream ended without GenerateComplete")
}

async fn run(
    client: &mut VllmEngineClient<Channel>,
    req: GenerateRequest,
) -> (Vec<GenerateStreamChunk>, GenerateComplete) {
    collect(client.generate(req).await.expect("accepted").into_inner()).await
}

async fn load(client: &mut VllmEngineClient<Channel>) -> SchedulerLoad {
    let reply =
        client.get_loads(GetLoadsRequest { dp_rank: None, include: vec!["core".into(), "queues".into()] });
    let mut loads = reply.await.expect("GetLoads").into_inner();
    assert_eq!(loads.dp_rank_count, 1);
    loads.loads.pop().expect("one rank")
}

#[tokio::test(start_paused = true)]
async fn the_engine_model_is_served_with_exact_prompt_lengths_streamed_or_not() {
    let (memory, runtime, mut client) = stack(256).await;
    let health = client.health_check(HealthCheckRequest {}).await.unwrap().into_inner();
    assert!(health.healthy, "{health:?}");
    let info = client.get_model_info(GetModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.served_model_name.as_str(), info.max_context_length), ("test-webllm", 4096));
    assert_eq!(
        (info.vocab_size, info.eos_token_ids.as_slice(), info.max_req_input_len),
        (191, &[190][..], 256)
    );
    let server = client.get_server_info(GetServerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((server.server_type.as_str(), server.data_parallel_size), ("vllm-grpc", 1));

    // Greedy never ends early: exactly max_tokens, one token per chunk, the prompt as sent.
    let (chunks, complete) = run(&mut client, request("exact-1", ids(37), params(20, 0.0, 1), true)).await;
    assert_eq!(chunks.len(), 20);
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(
            (chunk.token_ids.len(), chunk.prompt_tokens, chunk.completion_tokens),
            (1, 37, i as u32 + 1)
        );
    }
    let streamed: Vec<u32> = chunks.iter().flat_map(|c| c.token_ids.clone()).collect();
    assert_eq!(complete.output_ids, streamed);
    assert_eq!(
        (complete.finish_reason.as_str(), complete.prompt_tokens, complete.completion_tokens),
        ("length", 37, 20)
    );

    // Not streaming: only GenerateComplete, with the same tokens for the same prompt.
    let (chunks, unary) = run(&mut client, request("exact-2", ids(37), params(20, 0.0, 1), false)).await;
    assert!(chunks.is_empty());
    assert_eq!(unary.output_ids, complete.output_ids);

    // Text is tokenized by the runtime's engine tokenizer.
    let text = GenerateRequest {
        input: Some(Input::Text("Hello, pipelined world!".into())),
        ..request("text", vec![], params(3, 0.0, 1), true)
    };
    let (_, complete) = run(&mut client, text).await;
    assert_eq!((complete.prompt_tokens, complete.completion_tokens), (5, 3));
    wait_for_used(&memory, "kv-cache", 0).await;
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn ignore_eos_runs_to_max_tokens_where_the_model_stops_early_and_stop_tokens_end_it() {
    let (memory, runtime, mut client) = stack(256).await;
    // A hot model ends between sentences now and then; find a seed where it ends within 400.
    let mut early = None;
    for seed in 1..40 {
        let (_, complete) =
            run(&mut client, request(&format!("free-{seed}"), ids(12), params(400, 1.0, seed), false)).await;
        if complete.finish_reason == "stop" {
            early = Some((seed, complete));
            break;
        }
        assert_eq!((complete.finish_reason.as_str(), complete.completion_tokens), ("length", 400));
    }
    let (seed, stopped) = early.expect("some seed stops early");
    assert!(stopped.completion_tokens < 400 && stopped.matched_stop.is_none(), "{stopped:?}");

    let ignoring = SamplingParams { ignore_eos: true, ..params(400, 1.0, seed) };
    let (_, full) = run(&mut client, request("ignore", ids(12), ignoring, false)).await;
    assert_eq!((full.finish_reason.as_str(), full.completion_tokens), ("length", 400));
    assert!(full.output_ids.starts_with(&stopped.output_ids), "the same tokens, then past the end");

    let min = stopped.completion_tokens + 10;
    let at_least = SamplingParams { min_tokens: min, ..params(400, 1.0, seed) };
    let (_, longer) = run(&mut client, request("min", ids(12), at_least, false)).await;
    assert!(longer.completion_tokens >= min, "{} < {min}", longer.completion_tokens);

    let period = SamplingParams { stop_token_ids: vec![PERIOD], ignore_eos: true, ..params(400, 1.0, seed) };
    let (_, sentence) = run(&mut client, request("period", ids(12), period, true)).await;
    assert_eq!(sentence.finish_reason, "stop");
    assert_eq!(sentence.output_ids.last(), Some(&PERIOD), "the stop token is the last output token");
    assert_eq!(sentence.matched_stop, Some(MatchedStop::MatchedTokenId(PERIOD)));
    assert_eq!(sentence.output_ids.iter().filter(|&&id| id == PERIOD).count(), 1);
    wait_for_used(&memory, "kv-cache", 0).await;
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn abort_returns_the_blocks_before_its_reply_and_get_loads_follows_the_scheduler() {
    let (memory, runtime, mut client) = stack(1).await;
    let idle = load(&mut client).await;
    assert_eq!((idle.num_running_reqs, idle.num_waiting_reqs, idle.num_used_tokens), (0, 0, 0));

    let long =
        |id: &str| request(id, ids(40), SamplingParams { ignore_eos: true, ..params(500, 0.0, 1) }, true);
    let mut first = client.generate(long("busy-1")).await.unwrap().into_inner();
    first.next().await.expect("a chunk").expect("no error");
    // The device takes one sequence per step here: the second one waits.
    let second = client.generate(long("busy-2")).await.unwrap().into_inner();
    let mut busy = load(&mut client).await;
    while busy.num_waiting_reqs == 0 {
        first.next().await.expect("a chunk").expect("no error");
        busy = load(&mut client).await;
    }
    assert_eq!((busy.num_running_reqs, busy.num_waiting_reqs, busy.num_total_reqs), (1, 1, 2));
    assert!(busy.num_used_tokens >= 48 && busy.num_used_tokens <= busy.max_total_num_tokens, "{busy:?}");
    assert!(busy.token_usage > 0.0 && busy.max_running_requests == 1, "{busy:?}");

    client
        .abort(AbortRequest { request_ids: vec!["busy-1".into(), "busy-2".into(), "gone".into()] })
        .await
        .unwrap();
    let after = load(&mut client).await;
    assert_eq!(
        (after.num_running_reqs, after.num_waiting_reqs, after.num_used_tokens),
        (0, 0, 0),
        "{after:?}"
    );
    let (chunks, aborted) = collect(first).await;
    assert_eq!(aborted.finish_reason, "abort");
    assert!(aborted.completion_tokens as usize > chunks.len(), "tokens read before the abort count too");
    let (_, queued) = collect(second).await;
    assert_eq!((queued.finish_reason.as_str(), queued.completion_tokens), ("abort", 0));
    wait_for_used(&memory, "kv-cache", 0).await;

    // A gateway that hangs up aborts too: the sequence's slabs go back to memory-service.
    let mut dropped = client.generate(long("dropped")).await.unwrap().into_inner();
    dropped.next().await.expect("a chunk").expect("no error");
    assert_eq!(load(&mut client).await.num_running_reqs, 1);
    drop(dropped);
    wait_for_used(&memory, "kv-cache", 0).await;
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn what_the_simulator_cannot_do_is_refused_by_field_name() {
    let (memory, runtime, mut client) = stack(256).await;
    let unsupported = SamplingParams {
        n: 2,
        logprobs: Some(1),
        min_p: 0.1,
        stop: vec!["END".into()],
        constraint: Some(Constraint::Regex("a+".into())),
        ..params(10, 0.0, 1)
    };
    let req = GenerateRequest {
        mm_inputs: Some(MultimodalInputs::default()),
        kv_transfer_params_json: Some("{}".into()),
        ..request("refused", ids(5), unsupported, true)
    };
    let status = client.generate(req).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        bad_request_fields(&status),
        [
            "sampling_params.n",
            "sampling_params.logprobs",
            "sampling_params.constraint",
            "sampling_params.stop",
            "sampling_params.min_p",
            "mm_inputs",
            "kv_transfer_params_json"
        ]
    );
    let cases: [(GenerateRequest, &[&str]); 4] = [
        (GenerateRequest { input: None, ..request("none", vec![], params(5, 0.0, 1), true) }, &["input"]),
        (request("vocab", vec![3, 191], params(5, 0.0, 1), true), &["tokenized.input_ids"]),
        (request("long", ids(257), params(5, 0.0, 1), true), &["tokenized.input_ids"]),
        (
            request(
                "max",
                ids(5),
                SamplingParams { min_tokens: 9, temperature: Some(3.0), ..params(0, 0.0, 1) },
                true,
            ),
            &["sampling_params.max_tokens", "sampling_params.min_tokens", "sampling_params.temperature"],
        ),
    ];
    for (req, fields) in cases {
        let status = client.generate(req).await.expect_err("refused");
        assert_eq!(
            (status.code(), bad_request_fields(&status)),
            (Code::InvalidArgument, fields.iter().map(|f| f.to_string()).collect())
        );
    }
    let status = client.abort(AbortRequest { request_ids: vec![] }).await.expect_err("nothing to abort");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status =
        client.get_loads(GetLoadsRequest { dp_rank: Some(1), include: vec![] }).await.expect_err("one rank");
    assert_eq!(status.code(), Code::InvalidArgument);
    runtime.stop().await;
    memory.stop().await;
}

//! vLLM's series on the runtime's admin port move with the load: the gauges a router and an
//! autoscaler read rise while generations run and queue, and fall back to zero when the load
//! stops (scale-down); the counters and histograms count every request once, as `runtime_*` do.

use e2e::{MemoryServer, RuntimeServer, config_with_pools, generate_request, runtime_config, sample};
use proto::runtime::v1::{CancelRequest, GenerateResponse, generate_response::Item};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming};

const MODEL: &str = r#"model_name="test-webllm""#;
const ENGINE: &str = r#"engine="0""#;
const GENERATIONS: usize = 6;
const POOLS: &[(&str, u64)] = &[("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];

/// A vLLM sample of the test model.
fn vllm(page: &str, name: &str, labels: &[&str]) -> f64 {
    let all: Vec<&str> = [MODEL, ENGINE].into_iter().chain(labels.iter().copied()).collect();
    sample(page, name, &all).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{page}"))
}

/// A `runtime_*` sample of the test model.
fn runtime_series(page: &str, name: &str, labels: &[&str]) -> f64 {
    let all: Vec<&str> = [r#"model="test-webllm""#].into_iter().chain(labels.iter().copied()).collect();
    sample(page, name, &all).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{page}"))
}

/// Reads to the summary: its prompt and completion token counts.
async fn finish(stream: &mut Streaming<GenerateResponse>) -> (u32, u32) {
    while let Some(item) = stream.next().await {
        if let Some(Item::Summary(s)) = item.expect("no error").item {
            return (s.prompt_tokens, s.completion_tokens);
        }
    }
    panic!("the stream ended without a summary");
}

#[tokio::test(start_paused = true)]
async fn vllm_series_rise_under_load_and_fall_to_zero_when_it_stops() {
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let mut config = runtime_config(memory.addr);
    config.max_batch_size = 2;
    config.queue_capacity = 8;
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;

    // Idle: every series is there at zero, before any request.
    let page = runtime.scrape().await;
    for gauge in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"] {
        assert_eq!(vllm(&page, gauge, &[]), 0.0, "{gauge}");
    }
    for reason in ["stop", "length", "abort"] {
        let label = format!(r#"finished_reason="{reason}""#);
        assert_eq!(vllm(&page, "vllm:request_success_total", &[&label]), 0.0);
    }
    assert_eq!(vllm(&page, "vllm:time_to_first_token_seconds_count", &[]), 0.0);

    // Load: two run (the batch is full), the rest queue; one more will be cancelled while queued.
    let mut client = runtime.client().await;
    let mut streams = Vec::new();
    for i in 0..=GENERATIONS {
        let request = generate_request(40, &format!("load-{i}"));
        streams.push(client.generate(request).await.expect("admitted").into_inner());
    }
    // Read the first stream token by token until every generation has reached the device.
    let queued = (GENERATIONS + 1 - 2) as f64;
    let mut page = String::new();
    for _ in 0..40 {
        let item = streams[0].next().await.expect("open").expect("no error");
        assert!(matches!(item.item, Some(Item::Token(_))));
        page = runtime.scrape().await;
        if vllm(&page, "vllm:num_requests_waiting", &[]) == queued {
            break;
        }
    }
    assert_eq!(vllm(&page, "vllm:num_requests_waiting", &[]), queued, "{page}");
    assert_eq!(vllm(&page, "vllm:num_requests_running", &[]), 2.0);
    // The same readings as runtime_*, taken at the same moment.
    assert_eq!(runtime_series(&page, "runtime_waiting_sequences", &[]), queued);
    assert_eq!(runtime_series(&page, "runtime_running_sequences", &[]), 2.0);
    let usage = vllm(&page, "vllm:kv_cache_usage_perc", &[]);
    assert!(usage > 0.0, "two sequences hold blocks: {usage}");
    assert_eq!(usage, runtime_series(&page, "runtime_kv_utilization", &[]));
    // The cache geometry a prefix-aware router reads: 16-token blocks, the pool's capacity.
    let capacity = runtime_series(&page, "runtime_kv_blocks", &[r#"state="capacity""#]);
    let geometry = format!(r#"num_gpu_blocks="{capacity}""#);
    assert_eq!(vllm(&page, "vllm:cache_config_info", &[r#"block_size="16""#, &geometry]), 1.0);
    assert!(vllm(&page, "vllm:time_to_first_token_seconds_count", &[]) >= 1.0);
    assert!(vllm(&page, "vllm:generation_tokens_total", &[]) > 0.0);

    // One queued generation is cancelled: it leaves the device as an abort.
    let mut cancelled = streams.pop().expect("the last one");
    client.cancel(CancelRequest { request_id: format!("load-{GENERATIONS}") }).await.expect("in flight");
    let status = loop {
        match cancelled.next().await.expect("ends with a status") {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Cancelled);

    // The load stops.
    let mut prompt_tokens = 0;
    let mut generated = 0;
    for stream in &mut streams {
        let (prompt, completion) = finish(stream).await;
        prompt_tokens += prompt;
        generated += completion;
    }
    let page = runtime.scrape().await;
    for gauge in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"] {
        assert_eq!(vllm(&page, gauge, &[]), 0.0, "{gauge} back to zero after the load:\n{page}");
    }
    // Every request counted once, by how it ended.
    let reason = |r: &str| vllm(&page, "vllm:request_success_total", &[&format!(r#"finished_reason="{r}""#)]);
    assert_eq!(reason("stop") + reason("length"), GENERATIONS as f64);
    assert_eq!(reason("abort"), 1.0);
    let finished = (GENERATIONS + 1) as f64;
    for histogram in [
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
        "vllm:request_prompt_tokens_count",
        "vllm:request_generation_tokens_count",
        "vllm:request_time_per_output_token_seconds_count",
    ] {
        assert_eq!(vllm(&page, histogram, &[]), finished, "{histogram}");
    }
    // Queued behind a full batch: some waited, and the queue time says so.
    assert!(vllm(&page, "vllm:request_queue_time_seconds_sum", &[]) > 0.0);
    // Tokens: what the clients were sent, what runtime_* counted.
    let generated = f64::from(generated);
    assert_eq!(vllm(&page, "vllm:generation_tokens_total", &[]), generated);
    assert_eq!(vllm(&page, "vllm:request_generation_tokens_sum", &[]), generated);
    assert_eq!(runtime_series(&page, "runtime_tokens_generated_total", &[]), generated);
    assert_eq!(
        vllm(&page, "vllm:prompt_tokens_total", &[]),
        f64::from(prompt_tokens),
        "the cancelled one never ran"
    );
    // Time to first token and the gaps: one per stream and one per later token, as runtime_*.
    let ttft = vllm(&page, "vllm:time_to_first_token_seconds_count", &[]);
    assert_eq!(ttft, GENERATIONS as f64);
    assert_eq!(ttft, runtime_series(&page, "runtime_time_to_first_token_seconds_count", &[]));
    let (ours, theirs) = (
        vllm(&page, "vllm:time_to_first_token_seconds_sum", &[]),
        runtime_series(&page, "runtime_time_to_first_token_seconds_sum", &[]),
    );
    assert!((ours - theirs).abs() < 1e-6, "same clock, same moments: {ours} vs {theirs}");
    let gaps = vllm(&page, "vllm:inter_token_latency_seconds_count", &[]);
    assert_eq!(gaps, generated - GENERATIONS as f64);
    assert_eq!(gaps, runtime_series(&page, "runtime_inter_token_seconds_count", &[]));
    assert_eq!(
        vllm(&page, "vllm:num_preemptions_total", &[]),
        sample(&page, "runtime_preemptions_total", &[]).expect("present")
    );
    runtime.stop().await;
    memory.stop().await;
}

//! One trace across both services: an OTLP receiver runs in this test, memory-service and
//! runtime-service run as separate processes exporting to it, and a Generate carrying the test's
//! own `traceparent` must come back as one trace with the right parents and attributes.

use std::{collections::HashMap, time::Duration};

use e2e::{
    TEST_DEVICE, TEST_MODELS,
    otlp::{Collector, attr, hex, start},
    pb_duration,
    process::Process,
    wait_serving,
};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use proto::{
    memory::v1::{
        AllocateRequest, AllocationItem, CreatePoolRequest, memory_service_client::MemoryServiceClient,
    },
    runtime::v1::{GenerateRequest, runtime_service_client::RuntimeServiceClient},
};
use tokio_stream::StreamExt;
use tonic::{Code, Request, transport::Channel};

/// An ASCII waterfall of one trace: start offset, duration, service and span name by depth.
fn waterfall<'a>(spans: &'a [(String, Span)]) -> String {
    let by_id: HashMap<&'a [u8], &'a Span> = spans.iter().map(|(_, s)| (s.span_id.as_slice(), s)).collect();
    let depth = |mut span: &'a Span| {
        let mut d = 0;
        while let Some(parent) = by_id.get(span.parent_span_id.as_slice()) {
            d += 1;
            span = parent;
        }
        d
    };
    let start = spans.iter().map(|(_, s)| s.start_time_unix_nano).min().unwrap_or_default();
    let mut rows: Vec<_> = spans.iter().collect();
    rows.sort_by_key(|(_, s)| (s.start_time_unix_nano, depth(s)));
    rows.iter()
        .map(|(service, s)| {
            format!(
                "{:>8.2} ms {:>8.2} ms  {:<16} {}{}",
                (s.start_time_unix_nano - start) as f64 / 1e6,
                (s.end_time_unix_nano - s.start_time_unix_nano) as f64 / 1e6,
                service,
                "  ".repeat(depth(s)),
                s.name
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout)] // the waterfall is the point of `--nocapture`
async fn one_trace_spans_the_caller_both_services_and_memory_calls() {
    let (otlp, received) = Collector::start().await;

    let dir = std::env::temp_dir().join(format!("tracing-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let models = dir.join("models.toml");
    std::fs::write(&models, format!("{TEST_DEVICE}{TEST_MODELS}")).unwrap();
    let memory = start(
        "memory-service",
        &["--pool", "kv-cache=64MiB,activations=64MiB,uniforms=64MiB", "--log-format", "json"],
        otlp.addr,
    );
    let memory_addr = memory.addr.clone();
    let memory_url = format!("http://{memory_addr}");
    let runtime = start(
        "runtime-service",
        &["--memory-addr", &memory_url, "--config", models.to_str().unwrap(), "--instance", "trace-test"],
        otlp.addr,
    );
    let runtime_addr = runtime.addr.clone();
    let runtime_channel =
        Channel::from_shared(format!("http://{runtime_addr}")).unwrap().connect().await.unwrap();
    wait_serving(runtime_channel.clone(), "runtime.v1.RuntimeService").await;

    // The caller's own trace: a Generate that runs to its summary.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = Request::new(GenerateRequest {
        model: "test-webllm".into(),
        prompt: "Trace this generation.".into(),
        max_tokens: 10,
        seed: 1,
        ..GenerateRequest::default()
    });
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-{caller_span}-01").parse().unwrap());
    let mut stream = RuntimeServiceClient::new(runtime_channel).generate(request).await.unwrap().into_inner();
    while let Some(item) = stream.next().await {
        item.unwrap();
    }

    // A failing call in a second trace: a wait for room that times out.
    let failing_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut memory_client =
        MemoryServiceClient::new(Channel::from_shared(memory_url.clone()).unwrap().connect().await.unwrap());
    memory_client.create_pool(CreatePoolRequest { name: "tiny".into(), capacity_bytes: 1 }).await.unwrap();
    let item = AllocationItem { pool: "tiny".into(), size_bytes: 1 };
    let hold =
        AllocateRequest { items: vec![item.clone()], holder: "test".into(), ..AllocateRequest::default() };
    memory_client.allocate(hold).await.unwrap();
    let mut waits = Request::new(AllocateRequest {
        items: vec![item],
        holder: "test".into(),
        max_wait: Some(pb_duration(Duration::from_millis(50))),
        ..AllocateRequest::default()
    });
    waits
        .metadata_mut()
        .insert("traceparent", format!("00-{failing_trace}-b7ad6b7169203331-01").parse().unwrap());
    assert_eq!(memory_client.allocate(waits).await.unwrap_err().code(), Code::ResourceExhausted);

    // Clean exits flush every span to the receiver before the processes end.
    let memory_logs = memory.logs.clone();
    runtime.stop();
    memory.stop();

    // Logs: a line emitted inside a traced request carries its trace id (JSON format here).
    let memory_logs = memory_logs.lock().expect("log buffer").clone();
    let created = memory_logs.iter().find(|l| l.contains("pool created")).expect("a 'pool created' log line");
    assert!(created.starts_with("{\"trace_id\":\""), "the trace id is a top-level field: {created}");
    let listening =
        memory_logs.iter().find(|l| l.contains("memory-service listening")).expect("listening line");
    assert!(listening.contains("\"epoch\":\""), "64-bit ids are strings in JSON: {listening}");
    let spans = received.lock().unwrap().clone();
    otlp.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();

    let trace: Vec<(String, Span)> =
        spans.iter().filter(|(_, s)| hex(&s.trace_id) == trace_id).cloned().collect();
    println!("trace {trace_id}:\n{}", waterfall(&trace));
    let services: std::collections::BTreeSet<_> = trace.iter().map(|(service, _)| service.as_str()).collect();
    assert_eq!(services, ["memory-service", "runtime-service"].into(), "one trace across both services");

    let find = |service: &str, name: &str, kind: SpanKind| {
        trace
            .iter()
            .find(|(s, span)| s == service && span.name == name && span.kind == kind as i32)
            .map(|(_, span)| span)
    };
    let root = find("runtime-service", "runtime.v1.RuntimeService/Generate", SpanKind::Server)
        .expect("Generate span");
    assert_eq!(hex(&root.parent_span_id), caller_span, "the caller's span is the root's parent");
    assert_eq!(attr(root, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attr(root, "rpc.service").as_deref(), Some("runtime.v1.RuntimeService"));
    assert_eq!(attr(root, "rpc.method").as_deref(), Some("Generate"));
    assert_eq!(attr(root, "rpc.grpc.status_code").as_deref(), Some("0"));

    let client = find("runtime-service", "memory.v1.MemoryService/Allocate", SpanKind::Client);
    let client = client.expect("runtime's client span for Allocate");
    let server = find("memory-service", "memory.v1.MemoryService/Allocate", SpanKind::Server);
    let server = server.expect("memory-service's server span for Allocate");
    assert_eq!(
        server.parent_span_id, client.span_id,
        "memory's server span continues the runtime's client span"
    );
    // The first generation on a fresh device waited for its model's first kv-cache slab: the
    // lease joins that generation's trace.
    assert!(attr(client, "memory.scope").is_some_and(|s| s.starts_with("trace-test/kv/test-webllm/")));
    for name in ["generate", "model.load", "kv.lease", "decode"] {
        assert!(find("runtime-service", name, SpanKind::Internal).is_some(), "{name} span missing");
    }
    let generate = find("runtime-service", "generate", SpanKind::Internal).expect("generate span");
    assert_eq!(attr(generate, "completion_tokens").as_deref(), Some("10"));
    assert!(
        root.end_time_unix_nano >= generate.end_time_unix_nano,
        "the server span lasts as long as the stream"
    );
    assert!(find("memory-service", "memory.allocate", SpanKind::Internal).is_some());

    let failed = spans.iter().find(|(service, s)| {
        service == "memory-service" && hex(&s.trace_id) == failing_trace && s.kind == SpanKind::Server as i32
    });
    let (_, failed) = failed.expect("the failing call's server span");
    assert_eq!(attr(failed, "rpc.grpc.status_code").as_deref(), Some("8"), "RESOURCE_EXHAUSTED recorded");
    // A caller's condition, not a server fault: per the OpenTelemetry RPC conventions the server
    // span's status stays unset (an error status would count it in the service's error rate).
    assert_eq!(failed.status.as_ref().map_or(0, |s| s.code), 0, "server span status unset");
    // Probes and reflection are not traced.
    assert!(
        spans
            .iter()
            .all(|(_, s)| !s.name.starts_with("grpc.health.") && !s.name.starts_with("grpc.reflection.")),
        "no spans for health or reflection"
    );
}

#[tokio::test]
async fn spans_that_cannot_be_delivered_are_reported_in_the_log() {
    // A collector that is not there (nothing listens on loopback port 9).
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("RUST_LOG", "info"),
    ];
    let memory = Process::start("memory-service", &["--pool", "kv-cache=1MiB"], &env, false);
    let channel = Channel::from_shared(format!("http://{}", memory.addr)).unwrap().connect().await.unwrap();
    MemoryServiceClient::new(channel).list_pools(proto::memory::v1::ListPoolsRequest {}).await.unwrap();
    // The export fails in the background: wait (bounded) for the SDK's report in the log.
    let mut reported = false;
    for _ in 0..400 {
        reported = memory
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("ExportError") || l.contains("Export.Failed"));
        if reported {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(reported, "no warning about undelivered spans: {:?}", memory.logs.lock().unwrap());
    memory.stop();
}

#[tokio::test]
async fn without_an_exporter_logs_still_carry_the_callers_trace_id() {
    // No collector configured: no exporter, and spans only where a caller sent a trace context.
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        ("RUST_LOG", "info"),
    ];
    let memory = Process::start("memory-service", &["--pool", "kv-cache=1MiB"], &env, false);
    let channel = Channel::from_shared(format!("http://{}", memory.addr)).unwrap().connect().await.unwrap();
    let mut client = MemoryServiceClient::new(channel);
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut request = Request::new(CreatePoolRequest { name: "traced".into(), capacity_bytes: 1024 });
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01").parse().unwrap());
    client.create_pool(request).await.unwrap();
    client.create_pool(CreatePoolRequest { name: "untraced".into(), capacity_bytes: 1024 }).await.unwrap();
    let logs_handle = memory.logs.clone();
    memory.stop();
    let logs = logs_handle.lock().unwrap().clone();
    let traced =
        logs.iter().find(|l| l.contains("pool created") && l.contains("pool=traced")).expect("logged");
    assert!(traced.contains(trace_id), "the caller's trace id is missing: {traced}");
    let untraced =
        logs.iter().find(|l| l.contains("pool created") && l.contains("pool=untraced")).expect("logged");
    assert!(
        !untraced.contains("trace_id="),
        "a span was built with nothing to export or continue: {untraced}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_of_the_last_generate_closes_while_the_device_is_idle() {
    let (otlp, received) = Collector::start().await;
    let dir = e2e::certs::TempDir::new("tracing-idle");
    let models = dir.path().join("models.toml");
    std::fs::write(&models, format!("{TEST_DEVICE}{TEST_MODELS}")).unwrap();
    let memory =
        start("memory-service", &["--pool", "kv-cache=64MiB,activations=64MiB,uniforms=64MiB"], otlp.addr);
    let memory_url = format!("http://{}", memory.addr);
    let runtime = start(
        "runtime-service",
        &["--memory-addr", &memory_url, "--config", models.to_str().unwrap()],
        otlp.addr,
    );
    let channel = Channel::from_shared(format!("http://{}", runtime.addr)).unwrap().connect().await.unwrap();
    wait_serving(channel.clone(), "runtime.v1.RuntimeService").await;

    // One Generate, and nothing after it: the device falls idle.
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let mut request = Request::new(GenerateRequest {
        model: "test-webllm".into(),
        prompt: "The last request before an incident.".into(),
        max_tokens: 8,
        seed: 1,
        ..GenerateRequest::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b8-01").parse().unwrap());
    let mut stream = RuntimeServiceClient::new(channel).generate(request).await.unwrap().into_inner();
    while let Some(item) = stream.next().await {
        item.unwrap();
    }
    // Its root spans are exported while both services keep running (spans are batched every
    // 100 ms here): a span held open by a leftover clone would never come.
    let roots = ["runtime.v1.RuntimeService/Generate", "generate"];
    let mut exported = Vec::new();
    for _ in 0..200 {
        exported = received
            .lock()
            .unwrap()
            .iter()
            .filter(|(service, s)| service == "runtime-service" && hex(&s.trace_id) == trace_id)
            .map(|(_, s)| s.name.clone())
            .collect();
        if roots.iter().all(|root| exported.contains(&root.to_string())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    runtime.stop();
    memory.stop();
    otlp.stop().await;
    for root in roots {
        assert!(
            exported.contains(&root.to_string()),
            "{root} was not exported within 10 s of the stream's end: {exported:?}"
        );
    }
}

//! Fuzzing every runtime-service handler with arbitrary decoded messages, over a real socket
//! against a real memory-service: nothing panics, every refusal or cut is a proper status, and
//! once the calls are over every byte of kv-cache comes back. Bounded: 64 cases in CI.

use std::time::Duration;

use e2e::{MemoryServer, RuntimeServer, config_with_pools, runtime_config};
use proptest::prelude::*;
use proto::runtime::v1::{
    CancelRequest, GenerateRequest, ListModelsRequest, runtime_service_client::RuntimeServiceClient,
};
use tonic::{Code, transport::Channel};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("test-webllm".to_owned()),
        Just(String::new()),
        "[a-z0-9-]{1,80}",
        "\\PC{0,40}",
        (1usize..50_000).prop_map(|n| "y".repeat(n)),
        Just("bad\u{0}\nid".to_owned()),
    ]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0f32), 0.0f32..2.0, Just(f32::NAN), Just(f32::INFINITY), Just(-1.0), any::<f32>()]
}

#[derive(Debug, Clone)]
enum Call {
    /// A Generate, read for at most this many messages, then dropped.
    Generate(GenerateRequest, usize),
    Cancel(String),
    ListModels,
}

fn call() -> impl Strategy<Value = Call> {
    let generate = (
        text(),
        text(),
        prop_oneof![0u32..8, Just(u32::MAX), any::<u32>()],
        any::<u64>(),
        text(),
        float(),
        float(),
        any::<i32>(),
        0usize..12,
    )
        .prop_map(|(model, prompt, max_tokens, seed, request_id, temperature, top_p, pipeline, read)| {
            #[allow(deprecated)]
            let request = GenerateRequest {
                model,
                prompt,
                max_tokens,
                seed,
                request_id,
                temperature,
                top_p,
                pipeline_mode: pipeline,
            };
            Call::Generate(request, read)
        });
    prop_oneof![generate, text().prop_map(Call::Cancel), Just(Call::ListModels)]
}

fn check(status: &tonic::Status) -> Result<(), TestCaseError> {
    e2e::proper_refusal(
        status,
        &[
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Cancelled,
            Code::OutOfRange,
        ],
    )
    .map_err(TestCaseError::fail)
}

async fn run(client: &mut RuntimeServiceClient<Channel>, call: Call) -> Result<(), TestCaseError> {
    let result = match call {
        Call::Generate(request, read) => match client.generate(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut outcome = Ok(());
                for _ in 0..read {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(status) => {
                            outcome = Err(status);
                            break;
                        }
                    }
                }
                outcome
            }
            Err(status) => Err(status),
        },
        Call::Cancel(request_id) => client.cancel(CancelRequest { request_id }).await.map(drop),
        Call::ListModels => client.list_models(ListModelsRequest {}).await.map(drop),
    };
    match result {
        Ok(()) => Ok(()),
        Err(status) => check(&status),
    }
}

#[test]
fn every_handler_answers_arbitrary_messages_with_a_proper_status() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let pools = [("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];
    let memory = runtime.block_on(MemoryServer::start(config_with_pools(&pools)));
    let server = runtime.block_on(RuntimeServer::start(runtime_config(memory.addr)));
    runtime.block_on(server.ready());
    let client = runtime.block_on(server.client());
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
    runner
        .run(&prop::collection::vec(call(), 1..12), |calls| {
            let mut client = client.clone();
            runtime.block_on(async {
                for call in calls {
                    tokio::time::timeout(Duration::from_secs(30), run(&mut client, call))
                        .await
                        .map_err(|_| TestCaseError::fail("a call hung"))??;
                }
                Ok(())
            })
        })
        .expect("no handler misbehaved");
    // Every abandoned generation gave its kv-cache back.
    runtime.block_on(e2e::wait_for_used(&memory, "kv-cache", 0));
    drop(client);
    runtime.block_on(server.stop());
    runtime.block_on(memory.stop());
}

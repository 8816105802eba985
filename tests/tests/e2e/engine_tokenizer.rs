//! GetTokenizer as a gateway uses it: the chunks reassembled, their SHA-256 checked, the zip
//! opened with the `zip` crate and `tokenizer.json` loaded with the `tokenizers` crate (what the
//! Shepherd Model Gateway's client does), then that tokenizer's counts and decoded text compared
//! with what both front doors stream for the same prompt and seed, given as text or as the ids
//! that tokenizer makes of it.

use std::io::{Cursor, Read};

use e2e::{MemoryServer, RuntimeServer, config_with_pools, runtime_config};
use proto::{
    runtime::v1::{self as rt, generate_response::Item, runtime_service_client::RuntimeServiceClient},
    smg::grpc::common::GetTokenizerRequest,
    vllm::grpc::engine::{
        GenerateRequest, GetModelInfoRequest, SamplingParams, TokenizedInput, generate_request::Input,
        generate_response::Response, vllm_engine_client::VllmEngineClient,
    },
};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;
use tokio_stream::StreamExt;

const POOLS: &[(&str, u64)] = &[("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];
const PROMPT: &str = "Explain pipelining, briefly.";

/// The bundle's files, fetched and checked as the gateway does.
async fn fetch_bundle(client: &mut VllmEngineClient<tonic::transport::Channel>) -> Vec<(String, String)> {
    let mut stream = client.get_tokenizer(GetTokenizerRequest {}).await.expect("GetTokenizer").into_inner();
    let (mut data, mut sha256) = (Vec::new(), String::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        assert!(sha256.is_empty(), "only the last chunk carries the SHA-256");
        data.extend_from_slice(&chunk.data);
        sha256 = chunk.sha256;
    }
    let digest: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sha256, digest, "the last chunk's SHA-256 is the zip's");
    let mut archive = zip::ZipArchive::new(Cursor::new(data)).expect("a zip");
    (0..archive.len())
        .map(|i| {
            let mut entry = archive.by_index(i).expect("entry");
            let mut body = String::new();
            entry.read_to_string(&mut body).expect("utf-8");
            (entry.name().expect("a name").to_string(), body)
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_served_tokenizer_counts_and_decodes_as_both_doors_stream() {
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    for key in ["test-webllm", "test-tjs"] {
        let config =
            runtime_service::Config { engine_model: Some(key.into()), ..runtime_config(memory.addr) };
        let runtime = RuntimeServer::start(config).await;
        e2e::wait_serving(runtime.channel().await, "vllm.grpc.engine.VllmEngine").await;
        let mut engine = VllmEngineClient::new(runtime.channel().await);
        let files = fetch_bundle(&mut engine).await;
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["tokenizer.json", "tokenizer_config.json", "config.json"]);
        let tokenizer = Tokenizer::from_bytes(files[0].1.as_bytes()).expect("tokenizer.json loads");
        assert!(files[1].1.contains("chat_template") && files[1].1.contains("\"eos_token\": \"</s>\""));

        let info = engine.get_model_info(GetModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.served_model_name, key);
        assert_eq!(Some(info.bos_token_id as u32), tokenizer.token_to_id("<s>"));
        assert_eq!(info.eos_token_ids, [tokenizer.token_to_id("</s>").expect("eos") as i32]);

        // The dialect, given text: its prompt count is the tokenizer's, its ids decode to the text
        // runtime.v1 streams for the same prompt and seed (both end where the model ends).
        let params = SamplingParams {
            max_tokens: Some(40),
            temperature: Some(0.8),
            top_p: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let req = GenerateRequest {
            request_id: format!("tok-{key}"),
            input: Some(Input::Text(PROMPT.into())),
            sampling_params: Some(params.clone()),
            ..GenerateRequest::default()
        };
        let mut stream = engine.generate(req).await.expect("accepted").into_inner();
        let Some(Ok(reply)) = stream.next().await else { panic!("a reply") };
        let Some(Response::Complete(complete)) = reply.response else { panic!("complete") };
        let encoded = tokenizer.encode(PROMPT, false).expect("encodes");
        assert_eq!(complete.prompt_tokens as usize, encoded.len(), "{key}");

        // A gateway sends the ids it tokenized: the same prompt, the same completion.
        let req = GenerateRequest {
            request_id: format!("ids-{key}"),
            input: Some(Input::Tokenized(TokenizedInput {
                original_text: PROMPT.into(),
                input_ids: encoded.get_ids().to_vec(),
            })),
            sampling_params: Some(params),
            ..GenerateRequest::default()
        };
        let mut stream = engine.generate(req).await.expect("accepted").into_inner();
        let Some(Ok(reply)) = stream.next().await else { panic!("a reply") };
        let Some(Response::Complete(from_ids)) = reply.response else { panic!("complete") };
        assert_eq!(from_ids.output_ids, complete.output_ids, "{key}");

        let mut runtime_v1 = RuntimeServiceClient::new(runtime.channel().await);
        let req = rt::GenerateRequest {
            model: key.into(),
            prompt: PROMPT.into(),
            max_tokens: 40,
            seed: 7,
            temperature: 0.8,
            top_p: 1.0,
            ..rt::GenerateRequest::default()
        };
        let mut stream = runtime_v1.generate(req).await.expect("accepted").into_inner();
        let mut text = String::new();
        while let Some(item) = stream.next().await {
            if let Some(Item::Token(token)) = item.expect("streamed").item {
                text.push_str(&token.text);
            }
        }
        assert!(!complete.output_ids.is_empty(), "{key}");
        assert_eq!(tokenizer.decode(&complete.output_ids, true).expect("decodes"), text, "{key}");
        runtime.stop().await;
    }
    memory.stop().await;
}

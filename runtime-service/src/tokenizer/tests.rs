use std::collections::BTreeSet;

use tokenizers::Tokenizer;

use super::*;
use crate::mock_lm::{Decoder, MockLmKind, Stops, text::Sampling};

const KINDS: [MockLmKind; 2] = [MockLmKind::Webllm, MockLmKind::TransformersJs];

fn load(kind: MockLmKind) -> Tokenizer {
    let bundle = Bundle::generate(kind.lm(), "test", 4096);
    Tokenizer::from_bytes(bundle.tokenizer_json().as_bytes()).expect("tokenizer.json loads")
}

/// The ids and the text the mock model streams for `prompt` under `seed`, `n` tokens at most.
fn stream(kind: MockLmKind, prompt: &str, seed: u64, n: usize) -> (Vec<u32>, String) {
    let hot = Sampling { temperature: 1.0, top_p: 1.0, top_k: 0 };
    let stops = Stops { ignore_eos: true, ..Stops::default() };
    let mut decoder = Decoder::primed(kind.lm(), crate::rng::fnv1a(prompt.as_bytes()), seed, hot, stops);
    std::iter::from_fn(|| decoder.next_token()).take(n).map(|t| (t.id, t.text)).unzip()
}

#[test]
fn every_id_has_one_spelling_and_every_spelling_one_id() {
    for kind in KINDS {
        let vocab = vocabulary(kind.lm());
        let spellings: BTreeSet<&String> = vocab.values().collect();
        assert_eq!(spellings.len(), vocab.len(), "{kind:?}");
        assert!(vocab.keys().all(|&id| id < kind.lm().vocab_size()), "{kind:?}");
    }
}

#[test]
fn decoding_the_streamed_ids_gives_the_streamed_text() {
    for kind in KINDS {
        let tokenizer = load(kind);
        for seed in 0..40 {
            let (ids, text) = stream(kind, &format!("prompt {seed}"), seed, 120);
            let decoded = tokenizer.decode(&ids, true).expect("decodes");
            assert_eq!(decoded, text, "{kind:?} seed {seed}");
        }
    }
}

#[test]
fn encoding_counts_prompts_as_the_mock_model_does_and_decodes_back() {
    let prompts =
        ["Hello, pipelined world!", "Explain pipelining.", " a  b\tc\n", "   ", "", "What is a KV cache?"];
    for kind in KINDS {
        let tokenizer = load(kind);
        let lm = kind.lm();
        let generated: Vec<String> = (0..20).map(|seed| stream(kind, "p", seed, 80).1).collect();
        for prompt in prompts.iter().copied().chain(generated.iter().map(String::as_str)) {
            let encoding = tokenizer.encode(prompt, false).expect("encodes");
            assert_eq!(encoding.len() as u32, lm.count_prompt_tokens(prompt), "{kind:?}: {prompt}");
        }
        for text in &generated {
            let ids = tokenizer.encode(text.as_str(), false).expect("encodes").get_ids().to_vec();
            assert_eq!(&tokenizer.decode(&ids, true).expect("decodes"), text, "{kind:?}");
        }
    }
    // Whole words: the text's ids are the very ids the mock model streamed.
    let tokenizer = load(MockLmKind::Webllm);
    let (ids, text) = stream(MockLmKind::Webllm, "q", 3, 60);
    assert_eq!(tokenizer.encode(text.as_str(), false).expect("encodes").get_ids(), ids.as_slice());
}

#[test]
fn special_tokens_are_the_mock_model_ids_and_the_zip_holds_the_three_files() {
    for kind in KINDS {
        let lm = kind.lm();
        let tokenizer = load(kind);
        let (bos, eos) = special_ids(lm);
        assert_eq!(tokenizer.token_to_id("<s>"), Some(bos));
        assert_eq!(tokenizer.token_to_id("</s>"), Some(eos));
        assert_eq!(tokenizer.token_to_id("<unk>"), Some(unknown_id(lm)));
        let bundle = Bundle::generate(lm, "test", 4096);
        let zip = bundle.zip();
        for (name, body) in &bundle.files {
            let entry = format!("{name}{body}");
            let stored = zip.windows(entry.len()).any(|w| w == entry.as_bytes());
            assert!(stored, "{name} is stored as is, after its name");
        }
        assert_eq!(&zip[zip.len() - 22..zip.len() - 18], &0x0605_4b50u32.to_le_bytes());
    }
}

#[test]
fn a_users_tokenizer_is_served_with_its_own_special_ids_and_a_bad_one_is_refused() {
    let dir = std::env::temp_dir().join(format!("rt-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("tokenizer.json");
    let own = Bundle::generate(MockLmKind::TransformersJs.lm(), "theirs", 4096);
    std::fs::write(&path, own.tokenizer_json()).expect("written");
    // Their config names <unk> as the end token: the ids follow the files, not the mock model.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": {"content": "<unk>"}}"#)
        .expect("written");
    let toml = format!(
        "[[models]]\nkey = \"m\"\nmock_lm = \"webllm\"\npreset = \"llama-3.1-8b\"\ntokenizer = {:?}\n",
        path.display().to_string()
    );
    let spec = &crate::config::parse_models(&toml).expect("parses")[0];
    let bundle = Bundle::for_model(spec).expect("loads");
    assert_eq!(bundle.tokenizer_json(), own.tokenizer_json());
    assert_eq!((bundle.bos, bundle.eos), (own.bos, unknown_id(MockLmKind::TransformersJs.lm())));
    assert_eq!(bundle.files[1].1, r#"{"eos_token": {"content": "<unk>"}}"#);
    assert_eq!(
        bundle.encode("Hello, pipelined world!").map(|ids| ids.len()),
        Some(6),
        "counted by their tokenizer"
    );

    std::fs::write(&path, "{}").expect("written");
    assert!(Bundle::for_model(spec).expect_err("not a tokenizer").contains("is not a tokenizer.json"));
    assert!(Bundle::check(spec).expect_err("refused").starts_with("model \"m\": "));
    std::fs::remove_dir_all(&dir).expect("cleaned up");
}

#[test]
fn with_a_foreign_tokenizer_the_mock_model_streams_its_ids_and_they_decode_to_the_text() {
    // The sub-word mock model's tokenizer stands in for a user's: the whole-word mock model's words are
    // cut into its pieces.
    let theirs = load(MockLmKind::TransformersJs);
    let hot = Sampling { temperature: 1.0, top_p: 1.0, top_k: 0 };
    let stops = Stops { ignore_eos: true, ..Stops::default() };
    let mut decoder = Decoder::primed(MockLmKind::Webllm.lm(), 5, 5, hot, stops)
        .with_tokenizer(Some(std::sync::Arc::new(theirs.clone())));
    let (ids, texts): (Vec<u32>, Vec<String>) =
        std::iter::from_fn(|| decoder.next_token()).take(150).map(|t| (t.id, t.text)).unzip();
    assert!(ids.iter().any(|&id| id >= PIECE_BASE), "long words come as their pieces");
    assert_eq!(theirs.decode(&ids, true).expect("decodes"), texts.concat());
}

//! Each simulated model's tokenizer as a Hugging Face bundle (`tokenizer.json`,
//! `tokenizer_config.json`, `config.json`): what a gateway in gRPC mode fetches with
//! `GetTokenizer` to tokenize prompts and detokenize the ids the engine streams.
//!
//! The bundle is generated in-process from the engine's own tables (its words, and the pieces its
//! `split` cuts them into) rather than checked in: it cannot drift from the ids the engine
//! samples, and there is no generator to rerun when the vocabulary changes. A WordLevel model
//! maps each token to the engine's id; a Metaspace pre-tokenizer and decoder carry the leading
//! spaces the engine streams, so decoding the streamed ids gives back the streamed text.

pub mod zip;

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use crate::engine::{Engine, PIECE_BASE, special_ids, text, unknown_id};

/// SentencePiece's space marker: a token's leading space, as Llama's tokenizers spell it.
const SPACE: char = '\u{2581}';
/// Zero-width space: tells apart two tokens that decode to the same text; decoding drops it.
const MARK: char = '\u{200B}';
/// Special tokens, in Llama's spelling.
const UNK: &str = "<unk>";
const BOS: &str = "<s>";
const EOS: &str = "</s>";

/// The files a gateway needs to tokenize for a model, and its special ids.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// (file name, contents) of each file, in the zip's order.
    pub files: Vec<(&'static str, String)>,
    /// Begin of sequence id.
    pub bos: u32,
    /// End of sequence id (also the pad id: Llama's tokenizers have no pad of their own).
    pub eos: u32,
}

impl Bundle {
    /// The bundle of `engine` serving model `name` with `context` tokens.
    pub fn generate(engine: &dyn Engine, name: &str, context: u32) -> Self {
        let (bos, eos) = special_ids(engine);
        let tokenizer = serde_json::to_string_pretty(&tokenizer_json(engine)).unwrap_or_default();
        let config = json!({
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "unk_token": UNK,
            "add_bos_token": false,
            "add_eos_token": false,
            "model_max_length": context,
            "tokenizer_class": "PreTrainedTokenizerFast",
            // A plain transcript: the simulated model reads no roles, so any template would do;
            // this one keeps chat prompts readable in traces.
            "chat_template": "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
        });
        let model = json!({
            "architectures": [format!("Simulated{}ForCausalLM", title(engine))],
            "model_type": "llama",
            "_name_or_path": name,
            "vocab_size": engine.vocab_size(),
            "max_position_embeddings": context,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        });
        let pretty = |v: Value| serde_json::to_string_pretty(&v).unwrap_or_default();
        Bundle {
            files: vec![
                ("tokenizer.json", tokenizer),
                ("tokenizer_config.json", pretty(config)),
                ("config.json", pretty(model)),
            ],
            bos,
            eos,
        }
    }

    /// The files as a zip archive.
    pub fn zip(&self) -> Vec<u8> {
        zip::stored(self.files.iter().map(|(name, body)| (*name, body.as_bytes())))
    }

    /// The contents of `tokenizer.json`.
    pub fn tokenizer_json(&self) -> &str {
        self.files.iter().find(|(name, _)| *name == "tokenizer.json").map_or("", |(_, body)| body)
    }
}

/// The engine's name in an architecture name (`SimulatedWebLlmForCausalLM`).
pub fn title(engine: &dyn Engine) -> &'static str {
    match engine.kind() {
        crate::engine::EngineKind::Webllm => "WebLlm",
        crate::engine::EngineKind::TransformersJs => "TransformersJs",
    }
}

/// Every token the engine can stream, by id: each word, lower-case and capitalised, with and
/// without its leading space, run through the engine's own `split`. Two ids never share a
/// spelling (a WordLevel vocabulary maps spellings to ids): a piece spelled like a word (" quiet"
/// of " quietly" and the word " quiet") is told apart by a trailing [`MARK`] the decoder drops.
pub fn vocabulary(engine: &dyn Engine) -> BTreeMap<u32, String> {
    let words = text::words_len();
    let mut pieces = VecDeque::new();
    for (id, word) in (0..).zip(text::vocabulary()) {
        for (id, word) in [(id, word.to_owned()), (id + words, text::capitalised(word))] {
            for spelled in [word.clone(), format!(" {word}")] {
                engine.split(id, spelled, &mut pieces);
            }
        }
    }
    let mut tokens = BTreeMap::new();
    tokens.insert(unknown_id(engine), UNK.to_owned());
    let (bos, eos) = special_ids(engine);
    tokens.insert(bos, BOS.into());
    tokens.insert(eos, EOS.into());
    // Words first, so that they keep their plain spelling and pieces take the mark.
    let (words, pieces): (Vec<_>, Vec<_>) = pieces.into_iter().partition(|p| p.id < PIECE_BASE);
    let mut taken: BTreeMap<String, u32> = tokens.iter().map(|(id, t)| (t.clone(), *id)).collect();
    for piece in words.into_iter().chain(pieces) {
        if tokens.contains_key(&piece.id) {
            continue;
        }
        // A word's id stands for the word wherever it falls: the space in front is the
        // decoder's to add (and to drop at the start of the text). A piece's id is its text.
        let mut token = match piece.text.trim() {
            "." if piece.id < PIECE_BASE => ".".to_owned(),
            body if piece.id < PIECE_BASE => format!("{SPACE}{body}"),
            _ => piece.text.replace(' ', &SPACE.to_string()),
        };
        while taken.contains_key(&token) {
            token.push(MARK);
        }
        taken.insert(token.clone(), piece.id);
        tokens.insert(piece.id, token);
    }
    tokens
}

/// The `tokenizer.json` of `engine`: WordLevel over [`vocabulary`], Metaspace for spaces,
/// punctuation split off as the engine counts prompts.
fn tokenizer_json(engine: &dyn Engine) -> Value {
    let vocab: serde_json::Map<String, Value> =
        vocabulary(engine).into_iter().map(|(id, token)| (token, json!(id))).collect();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let (bos, eos) = special_ids(engine);
    let metaspace = json!({"type": "Metaspace", "replacement": SPACE.to_string(),
                           "prepend_scheme": "always", "split": true});
    let mut pre = vec![metaspace.clone(), json!({"type": "Punctuation", "behavior": "Isolated"})];
    if engine.kind() == crate::engine::EngineKind::TransformersJs {
        // The engine cuts a word of more than five characters after the fifth, once: a word's
        // first five characters, when more follow, are a token of their own.
        let head = format!("^{SPACE}?[^{SPACE}]{{5}}(?=[^{SPACE}])");
        pre.push(
            json!({"type": "Split", "pattern": {"Regex": head}, "behavior": "Isolated", "invert": false}),
        );
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(unknown_id(engine), UNK), special(bos, BOS), special(eos, EOS)],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": MARK.to_string()}, "content": ""},
            metaspace,
        ]},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK},
    })
}

#[cfg(test)]
mod tests;

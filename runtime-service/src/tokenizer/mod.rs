//! Each simulated model's tokenizer as a Hugging Face bundle (`tokenizer.json`,
//! `tokenizer_config.json`, `config.json`): what a gateway in gRPC mode fetches with
//! `GetTokenizer` to tokenize prompts and detokenize the ids the mock model streams.
//!
//! The bundle is generated in-process from the mock model's own tables (its words, and the pieces its
//! `split` cuts them into) rather than checked in: it cannot drift from the ids the mock model
//! samples, and there is no generator to rerun when the vocabulary changes. A WordLevel model
//! maps each token to the mock model's id; a Metaspace pre-tokenizer and decoder carry the leading
//! spaces the mock model streams, so decoding the streamed ids gives back the streamed text.

pub mod zip;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::{
    config::ModelSpec,
    mock_lm::{MockLm, PIECE_BASE, special_ids, text, unknown_id},
};

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
    /// `tokenizer.json` loaded, to count prompts with the very file the gateway gets.
    tokenizer: Option<Arc<Tokenizer>>,
    /// Whether it is a user's own, whose ids are not the mock model's.
    foreign: bool,
}

impl Bundle {
    /// The bundle of `lm` serving model `name` with `context` tokens.
    pub fn generate(lm: &dyn MockLm, name: &str, context: u32) -> Self {
        let (bos, eos) = special_ids(lm);
        let tokenizer = serde_json::to_string_pretty(&tokenizer_json(lm)).unwrap_or_default();
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
            "architectures": [format!("Simulated{}ForCausalLM", title(lm))],
            "model_type": "llama",
            "_name_or_path": name,
            "vocab_size": lm.vocab_size(),
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
            tokenizer: None,
            foreign: false,
        }
        .loaded()
    }

    /// The bundle of `spec`: its own `tokenizer.json` if it names one (with the
    /// `tokenizer_config.json` and `config.json` next to it, generated ones where absent),
    /// else the mock model's.
    pub fn for_model(spec: &ModelSpec) -> Result<Self, String> {
        let generated = Self::generate(spec.mock_lm.lm(), &spec.key, spec.arch.context_length);
        let Some(path) = &spec.tokenizer else { return Ok(generated) };
        let read =
            |p: &std::path::Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
        let json = read(path)?;
        let tokenizer = Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| format!("{} is not a tokenizer.json: {e}", path.display()))?;
        let mut files = vec![("tokenizer.json", json)];
        for (name, body) in generated.files.into_iter().skip(1) {
            let beside = path.with_file_name(name);
            files.push((name, if beside.is_file() { read(&beside)? } else { body }));
        }
        // Special tokens as the config beside it names them, else Llama's spelling, else the
        // mock model's ids (which the user's vocabulary may not know).
        let config: Value = serde_json::from_str(&files[1].1).unwrap_or(Value::Null);
        let id = |key: &str, default: &str, fallback: u32| {
            let name = match &config[key] {
                Value::String(s) => s.as_str(),
                other => other["content"].as_str().unwrap_or(default),
            };
            tokenizer.token_to_id(name).unwrap_or(fallback)
        };
        let (bos, eos) = (id("bos_token", BOS, generated.bos), id("eos_token", EOS, generated.eos));
        Ok(Bundle { files, bos, eos, tokenizer: Some(Arc::new(tokenizer)), foreign: true })
    }

    /// Refuses, at configuration time, a user's tokenizer that does not load: it would
    /// otherwise fail only at the first request.
    pub fn check(spec: &ModelSpec) -> Result<(), String> {
        match spec.tokenizer {
            Some(_) => Self::for_model(spec).map(drop).map_err(|e| format!("model {:?}: {e}", spec.key)),
            None => Ok(()),
        }
    }

    /// With `tokenizer.json` loaded (it always loads for a generated bundle: see the tests).
    fn loaded(mut self) -> Self {
        self.tokenizer = Tokenizer::from_bytes(self.tokenizer_json().as_bytes()).ok().map(Arc::new);
        self
    }

    /// A user's own tokenizer, into whose vocabulary the mock model's words must be re-tokenized;
    /// `None` for the mock model's (its ids already are the tokenizer's).
    pub fn foreign(&self) -> Option<Arc<Tokenizer>> {
        self.tokenizer.clone().filter(|_| self.foreign)
    }

    /// Ids the tokenizer knows, special tokens included (0 if it did not load).
    pub fn vocab_size(&self) -> u32 {
        self.tokenizer.as_ref().map_or(0, |t| u32::try_from(t.get_vocab_size(true)).unwrap_or(u32::MAX))
    }

    /// The ids of `text` by this bundle's tokenizer, with no special tokens added (a gateway's
    /// completion prompt, as our tokenizer_config.json says); `None` if it could not encode.
    pub fn encode(&self, text: &str) -> Option<Vec<u32>> {
        Some(self.tokenizer.as_ref()?.encode(text, false).ok()?.get_ids().to_vec())
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

/// The mock model's name in an architecture name (`SimulatedWebLlmForCausalLM`).
pub fn title(lm: &dyn MockLm) -> &'static str {
    match lm.kind() {
        crate::mock_lm::MockLmKind::Webllm => "WebLlm",
        crate::mock_lm::MockLmKind::TransformersJs => "TransformersJs",
    }
}

/// Every token the mock model can stream, by id: each word, lower-case and capitalised, with and
/// without its leading space, run through the mock model's own `split`. Two ids never share a
/// spelling (a WordLevel vocabulary maps spellings to ids): a piece spelled like a word (" quiet"
/// of " quietly" and the word " quiet") is told apart by a trailing [`MARK`] the decoder drops.
pub fn vocabulary(lm: &dyn MockLm) -> BTreeMap<u32, String> {
    let words = text::words_len();
    let mut pieces = VecDeque::new();
    for (id, word) in (0..).zip(text::vocabulary()) {
        for (id, word) in [(id, word.to_owned()), (id + words, text::capitalised(word))] {
            for spelled in [word.clone(), format!(" {word}")] {
                lm.split(id, spelled, &mut pieces);
            }
        }
    }
    let mut tokens = BTreeMap::new();
    tokens.insert(unknown_id(lm), UNK.to_owned());
    let (bos, eos) = special_ids(lm);
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

/// The `tokenizer.json` of `lm`: WordLevel over [`vocabulary`], Metaspace for spaces,
/// punctuation split off as the mock model counts prompts.
fn tokenizer_json(lm: &dyn MockLm) -> Value {
    let vocab: serde_json::Map<String, Value> =
        vocabulary(lm).into_iter().map(|(id, token)| (token, json!(id))).collect();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let (bos, eos) = special_ids(lm);
    let metaspace = json!({"type": "Metaspace", "replacement": SPACE.to_string(),
                           "prepend_scheme": "always", "split": true});
    let mut pre = vec![metaspace.clone(), json!({"type": "Punctuation", "behavior": "Isolated"})];
    if lm.kind() == crate::mock_lm::MockLmKind::TransformersJs {
        // The mock model cuts a word of more than five characters after the fifth, once: a word's
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
        "added_tokens": [special(unknown_id(lm), UNK), special(bos, BOS), special(eos, EOS)],
        // The mock model counts words between runs of whitespace: runs become one space, and the
        // ends are trimmed, so "   " has no token and "a  b" two.
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Strip", "strip_left": true, "strip_right": true},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
        ]},
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

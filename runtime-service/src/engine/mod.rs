//! Simulated inference engines: the seed's MockWebLLMEngine and MockTransformersJSEngine.
//!
//! An engine is a tokenizer (how text becomes tokens) and a sampling style; the words come from the
//! shared [`text::LanguageModel`]. Timing comes from the device's roofline, not from here, so the
//! same engine runs under tokio's paused clock in tests and in real time in production.

mod rng;
pub mod text;

use std::{collections::VecDeque, fmt};

pub use self::rng::{SplitMix64, fnv1a, mix};
use self::text::{LanguageModel, Sampling, Word};

/// Which simulated engine a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// WebLLM-like: WebGPU compute, whole-word tokens.
    Webllm,
    /// Transformers.js-like: WASM/WebGPU, sub-word tokens (long words split in pieces).
    TransformersJs,
}

impl EngineKind {
    /// Name as shown in ListModels and config files.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Webllm => "webllm",
            EngineKind::TransformersJs => "transformers-js",
        }
    }

    /// The engine implementation.
    pub fn engine(self) -> &'static dyn Engine {
        match self {
            EngineKind::Webllm => &WebLlm,
            EngineKind::TransformersJs => &TransformersJs,
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOut {
    /// Id in the engine's vocabulary.
    pub id: u32,
    /// Text, with its leading space if any.
    pub text: String,
}

/// A simulated engine: how it tokenizes.
pub trait Engine: Send + Sync + fmt::Debug {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;
    /// Splits one word (with its leading space) into tokens.
    fn split(&self, id: u32, text: String, out: &mut VecDeque<TokenOut>);
    /// Number of tokens `prompt` costs.
    fn count_prompt_tokens(&self, prompt: &str) -> u32;
}

/// WebLLM-like engine: one token per word or punctuation mark.
#[derive(Debug)]
pub struct WebLlm;

impl Engine for WebLlm {
    fn kind(&self) -> EngineKind {
        EngineKind::Webllm
    }

    fn split(&self, id: u32, text: String, out: &mut VecDeque<TokenOut>) {
        out.push_back(TokenOut { id, text });
    }

    fn count_prompt_tokens(&self, prompt: &str) -> u32 {
        words_and_marks(prompt).count() as u32
    }
}

/// Transformers.js-like engine: sub-word tokens (words longer than five characters split after
/// the fifth).
#[derive(Debug)]
pub struct TransformersJs;

/// Piece ids live above the word vocabulary.
const PIECE_BASE: u32 = 1 << 16;

impl Engine for TransformersJs {
    fn kind(&self) -> EngineKind {
        EngineKind::TransformersJs
    }

    fn split(&self, id: u32, text: String, out: &mut VecDeque<TokenOut>) {
        let body = text.trim_start().chars().count();
        if body <= 5 {
            out.push_back(TokenOut { id, text });
            return;
        }
        let lead = usize::from(text.starts_with(' '));
        let cut = text.char_indices().nth(lead + 5).map_or(text.len(), |(i, _)| i);
        let (head, tail) = text.split_at(cut);
        let piece_id = |s: &str| PIECE_BASE + (fnv1a(s.as_bytes()) % 30_000) as u32;
        out.push_back(TokenOut { id: piece_id(head), text: head.to_owned() });
        out.push_back(TokenOut { id: piece_id(tail), text: tail.to_owned() });
    }

    fn count_prompt_tokens(&self, prompt: &str) -> u32 {
        words_and_marks(prompt).map(|w| if w.chars().count() > 5 { 2 } else { 1 }).sum()
    }
}

/// Words and punctuation marks of `text`.
fn words_and_marks(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c.is_whitespace()).filter(|w| !w.is_empty()).flat_map(|w| {
        let end = w.trim_end_matches(|c: char| c.is_ascii_punctuation()).len();
        let (word, marks) = w.split_at(end);
        let marks = marks.char_indices().map(move |(i, c)| &marks[i..i + c.len_utf8()]);
        std::iter::once(word).filter(|s| !s.is_empty()).chain(marks)
    })
}

/// Produces the tokens of one generation: words from the language model, split by the engine.
#[derive(Debug)]
pub struct Decoder {
    engine: &'static dyn Engine,
    model: LanguageModel,
    pending: VecDeque<TokenOut>,
}

impl Decoder {
    /// A decoder for `prompt` under `seed` and `sampling`.
    pub fn new(engine: &'static dyn Engine, prompt: &str, seed: u64, sampling: Sampling) -> Self {
        Decoder {
            engine,
            model: LanguageModel::new(fnv1a(prompt.as_bytes()), seed, sampling),
            pending: VecDeque::new(),
        }
    }

    /// The next token, or `None` at the end of the sequence.
    pub fn next_token(&mut self) -> Option<TokenOut> {
        if self.pending.is_empty() {
            match self.model.next_word() {
                Word::Word { id, text } => self.engine.split(id, text, &mut self.pending),
                Word::End => return None,
            }
        }
        self.pending.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WARM: Sampling = Sampling { temperature: 0.7, top_p: 0.9 };

    fn tokens(kind: EngineKind, seed: u64, n: usize) -> Vec<TokenOut> {
        let mut decoder = Decoder::new(kind.engine(), "Explain pipelining.", seed, WARM);
        std::iter::from_fn(|| decoder.next_token()).take(n).collect()
    }

    #[test]
    fn engines_tokenize_differently_but_spell_the_same_text() {
        let words: String = tokens(EngineKind::Webllm, 5, 30).iter().map(|t| t.text.as_str()).collect();
        let pieces = tokens(EngineKind::TransformersJs, 5, 60);
        let joined: String = pieces.iter().map(|t| t.text.as_str()).collect();
        assert!(joined.starts_with(&words[..words.len().min(joined.len())]) || words.starts_with(&joined));
        assert!(pieces.iter().any(|t| t.id >= PIECE_BASE), "long words are split");
    }

    #[test]
    fn prompt_token_counts() {
        assert_eq!(WebLlm.count_prompt_tokens("Hello, pipelined world!"), 5);
        assert_eq!(TransformersJs.count_prompt_tokens("Hello, pipelined world!"), 6);
        assert_eq!(WebLlm.count_prompt_tokens("   "), 0);
    }

    #[test]
    fn same_seed_same_tokens() {
        assert_eq!(tokens(EngineKind::TransformersJs, 9, 50), tokens(EngineKind::TransformersJs, 9, 50));
    }
}

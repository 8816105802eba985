//! The mock language models: what the seed called MockWebLLMEngine and MockTransformersJSEngine.
//! They are not engines (the engine is [`crate::core`]): each is a tokenization (how text becomes
//! tokens) over the shared word list and sampling of [`text::LanguageModel`]. Timing comes from
//! the device's roofline, not from here, so the same words come out under tokio's paused clock in
//! tests and in real time in production.

pub mod text;

use std::{collections::VecDeque, fmt, sync::Arc};

use tokenizers::Tokenizer;

use crate::rng::fnv1a;

use self::text::{LanguageModel, Sampling, Word};

/// Which mock language model a model generates with (config key `mock_lm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MockLmKind {
    /// WebLLM-like: WebGPU compute, whole-word tokens.
    Webllm,
    /// Transformers.js-like: WASM/WebGPU, sub-word tokens (long words split in pieces).
    TransformersJs,
}

impl MockLmKind {
    /// Name as shown in ListModels and config files.
    pub fn name(self) -> &'static str {
        match self {
            MockLmKind::Webllm => "webllm",
            MockLmKind::TransformersJs => "transformers-js",
        }
    }

    /// The implementation.
    pub fn lm(self) -> &'static dyn MockLm {
        match self {
            MockLmKind::Webllm => &WebLlm,
            MockLmKind::TransformersJs => &TransformersJs,
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOut {
    /// Id in the model's vocabulary.
    pub id: u32,
    /// Text, with its leading space if any.
    pub text: String,
}

/// A mock language model: how it tokenizes.
pub trait MockLm: Send + Sync + fmt::Debug {
    /// Which one this is.
    fn kind(&self) -> MockLmKind;
    /// Splits one word (with its leading space) into tokens.
    fn split(&self, id: u32, text: String, out: &mut VecDeque<TokenOut>);
    /// Number of tokens `prompt` costs by the mock model's own reading; prompts are counted with
    /// the model's tokenizer (`tokenizer::Bundle`), which agrees, and this is its fallback.
    fn count_prompt_tokens(&self, prompt: &str) -> u32;
    /// Ids the mock model knows: its words, capitalised words (and pieces), then its three special
    /// tokens: unknown, begin and end (see [`unknown_id`] and [`special_ids`]).
    fn vocab_size(&self) -> u32;
}

/// The (begin, end) of sequence ids: the last two of the vocabulary. Prompts may carry them;
/// the model's end of sequence is a step that samples the end (see [`Stops`]), not a streamed
/// token, so completions never contain it.
pub fn special_ids(lm: &dyn MockLm) -> (u32, u32) {
    let size = lm.vocab_size();
    (size - 2, size - 1)
}

/// A prompt's hash from its token ids: the same ids always prime the same completion,
/// whichever door they came through (a gateway's ids, or text tokenized here).
pub fn hash_ids(ids: &[u32]) -> u64 {
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    fnv1a(&bytes)
}

/// The id a tokenizer gives a word it does not know: just below the begin and end ids.
pub fn unknown_id(lm: &dyn MockLm) -> u32 {
    lm.vocab_size() - 3
}

/// WebLLM-like: one token per word or punctuation mark.
#[derive(Debug)]
pub struct WebLlm;

impl MockLm for WebLlm {
    fn kind(&self) -> MockLmKind {
        MockLmKind::Webllm
    }

    fn split(&self, id: u32, text: String, out: &mut VecDeque<TokenOut>) {
        out.push_back(TokenOut { id, text });
    }

    fn count_prompt_tokens(&self, prompt: &str) -> u32 {
        words_and_marks(prompt).count() as u32
    }

    fn vocab_size(&self) -> u32 {
        2 * text::words_len() + 3
    }
}

/// Transformers.js-like: sub-word tokens (words longer than five characters split after
/// the fifth).
#[derive(Debug)]
pub struct TransformersJs;

/// Piece ids live above the word vocabulary.
pub const PIECE_BASE: u32 = 1 << 16;
/// Distinct piece ids.
const PIECES: u32 = 30_000;

impl MockLm for TransformersJs {
    fn kind(&self) -> MockLmKind {
        MockLmKind::TransformersJs
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
        let piece_id = |s: &str| PIECE_BASE + (fnv1a(s.as_bytes()) % u64::from(PIECES)) as u32;
        out.push_back(TokenOut { id: piece_id(head), text: head.to_owned() });
        out.push_back(TokenOut { id: piece_id(tail), text: tail.to_owned() });
    }

    fn count_prompt_tokens(&self, prompt: &str) -> u32 {
        words_and_marks(prompt).map(|w| if w.chars().count() > 5 { 2 } else { 1 }).sum()
    }

    fn vocab_size(&self) -> u32 {
        PIECE_BASE + PIECES + 3
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

/// When a sequence may end before max_tokens, as vLLM's `check_stop` decides it.
///
/// The simulated model's end of sequence is a step that samples "end" instead of a word (see
/// [`LanguageModel::next_word`]): the step is paid for, but no token is streamed or counted,
/// as a detokenizer hides an EOS token. Greedy decoding never ends early.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stops {
    /// No end (of sequence or by stop token) before this many tokens: the model's end is
    /// skipped, as vLLM masks EOS and stop tokens below `min_tokens`.
    pub min_tokens: u32,
    /// Never end at the model's end of sequence: run to max_tokens (or a stop token).
    pub ignore_eos: bool,
    /// Tokens that end the sequence once emitted (they are part of the output, as in vLLM).
    pub stop_token_ids: Vec<u32>,
}

/// Produces the tokens of one generation: words from the language model, split by the mock model's tokenization.
#[derive(Debug)]
pub struct Decoder {
    lm: &'static dyn MockLm,
    model: LanguageModel,
    pending: VecDeque<TokenOut>,
    stops: Stops,
    emitted: u32,
    stopped_by_token: bool,
    /// A user's tokenizer: words are cut into its tokens instead of the mock model's.
    tokenizer: Option<Arc<Tokenizer>>,
}

impl Decoder {
    /// A decoder for `prompt` under `seed` and `sampling`, ending where the model ends.
    pub fn new(lm: &'static dyn MockLm, prompt: &str, seed: u64, sampling: Sampling) -> Self {
        Self::primed(lm, fnv1a(prompt.as_bytes()), seed, sampling, Stops::default())
    }

    /// A decoder for a prompt hashed to `prompt_hash` (its text or its token ids: the same
    /// prompt always yields the same completion), under `seed`, `sampling` and `stops`.
    pub fn primed(
        lm: &'static dyn MockLm,
        prompt_hash: u64,
        seed: u64,
        sampling: Sampling,
        stops: Stops,
    ) -> Self {
        Decoder {
            lm,
            model: LanguageModel::new(prompt_hash, seed, sampling),
            pending: VecDeque::new(),
            stops,
            emitted: 0,
            stopped_by_token: false,
            tokenizer: None,
        }
    }

    /// Cuts words into `tokenizer`'s tokens (a user's own, served over GetTokenizer), so the
    /// ids streamed are in the vocabulary the gateway decodes with.
    pub fn with_tokenizer(mut self, tokenizer: Option<Arc<Tokenizer>>) -> Self {
        self.tokenizer = tokenizer;
        self
    }

    fn split(&mut self, id: u32, text: String) {
        let encoding = self.tokenizer.as_ref().and_then(|t| t.encode(text.as_str(), false).ok());
        let Some(encoding) = encoding.filter(|e| !e.is_empty()) else {
            return self.lm.split(id, text, &mut self.pending);
        };
        // Each token's text runs from the end of the previous one, so the leading space goes
        // with the first and the pieces spell the word exactly.
        let mut start = 0;
        let last = encoding.len() - 1;
        for (i, (&id, &(_, end))) in encoding.get_ids().iter().zip(encoding.get_offsets()).enumerate() {
            let end = if i == last { text.len() } else { end.clamp(start, text.len()) };
            let piece = text.get(start..end).unwrap_or_default().to_owned();
            self.pending.push_back(TokenOut { id, text: piece });
            start = end;
        }
    }

    /// The next token, or `None` at the end of the sequence.
    pub fn next_token(&mut self) -> Option<TokenOut> {
        if self.stopped_by_token {
            return None;
        }
        while self.pending.is_empty() {
            match self.model.next_word() {
                Word::Word { id, text } => self.split(id, text),
                Word::End if self.stops.ignore_eos || self.emitted < self.stops.min_tokens => {}
                Word::End => return None,
            }
        }
        let token = self.pending.pop_front()?;
        self.emitted += 1;
        self.stopped_by_token =
            self.emitted >= self.stops.min_tokens && self.stops.stop_token_ids.contains(&token.id);
        Some(token)
    }

    /// Whether the last token was a stop token: the sequence ends with it.
    pub fn stopped_by_token(&self) -> bool {
        self.stopped_by_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WARM: Sampling = Sampling { temperature: 0.7, top_p: 0.9, top_k: 0 };

    fn tokens(kind: MockLmKind, seed: u64, n: usize) -> Vec<TokenOut> {
        let mut decoder = Decoder::new(kind.lm(), "Explain pipelining.", seed, WARM);
        std::iter::from_fn(|| decoder.next_token()).take(n).collect()
    }

    #[test]
    fn mock_models_tokenize_differently_but_spell_the_same_text() {
        let words: String = tokens(MockLmKind::Webllm, 5, 30).iter().map(|t| t.text.as_str()).collect();
        let pieces = tokens(MockLmKind::TransformersJs, 5, 60);
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

    /// Tokens until the end, at most `n`, and whether the model ended them.
    fn run(stops: Stops, seed: u64, n: usize) -> (Vec<u32>, bool) {
        let hot = Sampling { temperature: 1.0, top_p: 1.0, top_k: 0 };
        let mut decoder = Decoder::primed(&WebLlm, 11, seed, hot, stops);
        let ids: Vec<u32> = std::iter::from_fn(|| decoder.next_token()).take(n).map(|t| t.id).collect();
        let ended = ids.len() < n;
        (ids, ended)
    }

    #[test]
    fn ignore_eos_and_min_tokens_skip_the_end_and_stop_tokens_end_with_themselves() {
        let (free, ended) = run(Stops::default(), 3, 2000);
        assert!(ended, "a hot model ends within 2000 tokens");
        let ignoring = Stops { ignore_eos: true, ..Stops::default() };
        let (all, ended) = run(ignoring, 3, 2000);
        assert!(!ended && all.starts_with(&free), "the same tokens, past the end");
        let min = Stops { min_tokens: free.len() as u32 + 5, ..Stops::default() };
        assert!(run(min, 3, 2000).0.len() >= free.len() + 5);
        let period = text::vocabulary().position(|w| w == ".").expect("a period") as u32;
        let stops = Stops { stop_token_ids: vec![period], ignore_eos: true, ..Stops::default() };
        let (ids, ended) = run(stops, 3, 2000);
        assert!(ended && ids.last() == Some(&period), "{ids:?}");
        assert_eq!(ids.iter().filter(|&&id| id == period).count(), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        assert_eq!(tokens(MockLmKind::TransformersJs, 9, 50), tokens(MockLmKind::TransformersJs, 9, 50));
    }
}

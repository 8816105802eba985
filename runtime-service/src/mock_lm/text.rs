//! The simulated language model: a small grammar over a fixed vocabulary with context-dependent
//! pseudo-logits, sampled with temperature and top-p. It produces varied, readable sentences and is
//! a pure function of (prompt, seed, knobs).

use crate::rng::{SplitMix64, mix};

/// Word classes of the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Det,
    Adj,
    Noun,
    Verb,
    Adv,
    Prep,
    Pron,
    Conj,
    Stop,
}

const DET: &[&str] = &["the", "a", "this", "every", "each", "one", "our", "their"];
const ADJ: &[&str] = &[
    "fast", "small", "large", "shared", "pinned", "idle", "warm", "cold", "stable", "parallel", "hidden",
    "quiet", "bright", "careful", "simple", "eager", "distant", "steady",
];
/// The nouns the simulated model speaks (each one token of its vocabulary).
pub const NOUN: &[&str] = &[
    "model",
    "token",
    "cache",
    "kernel",
    "buffer",
    "pipeline",
    "scheduler",
    "tensor",
    "batch",
    "stream",
    "engine",
    "pool",
    "lease",
    "layer",
    "request",
    "device",
    "queue",
    "thread",
    "signal",
    "river",
    "garden",
    "lantern",
    "story",
    "window",
];
const VERB: &[&str] = &[
    "computes", "prepares", "streams", "holds", "frees", "returns", "reads", "writes", "shapes", "guards",
    "follows", "carries", "builds", "finds", "opens", "keeps",
];
const ADV: &[&str] =
    &["quickly", "quietly", "again", "together", "carefully", "softly", "early", "later", "often"];
const PREP: &[&str] = &["into", "from", "through", "over", "under", "beside", "with", "across"];
const PRON: &[&str] = &["it", "she", "he", "someone", "nothing"];
const CONJ: &[&str] = &["and", "while", "but", "because", "so"];

/// Sentence shapes; each is a sequence of classes ending in `Stop`.
const TEMPLATES: &[&[Class]] = {
    use Class::*;
    &[
        &[Det, Adj, Noun, Verb, Det, Noun, Prep, Det, Noun, Stop],
        &[Det, Noun, Verb, Adv, Stop],
        &[Pron, Verb, Det, Adj, Noun, Conj, Pron, Verb, Det, Noun, Stop],
        &[Det, Noun, Prep, Det, Adj, Noun, Verb, Det, Noun, Adv, Stop],
        &[Pron, Adv, Verb, Det, Noun, Stop],
    ]
};

/// Largest word class or template list.
const MAX_CHOICES: usize = 32;

/// `-ln(i + 1)`, the Zipf-like prior of the i-th word of a class, computed once.
fn zipf_prior(i: usize) -> f64 {
    static PRIOR: std::sync::LazyLock<[f64; MAX_CHOICES]> =
        std::sync::LazyLock::new(|| std::array::from_fn(|i| -((i + 1) as f64).ln()));
    PRIOR[i]
}

/// 64 random bits as a uniform value in [0, 1).
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

fn words(class: Class) -> &'static [&'static str] {
    match class {
        Class::Det => DET,
        Class::Adj => ADJ,
        Class::Noun => NOUN,
        Class::Verb => VERB,
        Class::Adv => ADV,
        Class::Prep => PREP,
        Class::Pron => PRON,
        Class::Conj => CONJ,
        Class::Stop => &["."],
    }
}

/// Every word the model can produce, in a fixed order: a word's index is its id.
pub fn vocabulary() -> impl Iterator<Item = &'static str> {
    [DET, ADJ, NOUN, VERB, ADV, PREP, PRON, CONJ, &["."]].into_iter().flatten().copied()
}

/// Words in [`vocabulary`]. Ids from here to twice this are the same words capitalised, as a
/// sentence starts with them: a tokenizer must tell "The" from "the" for its decode of the ids
/// to give back the streamed text.
pub fn words_len() -> u32 {
    static LEN: std::sync::LazyLock<u32> = std::sync::LazyLock::new(|| vocabulary().count() as u32);
    *LEN
}

/// `word` with its first letter upper-cased, as it starts a sentence.
pub fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// Id of `word` in [`vocabulary`].
fn word_id(class: Class, index: usize) -> u32 {
    let offset: usize = [DET, ADJ, NOUN, VERB, ADV, PREP, PRON, CONJ]
        .iter()
        .take_while(|list| !std::ptr::eq(**list, words(class)))
        .map(|list| list.len())
        .sum();
    (offset + index) as u32
}

/// Sampling knobs, validated by the caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 is greedy; higher flattens the distribution.
    pub temperature: f64,
    /// Nucleus size in (0, 1].
    pub top_p: f64,
    /// Only the k most likely choices are drawn from; 0 keeps them all.
    pub top_k: u32,
}

/// A produced word, or the end of the sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Word {
    /// A word with its id and its surface text (leading space and capitalisation applied).
    Word {
        /// Id in [`vocabulary`].
        id: u32,
        /// Text as it should be printed.
        text: String,
    },
    /// End of sequence.
    End,
}

/// Generates words for one request.
#[derive(Debug, Clone)]
pub struct LanguageModel {
    rng: SplitMix64,
    context: u64,
    sampling: Sampling,
    template: &'static [Class],
    slot: usize,
    sentence_start: bool,
    first: bool,
}

impl LanguageModel {
    /// A model primed by `prompt_hash` and seeded by `seed`.
    pub fn new(prompt_hash: u64, seed: u64, sampling: Sampling) -> Self {
        let rng = SplitMix64::new(mix(seed ^ prompt_hash.rotate_left(17)));
        // The context (the "model's opinion") depends on the prompt only: greedy decoding is then
        // the same for every seed, as with a real model.
        let context = mix(prompt_hash ^ 0x5851_F42D_4C95_7F2D);
        let mut model = LanguageModel {
            rng,
            context,
            sampling,
            template: TEMPLATES[0],
            slot: 0,
            sentence_start: true,
            first: true,
        };
        model.template = model.pick_template();
        model
    }

    /// The next word.
    pub fn next_word(&mut self) -> Word {
        if self.slot >= self.template.len() {
            // Between sentences the model may end: "continue" is favoured 19:1, so greedy
            // decoding (temperature 0) never stops early.
            if self.sample(&[0.0, -(19f64).ln()]) == 1 {
                return Word::End;
            }
            self.template = self.pick_template();
            self.slot = 0;
            self.sentence_start = true;
        }
        let class = self.template[self.slot];
        self.slot += 1;
        let choices = words(class);
        let mut logits = [0.0; MAX_CHOICES];
        for (i, logit) in logits.iter_mut().enumerate().take(choices.len()) {
            // Zipf-like prior plus a context-dependent perturbation: the "model's opinion".
            let noise = unit(mix(self.context ^ (i as u64).wrapping_mul(0x9E37_79B9)));
            *logit = zipf_prior(i) + 2.5 * noise;
        }
        let index = self.sample(&logits[..choices.len()]);
        let id = word_id(class, index);
        self.context = mix(self.context ^ u64::from(id).wrapping_add(0x632B_E59B_D9B4_E019));
        let word = choices[index];
        let mut text = String::with_capacity(word.len() + 1);
        if class != Class::Stop && !self.first {
            text.push(' ');
        }
        // The context above hashes the word's own id, so capitalising changes the id streamed,
        // never the words chosen.
        let id = if self.sentence_start && class != Class::Stop {
            text.push_str(&capitalised(word));
            id + words_len()
        } else {
            text.push_str(word);
            id
        };
        self.sentence_start = false;
        self.first = false;
        Word::Word { id, text }
    }

    fn pick_template(&mut self) -> &'static [Class] {
        let mut logits = [0.0; MAX_CHOICES];
        for (i, logit) in logits.iter_mut().enumerate().take(TEMPLATES.len()) {
            *logit = unit(mix(self.context ^ (i as u64 + 1)));
        }
        TEMPLATES[self.sample(&logits[..TEMPLATES.len()])]
    }

    /// Samples an index from `logits` with temperature and top-p; argmax at temperature 0.
    fn sample(&mut self, logits: &[f64]) -> usize {
        let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        if self.sampling.temperature <= 0.0 {
            return argmax();
        }
        // Fixed-size buffers: this runs once per token, and allocating here showed in profiles.
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut probs = [(0usize, 0.0f64); MAX_CHOICES];
        let probs = &mut probs[..logits.len()];
        for (i, (slot, l)) in probs.iter_mut().zip(logits).enumerate() {
            *slot = (i, ((l - max) / self.sampling.temperature).exp());
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept_len = 0;
        let mut cumulative = 0.0;
        // Top-k before top-p, as vLLM applies them; a k of 0 (or beyond the choices) keeps all.
        let top_k = match self.sampling.top_k {
            0 => probs.len(),
            k => probs.len().min(k as usize),
        };
        for p in probs.iter_mut().take(top_k) {
            p.1 /= total;
            kept_len += 1;
            cumulative += p.1;
            if cumulative >= self.sampling.top_p {
                break;
            }
        }
        let kept = &probs[..kept_len];
        let mass: f64 = kept.iter().map(|p| p.1).sum();
        let mut draw = self.rng.next_f64() * mass;
        for &(i, p) in kept {
            if draw < p {
                return i;
            }
            draw -= p;
        }
        kept.last().map_or_else(argmax, |p| p.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentence(seed: u64, sampling: Sampling, n: usize) -> String {
        let mut model = LanguageModel::new(7, seed, sampling);
        let mut out = String::new();
        for _ in 0..n {
            match model.next_word() {
                Word::Word { text, .. } => out.push_str(&text),
                Word::End => break,
            }
        }
        out
    }

    #[test]
    fn same_inputs_same_words_and_the_text_reads_like_sentences() {
        let warm = Sampling { temperature: 0.8, top_p: 0.95, top_k: 0 };
        let text = sentence(1, warm, 40);
        assert_eq!(text, sentence(1, warm, 40));
        assert_ne!(text, sentence(2, warm, 40), "the seed matters");
        assert!(text.chars().next().is_some_and(char::is_uppercase), "{text}");
        assert!(text.contains('.'), "{text}");
        assert!(!text.contains("  "), "{text}");
    }

    #[test]
    fn greedy_decoding_ignores_the_seed_and_never_stops() {
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0 };
        assert_eq!(sentence(1, greedy, 200), sentence(99, greedy, 200));
        let mut model = LanguageModel::new(7, 1, greedy);
        assert!((0..500).all(|_| model.next_word() != Word::End));
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0 };
        let hot_k1 = Sampling { temperature: 2.0, top_p: 1.0, top_k: 1 };
        assert_eq!(sentence(1, greedy, 60), sentence(5, hot_k1, 60));
    }

    #[test]
    fn ids_index_the_vocabulary() {
        let vocab: Vec<_> = vocabulary().collect();
        let mut model = LanguageModel::new(3, 3, Sampling { temperature: 1.0, top_p: 1.0, top_k: 0 });
        for _ in 0..200 {
            if let Word::Word { id, text } = model.next_word() {
                let word = vocab[(id % words_len()) as usize];
                let word = if id >= words_len() { capitalised(word) } else { word.to_owned() };
                assert_eq!(word, text.trim());
            }
        }
    }
}

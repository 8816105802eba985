//! Model architectures: the published shape of a transformer, from which its weight bytes, KV
//! bytes per token, activation bytes and FLOPs follow. Nothing per-token is typed in by hand.
//! They live here, not in runtime-service, because memory-service sizes its pools from them too.

use serde::Deserialize;

/// A decoder-only transformer, as its `config.json` describes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arch {
    /// Parameters (weights), all layers and embeddings.
    pub parameters: u64,
    /// Transformer layers.
    pub layers: u32,
    /// Hidden (model) dimension.
    pub hidden_size: u32,
    /// Attention (query) heads.
    pub attention_heads: u32,
    /// Key/value heads (fewer than attention heads with grouped-query attention).
    pub kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// MLP inner dimension.
    pub intermediate_size: u32,
    /// Bytes per weight and per KV element (2 for BF16/FP16, 4 for FP32).
    pub dtype_bytes: u32,
    /// Longest context (prompt + completion) the model supports, tokens.
    pub context_length: u32,
    /// Tokens in the vocabulary: the input embedding and the LM head are `vocab_size ×
    /// hidden_size` each. 0 (the default for a hand-written table) prices every parameter as a
    /// GEMM read every step, as if the model had no embeddings.
    #[serde(default)]
    pub vocab_size: u32,
    /// Whether the LM head is the input embedding's matrix (Llama 3.2 1B, GPT-2): then that matrix
    /// is read every step as the LM head; untied, the input embedding is only gathered.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl Arch {
    /// The embedded preset called `name`, from the models' published configurations.
    pub fn preset(name: &str) -> Option<Arch> {
        let arch = match name {
            // meta-llama/Llama-3.1-8B: 32 layers, 4096 hidden, 32 heads, 8 KV heads (GQA).
            "llama-3.1-8b" => Arch {
                parameters: 8_030_261_248,
                layers: 32,
                hidden_size: 4096,
                attention_heads: 32,
                kv_heads: 8,
                head_dim: 128,
                intermediate_size: 14336,
                dtype_bytes: 2,
                context_length: 131_072,
                vocab_size: 128256,
                tie_word_embeddings: false,
            },
            // meta-llama/Llama-3.2-1B: 16 layers, 2048 hidden, 32 heads of 64, 8 KV heads.
            "llama-3.2-1b" => Arch {
                parameters: 1_235_814_400,
                layers: 16,
                hidden_size: 2048,
                attention_heads: 32,
                kv_heads: 8,
                head_dim: 64,
                intermediate_size: 8192,
                dtype_bytes: 2,
                context_length: 131_072,
                vocab_size: 128256,
                tie_word_embeddings: true,
            },
            // microsoft/Phi-3-mini-4k-instruct: 32 layers, 3072 hidden, 32 heads, no GQA.
            "phi-3-mini" => Arch {
                parameters: 3_821_079_552,
                layers: 32,
                hidden_size: 3072,
                attention_heads: 32,
                kv_heads: 32,
                head_dim: 96,
                intermediate_size: 8192,
                dtype_bytes: 2,
                context_length: 4096,
                vocab_size: 32064,
                tie_word_embeddings: false,
            },
            // distilgpt2: 6 layers, 768 hidden, 12 heads; FP32 as Transformers.js runs it.
            "distilgpt2" => Arch {
                parameters: 81_912_576,
                layers: 6,
                hidden_size: 768,
                attention_heads: 12,
                kv_heads: 12,
                head_dim: 64,
                intermediate_size: 3072,
                dtype_bytes: 4,
                context_length: 1024,
                vocab_size: 50257,
                tie_word_embeddings: true,
            },
            _ => return None,
        };
        Some(arch)
    }

    /// The architecture of a model entry of a models file: its `arch` table, else its `preset`,
    /// else the preset named like its `key`. Both services read models files through this.
    pub fn for_model(key: &str, preset: Option<&str>, arch: Option<Arch>) -> Result<Arch, String> {
        match (arch, preset) {
            (Some(arch), None) => Ok(arch),
            (None, preset) => {
                let name = preset.unwrap_or(key);
                Arch::preset(name).ok_or_else(|| {
                    format!(
                        "model {key:?}: no architecture preset {name:?}; use one of {} or give an [models.arch] table",
                        Arch::PRESETS.join(", ")
                    )
                })
            }
            (Some(_), Some(_)) => Err(format!("model {key:?}: give preset or arch, not both")),
        }
    }

    /// Names of the embedded presets.
    pub const PRESETS: [&'static str; 4] = ["llama-3.1-8b", "llama-3.2-1b", "phi-3-mini", "distilgpt2"];

    /// Bytes of weights: what one decode step reads whatever the batch, and the `uniforms` lease.
    pub fn weight_bytes(&self) -> u64 {
        self.parameters.saturating_mul(u64::from(self.dtype_bytes))
    }

    /// KV-cache bytes per token: a key and a value vector per KV head per layer.
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.dtype_bytes)
    }

    /// Activation bytes per token in a step: the residual stream, the attention output and the
    /// MLP's inner vector live at once (layers reuse the same buffers).
    pub fn activation_bytes_per_token(&self) -> u64 {
        (2 * u64::from(self.hidden_size) + u64::from(self.intermediate_size)) * u64::from(self.dtype_bytes)
    }

    /// Parameters of one vocabulary-by-hidden matrix (the input embedding, or the LM head).
    pub fn vocab_matrix_params(&self) -> u64 {
        u64::from(self.vocab_size) * u64::from(self.hidden_size)
    }

    /// Parameters the transformer body multiplies every computed token by: all but the input
    /// embedding (a gather, not a matmul) and the LM head (run only where a token is sampled).
    fn body_params(&self) -> u64 {
        let vocab = self.vocab_matrix_params();
        let matrices = if self.tie_word_embeddings { vocab } else { 2 * vocab };
        self.parameters.saturating_sub(matrices)
    }

    /// FLOPs of the weight matmuls per computed token: one multiply-add per body parameter.
    pub fn dense_flops_per_token(&self) -> f64 {
        2.0 * self.body_params() as f64
    }

    /// FLOPs of the LM head per sampled token: a multiply-add per vocabulary-matrix parameter.
    /// Engines compute logits only at the positions they sample (the last of a prompt, each decode).
    pub fn lm_head_flops_per_sample(&self) -> f64 {
        2.0 * self.vocab_matrix_params() as f64
    }

    /// Weight bytes one forward pass reads: all but an untied input embedding, of which it
    /// gathers only the rows of its tokens (a few KiB).
    pub fn step_weight_bytes(&self) -> u64 {
        let gathered = if self.tie_word_embeddings { 0 } else { self.vocab_matrix_params() };
        self.parameters.saturating_sub(gathered).saturating_mul(u64::from(self.dtype_bytes))
    }

    /// FLOPs of attention per (query token, context token) pair: QKᵀ and AV, a multiply-add each,
    /// over every query head of every layer.
    pub fn attention_flops_per_pair(&self) -> f64 {
        4.0 * f64::from(self.layers) * f64::from(self.attention_heads) * f64::from(self.head_dim)
    }

    /// Checks every dimension; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let fields = [
            ("layers", self.layers),
            ("hidden_size", self.hidden_size),
            ("attention_heads", self.attention_heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("context_length", self.context_length),
        ];
        for (field, v) in fields {
            if v == 0 || v > 1 << 20 {
                return Err(format!("{field} = {v} must be between 1 and 1048576"));
            }
        }
        let vocab_matrices =
            if self.tie_word_embeddings { 1 } else { 2 } * u128::from(self.vocab_matrix_params());
        if vocab_matrices >= u128::from(self.parameters) {
            return Err(format!(
                "vocab_size × hidden_size × {} ({vocab_matrices}) must be below parameters = {}: the \
                 embeddings cannot hold every weight",
                if self.tie_word_embeddings { 1 } else { 2 },
                self.parameters
            ));
        }
        if self.parameters == 0 || self.parameters > 10_000_000_000_000 {
            return Err(format!("parameters = {} must be between 1 and 10^13", self.parameters));
        }
        if ![1, 2, 4].contains(&self.dtype_bytes) {
            return Err(format!("dtype_bytes = {} must be 1, 2 or 4", self.dtype_bytes));
        }
        // Within these bounds every size below fits 64 bits; a model whose KV per token passes a
        // GiB is no model anyone serves.
        let kv = 2
            * u128::from(self.layers)
            * u128::from(self.kv_heads)
            * u128::from(self.head_dim)
            * u128::from(self.dtype_bytes);
        if kv > 1 << 30 {
            return Err(format!(
                "KV bytes per token ({kv}) must be at most 1 GiB: check layers, kv_heads and head_dim"
            ));
        }
        if self.kv_heads > self.attention_heads {
            return Err(format!(
                "kv_heads = {} cannot exceed attention_heads = {}",
                self.kv_heads, self.attention_heads
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_8b_numbers_match_its_published_size() {
        let arch = Arch::preset("llama-3.1-8b").expect("preset");
        // 16.06 GB of BF16 weights; 128 KiB of KV per token (32 layers × 8 KV heads × 128 × 2 × 2).
        assert_eq!(arch.weight_bytes(), 16_060_522_496);
        assert_eq!(arch.kv_bytes_per_token(), 128 << 10);
        for name in Arch::PRESETS {
            Arch::preset(name).expect("listed").validate().expect("valid");
        }
        assert_eq!(Arch::preset("phi-3-mini").map(|a| a.kv_bytes_per_token()), Some(384 << 10));
    }

    #[test]
    fn embeddings_are_gathered_and_logits_computed_only_where_sampled() {
        let llama = Arch::preset("llama-3.1-8b").expect("preset");
        // Untied: the 128256 × 4096 input embedding (1.05 GB in BF16) is gathered, not read whole
        // (6.5% of the weights), and the body's GEMMs leave out both vocabulary matrices (13%).
        assert_eq!(llama.step_weight_bytes(), 16_060_522_496 - 2 * 128_256 * 4096);
        assert_eq!(llama.dense_flops_per_token(), 2.0 * (8_030_261_248u64 - 2 * 128_256 * 4096) as f64);
        assert_eq!(llama.lm_head_flops_per_sample(), 2.0 * (128_256u64 * 4096) as f64);
        // Tied (GPT-2): the one matrix is read every step as the LM head; 47% of distilgpt2's
        // parameters are that matrix, priced per sample rather than per token.
        let gpt2 = Arch::preset("distilgpt2").expect("preset");
        assert_eq!(gpt2.step_weight_bytes(), gpt2.weight_bytes());
        let share = gpt2.vocab_matrix_params() as f64 / gpt2.parameters as f64;
        assert!((0.46..0.48).contains(&share), "{share}");
        // A hand-written table without a vocabulary keeps the old pricing: every parameter a GEMM.
        let bare = Arch { vocab_size: 0, ..llama.clone() };
        assert_eq!(bare.dense_flops_per_token(), 2.0 * bare.parameters as f64);
        assert_eq!(bare.step_weight_bytes(), bare.weight_bytes());
        assert!(Arch { vocab_size: 1 << 20, ..llama }.validate().is_err());
    }
}

//! Which ggml type each weight matrix of an export gets: one type for all of them, or one of
//! llama.cpp's k-quant presets, which spend more bits where quantization hurts most (the output
//! matrix, the value projection and the MLP down projection of some layers). The preset rules
//! are llama.cpp's (`llama_tensor_get_type` in llama-quant.cpp) for the llama architecture
//! without an importance matrix, so `--type q4_k_m` picks the types `llama-quantize … Q4_K_M`
//! picks (tested against llama-quantize).

use super::quant::GgmlType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// Every matrix in this type (F16 where a row does not fill whole blocks).
    Uniform(GgmlType),
    /// Q4_K; Q5_K for the value projection of the first 4 layers and the MLP down projection
    /// of the first eighth; Q6_K for the output matrix.
    Q4KS,
    /// Q4_K; Q6_K for the output matrix and for the value and down projections of the layers
    /// `more_bits` picks.
    Q4KM,
    /// Q5_K; Q6_K for the output matrix.
    Q5KS,
    /// Q5_K; Q6_K as in Q4_K_M.
    Q5KM,
    /// Q6_K everywhere.
    Q6K,
}

impl From<GgmlType> for Quantization {
    fn from(ty: GgmlType) -> Self {
        Quantization::Uniform(ty)
    }
}

impl Quantization {
    /// The names [`Self::parse`] accepts, for error messages.
    pub const NAMES: &'static str =
        "f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0";

    pub fn parse(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        Some(match name.as_str() {
            "q4_k_s" => Quantization::Q4KS,
            "q4_k_m" => Quantization::Q4KM,
            "q5_k_s" => Quantization::Q5KS,
            "q5_k_m" => Quantization::Q5KM,
            "q6_k" => Quantization::Q6K,
            // A file all in Q4_K or Q5_K is no llama.cpp file type: use a preset.
            "q4_k" | "q5_k" => return None,
            _ => Quantization::Uniform(GgmlType::parse(&name)?),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Quantization::Uniform(ty) => ty.name(),
            Quantization::Q4KS => "q4_k_s",
            Quantization::Q4KM => "q4_k_m",
            Quantization::Q5KS => "q5_k_s",
            Quantization::Q5KM => "q5_k_m",
            Quantization::Q6K => "q6_k",
        }
    }

    /// llama.cpp's `llama_ftype`, stored as `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            Quantization::Uniform(ty) => match ty {
                GgmlType::F32 => 0,
                GgmlType::F16 => 1,
                GgmlType::Q4_0 => 2,
                GgmlType::Q4_1 => 3,
                GgmlType::Q8_0 => 7,
                GgmlType::Q5_0 => 8,
                GgmlType::Q5_1 => 9,
                GgmlType::Q4_K => 14,
                GgmlType::Q5_K => 16,
                GgmlType::Q6_K => 18,
                GgmlType::BF16 => 32,
            },
            Quantization::Q4KS => 14,
            Quantization::Q4KM => 15,
            Quantization::Q5KS => 16,
            Quantization::Q5KM => 17,
            Quantization::Q6K => 18,
        }
    }

    /// Whether any matrix is stored in a block format (GGUF then records the quantization
    /// version).
    pub fn is_quantized(self) -> bool {
        !matches!(
            self,
            Quantization::Uniform(GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
        )
    }

    /// The type of the weight matrix named `name` (GGUF name) whose rows hold `row_len` values,
    /// in a model of `n_layers` blocks with (`has_output`) or without an output matrix of its own.
    pub fn matrix_type(
        self,
        name: &str,
        row_len: usize,
        n_layers: usize,
        has_output: bool,
    ) -> GgmlType {
        let preferred = self.preferred(name, n_layers, has_output);
        if row_len.is_multiple_of(preferred.block_size()) {
            return preferred;
        }
        // llama.cpp's fallbacks for rows that do not fill whole 256-value super-blocks.
        let fallback = match preferred {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            _ => GgmlType::F16,
        };
        if row_len.is_multiple_of(fallback.block_size()) {
            fallback
        } else {
            GgmlType::F16
        }
    }

    fn preferred(self, name: &str, n_layers: usize, has_output: bool) -> GgmlType {
        let base = match self {
            Quantization::Uniform(ty) => return ty,
            Quantization::Q4KS | Quantization::Q4KM => GgmlType::Q4_K,
            Quantization::Q5KS | Quantization::Q5KM => GgmlType::Q5_K,
            Quantization::Q6K => GgmlType::Q6_K,
        };
        if name == "output.weight" || (!has_output && name == "token_embd.weight") {
            return GgmlType::Q6_K;
        }
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let Some(layer) = layer else {
            return base;
        };
        let more_bits = more_bits(layer, n_layers);
        if name.ends_with("attn_v.weight") {
            match self {
                Quantization::Q4KM | Quantization::Q5KM if more_bits => GgmlType::Q6_K,
                Quantization::Q4KS if layer < 4 => GgmlType::Q5_K,
                _ => base,
            }
        } else if name.ends_with("ffn_down.weight") {
            match self {
                Quantization::Q4KM | Quantization::Q5KM if more_bits => GgmlType::Q6_K,
                Quantization::Q4KS if layer < n_layers / 8 => GgmlType::Q5_K,
                _ => base,
            }
        } else {
            base
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third one
/// between.
fn more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_more_bits_where_llama_cpp_does() {
        let q = Quantization::Q4KM;
        let n = 22;
        let six: Vec<usize> = (0..n)
            .filter(|&i| {
                q.matrix_type(&format!("blk.{i}.attn_v.weight"), 2048, n, true) == GgmlType::Q6_K
            })
            .collect();
        // n/8 = 2, 7n/8 = 19: layers 0, 1, then 4, 7, 10, 13, 16, then 19, 20, 21.
        assert_eq!(six, [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]);
        assert_eq!(
            q.matrix_type("blk.3.attn_q.weight", 2048, n, true),
            GgmlType::Q4_K
        );
        assert_eq!(
            q.matrix_type("output.weight", 2048, n, true),
            GgmlType::Q6_K
        );
        assert_eq!(
            q.matrix_type("token_embd.weight", 2048, n, true),
            GgmlType::Q4_K
        );
        assert_eq!(
            q.matrix_type("token_embd.weight", 2048, n, false),
            GgmlType::Q6_K
        );
        // Rows of 96 values: no whole super-block, Q4_K falls back to Q5_0, Q6_K to Q8_0.
        assert_eq!(
            q.matrix_type("blk.3.attn_q.weight", 96, n, true),
            GgmlType::Q5_0
        );
        assert_eq!(q.matrix_type("output.weight", 96, n, true), GgmlType::Q8_0);
        assert_eq!(
            q.matrix_type("blk.3.attn_q.weight", 40, n, true),
            GgmlType::F16
        );
        assert_eq!(Quantization::parse("Q4_K_M"), Some(q));
        assert_eq!(Quantization::parse("q4_k"), None);
    }
}

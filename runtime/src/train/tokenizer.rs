//! Tokenizers for text data: bytes (ids 0–255), GPT-2's byte-level BPE
//! through the `tokenizers` crate with GPT-2's `encoder.json` and
//! `vocab.bpe` built in (data/gpt2), or a published model's own
//! `tokenizer.json` read by the `tokenizers` crate.

use super::TrainError;
use std::collections::HashMap;

const ENCODER: &str = include_str!("../../../data/gpt2/encoder.json");
const MERGES: &str = include_str!("../../../data/gpt2/vocab.bpe");

pub enum Tokenizer {
    Bytes,
    /// A `tokenizers` tokenizer: GPT-2's built in, or one from a `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// `bytes` (the default), `gpt2`, or the path of a `tokenizer.json`.
    pub fn by_name(name: Option<&str>) -> Result<Tokenizer, TrainError> {
        match name.unwrap_or("bytes") {
            "bytes" => Ok(Tokenizer::Bytes),
            "gpt2" => Tokenizer::gpt2(),
            path if path.ends_with(".json") => Tokenizer::from_file(std::path::Path::new(path)),
            other => Err(TrainError::Setup(format!(
                "unknown tokenizer `{other}`: use `bytes`, `gpt2` or the path of a tokenizer.json"
            ))),
        }
    }

    /// A published model's tokenizer from its `tokenizer.json` (Hugging Face's format).
    pub fn from_file(path: &std::path::Path) -> Result<Tokenizer, TrainError> {
        tokenizers::Tokenizer::from_file(path).map(|t| Tokenizer::Hf(Box::new(t))).map_err(|e| {
            TrainError::Setup(format!(
                "{}: not a tokenizer.json the `tokenizers` crate reads: {e}; pass the model's own tokenizer.json",
                path.display()
            ))
        })
    }

    /// The ids of `text` with the tokenizer's special tokens added as its
    /// post-processor says (BERT's `[CLS] ... [SEP]`), truncated as it says,
    /// without the padding it may add; bytes add none.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        match self {
            Tokenizer::Bytes => self.encode(text),
            Tokenizer::Hf(t) => t
                .encode(text, true)
                .map(|e| {
                    e.get_ids().iter().zip(e.get_attention_mask()).filter(|(_, m)| **m == 1).map(|(i, _)| *i).collect()
                })
                .map_err(|e| TrainError::Setup(format!("tokenization failed: {e}"))),
        }
    }

    pub fn gpt2() -> Result<Tokenizer, TrainError> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::{decoders::byte_level::ByteLevel as ByteLevelDecoder, pre_tokenizers::byte_level::ByteLevel};
        let bad = |e: &dyn std::fmt::Display| TrainError::Setup(format!("the built-in GPT-2 vocabulary: {e}"));
        let vocab: HashMap<String, u32> = serde_json::from_str(ENCODER).map_err(|e| bad(&e))?;
        let merges: Vec<(String, String)> = MERGES
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = vocab.into_iter().collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| bad(&e))?;
        let mut t = tokenizers::Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TrainError::Setup(format!("tokenization failed: {e}"))),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Bytes => {
                String::from_utf8_lossy(&ids.iter().map(|&i| i.min(255) as u8).collect::<Vec<_>>()).into_owned()
            }
            Tokenizer::Hf(t) => t.decode(ids, false).unwrap_or_default(),
        }
    }

    pub fn vocab(&self) -> u64 {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(t) => t.get_vocab_size(true) as u64,
        }
    }
}

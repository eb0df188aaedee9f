//! Tokenizers for text data: bytes (ids 0–255), or GPT-2's byte-level BPE
//! through the `tokenizers` crate, with GPT-2's `encoder.json` and
//! `vocab.bpe` built in (data/gpt2).

use super::TrainError;
use std::collections::HashMap;

const ENCODER: &str = include_str!("../../../data/gpt2/encoder.json");
const MERGES: &str = include_str!("../../../data/gpt2/vocab.bpe");

pub enum Tokenizer {
    Bytes,
    Gpt2(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// `bytes` (the default) or `gpt2`.
    pub fn by_name(name: Option<&str>) -> Result<Tokenizer, TrainError> {
        match name.unwrap_or("bytes") {
            "bytes" => Ok(Tokenizer::Bytes),
            "gpt2" => Tokenizer::gpt2(),
            other => Err(TrainError::Setup(format!("unknown tokenizer `{other}`: use `bytes` or `gpt2`"))),
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
        Ok(Tokenizer::Gpt2(Box::new(t)))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Gpt2(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TrainError::Setup(format!("GPT-2 tokenization failed: {e}"))),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Bytes => {
                String::from_utf8_lossy(&ids.iter().map(|&i| i.min(255) as u8).collect::<Vec<_>>()).into_owned()
            }
            Tokenizer::Gpt2(t) => t.decode(ids, false).unwrap_or_default(),
        }
    }

    pub fn vocab(&self) -> u64 {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Gpt2(t) => t.get_vocab_size(true) as u64,
        }
    }
}

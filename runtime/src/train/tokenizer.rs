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
    /// A `tokenizers` tokenizer: GPT-2's built in, one from a
    /// `tokenizer.json`, or one a GGUF describes; with the model's
    /// end-of-sequence token where the file names it (a GGUF's
    /// `tokenizer.ggml.eos_token_id`).
    Hf(Box<tokenizers::Tokenizer>, Option<u32>),
}

impl Tokenizer {
    /// `bytes` (the default), `gpt2`, or the path of a `tokenizer.json`.
    pub fn by_name(name: Option<&str>) -> Result<Tokenizer, TrainError> {
        match name.unwrap_or("bytes") {
            "bytes" => Ok(Tokenizer::Bytes),
            "gpt2" => Tokenizer::gpt2(),
            path if path.ends_with(".json") => Tokenizer::from_file(std::path::Path::new(path)),
            path if path.ends_with(".gguf") => Tokenizer::from_gguf(std::path::Path::new(path)),
            other => Err(TrainError::Setup(format!(
                "unknown tokenizer `{other}`: use `bytes`, `gpt2`, or the path of a tokenizer.json or a .gguf"
            ))),
        }
    }

    /// A published model's tokenizer from its `tokenizer.json` (Hugging Face's format).
    pub fn from_file(path: &std::path::Path) -> Result<Tokenizer, TrainError> {
        tokenizers::Tokenizer::from_file(path).map(|t| Tokenizer::Hf(Box::new(t), None)).map_err(|e| {
            TrainError::Setup(format!(
                "{}: not a tokenizer.json the `tokenizers` crate reads: {e}; pass the model's own tokenizer.json",
                path.display()
            ))
        })
    }

    /// The tokenizer a GGUF file describes in its metadata, for the
    /// byte-level BPE files llama.cpp writes (`tokenizer.ggml.model =
    /// gpt2`: `tokens`, `merges`, `token_type`), built as `transformers`
    /// builds it from a GGUF: GPT-2's byte-level pre-tokenizer and decoder,
    /// tokens marked control (type 3) added as special tokens and those
    /// marked user-defined (type 4) as added tokens, so both stay whole.
    pub fn from_gguf(path: &std::path::Path) -> Result<Tokenizer, TrainError> {
        use crate::weights::gguf::Value;
        use tokenizers::models::bpe::BPE;
        use tokenizers::{decoders::byte_level::ByteLevel as ByteLevelDecoder, pre_tokenizers::byte_level::ByteLevel};
        let bad = |m: String| TrainError::Setup(format!("{}: {m}", path.display()));
        let w = crate::weights::WeightFile::open(path).map_err(|e| TrainError::Setup(e.to_string()))?;
        let strings = |key: &str| -> Result<Vec<String>, TrainError> {
            match w.metadata.get(key) {
                Some(Value::Array(v)) => v
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).ok_or_else(|| bad(format!("`{key}` holds a non-string"))))
                    .collect(),
                _ => Err(bad(format!("no `{key}` in its metadata: the file carries no tokenizer"))),
            }
        };
        match w.metadata.get("tokenizer.ggml.model").and_then(|v| v.as_str()) {
            Some("gpt2") => {}
            other => {
                return Err(bad(format!(
                    "its tokenizer is `{}`; Tessera builds byte-level BPE (`gpt2`) tokenizers from GGUF files. \
                     Pass the model's tokenizer.json instead",
                    other.unwrap_or("missing")
                )));
            }
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("a merge that is not two tokens".into()))?;
        let types: Vec<i64> = match w.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => v
                .iter()
                .map(|x| match x {
                    Value::I64(i) => *i,
                    Value::U64(u) => *u as i64,
                    _ => 1,
                })
                .collect(),
            _ => Vec::new(),
        };
        // Tokens are spelled in GPT-2's byte alphabet; one that is not is respelled byte by byte.
        let spell = byte_spelling();
        let alphabet: std::collections::HashSet<char> = spell.iter().copied().collect();
        let spelled = |t: &str| -> String {
            if t.chars().all(|c| alphabet.contains(&c)) {
                t.to_string()
            } else {
                t.bytes().map(|b| spell[b as usize]).collect()
            }
        };
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (spelled(t), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| bad(e.to_string()))?;
        let mut t = tokenizers::Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        let added = |kind: i64, special: bool| -> Vec<tokenizers::AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(tok, ty)| **ty == kind && (!special || tok.chars().all(|c| alphabet.contains(&c))))
                .map(|(tok, _)| tokenizers::AddedToken::from(tok.clone(), special).normalized(false))
                .collect()
        };
        t.add_special_tokens(&added(3, true));
        t.add_tokens(&added(4, false));
        let eos = match w.metadata.get("tokenizer.ggml.eos_token_id") {
            Some(Value::U64(i)) => Some(*i as u32),
            Some(Value::I64(i)) => u32::try_from(*i).ok(),
            _ => None,
        };
        Ok(Tokenizer::Hf(Box::new(t), eos))
    }

    /// The tokenizer a weights file carries, if it carries one: a GGUF's
    /// metadata, or the `tokenizer.json` beside a safetensors checkpoint.
    pub fn of_weights(path: &std::path::Path) -> Option<Result<Tokenizer, TrainError>> {
        if path.extension().is_some_and(|e| e == "gguf") {
            let has =
                crate::weights::WeightFile::open(path).is_ok_and(|w| w.metadata.contains_key("tokenizer.ggml.tokens"));
            return has.then(|| Tokenizer::from_gguf(path));
        }
        beside(path, "tokenizer.json").map(|json| Tokenizer::from_file(&json))
    }

    /// The ids of `text` with the tokenizer's special tokens added as its
    /// post-processor says (BERT's `[CLS] ... [SEP]`), truncated as it says,
    /// without the padding it may add; bytes add none.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        match self {
            Tokenizer::Bytes => self.encode(text),
            Tokenizer::Hf(t, _) => t
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
        Ok(Tokenizer::Hf(Box::new(t), None))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(t, _) => t
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
            Tokenizer::Hf(t, _) => t.decode(ids, false).unwrap_or_default(),
        }
    }

    /// The model's end-of-sequence token, where the tokenizer's file names it.
    pub fn eos(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(_, eos) => *eos,
        }
    }

    pub fn vocab(&self) -> u64 {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(t, _) => t.get_vocab_size(true) as u64,
        }
    }
}

/// GPT-2's byte alphabet: the printable character each byte is spelled
/// with in a byte-level vocabulary (`bytes_to_unicode`).
fn byte_spelling() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("a char")
            } else {
                let c = char::from_u32(next).expect("a char");
                next += 1;
                c
            }
        })
        .collect()
}

/// A model's chat template (Hugging Face's Jinja format), rendered by
/// `minijinja`: a GGUF's `tokenizer.chat_template`, or the `chat_template`
/// of the `tokenizer_config.json` beside a checkpoint.
pub struct ChatTemplate {
    source: String,
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>) -> ChatTemplate {
        ChatTemplate { source: source.into() }
    }

    /// The template a weights file carries, if it carries one: a GGUF's
    /// metadata, or `tokenizer_config.json` beside a safetensors checkpoint.
    pub fn of_weights(path: &std::path::Path) -> Option<ChatTemplate> {
        if path.extension().is_some_and(|e| e == "gguf") {
            let w = crate::weights::WeightFile::open(path).ok()?;
            return w.metadata.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(ChatTemplate::new);
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(beside(path, "tokenizer_config.json")?).ok()?).ok()?;
        config["chat_template"].as_str().map(ChatTemplate::new)
    }

    /// The prompt for `messages` (role, content), ending with the
    /// assistant's turn opened (`add_generation_prompt`).
    pub fn render(&self, messages: &[(&str, &str)]) -> Result<String, TrainError> {
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let messages: Vec<_> =
            messages.iter().map(|(role, content)| minijinja::context! { role => *role, content => *content }).collect();
        env.render_str(&self.source, minijinja::context! { messages, add_generation_prompt => true })
            .map_err(|e| TrainError::Setup(format!("the model's chat template does not render: {e}")))
    }
}

/// The file `name` in a checkpoint folder, or beside a checkpoint file, if it is there.
fn beside(path: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    let dir = if path.is_dir() { path } else { path.parent()? };
    Some(dir.join(name)).filter(|p| p.is_file())
}

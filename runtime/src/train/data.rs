//! Token data: a text file read byte by byte (ids 0..256), or a `.bin` of
//! little-endian u16 token ids as nanoGPT writes them. The last
//! `val_fraction` of the tokens is the validation split. A batch is a set of
//! windows whose start positions are a pure function of (seed, step, micro).

use super::TrainError;
use crate::exec::kernels::uniform;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

pub struct Dataset {
    tokens: Vec<u32>,
    /// First token of the validation split.
    split_at: usize,
}

impl Dataset {
    pub fn open(
        path: &Path,
        val_fraction: f64,
        vocab: u64,
        tokenizer: &super::tokenizer::Tokenizer,
    ) -> Result<Dataset, TrainError> {
        let bytes =
            std::fs::read(path).map_err(|e| TrainError::Io(format!("cannot read data `{}`: {e}", path.display())))?;
        let tokens: Vec<u32> = if path.extension().is_some_and(|e| e == "bin") {
            if bytes.len() % 2 != 0 {
                return Err(TrainError::Io(format!("`{}` is not a u16 token file (odd length)", path.display())));
            }
            bytes.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect()
        } else if let super::tokenizer::Tokenizer::Bytes = tokenizer {
            bytes.iter().map(|&b| b as u32).collect()
        } else {
            let text = String::from_utf8(bytes).map_err(|_| {
                TrainError::Io(format!("`{}` is not UTF-8 text; the GPT-2 tokenizer reads text", path.display()))
            })?;
            tokenizer.encode(&text)?
        };
        if let Some(bad) = tokens.iter().find(|&&t| t as u64 >= vocab) {
            return Err(TrainError::Setup(format!(
                "`{}` holds token id {bad}, but the model's vocab is {vocab}; byte-level text needs vocab = 256, GPT-2 BPE vocab = 50257",
                path.display()
            )));
        }
        let split_at = ((tokens.len() as f64) * (1.0 - val_fraction)) as usize;
        Ok(Dataset { tokens, split_at })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// `batch` windows of `seq + 1` tokens: inputs and next-token targets,
    /// row-major [batch, seq]. Microbatch `micro` of a step holds sequences
    /// `micro·batch ..` of the step's global batch, so a step sees the same
    /// windows however its batch is split into microbatches and ranks.
    pub fn batch<T: num_traits::Float>(
        &self,
        split: Split,
        batch: usize,
        seq: usize,
        seed: u64,
        step: u64,
        micro: u64,
    ) -> (Vec<T>, Vec<T>) {
        let (lo, hi) = match split {
            Split::Train => (0, self.split_at),
            Split::Val => (self.split_at, self.tokens.len()),
        };
        let room = hi.saturating_sub(lo + seq + 1).max(1);
        let mut x = Vec::with_capacity(batch * seq);
        let mut y = Vec::with_capacity(batch * seq);
        for b in 0..batch {
            let stream = step.wrapping_mul(1_000_003);
            let global = micro.wrapping_mul(batch as u64).wrapping_add(b as u64);
            let start = lo + (uniform(seed ^ 0xDA7A, stream, global) * room as f64) as usize;
            for i in 0..seq {
                let at = |k: usize| T::from(self.tokens.get(k).copied().unwrap_or(0)).unwrap_or_else(T::zero);
                x.push(at(start + i));
                y.push(at(start + i + 1));
            }
        }
        (x, y)
    }
}

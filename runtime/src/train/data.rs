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
    tokens: Tokens,
    /// First token of the validation split.
    split_at: usize,
    /// The file (canonical where it can be) and the SHA-256 of its bytes.
    pub path: std::path::PathBuf,
    pub sha256: String,
}

/// Token ids in the narrowest integers that hold them: the file's own bytes
/// for byte-level text, 16 bits for a vocabulary up to 65,536 (GPT-2's), else 32.
enum Tokens {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Tokens {
    fn len(&self) -> usize {
        match self {
            Tokens::U8(t) => t.len(),
            Tokens::U16(t) => t.len(),
            Tokens::U32(t) => t.len(),
        }
    }

    fn get(&self, k: usize) -> Option<u32> {
        match self {
            Tokens::U8(t) => t.get(k).map(|&x| x as u32),
            Tokens::U16(t) => t.get(k).map(|&x| x as u32),
            Tokens::U32(t) => t.get(k).copied(),
        }
    }

    fn max(&self) -> Option<u32> {
        match self {
            Tokens::U8(t) => t.iter().max().map(|&x| x as u32),
            Tokens::U16(t) => t.iter().max().map(|&x| x as u32),
            Tokens::U32(t) => t.iter().max().copied(),
        }
    }
}

/// Where a spec's `data = "PATH"` is: an absolute path as it is; a relative
/// one the way `use` is resolved, next to the spec and then in each folder
/// above it (without a spec, from the working directory).
pub fn resolve(data: &str, spec: Option<&Path>) -> Result<std::path::PathBuf, TrainError> {
    let rel = Path::new(data);
    let Some(spec) = spec.filter(|_| rel.is_relative()) else {
        return Ok(rel.to_path_buf());
    };
    let spec = spec.canonicalize().unwrap_or(spec.to_path_buf());
    let mut tried = Vec::new();
    for dir in spec.ancestors().skip(1) {
        let candidate = dir.join(rel);
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    Err(TrainError::Io(format!(
        "the spec's data `{data}` was not found; looked in:\n    {}\n  help: a spec's `data` path is resolved \
         like `use`: next to the spec, then in each folder above it; or pass --data PATH (from the working directory)",
        tried.join("\n    ")
    )))
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
        let sha256 = super::checkpoint::sha256_hex(&bytes);
        let tokens = if path.extension().is_some_and(|e| e == "bin") {
            if bytes.len() % 2 != 0 {
                return Err(TrainError::Io(format!("`{}` is not a u16 token file (odd length)", path.display())));
            }
            Tokens::U16(bytes.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
        } else if let super::tokenizer::Tokenizer::Bytes = tokenizer {
            Tokens::U8(bytes)
        } else {
            let text = String::from_utf8(bytes).map_err(|_| {
                TrainError::Io(format!("`{}` is not UTF-8 text; the GPT-2 tokenizer reads text", path.display()))
            })?;
            let ids = tokenizer.encode(&text)?;
            match ids.iter().all(|&t| t <= u16::MAX as u32) {
                true => Tokens::U16(ids.into_iter().map(|t| t as u16).collect()),
                false => Tokens::U32(ids),
            }
        };
        if let Some(bad) = tokens.max().filter(|&t| t as u64 >= vocab) {
            return Err(TrainError::Setup(format!(
                "`{}` holds token id {bad}, but the model's vocab is {vocab}; byte-level text needs vocab = 256, GPT-2 BPE vocab = 50257",
                path.display()
            )));
        }
        let split_at = ((tokens.len() as f64) * (1.0 - val_fraction)) as usize;
        let path = path.canonicalize().unwrap_or(path.to_path_buf());
        Ok(Dataset { tokens, split_at, path, sha256 })
    }

    /// Both splits must hold at least one window of `seq + 1` tokens
    /// (inputs and their next-token targets): nothing is padded.
    pub fn check_windows(&self, seq: usize) -> Result<(), TrainError> {
        let (train, val) = (self.split_at, self.tokens.len() - self.split_at);
        if train > seq && val > seq {
            return Ok(());
        }
        let frac = val as f64 / self.tokens.len().max(1) as f64;
        Err(TrainError::Setup(format!(
            "data `{}` is too short: it holds {} tokens, split into {train} for training and {val} for validation \
             ({:.0}%), but each split needs at least seq + 1 = {} tokens for one window\n  help: use a file with at \
             least {} tokens, or a smaller `seq`",
            self.path.display(),
            self.tokens.len(),
            100.0 * frac,
            seq + 1,
            ((seq + 1) as f64 / frac.clamp(1e-9, 0.5)).ceil() as u64
        )))
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.len() == 0
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
                let at = |k: usize| T::from(self.tokens.get(k).unwrap_or(0)).unwrap_or_else(T::zero);
                x.push(at(start + i));
                y.push(at(start + i + 1));
            }
        }
        (x, y)
    }
}

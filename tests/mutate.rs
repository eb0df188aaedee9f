//! No input can panic the compiler: mutate every spec of the library (token
//! deletions, swaps, duplications, number changes) and check each mutant.
//! Every mutant must give a model or diagnostics, never a panic.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use tessera::compiler::{Options, SourceMap, check_text};

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Split text into tokens: words/numbers, single punctuation, whitespace runs.
fn tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let c = b[i];
        if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_whitespace() {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
        } else {
            i += text[i..].chars().next().map(char::len_utf8).unwrap_or(1);
        }
        out.push(&text[start..i]);
    }
    out
}

const NUMBERS: &[&str] =
    &["0", "1", "3", "7", "-1", "0.5", "1e30", "1e-30", "99999999999", "4096", "2.5", "1e12", "13", "1B", "3Mi"];

fn mutate(rng: &mut Rng, toks: &[&str]) -> String {
    let mut t: Vec<String> = toks.iter().map(|s| s.to_string()).collect();
    let n = t.len();
    let i = rng.below(n);
    match rng.below(5) {
        0 => {
            t.remove(i);
        }
        1 if i + 1 < n => t.swap(i, i + 1),
        2 => {
            let x = t[i].clone();
            t.insert(i, x);
        }
        _ => {
            // Change a number (or, if there is none near, any token) to another number.
            let nums: Vec<usize> = (0..n).filter(|&k| t[k].starts_with(|c: char| c.is_ascii_digit())).collect();
            let k = if nums.is_empty() { i } else { nums[rng.below(nums.len())] };
            t[k] = NUMBERS[rng.below(NUMBERS.len())].to_string();
        }
    }
    t.concat()
}

#[test]
fn mutated_specs_never_panic() {
    let files: Vec<_> = common::specs_under("specs")
        .into_iter()
        .chain(common::specs_under("tests/ui"))
        .chain(common::specs_under("tests/specs"))
        .collect();
    let per_file: usize = std::env::var("TESSERA_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(120);
    let seed =
        std::env::var("TESSERA_MUTATION_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_1234_abcd_0001u64);
    let mut rng = Rng(seed | 1);
    let (mut ok, mut diagnosed, mut cases) = (0, 0, 0);
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read spec");
        let toks = tokens(&text);
        let dir = f.parent().expect("spec folder").to_path_buf();
        for _ in 0..per_file {
            let mutant = mutate(&mut rng, &toks);
            cases += 1;
            let name = f.to_string_lossy().into_owned();
            let r = catch_unwind(AssertUnwindSafe(|| {
                let mut sources = SourceMap::new();
                check_text(&mut sources, &name, &mutant, &dir, &Options::default()).map(|_| ()).map_err(|d| d.len())
            }));
            match r {
                Ok(Ok(())) => ok += 1,
                Ok(Err(n)) => {
                    assert!(n > 0, "{name}: an error without diagnostics for mutant:\n{mutant}");
                    diagnosed += 1;
                }
                Err(_) => panic!("the compiler panicked on a mutant of {name}:\n{mutant}"),
            }
        }
    }
    assert!(cases >= 3000, "only {cases} mutants");
    assert!(diagnosed > cases / 10, "mutations should mostly break specs: {diagnosed} of {cases} diagnosed");
    eprintln!("{cases} mutants: {ok} checked, {diagnosed} diagnosed, 0 panics");
}

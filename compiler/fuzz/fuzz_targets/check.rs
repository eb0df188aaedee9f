//! The whole checker never panics on any text (with the standard library in
//! reach). Run: `cargo +nightly fuzz run check` in compiler/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_compiler::{Options, SourceMap, check_text};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut sources = SourceMap::new();
    let _ = check_text(&mut sources, "fuzz.spec", text, std::path::Path::new("/nonexistent"), &Options::default());
});

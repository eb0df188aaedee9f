//! The parser and the formatter never panic, and formatting what parses
//! gives text that parses again. Run: `cargo +nightly fuzz run parse` in compiler/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_compiler::syntax::{parse_file, print_file, span::FileId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(ast) = parse_file(FileId(0), text) {
        let printed = print_file(&ast, text);
        assert!(parse_file(FileId(1), &printed).is_ok(), "formatted text does not parse:\n{printed}");
    }
});

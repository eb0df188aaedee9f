//! docs/language.md stays true to the language: every op, every section key
//! and every device is documented, and its complete example checks.

use tessera::compiler::check::{ops, sections};

fn reference() -> String {
    std::fs::read_to_string("docs/language.md").expect("docs/language.md")
}

#[test]
fn every_op_and_keyword_is_documented() {
    let doc = reference();
    for op in ops::op_names() {
        assert!(doc.contains(&format!("`{op}(")), "op `{op}` is missing from docs/language.md");
        for kw in ops::op_keywords(op) {
            assert!(doc.contains(&format!("{kw} =")), "keyword `{kw}` of `{op}` is missing from docs/language.md");
        }
    }
}

#[test]
fn every_section_key_and_device_is_documented() {
    let doc = reference();
    for (section, keys) in sections::schema() {
        for k in keys {
            assert!(
                doc.contains(&format!("`{k}")) || doc.contains(&format!("{k} =")),
                "key `{section}.{k}` is missing from docs/language.md"
            );
        }
    }
    for d in tessera::compiler::device::devices() {
        assert!(doc.contains(d.name.as_str()), "device `{}` is missing from docs/language.md", d.name);
    }
}

#[test]
fn the_complete_example_checks() {
    let doc = reference();
    let tail = &doc[doc.find("## A complete example").expect("section")..];
    let start = tail.find("```\n").expect("code block") + 4;
    let end = start + tail[start..].find("```").expect("end of block");
    let mut sources = tessera::compiler::SourceMap::new();
    let m = tessera::compiler::check_text(
        &mut sources,
        "example.spec",
        &tail[start..end],
        std::path::Path::new("."),
        &Default::default(),
    )
    .unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)));
    assert_eq!(m.name, "tiny_gpt");
}

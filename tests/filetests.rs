//! File tests, in the style of cranelift's filetests: each file under
//! `tests/filetests/` names a pass, its input (a spec with overrides, or IR
//! text in the file) and, after `// ---`, the pass's expected output. One
//! harness runs them all; `UPDATE_EXPECT=1 cargo test --test filetests`
//! rewrites the expected output of every file whose output changed.
//!
//! ```text
//! // test: lower            check | autodiff | shard | schedule | plan | lower | eval | window | decode | verify
//! // spec: specs/tiny/gpt.spec
//! // set: dims.layers=1
//! // rank: 1
//! // input:                 (IR text until `// ---`, for autodiff, plan and verify)
//! // ---
//! expected output
//! ```
//!
//! Every output that is IR text (a graph or a lowered program) must also
//! parse back to itself.

mod common;

use std::path::Path;
use tessera::compiler::autodiff::differentiate;
use tessera::compiler::ir::{self, Graph};
use tessera::compiler::lower;

struct Case {
    test: String,
    spec: Option<String>,
    sets: Vec<String>,
    rank: u64,
    input: String,
    expected: String,
    /// The file's text before the expected output.
    head: String,
}

fn read(path: &Path) -> Case {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (head, expected) = match text.find("// ---\n") {
        Some(at) => (text[..at + 7].to_string(), text[at + 7..].to_string()),
        None => panic!("{}: no `// ---` line before the expected output", path.display()),
    };
    let mut c = Case {
        test: String::new(),
        spec: None,
        sets: Vec::new(),
        rank: 0,
        input: String::new(),
        expected,
        head: head.clone(),
    };
    let mut in_input = false;
    for line in head.lines() {
        if in_input {
            if line != "// ---" {
                c.input += line;
                c.input.push('\n');
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("// ") else { continue };
        match rest.split_once(':') {
            Some(("test", v)) => c.test = v.trim().to_string(),
            Some(("spec", v)) => c.spec = Some(v.trim().to_string()),
            Some(("set", v)) => c.sets.push(v.trim().to_string()),
            Some(("rank", v)) => c.rank = v.trim().parse().expect("a rank number"),
            Some(("input", _)) => in_input = true,
            _ => {}
        }
    }
    c
}

fn model(c: &Case) -> tessera::compiler::Model {
    let sets: Vec<&str> = c.sets.iter().map(String::as_str).collect();
    common::check_ok(c.spec.as_deref().expect("a `// spec:` line"), &sets)
}

fn graph_input(c: &Case) -> Graph {
    ir::parse(&c.input).unwrap_or_else(|e| panic!("the input IR: {e}"))
}

/// A graph's text parses back to itself.
fn round_trip_graph(text: &str) {
    let g = ir::parse(text).unwrap_or_else(|e| panic!("the output does not parse: {e}"));
    assert_eq!(g.to_text(), text, "the output does not print back to itself");
}

fn run(c: &Case) -> String {
    match c.test.as_str() {
        "check" => {
            let t = model(c).graph.to_text();
            round_trip_graph(&t);
            t
        }
        "autodiff" => {
            let g = graph_input(c);
            let loss = g.output("loss").expect("the input names a `loss` output");
            let bw = differentiate(&g, loss).unwrap_or_else(|e| panic!("{e}"));
            ir::verify(&bw.graph).unwrap_or_else(|e| panic!("{e}"));
            let t = bw.graph.to_text();
            round_trip_graph(&t);
            t
        }
        "shard" => {
            let m = model(c);
            let compiled =
                tessera::compiler::driver::compile_ranks(&m, Some(&[c.rank])).unwrap_or_else(|e| panic!("{e}"));
            let r = &compiled.ranks[0];
            assert!(r.stage.is_none(), "`shard` tests take layouts without pipelines (use `schedule`)");
            let t = r.graph.to_text();
            round_trip_graph(&t);
            format!("{}{t}", r.step.iter().map(|s| format!("// step {}\n", s.to_text())).collect::<String>())
        }
        "schedule" => {
            let m = model(c);
            let compiled = tessera::compiler::driver::compile(&m).unwrap_or_else(|e| panic!("{e}"));
            let mut s = String::new();
            for r in &compiled.ranks {
                let sp = r.stage.as_ref().expect("a pipeline layout");
                let order: Vec<String> = sp
                    .schedule
                    .iter()
                    .map(|a| match a {
                        tessera::compiler::parallel::pipeline::Action::Forward { chunk, micro } => {
                            format!("F{chunk}.{micro}")
                        }
                        tessera::compiler::parallel::pipeline::Action::Backward { chunk, micro } => {
                            format!("B{chunk}.{micro}")
                        }
                    })
                    .collect();
                s += &format!("rank {} stage {}: {}\n", r.rank, sp.stage, order.join(" "));
            }
            s
        }
        "plan" => {
            let g = graph_input(c);
            let keep: Vec<_> = g.outputs.iter().map(|(_, v)| *v).collect();
            let p = tessera::compiler::plan::plan(&g, &keep);
            tessera::compiler::plan::validate(&g, &p, &keep).unwrap_or_else(|e| panic!("{e}"));
            let mut s = String::new();
            for (i, off) in p.offsets.iter().enumerate() {
                if let Some(o) = off {
                    s += &format!("%{i} at {o}, {} bytes\n", p.sizes[i]);
                }
            }
            s + &format!("peak {} bytes (one buffer per value: {})\n", p.peak, p.naive)
        }
        "lower" => {
            let m = model(c);
            let compiled =
                tessera::compiler::driver::compile_ranks(&m, Some(&[c.rank])).unwrap_or_else(|e| panic!("{e}"));
            let t = lower::text::print(&compiled.programs[0]);
            let back = lower::text::parse(&t).unwrap_or_else(|e| panic!("the output does not parse: {e}"));
            assert_eq!(back, compiled.programs[0].without_origins(), "the output does not parse back to the program");
            t
        }
        "eval" => {
            let m = model(c);
            let passes = tessera::compiler::driver::Passes::default();
            let bw = tessera::compiler::driver::compile_with(&m, Some(&[0]), passes)
                .unwrap_or_else(|e| panic!("{e}"))
                .backward;
            let p = tessera::compiler::driver::compile_eval(&m, &bw, passes).unwrap_or_else(|e| panic!("{e}"));
            let t = lower::text::print(&p);
            let back = lower::text::parse(&t).unwrap_or_else(|e| panic!("the output does not parse: {e}"));
            assert_eq!(back, p.without_origins(), "the output does not parse back to the program");
            t
        }
        "window" | "decode" => {
            let m = model(c);
            let g = tessera::compiler::driver::compile_one_sequence(&m, Default::default())
                .unwrap_or_else(|e| panic!("{e}"));
            let p = if c.test == "window" {
                g.window
            } else {
                g.paged.unwrap_or_else(|why| panic!("no step: {why}")).steps.remove(0).1
            };
            let t = lower::text::print(&p);
            let back = lower::text::parse(&t).unwrap_or_else(|e| panic!("the output does not parse: {e}"));
            assert_eq!(back, p.without_origins(), "the output does not parse back to the program");
            t
        }
        "verify" => {
            let g = graph_input(c);
            match ir::verify(&g) {
                Ok(()) => "ok\n".to_string(),
                Err(e) => format!("{e}\n"),
            }
        }
        other => panic!("unknown test `{other}`"),
    }
}

#[test]
fn filetests() {
    let update = std::env::var("UPDATE_EXPECT").is_ok_and(|v| v == "1");
    let mut files: Vec<_> = std::fs::read_dir("tests/filetests")
        .expect("tests/filetests")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "test"))
        .collect();
    files.sort();
    let mut failed = Vec::new();
    let mut tests = std::collections::BTreeSet::new();
    for path in &files {
        let c = read(path);
        tests.insert(c.test.clone());
        let got =
            std::panic::catch_unwind(|| run(&c)).unwrap_or_else(|_| panic!("{}: the pass failed", path.display()));
        if got == c.expected {
            continue;
        }
        if update {
            std::fs::write(path, format!("{}{got}", c.head)).expect("write the expected output");
            eprintln!("updated {}", path.display());
        } else {
            let diff: Vec<String> = c
                .expected
                .lines()
                .zip(got.lines())
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .take(3)
                .map(|(i, (a, b))| format!("  line {}: expected `{a}`\n           got      `{b}`", i + 1))
                .collect();
            failed.push(format!(
                "{}: the output differs ({} lines expected, {} got)\n{}",
                path.display(),
                c.expected.lines().count(),
                got.lines().count(),
                diff.join("\n")
            ));
        }
    }
    assert!(failed.is_empty(), "{}\n(UPDATE_EXPECT=1 rewrites the expected outputs)", failed.join("\n"));
    for pass in ["check", "autodiff", "shard", "schedule", "plan", "lower", "eval", "window", "decode", "verify"] {
        assert!(tests.contains(pass), "no file test runs `{pass}`");
    }
}

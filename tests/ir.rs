//! The graph IR built by the checker: it verifies for every spec of the
//! library, and the text form of the tiny specs is a snapshot.

mod common;

use common::{check_ok, specs_under};
use tessera::compiler::ir::{self, Op};

#[test]
fn every_library_graph_verifies() {
    for p in specs_under("specs/models").into_iter().chain(specs_under("specs/tiny")).chain(specs_under("tests/specs"))
    {
        let m = check_ok(&p.to_string_lossy(), &[]);
        ir::verify(&m.graph).unwrap_or_else(|e| panic!("{}: {e}\n{}", p.display(), m.graph.to_text()));
        assert!(!m.graph.is_empty());
        if m.train.is_some() {
            let loss = m.graph.output("loss").unwrap_or_else(|| panic!("{}: no loss output", p.display()));
            assert!(m.graph.ty(loss).dims.is_empty(), "{}: loss is a scalar", p.display());
        }
    }
}

#[test]
fn layers_are_unrolled_with_parameter_slices() {
    let m = check_ok("specs/tiny/gpt.spec", &[]);
    // Every stacked parameter appears once per layer, as a slice of its stack.
    for (i, p) in m.params.iter().enumerate() {
        let uses: Vec<Option<u64>> = m
            .graph
            .nodes
            .iter()
            .filter_map(|n| match n.op {
                Op::Param { index, layer } if index == i => Some(layer),
                _ => None,
            })
            .collect();
        match p.placement {
            tessera::compiler::model::Placement::Layers => {
                let want: Vec<Option<u64>> = p.layers.iter().map(|&l| Some(l)).collect();
                assert_eq!(uses, want, "{}", p.path);
            }
            _ => assert_eq!(uses, vec![None], "{}", p.path),
        }
    }
}

#[test]
fn the_verifier_rejects_broken_graphs() {
    let m = check_ok("specs/tiny/gpt.spec", &[]);
    // A use before definition.
    let mut g = m.graph.clone();
    let last = g.nodes.len() - 1;
    g.nodes[0].inputs.push(ir::ValueId(last as u32));
    assert!(ir::verify(&g).unwrap_err().message.contains("not defined before its use"));
    // A wrong result type.
    let mut g = m.graph.clone();
    let mm = g.nodes.iter().position(|n| matches!(n.op, Op::MatMul { .. })).expect("a matmul");
    g.nodes[mm].ty.dims.pop();
    let e = ir::verify(&g).unwrap_err();
    assert!(e.message.contains("`matmul` should produce"), "{e}");
}

#[test]
fn tiny_graphs_snapshot() {
    for p in specs_under("specs/tiny") {
        let m = check_ok(&p.to_string_lossy(), &[]);
        let name = format!("ir_{}", p.file_stem().expect("stem").to_string_lossy());
        insta::assert_snapshot!(name, m.graph.to_text());
    }
}

#[test]
fn the_optimizer_update_is_a_verified_graph() {
    use tessera::compiler::autodiff::update::{PER_PARAM, optimizer_update};
    let m = check_ok("specs/tiny/gpt.spec", &[]);
    let train = m.train.as_ref().expect("train");
    let g = optimizer_update(&m.params, &train.optimizer, train.clip);
    ir::verify(&g).unwrap_or_else(|e| panic!("{e}\n{}", g.to_text()));
    // New weights and both moments for every parameter; inputs for all of them plus the hyperparameters.
    assert_eq!(g.outputs.len(), 3 * m.params.len());
    let inputs = g.nodes.iter().filter(|n| matches!(n.op, Op::Input { .. })).count();
    assert_eq!(inputs, PER_PARAM * m.params.len() + 1);
    assert!(g.nodes.iter().any(|n| matches!(n.op, Op::ClipScale { .. })), "the spec clips gradients");
}

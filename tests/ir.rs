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
    use tessera::compiler::autodiff::update::optimizer_update;
    use tessera::compiler::config::StateRole;
    let sets = [
        vec![],
        vec!["train.optimizer=sgd(lr = 0.1, momentum = 0.9)"],
        vec!["train.optimizer=adafactor(factor_min = 16)"],
        vec!["train.optimizer=adafactor(beta1 = 0.9, factor_min = 16)"],
    ];
    for set in sets {
        let m = check_ok("specs/tiny/gpt.spec", &set);
        let train = m.train.as_ref().expect("train");
        let opt = &train.optimizer;
        let g = optimizer_update(&m.params, opt, train.clip);
        ir::verify(&g).unwrap_or_else(|e| panic!("{set:?}: {e}\n{}", g.to_text()));
        // New weights and every state tensor for every parameter; inputs for
        // the weights, gradients and state of all, plus the hyperparameters.
        let state: usize = m.params.iter().map(|p| opt.state(&p.ty.dims, &p.ty.dims).len()).sum();
        assert_eq!(g.outputs.len(), m.params.len() + state, "{set:?}");
        let inputs = g.nodes.iter().filter(|n| matches!(n.op, Op::Input { .. })).count();
        assert_eq!(inputs, 2 * m.params.len() + state + 1, "{set:?}");
        assert!(g.nodes.iter().any(|n| matches!(n.op, Op::ClipScale { .. })), "the spec clips gradients");
        if matches!(opt, tessera::compiler::config::Optimizer::Adafactor { .. }) {
            // The matrices factor (both dims ≥ 16), the gains and biases do not.
            let roles = |p: &tessera::compiler::ir::Param| -> Vec<StateRole> {
                opt.state(&p.ty.dims, &p.ty.dims).into_iter().map(|s| s.0).collect()
            };
            let factored = m.params.iter().filter(|p| roles(p).contains(&StateRole::VRow)).count();
            let whole = m.params.iter().filter(|p| roles(p).contains(&StateRole::V)).count();
            assert!(factored > 0 && whole > 0, "{set:?}: {factored} factored, {whole} whole");
            assert_eq!(factored + whole, m.params.len());
        }
    }
    // The factored dims: the two largest but `layer` (rows the smaller), when the rows reach factor_min.
    use tessera::compiler::config::Optimizer;
    use tessera::compiler::ir::Dim;
    let dims = |ds: &[(&str, u64)]| -> Vec<Dim> { ds.iter().map(|&(n, s)| Dim::new(n, s)).collect() };
    let m = check_ok("specs/tiny/gpt.spec", &["train.optimizer=adafactor(factor_min = 64)"]);
    let opt: &Optimizer = &m.train.as_ref().expect("train").optimizer;
    let pair = |r: &str, c: &str| Some((r.to_string(), c.to_string()));
    let experts = dims(&[("layer", 24), ("expert", 128), ("embed", 768), ("mlp", 3072)]);
    assert_eq!(opt.factored(&experts), pair("embed", "mlp"));
    let wq = dims(&[("layer", 24), ("embed", 768), ("heads", 12), ("head_dim", 64)]);
    assert_eq!(opt.factored(&wq), pair("head_dim", "embed"));
    assert_eq!(opt.factored(&dims(&[("layer", 512), ("embed", 768), ("head_dim", 32)])), None);
    assert_eq!(opt.factored(&dims(&[("embed", 768)])), None);
    // Each kept dim keeps its own means: the row moment drops the column, the column moment the row.
    let state = opt.state(&experts, &experts);
    let names = |ds: &[Dim]| -> Vec<String> { ds.iter().map(|d| d.name.clone()).collect() };
    assert_eq!(state.len(), 2);
    assert_eq!(
        (state[0].0, names(&state[0].1)),
        (StateRole::VRow, names(&dims(&[("layer", 24), ("expert", 128), ("embed", 768)])))
    );
    assert_eq!(
        (state[1].0, names(&state[1].1)),
        (StateRole::VCol, names(&dims(&[("layer", 24), ("expert", 128), ("mlp", 3072)])))
    );
    assert_eq!(opt.state_elements(&experts), 24 * 128 * (768 + 3072));
}

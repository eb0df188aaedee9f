//! Loading: the root spec and everything it `use`s, gathered into one
//! program of blocks, models and (from the root file only) sections.
//!
//! `use a/b` looks for `a/b.spec` next to the importing file, then in each of
//! its ancestor folders, then in the standard library built into Tessera.

use crate::diag::{Diag, Diags, unknown_help};
use crate::syntax::ast::{self, Item};
use crate::syntax::span::{SourceMap, Span};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The standard library, built in so that any spec can `use std/...`.
pub const STD: &[(&str, &str)] = &[
    ("std/nn", include_str!("../../../specs/std/nn.spec")),
    ("std/attention", include_str!("../../../specs/std/attention.spec")),
    ("std/mlp", include_str!("../../../specs/std/mlp.spec")),
    ("std/moe", include_str!("../../../specs/std/moe.spec")),
    ("std/conv", include_str!("../../../specs/std/conv.spec")),
    ("std/transformer", include_str!("../../../specs/std/transformer.spec")),
    ("std/encdec", include_str!("../../../specs/std/encdec.spec")),
];

pub struct Program {
    pub blocks: HashMap<String, Rc<ast::BlockDef>>,
    pub models: HashMap<String, Rc<ast::ModelDef>>,
    /// Models of the root file, in order (the last one is checked by default).
    pub root_models: Vec<String>,
    pub sections: Vec<ast::Section>,
    /// Every `weights FORMAT for MODEL` mapping of every file loaded.
    pub weights: Vec<Rc<ast::WeightsDef>>,
}

/// Where a source came from, to resolve its `use`s.
#[derive(Clone)]
pub enum Origin {
    Path(PathBuf),
    Std,
    /// Text given directly (tests, stdin); `use` resolves from this folder.
    Text(PathBuf),
    /// A file of a set embedded in a program (a generated module's spec and
    /// the files it uses, by the paths they were read from): `use` resolves
    /// as on disk, but among the set only.
    Embedded(Rc<[(PathBuf, String)]>, PathBuf),
}

pub fn load(sources: &mut SourceMap, name: &str, text: String, origin: Origin) -> Result<Program, Diags> {
    let mut prog = Program {
        blocks: HashMap::new(),
        models: HashMap::new(),
        root_models: Vec::new(),
        sections: Vec::new(),
        weights: Vec::new(),
    };
    let mut loader = Loader { loaded: HashMap::new(), stack: Vec::new(), diags: Diags::default() };
    loader.file(sources, &mut prog, name, text, origin, true);
    if loader.diags.is_empty() { Ok(prog) } else { Err(loader.diags) }
}

struct Loader {
    /// Canonical key of every file loaded so far.
    loaded: HashMap<String, ()>,
    stack: Vec<String>,
    diags: Diags,
}

impl Loader {
    fn file(
        &mut self,
        sources: &mut SourceMap,
        prog: &mut Program,
        name: &str,
        text: String,
        origin: Origin,
        root: bool,
    ) {
        let id = sources.add(name, text);
        if let Origin::Path(p) = &origin {
            sources.paths.push((id, p.clone()));
        }
        let parsed = match crate::syntax::parse_file(id, sources.text(id)) {
            Ok(f) => f,
            Err(d) => {
                self.diags.push(d);
                return;
            }
        };
        self.stack.push(name.to_string());
        for item in parsed.items {
            match item {
                Item::Use(u) => self.use_item(sources, prog, &u, &origin),
                Item::Block(b) => {
                    if crate::check::ops::is_op(&b.name.name) {
                        self.diags.push(
                            Diag::error(format!("block `{}` has the name of a built-in op", b.name.name))
                                .at(b.name.span, "shadows the op")
                                .help("rename the block"),
                        );
                        continue;
                    }
                    if let Some(old) = prog.blocks.get(&b.name.name) {
                        self.diags.push(
                            Diag::error(format!("block `{}` is defined twice", b.name.name))
                                .at(b.name.span, "second definition")
                                .also(old.name.span, "first defined here")
                                .help("rename one of them"),
                        );
                        continue;
                    }
                    prog.blocks.insert(b.name.name.clone(), Rc::new(b));
                }
                Item::Model(m) => {
                    if let Some(old) = prog.models.get(&m.name.name) {
                        self.diags.push(
                            Diag::error(format!("model `{}` is defined twice", m.name.name))
                                .at(m.name.span, "second definition")
                                .also(old.name.span, "first defined here")
                                .help("rename one of them"),
                        );
                        continue;
                    }
                    if root {
                        prog.root_models.push(m.name.name.clone());
                    }
                    prog.models.insert(m.name.name.clone(), Rc::new(m));
                }
                Item::Weights(w) => {
                    let twice = |o: &ast::WeightsDef| {
                        w.models
                            .iter()
                            .find(|m| o.format.name == w.format.name && o.models.iter().any(|x| x.name == m.name))
                    };
                    if let Some((old, m)) = prog.weights.iter().find_map(|o| twice(o).map(|m| (o, m))) {
                        self.diags.push(
                            Diag::error(format!("`weights {} for {}` is defined twice", w.format.name, m.name))
                                .at(w.format.span, "second definition")
                                .also(old.format.span, "first defined here")
                                .help("merge the two mappings"),
                        );
                        continue;
                    }
                    prog.weights.push(Rc::new(w));
                }
                Item::Section(s) => {
                    if root {
                        prog.sections.push(s);
                    }
                }
            }
        }
        self.stack.pop();
    }

    fn use_item(&mut self, sources: &mut SourceMap, prog: &mut Program, u: &ast::Use, origin: &Origin) {
        let rel = u.path.trim_end_matches(".spec");
        let found = resolve(rel, origin);
        let Some((key, name, text, origin)) = found else {
            let std_names: Vec<&str> = STD.iter().map(|(n, _)| *n).collect();
            let help = match crate::diag::suggest(rel, std_names.iter().copied()) {
                Some(s) => format!("did you mean `use {s}`?"),
                None => format!(
                    "looked for `{rel}.spec` next to this file and in its parent folders; the standard library has {}",
                    unknown_help("module", rel, std_names.iter().copied()).trim_start_matches("expected one of: ")
                ),
            };
            self.diags
                .push(Diag::error(format!("cannot find `{}`", u.path)).at(u.span, "no such spec file").help(help));
            return;
        };
        if self.stack.contains(&name) {
            self.diags.push(
                Diag::error(format!("`use {}` makes a cycle: {} -> {name}", u.path, self.stack.join(" -> ")))
                    .at(u.span, "cyclic use")
                    .help("move the shared blocks into a third file that both use"),
            );
            return;
        }
        if self.loaded.insert(key, ()).is_some() {
            return;
        }
        self.file(sources, prog, &name, text, origin, false);
    }
}

fn resolve(rel: &str, origin: &Origin) -> Option<(String, String, String, Origin)> {
    let dir = match origin {
        Origin::Path(p) | Origin::Embedded(_, p) => p.parent().map(Path::to_path_buf),
        Origin::Text(d) => Some(d.clone()),
        Origin::Std => None,
    };
    let mut cur = dir;
    while let Some(d) = cur {
        let cand = d.join(format!("{rel}.spec"));
        if let Origin::Embedded(files, _) = origin {
            if let Some((p, text)) = files.iter().find(|(p, _)| *p == cand) {
                let key = p.to_string_lossy().into_owned();
                return Some((key, display_name(p), text.clone(), Origin::Embedded(files.clone(), p.clone())));
            }
            cur = d.parent().map(Path::to_path_buf);
            continue;
        }
        if cand.is_file()
            && let Ok(text) = std::fs::read_to_string(&cand)
        {
            let canon = cand.canonicalize().unwrap_or(cand.clone());
            let key = canon.to_string_lossy().into_owned();
            return Some((key, display_name(&canon), text, Origin::Path(canon)));
        }
        cur = d.parent().map(Path::to_path_buf);
    }
    STD.iter()
        .find(|(n, _)| *n == rel)
        .map(|(n, t)| (format!("<builtin>/{n}"), format!("<builtin>/{n}.spec"), t.to_string(), Origin::Std))
}

/// A path as diagnostics show it: relative to the working directory when under it.
fn display_name(path: &Path) -> String {
    let rel = std::env::current_dir()
        .ok()
        .and_then(|cwd| cwd.canonicalize().ok())
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf));
    rel.unwrap_or_else(|| path.to_path_buf()).to_string_lossy().into_owned()
}

/// The span of a whole file (for diagnostics about a file as a whole).
pub fn file_span(sources: &SourceMap, id: crate::syntax::span::FileId) -> Span {
    Span::new(id, 0, sources.text(id).len().min(1))
}

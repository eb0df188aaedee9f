//! The Rust emitter: a spec's lowered programs → one Rust module, for the
//! proc macro (`tessera::spec!`), build scripts (`tessera_build`) and
//! standalone crates (`cargo tessera build`).
//!
//! The module holds what is specific to the spec, typed, and what rustc
//! can make fast:
//! - `config`: the model's constants (dims and scalars);
//! - `Params`: one field per parameter, documented with its shape, its
//!   initializer and the spec line that declares it, loaded and saved as
//!   safetensors by the spec's parameter paths (the files `tessera train`
//!   writes);
//! - `Batch`: one field per model input; `Model` (the forward pass),
//!   `Trainer` (the training step with the spec's optimizer) and, for a
//!   decoder, `generate` (with the KV cache);
//! - every fused kernel of every program it runs (each rank's training
//!   step, the evaluation pass, generation's window and decode step) as a
//!   plain Rust function of one segment of its loop nest, straight-line
//!   arithmetic in a loop that rustc vectorizes, documented with the spec
//!   lines it computes. Kernels that compute the same code (the layers of a
//!   model, the ranks of a layout) are one function.
//!
//! The rest runs on `tessera-runtime` (`tessera_runtime::generated`): the
//! module embeds the spec's text, the runtime compiles it with the same
//! driver as the CLI and walks the lowered programs on the CPU backend,
//! whose GEMMs, attention, MoE routing and collectives serve every engine,
//! with the module's kernels in place of the JIT's. The walk of the
//! instructions is therefore the CLI's own, and a module is small: its
//! size grows with the distinct kernels of a model, not with its layers.
//!
//! The emitter reads the lowered programs (and the checked model's
//! constants and parameter list, for the typed API) and nothing else of
//! the compiler. Emitted code has no `unsafe`.

use crate::check::{Options as CheckOptions, check_path};
use crate::diag::render;
use crate::driver::{self, Passes};
use crate::ir::{BinaryOp, DType, UnaryOp};
use crate::kernel::rows::RowPlan;
use crate::kernel::{Expr, Kernel};
use crate::lower::{Kind, Program};
use crate::model::Model;
use crate::syntax::span::SourceMap;
use proc_macro2::{Ident, Literal, Span as TokSpan, TokenStream};
use quote::{format_ident, quote};
use std::path::{Path, PathBuf};

/// How generated code embeds the spec's files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Embed {
    /// `include_str!` of the path each file was read from (a proc macro or
    /// a build script: the compiler then rebuilds the crate when one changes).
    #[default]
    Paths,
    /// `include_str!` of each file's path relative to this folder, the
    /// crate's manifest folder (`concat!(env!("CARGO_MANIFEST_DIR"), ..)`):
    /// a module that builds wherever the crate is (`tessera build`, and the
    /// committed golden module of the tests). Every file must be under it.
    Manifest(PathBuf),
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Options {
    /// How generated code names the `tessera` facade crate (`::tessera`).
    pub krate: String,
    /// Overrides and model choice, as `tessera check` takes them.
    pub check: CheckOptions,
    pub embed: Embed,
}

impl Default for Options {
    fn default() -> Options {
        Options { krate: "::tessera".into(), check: CheckOptions::default(), embed: Embed::Paths }
    }
}

/// A generated module.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The module's name: the model's.
    pub name: String,
    /// The module (`pub mod NAME { .. }`), formatted by prettyplease.
    pub code: String,
    /// The spec files read, root first: (where read, text).
    pub files: Vec<(PathBuf, String)>,
    /// Distinct kernels emitted.
    pub kernels: usize,
}

/// Why no module was generated: the spec's diagnostics as `tessera check`
/// renders them (file:line:col, labels, help), or a later pass's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

/// Generate the module of the spec at `path`.
pub fn generate(path: &Path, opts: &Options) -> Result<Generated, Error> {
    let mut sources = SourceMap::new();
    let model = check_path(&mut sources, path, &opts.check).map_err(|d| Error(render(&sources, &d.0)))?;
    let files: Vec<(PathBuf, String)> =
        sources.paths.iter().map(|(id, p)| (p.clone(), sources.text(*id).to_string())).collect();
    if model.train.is_none() {
        return Err(Error(format!(
            "error: model `{}` has no `train` section\n  = help: a generated module trains and runs the model: add \
             a `train` section (see docs/language.md)",
            model.name
        )));
    }
    let training = driver::compile_training(&model, None).map_err(|e| Error(format!("error: {e}")))?;
    let mut kernels = KernelSet::default();
    for p in training.step.programs.iter().chain([&training.eval]) {
        kernels.add_program(p, &sources)?;
    }
    // Generation: the model checked for one sequence, when it is a decoder.
    let mut one = opts.check.clone();
    one.micro_batch = Some(1);
    let mut gen_sources = SourceMap::new();
    let generation = check_path(&mut gen_sources, path, &one)
        .ok()
        .and_then(|m| driver::compile_one_sequence(&m, Passes::default()).ok())
        .filter(|g| g.window.bound(crate::lower::Bound::Logits).is_some());
    if let Some(g) = &generation {
        for p in g.programs() {
            kernels.add_program(p, &gen_sources)?;
        }
    }
    if let Embed::Manifest(root) = &opts.embed
        && let Some((p, _)) = files.iter().find(|(p, _)| !p.starts_with(root))
    {
        return Err(Error(format!(
            "error: `{}` is outside `{}`, the folder the module embeds its spec files from\n  = help: keep the \
             spec and the files it uses under the crate's folder",
            p.display(),
            root.display()
        )));
    }
    let krate: syn::Path =
        syn::parse_str(&opts.krate).map_err(|e| Error(format!("crate path `{}`: {e}", opts.krate)))?;
    let tokens = module(&model, &sources, &files, &kernels, generation.is_some(), &krate, opts);
    let file: syn::File =
        syn::parse2(tokens).map_err(|e| Error(format!("the generated module does not parse: {e}")))?;
    let mut code = prettyplease::unparse(&file);
    if let Embed::Manifest(root) = &opts.embed {
        // Doc comments name spec lines by path: relative to the crate, as it builds anywhere.
        code = code.replace(&format!("{}/", root.display()), "");
    }
    Ok(Generated { name: model.name.clone(), code, files, kernels: kernels.list.len() })
}

/// The distinct kernels of some programs, by their code key.
#[derive(Default)]
struct KernelSet {
    list: Vec<Emitted>,
}

struct Emitted {
    key: u64,
    kernel: Kernel,
    /// Empty: every input read from its own slice. Else, per input, the
    /// output it is read from (an update in place: `kernel::in_place_key`).
    alias: Vec<Option<usize>>,
    /// Where its instances come from: `file:line:col \`text\`` lines, each once.
    origin: Vec<String>,
}

impl KernelSet {
    fn add_program(&mut self, p: &Program, sources: &SourceMap) -> Result<(), Error> {
        for ins in &p.instrs {
            let Kind::Kernel { kernel } = &ins.kind else { continue };
            let origin: Vec<String> = ins.origin.iter().map(|s| sources.quote(*s)).collect();
            // The inputs this instruction updates in place, as the CPU backend finds them: the
            // same f32 bytes as an output at the same positions, contiguous along a segment.
            let args: Vec<&crate::lower::Buffer> = ins.ins.iter().chain(&ins.outs).map(|b| p.buffer(*b)).collect();
            let inner = kernel.inner_strides();
            let alias: Vec<Option<usize>> = crate::lower::kernel_aliases(kernel, &args)
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(l, o)| {
                    o.filter(|&o| {
                        let f32s = args[l].ty.dtype == DType::F32 && args[kernel.inputs + o].ty.dtype == DType::F32;
                        f32s && inner[l] == 1
                    })
                })
                .collect();
            let in_place = alias.iter().any(Option::is_some);
            if kernel.is_row() {
                let plan = RowPlan::of(kernel).map_err(|e| Error(format!("a row kernel: {e}")))?;
                let last = plan.passes.len().saturating_sub(1);
                for (i, pass) in plan.passes.into_iter().enumerate() {
                    if in_place && i == last {
                        let mut a = alias.clone();
                        a.resize(pass.kernel.inputs, None);
                        self.add(pass.kernel.clone(), a, &origin);
                    }
                    self.add(pass.kernel, Vec::new(), &origin);
                }
            } else {
                if in_place {
                    self.add(kernel.clone(), alias, &origin);
                }
                self.add(kernel.clone(), Vec::new(), &origin);
            }
        }
        Ok(())
    }

    fn add(&mut self, kernel: Kernel, alias: Vec<Option<usize>>, origin: &[String]) {
        let key = kernel.native_key();
        let key = if alias.is_empty() { key } else { crate::kernel::in_place_key(key, &alias) };
        let at = match self.list.iter().position(|e| e.key == key) {
            Some(i) => i,
            None => {
                self.list.push(Emitted { key, kernel, alias, origin: Vec::new() });
                self.list.len() - 1
            }
        };
        let e = &mut self.list[at];
        for o in origin {
            if !e.origin.contains(o) {
                e.origin.push(o.clone());
            }
        }
    }
}

/// An identifier from a spec name: what is not a letter, digit or `_`
/// becomes `_`; a keyword gets a trailing `_`.
fn ident(name: &str) -> Ident {
    let mut s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    if syn::parse_str::<Ident>(&s).is_err() {
        s.push('_');
    }
    Ident::new(&s, TokSpan::call_site())
}

/// Distinct identifiers for `names`, in order (a clash gets a number).
fn idents<'a>(names: impl Iterator<Item = &'a str>) -> Vec<Ident> {
    let mut seen: Vec<String> = Vec::new();
    names
        .map(|n| {
            let mut id = ident(n).to_string();
            let base = id.clone();
            let mut k = 2;
            while seen.contains(&id) {
                id = format!("{base}_{k}");
                k += 1;
            }
            seen.push(id.clone());
            Ident::new(&id, TokSpan::call_site())
        })
        .collect()
}

fn doc(text: &str) -> TokenStream {
    let lines = text.lines().map(|l| format!(" {l}"));
    quote! { #( #[doc = #lines] )* }
}

fn f32_lit(v: f32) -> TokenStream {
    if v.is_finite() {
        let lit = Literal::f32_suffixed(v);
        quote! { #lit }
    } else if v.is_nan() {
        quote! { f32::NAN }
    } else if v > 0.0 {
        quote! { f32::INFINITY }
    } else {
        quote! { f32::NEG_INFINITY }
    }
}

fn module(
    model: &Model,
    sources: &SourceMap,
    files: &[(PathBuf, String)],
    kernels: &KernelSet,
    decoder: bool,
    krate: &syn::Path,
    opts: &Options,
) -> TokenStream {
    let name = ident(&model.name);
    let model_name = &model.name;
    // Each file's path as an expression: a literal, or under the manifest folder.
    let path_of = |p: &Path| -> TokenStream {
        match &opts.embed {
            Embed::Paths => {
                let key = p.to_string_lossy().into_owned();
                quote! { #key }
            }
            Embed::Manifest(root) => {
                let rel = p.strip_prefix(root).unwrap_or(p);
                let rel = format!("/{}", rel.to_string_lossy());
                quote! { concat!(env!("CARGO_MANIFEST_DIR"), #rel) }
            }
        }
    };
    let root_file = files.first().map(|(p, _)| p.as_path()).unwrap_or(Path::new(""));
    let root = path_of(root_file);
    let shown = match &opts.embed {
        Embed::Paths => root_file.to_string_lossy().into_owned(),
        Embed::Manifest(dir) => root_file.strip_prefix(dir).unwrap_or(root_file).to_string_lossy().into_owned(),
    };
    let embedded = files.iter().map(|(p, _)| {
        let key = path_of(p);
        quote! { (#key, include_str!(#key)) }
    });
    let overrides = &opts.check.overrides;
    let choose = match &opts.check.model {
        Some(m) => quote! { Some(#m) },
        None => quote! { None },
    };
    let set_note = if overrides.is_empty() { String::new() } else { format!(" with `{}`", overrides.join("`, `")) };
    let module_doc = doc(&format!(
        "Model `{}` of `{shown}`{set_note}, generated by Tessera {}.\n\nThe spec's text is embedded: the module \
         compiles it with the same driver as `tessera train` and runs the lowered programs on the CPU backend \
         with the {} kernels below. Do not edit; change the spec.",
        model.name,
        env!("CARGO_PKG_VERSION"),
        kernels.list.len()
    ));

    // config: the model's constants.
    let consts = model.consts.iter().map(|(n, v)| {
        let id = Ident::new(&ident(n).to_string().to_uppercase(), TokSpan::call_site());
        let d = doc(&format!("`{n}` = {v}"));
        if v.fract() == 0.0 && *v >= 0.0 && *v < 9.0e15 {
            let lit = Literal::usize_unsuffixed(*v as usize);
            quote! { #d pub const #id: usize = #lit; }
        } else {
            let lit = Literal::f64_suffixed(*v);
            quote! { #d pub const #id: f64 = #lit; }
        }
    });

    // Params: one field per parameter.
    let fields = idents(model.params.iter().map(|p| p.path.as_str()));
    let n_params = Literal::usize_unsuffixed(model.params.len());
    let param_fields = model.params.iter().zip(&fields).map(|(p, f)| {
        let d =
            doc(&format!("`{}`: `{}`, init `{:?}`.\n\nDeclared at {}.", p.path, p.ty, p.init, sources.quote(p.span)));
        quote! { #d pub #f: Tensor, }
    });
    let paths = model.params.iter().map(|p| p.path.as_str());
    let from_vec = fields.iter().map(|f| quote! { #f: it.next().ok_or_else(missing)?, });
    let to_vec = fields.iter().map(|f| quote! { self.#f.clone() });
    let into_vec = fields.iter().map(|f| quote! { self.#f });

    // Batch: one field per model input.
    let input_fields = idents(model.inputs.iter().map(|i| i.name.as_str()));
    let batch_fields = model.inputs.iter().zip(&input_fields).map(|(i, f)| {
        let d = doc(&format!(
            "`{}`: `{}` per microbatch; a step's batch holds every microbatch along the first dim.",
            i.name, i.ty
        ));
        quote! { #d pub #f: Tensor, }
    });
    let batch_list = input_fields.iter().map(|f| quote! { &self.#f });
    let batch_from = input_fields.iter().map(|f| quote! { #f: it.next().ok_or_else(missing)?, });

    let generate = decoder.then(|| {
        quote! {
            /// Continue `prompt` (token ids) by `cfg.tokens` tokens with the
            /// KV cache (the generation programs of the model checked for
            /// one sequence), from `params`.
            pub fn generate(params: &Params, prompt: &[u32], cfg: &rt::SampleConfig) -> Result<Vec<u32>, rt::Error> {
                let mut g = SPEC.generator(&params.to_vec())?;
                Ok(g.generate(prompt, cfg)?)
            }
        }
    });

    let sample_config = decoder.then(|| quote! { pub use rt::SampleConfig; });
    let table = kernels.list.iter().enumerate().map(|(i, e)| {
        let f = format_ident!("k{i}");
        let key = Literal::u64_unsuffixed(e.key);
        quote! { rt::NativeKernel { key: #key, run: #f }, }
    });
    let n_kernels = Literal::usize_unsuffixed(kernels.list.len());
    let kernel_fns = kernels.list.iter().enumerate().map(|(i, e)| kernel_fn(i, e));

    quote! {
        #module_doc
        // A generated API: what a crate does not call is not its author's dead code.
        #[allow(dead_code, unused_imports)]
        pub mod #name {
            use #krate::runtime::generated as rt;
            pub use rt::{Error, RunConfig, StepReport as StepMetrics, Tensor};
            #sample_config

            /// The spec this module was generated from, embedded.
            pub static SPEC: rt::Spec = rt::Spec {
                model: #model_name,
                path: #root,
                files: &[ #(#embedded),* ],
                overrides: &[ #(#overrides),* ],
                choose: #choose,
                kernels: &KERNELS,
            };

            /// The model's constants: its dims and scalars, after overrides.
            pub mod config {
                #(#consts)*
            }

            /// The model's parameters: logical tensors, whatever the layout
            /// that trains them, named in files by their spec paths.
            #[derive(Debug, Clone)]
            pub struct Params {
                #(#param_fields)*
            }

            impl Params {
                /// The parameters' paths, in field order (their names in safetensors files).
                pub const PATHS: [&'static str; #n_params] = [ #(#paths),* ];

                /// Drawn from the spec's initializers with `seed` (as `tessera train --seed`).
                pub fn init(seed: u64) -> Result<Params, Error> {
                    Params::from_vec(SPEC.init(seed)?)
                }

                /// From a safetensors file, or a checkpoint folder of `tessera train` or [`Trainer::save`].
                pub fn load(path: impl AsRef<std::path::Path>) -> Result<Params, Error> {
                    Params::from_vec(SPEC.load(path.as_ref())?)
                }

                /// To a safetensors file, atomically.
                pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), Error> {
                    SPEC.save(path.as_ref(), &self.to_vec())
                }

                /// From tensors in [`Params::PATHS`] order.
                pub fn from_vec(v: Vec<Tensor>) -> Result<Params, Error> {
                    let n = v.len();
                    let missing = || Error(format!("{n} tensors for {} parameters", #n_params));
                    let mut it = v.into_iter();
                    let p = Params { #(#from_vec)* };
                    if it.next().is_some() {
                        return Err(missing());
                    }
                    Ok(p)
                }

                /// The tensors in [`Params::PATHS`] order.
                pub fn to_vec(&self) -> Vec<Tensor> {
                    vec![ #(#to_vec),* ]
                }

                pub fn into_vec(self) -> Vec<Tensor> {
                    vec![ #(#into_vec),* ]
                }
            }

            /// The model's inputs (token ids and other integers as f32 values).
            #[derive(Debug, Clone)]
            pub struct Batch {
                #(#batch_fields)*
            }

            impl Batch {
                /// The inputs in the model's order.
                pub fn to_vec(&self) -> Vec<&Tensor> {
                    vec![ #(#batch_list),* ]
                }

                /// From tensors in the model's input order.
                pub fn from_vec(v: Vec<Tensor>) -> Result<Batch, Error> {
                    let n = v.len();
                    let missing = || Error(format!("{n} tensors for the model's inputs"));
                    let mut it = v.into_iter();
                    Ok(Batch { #(#batch_from)* })
                }
            }

            /// The forward pass of one microbatch (dropout off).
            pub struct Model {
                eval: rt::Evaluator,
            }

            /// What the forward pass computes.
            #[derive(Debug, Clone, Copy, PartialEq)]
            pub struct Outputs {
                /// The mean loss over the microbatch.
                pub loss: f64,
            }

            impl Model {
                pub fn new(params: &Params) -> Result<Model, Error> {
                    Ok(Model { eval: SPEC.evaluator(&params.to_vec())? })
                }

                pub fn forward(&mut self, batch: &Batch) -> Result<Outputs, Error> {
                    let inputs: Vec<Tensor> = batch.to_vec().into_iter().cloned().collect();
                    Ok(Outputs { loss: self.eval.loss(&inputs)? })
                }
            }

            /// Training with the spec's optimizer, schedule, precision and
            /// layout (its ranks as threads), checkpointed as `tessera train` does.
            pub struct Trainer {
                pub inner: rt::Trainer,
            }

            impl Trainer {
                /// A run as `cfg` says (from [`Trainer::config`]), from the
                /// initializers or `cfg.resume`.
                pub fn new(cfg: RunConfig) -> Result<Trainer, Error> {
                    Ok(Trainer { inner: SPEC.trainer(cfg)? })
                }

                /// A run into `out` that records this spec, with nothing else chosen.
                pub fn config(out: impl Into<std::path::PathBuf>) -> RunConfig {
                    SPEC.run_config(out)
                }

                /// The next step's batch from the spec's data, as `tessera train` draws it.
                pub fn next_batch(&self) -> Result<Batch, Error> {
                    Batch::from_vec(rt::next_batch(&self.inner)?)
                }

                /// One optimizer step on `batch` (every microbatch of the step along the first dim).
                pub fn step(&mut self, batch: &Batch) -> Result<StepMetrics, Error> {
                    rt::step(&mut self.inner, &batch.to_vec())
                }

                /// The current weights.
                pub fn params(&self) -> Result<Params, Error> {
                    Params::from_vec(self.inner.weights()?)
                }

                /// A checkpoint of the run (weights, optimizer state, step) in its folder.
                pub fn save(&self) -> Result<std::path::PathBuf, Error> {
                    Ok(self.inner.save()?)
                }

                /// The mean validation loss over `batches` batches.
                pub fn evaluate(&self, batches: u64) -> Result<f64, Error> {
                    Ok(self.inner.evaluate(batches)?)
                }
            }

            #generate

            static KERNELS: [rt::NativeKernel; #n_kernels] = [ #(#table)* ];

            #(#kernel_fns)*
        }
    }
}

/// Body values the stores need (the rest is not emitted).
fn live(k: &Kernel) -> Vec<bool> {
    let mut live = vec![false; k.body.len()];
    for &(_, v) in &k.stores {
        live[v] = true;
    }
    for i in (0..k.body.len()).rev() {
        if live[i] {
            for o in k.body[i].operands() {
                live[o] = true;
            }
        }
    }
    live
}

/// Kernel `i` as a function of one segment (`tessera_runtime::backend::native::Segment`).
fn kernel_fn(i: usize, e: &Emitted) -> TokenStream {
    let k = &e.kernel;
    let f = format_ident!("k{i}");
    let inner = k.inner_strides();
    let contiguous = |a: usize| inner[a] != 0;
    let live = live(k);
    let row = Literal::usize_unsuffixed(k.dims.last().map_or(1, |d| d.size.max(1)) as usize);
    let v = |j: usize| format_ident!("v{j}");
    let x = |a: usize| format_ident!("x{a}");
    let mut used = vec![false; k.inputs];
    let (mut uses_start, mut uses_seed, mut uses_elements) = (false, false, false);
    // Values the same at every position are computed once, before the loop.
    let mut before = Vec::new();
    let mut inside = Vec::new();
    let mut hoisted = vec![false; k.body.len()];
    let mut element = 0usize;
    for (j, ex) in k.body.iter().enumerate() {
        if let Expr::Element { .. } = ex {
            element += 1;
        }
        if !live[j] {
            continue;
        }
        let vj = v(j);
        let (hoist, value) = match *ex {
            Expr::Load { arg } => match e.alias.get(arg).copied().flatten() {
                // Updated in place: read before the same position is written.
                Some(o) => {
                    let oa = format_ident!("o{o}");
                    (false, quote! { #oa[j] })
                }
                None => {
                    used[arg] = true;
                    let xa = x(arg);
                    if contiguous(arg) { (false, quote! { #xa[j] }) } else { (true, quote! { #xa }) }
                }
            },
            Expr::Element { .. } => {
                uses_elements = true;
                let at = Literal::usize_unsuffixed(element - 1);
                (true, quote! { elements[#at] })
            }
            Expr::Const { value } => (true, f32_lit(value as f32)),
            Expr::Unary { op, x } => {
                let a = v(x);
                let value = match op {
                    UnaryOp::Neg => quote! { -#a },
                    UnaryOp::Square => quote! { #a * #a },
                    UnaryOp::Abs => quote! { #a.abs() },
                    UnaryOp::Sqrt => quote! { #a.sqrt() },
                    UnaryOp::Relu => quote! { #a.max(0.0) },
                    _ => {
                        let op = format_ident!("{op:?}");
                        quote! { rt::f::unary(rt::f::UnaryOp::#op, #a) }
                    }
                };
                (hoisted[x], value)
            }
            Expr::UnaryGrad { op, x, g } => {
                let (a, b) = (v(x), v(g));
                let op = format_ident!("{op:?}");
                (hoisted[x] && hoisted[g], quote! { rt::f::unary_grad(rt::f::UnaryOp::#op, #a, #b) })
            }
            Expr::Binary { op, a, b } => {
                let (va, vb) = (v(a), v(b));
                let value = match op {
                    BinaryOp::Add => quote! { #va + #vb },
                    BinaryOp::Sub => quote! { #va - #vb },
                    BinaryOp::Mul => quote! { #va * #vb },
                    BinaryOp::Div => quote! { #va / #vb },
                };
                (hoisted[a] && hoisted[b], value)
            }
            Expr::Pow { x, exp } => {
                let (a, e) = (v(x), f32_lit(exp as f32));
                (hoisted[x], quote! { #a.powf(#e) })
            }
            Expr::Dropout { x, p, rng } => {
                uses_start = true;
                uses_seed = true;
                let (a, p, rng) = (v(x), Literal::f64_suffixed(p), Literal::u64_suffixed(rng));
                (false, quote! { rt::f::dropout(#a, seed, #rng, (start + j) as u64, #p) })
            }
            Expr::Round { x, dtype } => {
                let a = v(x);
                let value = match dtype {
                    DType::Bf16 => quote! { rt::f::round_bf16(#a) },
                    DType::F16 => quote! { rt::f::round_f16(#a) },
                    _ => quote! { #a },
                };
                (hoisted[x], value)
            }
            Expr::Index => {
                uses_start = true;
                (false, quote! { ((start + j) % #row) as f32 })
            }
            Expr::Equal { a, b } => {
                let (va, vb) = (v(a), v(b));
                (hoisted[a] && hoisted[b], quote! { rt::f::equal(#va, #vb) })
            }
            // A row kernel is emitted as its passes, which reduce nothing themselves.
            Expr::Reduce { .. } => (false, quote! { 0.0 }),
        };
        hoisted[j] = hoist;
        let stmt = quote! { let #vj = #value; };
        if hoist { before.push(stmt) } else { inside.push(stmt) }
    }
    let bind_inputs = (0..k.inputs).filter(|&a| used[a]).map(|a| {
        let xa = x(a);
        let at = Literal::usize_unsuffixed(a);
        if contiguous(a) {
            quote! { let #xa = &ins[#at][..len]; }
        } else {
            quote! { let #xa = ins[#at][0]; }
        }
    });
    let outs: Vec<Ident> = (k.inputs..k.strides.len()).map(|a| format_ident!("o{}", a - k.inputs)).collect();
    let stored: Vec<bool> = (k.inputs..k.strides.len()).map(|a| k.stores.iter().any(|&(s, _)| s == a)).collect();
    let bind_outs = (k.inputs..k.strides.len()).filter(|&a| contiguous(a) && stored[a - k.inputs]).map(|a| {
        let o = &outs[a - k.inputs];
        quote! { let #o = &mut #o[..len]; }
    });
    let out_pats = outs.iter().zip(&stored).map(|(o, &st)| {
        if st {
            quote! { #o }
        } else {
            quote! { _ }
        }
    });
    let stores = k.stores.iter().map(|&(a, val)| {
        let o = &outs[a - k.inputs];
        let vv = v(val);
        if contiguous(a) {
            quote! { #o[j] = #vv; }
        } else {
            quote! { #o[0] = #vv; }
        }
    });
    let ins_pat = used.iter().any(|&u| u).then(|| quote! { ins, });
    let extra = [(uses_elements, quote! { elements, }), (uses_start, quote! { start, }), (uses_seed, quote! { seed, })];
    let extra = extra.iter().filter(|(u, _)| *u).map(|(_, t)| t);
    let mut origin = e.origin.clone();
    if origin.len() > 8 {
        let more = origin.len() - 8;
        origin.truncate(8);
        origin.push(format!("and {more} more"));
    }
    let in_place: Vec<String> =
        e.alias.iter().enumerate().filter_map(|(l, o)| o.map(|o| format!("input {l} is output {o}"))).collect();
    let variant = if in_place.is_empty() { String::new() } else { format!(" In place: {}.", in_place.join(", ")) };
    let text = format!(
        "Kernel {}: {} positions, in segments along the last; computes {}.{variant}\n\nFrom:\n{}",
        i,
        if k.dims.is_empty() {
            "one".to_string()
        } else {
            k.dims.iter().map(|d| format!("{}={}", d.name, d.size)).collect::<Vec<_>>().join(" × ")
        },
        k.ops.join(", "),
        if origin.is_empty() {
            "- (the step's own code)".to_string()
        } else {
            origin.iter().map(|o| format!("- {o}")).collect::<Vec<_>>().join("\n")
        }
    );
    let d = doc(&text);
    // Values and stores the same at every position need no loop over them.
    let per_position = !inside.is_empty() || k.stores.iter().any(|&(a, _)| contiguous(a));
    let body = if per_position {
        quote! {
            for j in 0..len {
                #(#inside)*
                #(#stores)*
            }
        }
    } else {
        quote! {
            if len > 0 {
                #(#stores)*
            }
        }
    };
    quote! {
        #d
        #[allow(clippy::needless_range_loop, clippy::approx_constant, clippy::excessive_precision)]
        fn #f(s: rt::Segment<'_, '_>) {
            let rt::Segment { #ins_pat outs, len, #(#extra)* .. } = s;
            let [#(#out_pats),*] = outs else { unreachable!("the runtime passes one slice per output") };
            #(#bind_inputs)*
            #(#bind_outs)*
            #(#before)*
            #body
        }
    }
}

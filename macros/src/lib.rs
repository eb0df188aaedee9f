//! tessera-macros: `tessera::spec!`, which expands a `.spec` into a typed
//! Rust module (the Rust emitter, `tessera_compiler::codegen::rust`), with
//! spec errors as compile errors at the macro call.
//!
//! ```text
//! tessera::spec!("specs/tiny/gpt.spec");
//! tessera::spec!("specs/tiny/gpt.spec", model = "gpt", set { "dims.embed" = 128, "parallel.mesh.data" = 2 });
//! ```
//!
//! The path is relative to the crate's `CARGO_MANIFEST_DIR` (or to
//! `TESSERA_SPEC_ROOT` where that is set: a crate built away from its
//! sources, as trybuild builds UI tests). The expansion
//! is `pub mod MODEL { .. }`; it embeds the spec and every file it `use`s
//! with `include_str!`, so editing any of them rebuilds the crate.

use proc_macro::TokenStream;
use quote::quote;
use syn::parse::{Parse, ParseStream};
use syn::{Ident, LitStr, Token, braced};
use tessera_compiler::codegen::rust::{Options, generate};

/// The macro's arguments: the spec path, then `model = "NAME"` and
/// `set { "PATH" = VALUE, .. }` in any order.
struct Args {
    path: LitStr,
    model: Option<String>,
    overrides: Vec<String>,
}

impl Parse for Args {
    fn parse(input: ParseStream) -> syn::Result<Args> {
        let path: LitStr = input.parse()?;
        let mut args = Args { path, model: None, overrides: Vec::new() };
        while !input.is_empty() {
            input.parse::<Token![,]>()?;
            if input.is_empty() {
                break;
            }
            let key: Ident = input.parse()?;
            match key.to_string().as_str() {
                "model" => {
                    input.parse::<Token![=]>()?;
                    args.model = Some(input.parse::<LitStr>()?.value());
                }
                "set" => {
                    let body;
                    braced!(body in input);
                    while !body.is_empty() {
                        let k: LitStr = body.parse()?;
                        body.parse::<Token![=]>()?;
                        let v = if body.peek(LitStr) {
                            body.parse::<LitStr>()?.value()
                        } else {
                            let neg = body.parse::<Option<Token![-]>>()?.is_some();
                            let t: proc_macro2::TokenTree = body.parse()?;
                            format!("{}{t}", if neg { "-" } else { "" })
                        };
                        args.overrides.push(format!("{}={v}", k.value()));
                        if body.is_empty() {
                            break;
                        }
                        body.parse::<Token![,]>()?;
                    }
                }
                other => {
                    return Err(syn::Error::new(
                        key.span(),
                        format!(
                            "unknown argument `{other}`: expected `model = \"NAME\"` or `set {{ \"PATH\" = VALUE }}`"
                        ),
                    ));
                }
            }
        }
        Ok(args)
    }
}

/// Expand a spec into `pub mod MODEL { .. }` (see the crate docs).
#[proc_macro]
pub fn spec(input: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(input as Args);
    match expand(&args) {
        Ok(ts) => ts,
        Err(msg) => {
            let span = args.path.span();
            quote::quote_spanned!(span=> compile_error!(#msg);).into()
        }
    }
}

fn expand(args: &Args) -> Result<TokenStream, String> {
    // `TESSERA_SPEC_ROOT` stands in for the crate's folder where a crate is
    // built somewhere else than its sources (trybuild's UI tests).
    let dir = std::env::var("TESSERA_SPEC_ROOT")
        .or_else(|_| std::env::var("CARGO_MANIFEST_DIR"))
        .map_err(|_| "CARGO_MANIFEST_DIR is not set: build with cargo")?;
    let path = std::path::Path::new(&dir).join(args.path.value());
    let mut opts = Options::default();
    opts.check.overrides = args.overrides.clone();
    opts.check.model = args.model.clone();
    let generated = generate(&path, &opts).map_err(|e| {
        // Paths under the crate print relative to it, as cargo prints the crate's own files.
        let mut msg = e.0.replace(&format!("{dir}/"), "");
        if let Ok(canon) = std::path::Path::new(&dir).canonicalize() {
            msg = msg.replace(&format!("{}/", canon.display()), "");
        }
        format!("the spec does not compile:\n{}", msg.trim_end())
    })?;
    let ts: proc_macro2::TokenStream =
        generated.code.parse().map_err(|e| format!("the generated module does not tokenize: {e}"))?;
    Ok(quote!(#ts).into())
}

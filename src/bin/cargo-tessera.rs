//! `cargo tessera ...`: cargo runs this binary as `cargo-tessera tessera ...`.
// Training allocates and frees large activation buffers every step; mimalloc
// reuses them instead of returning pages to the kernel and faulting them back.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tessera::alloc::keep_freed_memory();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "tessera") {
        args.remove(1);
    }
    tessera::cli::main(args)
}

// Training allocates and frees large activation buffers every step; mimalloc
// reuses them instead of returning pages to the kernel and faulting them back.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tessera::alloc::keep_freed_memory();
    tessera::cli::main(std::env::args_os().collect())
}

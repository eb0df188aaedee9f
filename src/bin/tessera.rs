fn main() -> std::process::ExitCode {
    tessera::cli::main(std::env::args_os().collect())
}

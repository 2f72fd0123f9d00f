//! The `authz-outbox` binary: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    authz_outbox::cli::main()
}

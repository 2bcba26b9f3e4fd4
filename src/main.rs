//! The `dedupd` binary: parses its command line, runs it, and maps an error to an exit code.

use std::process::ExitCode;

use clap::Parser;
use dedupd::cli::{self, Cli};

/// The relay allocates on one thread and frees on the store's (claims, sled nodes): mimalloc
/// does that without glibc's arena locks and consolidation (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are answers, not errors.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&cli::Error::usage(&e)),
    };
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// Prints `e` on one line, whatever it is (operators grep for it), and gives its exit code.
fn fail(e: &cli::Error) -> ExitCode {
    let line = e.to_string().replace('\n', " ");
    eprintln!("dedupd: error: {line}");
    ExitCode::from(e.exit_code())
}

//! The `dedupd` binary: parses its command line, runs it, and maps an error to an exit code.

use std::process::ExitCode;

use clap::Parser;
use dedupd::cli::{self, Cli};

/// The relay allocates on one thread and frees on the store's (claims, sled nodes): mimalloc
/// does that without glibc's arena locks and consolidation (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_transparent_huge_pages();
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

/// mimalloc asks for transparent huge pages (`MADV_HUGEPAGE`) on its arenas, so each first touch
/// of 2 MiB faulted in and zeroed all of it (and, with the kernel's `defrag=madvise`, compacted
/// memory first): a quarter of the relay's CPU in `benches/relay.rs`, and a process that holds a
/// few MiB resident at 80 MiB. Small pages cost less for what dedupd touches.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's flag.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

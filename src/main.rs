//! The `dedupd` binary: parses its configuration, sets up logging and runs the library.

fn main() {
    eprintln!("dedupd: the relay is not built yet; see README.md");
    std::process::exit(1);
}

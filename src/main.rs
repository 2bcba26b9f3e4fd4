//! The `dedupd` binary: parses its configuration, sets up logging and runs the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use dedupd::config::{self, Config, ConfigError};

/// Why the binary stopped; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install the SIGINT/SIGTERM handler: {0}")]
    Signal(#[from] ctrlc::Error),
    #[error("{0}")]
    Relay(#[from] dedupd::relay::Error),
}

impl MainError {
    fn exit_code(&self) -> u8 {
        match self {
            // Configuration errors are the operator's to fix: 2, like a usage error.
            MainError::Usage(_) | MainError::Config(_) => 2,
            _ => 1,
        }
    }
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the error: operators grep for it.
            let line = e.to_string().replace('\n', " ");
            eprintln!("dedupd: error: {line}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn try_main() -> Result<(), MainError> {
    let mut args = std::env::args().skip(1);
    if let Some(arg) = args.next() {
        return match arg.as_str() {
            "-h" | "--help" => {
                print!("{}", config::help());
                Ok(())
            }
            "-V" | "--version" => {
                println!("dedupd {}", env!("CARGO_PKG_VERSION"));
                Ok(())
            }
            other => Err(MainError::Usage(format!(
                "unknown argument {other:?}: dedupd is configured by DEDUPD_* variables, see dedupd --help"
            ))),
        };
    }
    let config = Config::from_env()?;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log))
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("dedupd-rt")
        .build()
        .map_err(MainError::Runtime)?;
    let shutdown = dedupd::shutdown::signal()?;
    runtime.block_on(dedupd::run(config, shutdown))?;
    Ok(())
}

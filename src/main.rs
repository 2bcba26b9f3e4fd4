//! The `dedupd` binary: parses its configuration, sets up logging and runs the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use dedupd::cli::{self, Request};
use dedupd::config::{self, Config, ConfigError, LogFormat};
use dedupd::redis::import;

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
    Service(#[from] dedupd::service::Error),
    #[error("{0}")]
    Admin(#[from] cli::Error),
    #[error("{0}")]
    Import(#[from] import::Error),

    #[error("{0}")]
    Shard(#[from] dedupd::shard::Error),
}

impl MainError {
    fn exit_code(&self) -> u8 {
        match self {
            // Configuration errors are the operator's to fix: 2, like a usage error.
            MainError::Usage(_) | MainError::Config(_) => 2,
            MainError::Shard(
                dedupd::shard::Error::BodySha256 | dedupd::shard::Error::Invalid(_),
            ) => 2,
            _ => 1,
        }
    }
}

const USAGE: &str = "\
Usage: dedupd                 run the relay (configured by DEDUPD_* variables, below)
       dedupd check <id>      is <id> inside the dedup window? (exit 0 yes, 1 no)
       dedupd forget <id>     forget <id>, so its next copy passes
       dedupd forget --all --yes
                              forget every id, so the next copy of each passes
       dedupd id [--scope <scope>] <part>...
                              the id recorded for a message of these parts (in DEDUPD_ID_SOURCE's
                              order) in that scope: hashed ids, for check and forget
       dedupd stats           the store's figures as JSON
       dedupd config          the effective configuration, secrets masked
       dedupd import-redis <redis-url> [--match 'msg:*'] [--strip-prefix msg:] [--into relay|redis]
                              copy a Redis' live keys with their TTL: as the relay's seen ids
                              (key minus the prefix), or as the Redis endpoint's keys
       dedupd topology --shards N [--exchange dedupd.shard] [--queue-prefix dedupd.in]
                              declare a consistent-hash ring of N source queues
       dedupd topology cut-over --old-shards N --new-exchange X [--entry dedupd.shard]
                              [--old-exchange E] [--old-queue-prefix P]
                              move the entry exchange to a new ring (see Scaling out)
       dedupd --help | --version

check, forget, stats and import-redis ask the running service at DEDUPD_METRICS_ADDR
(import-redis --into redis: at DEDUPD_REDIS_ADDR), or open DEDUPD_DATA_DIR directly when no
service answers there.
";

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever the error: operators grep for it.
            let line = e.to_string().replace('\n', " ");
            eprintln!("dedupd: error: {line}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn try_main() -> Result<ExitCode, MainError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let request =
        match args.as_slice() {
            [] => None,
            ["-h" | "--help" | "help"] => {
                print!(
                    "dedupd {}: message-deduplication relay for RabbitMQ\n\n{USAGE}\n{}",
                    env!("CARGO_PKG_VERSION"),
                    config::help()
                );
                return Ok(ExitCode::SUCCESS);
            }
            ["-V" | "--version"] => {
                println!("dedupd {}", env!("CARGO_PKG_VERSION"));
                return Ok(ExitCode::SUCCESS);
            }
            ["config"] => {
                for (name, value) in Config::from_env()?.effective() {
                    println!("{name}={value}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            ["check", id] => Some(Request::Check((*id).into())),
            ["forget", "--all", "--yes"] | ["forget", "--yes", "--all"] => Some(Request::ForgetAll),
            ["forget", "--all"] => return Err(MainError::Usage(
                "forget --all forgets every id, so every message seen in the window passes once \
                 more: add --yes to mean it"
                    .into(),
            )),
            ["forget", id] => Some(Request::Forget((*id).into())),
            ["stats"] => Some(Request::Stats),
            ["topology", rest @ ..] => {
                let command = dedupd::shard::Command::parse(rest).map_err(MainError::Usage)?;
                let config = Config::from_env()?;
                init_logging(&config);
                let report = runtime()?.block_on(command.run(&config))?;
                print!("{report}");
                return Ok(ExitCode::SUCCESS);
            }
            ["id", rest @ ..] => {
                let config = Config::from_env()?;
                let (scope, parts) = match rest {
                    ["--scope", scope, parts @ ..] => (Some(scope.as_bytes()), parts),
                    parts => (None, parts),
                };
                let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
                let id = dedupd::relay::id_of(&config, scope, &parts)
                    .map_err(|why| MainError::Usage(format!("dedupd id: {why}")))?;
                println!("{}", String::from_utf8_lossy(&id));
                return Ok(ExitCode::SUCCESS);
            }
            ["import-redis", rest @ ..] => {
                let options = import::Options::parse(rest).map_err(MainError::Usage)?;
                let config = Config::from_env()?;
                init_logging(&config);
                let summary = import::run(&config, &options)?;
                // Refused keys (empty or too long ids) would pass again: not a clean import.
                return Ok(if summary.complete() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
            _ => {
                return Err(MainError::Usage(format!(
                    "unexpected arguments {args:?}; see dedupd --help"
                )))
            }
        };
    let config = Config::from_env()?;
    init_logging(&config);
    if let Some(request) = request {
        let answer = cli::run(&config, &request)?;
        let pretty = serde_json::to_string_pretty(&answer.body).unwrap_or_default();
        println!("{pretty}");
        // Scripts can branch on it: check exits 1 for an unseen id; forgetting one is no error.
        let ok =
            answer.status == 200 || (answer.status == 404 && matches!(request, Request::Forget(_)));
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let shutdown = dedupd::shutdown::on_signal()?;
    runtime()?.block_on(dedupd::run(config, shutdown.cancelled_owned()))?;
    Ok(ExitCode::SUCCESS)
}

/// The single-threaded runtime dedupd runs on (it measured faster than a multi-threaded one).
fn runtime() -> Result<tokio::runtime::Runtime, MainError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("dedupd-rt")
        .build()
        .map_err(MainError::Runtime)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log.filter);
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

//! The command line: `dedupd` runs the service; its subcommands (`check`, `forget`, `id`,
//! `stats`, `config`, `import-redis`, `topology`) administer it. Parsed by clap from [`Cli`];
//! [`run`] does what it says and returns the exit code.

pub mod ask;
pub mod import_redis;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError, LogFormat};
use crate::shard;
use ask::Request;

/// What the help says below the commands: where admin commands go, then every variable.
fn after_help() -> String {
    format!(
        "check, forget, stats, backup and import-redis ask the running service at \
         DEDUPD_METRICS_ADDR \
         (import-redis --into redis: at DEDUPD_REDIS_ADDR), or open DEDUPD_DATA_DIR directly \
         when no service answers there.\n\n{}",
        config::help()
    )
}

/// `dedupd [COMMAND]`.
#[derive(Debug, Parser)]
#[command(
    name = "dedupd",
    version,
    about = "Message-deduplication relay for RabbitMQ: without a command, runs the relay \
             (configured by DEDUPD_* variables, below)",
    after_help = after_help()
)]
pub struct Cli {
    /// What to do instead of running the relay.
    #[command(subcommand)]
    command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Is <ID> inside the dedup window? (exit 0 yes, 1 no)
    Check {
        /// The id, as the relay records it (see `dedupd id` for hashed ids).
        id: String,
    },
    /// Forget <ID>, so its next copy passes; with --all --yes, every id
    Forget {
        /// The id to forget.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Forget every id, so the next copy of each passes (needs --yes).
        #[arg(long)]
        all: bool,
        /// Yes, forget every id.
        #[arg(long, requires = "all")]
        yes: bool,
    },
    /// The id recorded for a message of these parts (in DEDUPD_ID_SOURCE's order) in that
    /// scope: hashed ids, for check and forget
    Id {
        /// The message's scope (with DEDUPD_ID_SCOPE).
        #[arg(long)]
        scope: Option<String>,
        /// The id's parts, in DEDUPD_ID_SOURCE's order.
        #[arg(required = true)]
        parts: Vec<String>,
    },
    /// The store's figures as JSON
    Stats,
    /// A consistent backup of the store, taken while the service runs, into <FILE> (`-`:
    /// stdout)
    Backup {
        /// The backup file, written whole or not at all; `-` for standard output.
        file: PathBuf,
    },
    /// Restore a backup into an empty or new data dir (with the service stopped)
    Restore {
        /// The backup file; `-` for standard input.
        file: PathBuf,
        /// The data dir to create: empty or absent.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// The effective configuration, secrets masked
    Config,
    /// Copy a Redis' live keys with their TTL: as the relay's seen ids (key minus the prefix),
    /// or as the Redis endpoint's keys
    ImportRedis(import_redis::Options),
    /// Declare a consistent-hash ring of N source queues, or cut over to a new one
    Topology(shard::TopologyArgs),
}

/// Why a command failed; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The command line is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A variable is wrong (exit 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The async runtime did not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The signal handler could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handler: {0}")]
    Signal(#[from] ctrlc::Error),
    /// The service stopped on an error.
    #[error(transparent)]
    Service(#[from] crate::service::Error),
    /// An admin command got no answer.
    #[error(transparent)]
    Admin(#[from] ask::Error),
    /// `import-redis` stopped.
    #[error(transparent)]
    Import(#[from] import_redis::Error),
    /// `topology` failed.
    #[error(transparent)]
    Shard(#[from] shard::Error),
    /// `backup` or `restore` failed.
    #[error(transparent)]
    Backup(#[from] crate::backup::Error),
}

impl Error {
    /// The process' exit code: 2 for what the operator must fix in the command or the
    /// configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Config(_) => 2,
            Error::Shard(shard::Error::BodySha256 | shard::Error::Invalid(_)) => 2,
            _ => 1,
        }
    }

    /// A clap error as one line: what is wrong, without the usage block.
    pub fn usage(e: &clap::Error) -> Error {
        let text = e.render().to_string();
        let what = text.split("\n\nUsage:").next().unwrap_or_default();
        let what = what.strip_prefix("error: ").unwrap_or(what);
        let line = what.split_whitespace().collect::<Vec<_>>().join(" ");
        Error::Usage(format!("{line}; see dedupd --help"))
    }
}

/// Runs what `cli` asks for; the exit code on success.
///
/// # Errors
///
/// See [`Error`].
pub fn run(cli: Cli) -> Result<ExitCode, Error> {
    let config = Config::from_env()?;
    let request = match cli.command {
        None => {
            init_logging(&config);
            let shutdown = crate::shutdown::on_signal()?;
            let clock = service_clock();
            runtime()?.block_on(crate::service::run_with_clock(
                config,
                clock,
                shutdown.cancelled_owned(),
            ))?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Config) => {
            for (name, value) in config.effective() {
                println!("{name}={value}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Id { scope, parts }) => {
            let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
            let id = crate::relay::id_of(&config, scope.as_deref().map(str::as_bytes), &parts)
                .map_err(|why| Error::Usage(format!("dedupd id: {why}")))?;
            println!("{}", String::from_utf8_lossy(&id));
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Backup { file }) => {
            init_logging(&config);
            let summary = crate::backup::backup(&config, &file)?;
            // With `-` the backup itself is on stdout: the summary goes to stderr.
            let line = summary.to_json("file", &file).to_string();
            if file == Path::new("-") {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Restore { file, data_dir }) => {
            init_logging(&config);
            let summary = crate::backup::restore(&config, &file, &data_dir)?;
            println!("{}", summary.to_json("data_dir", &data_dir));
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Topology(args)) => {
            init_logging(&config);
            let report = runtime()?.block_on(shard::Command::from(args).run(&config))?;
            print!("{report}");
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::ImportRedis(options)) => {
            options.check().map_err(Error::Usage)?;
            init_logging(&config);
            let summary = import_redis::run(&config, &options)?;
            // Refused keys (empty or too long ids) would pass again: not a clean import.
            return Ok(exit_if(summary.complete()));
        }
        Some(Command::Check { id }) => Request::Check(id),
        Some(Command::Stats) => Request::Stats,
        Some(Command::Forget { all: true, yes, .. }) => {
            if !yes {
                return Err(Error::Usage(
                    "forget --all forgets every id, so every message seen in the window passes \
                     once more: add --yes to mean it"
                        .into(),
                ));
            }
            Request::ForgetAll
        }
        Some(Command::Forget { id, .. }) => Request::Forget(id.unwrap_or_default()),
    };
    init_logging(&config);
    let answer = ask::answer(&config, &request)?;
    let pretty = serde_json::to_string_pretty(&answer.body).unwrap_or_default();
    println!("{pretty}");
    // Scripts can branch on it: check exits 1 for an unseen id; forgetting one is no error.
    let forget = matches!(request, Request::Forget(_));
    Ok(exit_if(
        answer.status == 200 || (answer.status == 404 && forget),
    ))
}

/// Exit 0 if `ok`, else 1.
fn exit_if(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The service's clock: the wall clock. A debug build (what the black-box tests run) reads one
/// that its HTTP endpoint's `POST /clock?advance_ms=N` can move forward, so that a test of the
/// binary lets a dedup window pass without waiting it out; a release build has neither.
fn service_clock() -> std::sync::Arc<dyn crate::store::Clock> {
    #[cfg(debug_assertions)]
    return std::sync::Arc::new(crate::store::SteppedClock::default());
    #[cfg(not(debug_assertions))]
    std::sync::Arc::new(crate::store::SystemClock)
}

/// The single-threaded runtime dedupd runs on (it measured faster than a multi-threaded one).
fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("dedupd-rt")
        .build()
        .map_err(Error::Runtime)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        let args = std::iter::once("dedupd").chain(args.iter().copied());
        Cli::try_parse_from(args)
            .map(|cli| cli.command.expect("a command"))
            .map_err(|e| Error::usage(&e).to_string())
    }

    #[test]
    fn clap_checks_the_definitions() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn topology_declares_or_cuts_over_with_defaults() {
        let Command::Topology(args) = parse(&["topology", "--shards", "3"]).unwrap() else {
            panic!("topology");
        };
        assert_eq!(
            shard::Command::from(args),
            shard::Command::Declare(shard::Ring::new(3))
        );
        let Command::Topology(args) = parse(&[
            "topology",
            "cut-over",
            "--old-shards",
            "2",
            "--new-exchange",
            "dedupd.shard.v2",
        ])
        .unwrap() else {
            panic!("topology");
        };
        assert_eq!(
            shard::Command::from(args),
            shard::Command::CutOver {
                entry: shard::DEFAULT_EXCHANGE.into(),
                old: shard::Ring::new(2),
                new_exchange: "dedupd.shard.v2".into(),
            }
        );
        let err = parse(&["topology"]).unwrap_err();
        assert!(err.contains("--shards") && !err.contains('\n'), "{err}");
        assert!(parse(&["topology", "--shards", "x"]).is_err());
        assert!(parse(&["topology", "--bogus", "1"]).is_err());
        assert!(parse(&["topology", "cut-over", "--old-shards", "2"]).is_err());
    }

    #[test]
    fn import_redis_options_take_defaults_flags_and_refusals() {
        let options = |args: &[&str]| match parse(&[&["import-redis"], args].concat()) {
            Ok(Command::ImportRedis(o)) => o.check().map(|()| o),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let o = options(&["redis://h"]).unwrap();
        assert_eq!(
            (o.pattern.as_str(), o.strip_prefix, o.into),
            ("*", None, import_redis::Namespace::Relay)
        );
        let o = options(&[
            "redis://h",
            "--match",
            "msg:*",
            "--strip-prefix=msg:",
            "--into",
            "relay",
        ])
        .unwrap();
        assert_eq!(o.pattern, "msg:*");
        assert_eq!(o.strip_prefix.as_deref(), Some("msg:"));
        assert_eq!(
            options(&["redis://h", "--into", "redis"]).unwrap().into,
            import_redis::Namespace::Redis
        );
        assert!(options(&[]).is_err());
        assert!(options(&["redis://h", "--match"]).is_err());
        assert!(options(&["redis://h", "--into", "disk"]).is_err());
        assert!(options(&["redis://h", "--what"]).is_err());
        assert!(options(&["redis://h", "redis://i"]).is_err());
        assert!(options(&["redis://h", "--into", "redis", "--strip-prefix", "m"]).is_err());
    }

    #[test]
    fn forget_takes_an_id_or_all() {
        assert!(matches!(
            parse(&["forget", "x"]),
            Ok(Command::Forget {
                id: Some(_),
                all: false,
                ..
            })
        ));
        assert!(matches!(
            parse(&["forget", "--yes", "--all"]),
            Ok(Command::Forget {
                all: true,
                yes: true,
                ..
            })
        ));
        assert!(parse(&["forget"]).is_err());
        assert!(parse(&["forget", "x", "--all"]).is_err());
    }
}

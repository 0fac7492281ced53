//! `aqe`: run and use a fleet of aqe agents from the command line.
//!
//! ```text
//! aqe certs init certs                         # a fleet CA: certs/ca.pem, certs/ca.key
//! aqe certs issue certs node-a --ip 10.0.0.1   # certs/node-a.pem, certs/node-a.key
//! aqe node fleet/                              # the agents of fleet/*.json, until Ctrl-C
//! aqe request worker '{"task":"lint"}' --bootstrap 10.0.0.1:9000 --certs certs --name cli
//! ```
//!
//! Exit codes: 0 success, 1 the operation failed (timeout, remote error), 2 usage, 3 a
//! configuration or file problem, 4 a security refusal (certificate, token), 5 the fleet or
//! the agent could not be reached.
#![warn(missing_docs)]

use std::process::ExitCode;

mod bench;
mod bridge;
mod certs;
mod cli;
mod context;
mod error;
mod inspect;
mod join;
mod node;
mod ops;
mod payload;

use cli::{Cli, Command};
use error::CliError;

fn main() -> ExitCode {
    // `--version` says how the command joins a fleet, and which transports its build has.
    let version = format!(
        "{} (joins fleets over QUIC and NATS; transports built in: {})",
        env!("CARGO_PKG_VERSION"),
        aqe_agent::transports().join(", ")
    );
    let matches = <Cli as clap::CommandFactory>::command()
        .version(version)
        .get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let log_file = match &cli.command {
        Command::Node(n) => n.log_file.clone(),
        _ => None,
    };
    let node = matches!(cli.command, Command::Node(_));
    if let Err(e) = init_tracing(cli.verbose, node, log_file.as_deref()) {
        return report(&e);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aqe: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command));
    // Whatever is left (agents' tasks being torn down) gets a moment, not forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

async fn run(mut command: Command) -> Result<(), CliError> {
    if let Some(join) = joining(&mut command) {
        context::apply(join)?;
    }
    match command {
        Command::Certs(c) => certs::run(c),
        Command::Node(n) => node::run(n).await,
        Command::Send(a) => ops::send(a).await,
        Command::Request(a) => ops::request(a).await,
        Command::Broadcast(a) => ops::broadcast(a).await,
        Command::Reply(a) => ops::reply(a).await,
        Command::Agent(a) => bridge::run(a).await,
        Command::Listen(a) => ops::listen(a).await,
        Command::Peers(a) => ops::peers(a).await,
        Command::Stream(a) => ops::stream(a).await,
        Command::Bench(a) => bench::run(a).await,
        Command::Stats(a) => inspect::stats(a).await,
        Command::Health(a) => inspect::health(a).await,
        Command::Top(a) => inspect::top(a).await,
        Command::Context(c) => context::run(c),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "aqe", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// The joining options of a command that joins a fleet.
fn joining(command: &mut Command) -> Option<&mut cli::Join> {
    Some(match command {
        Command::Send(a) => &mut a.join,
        Command::Request(a) => &mut a.join,
        Command::Broadcast(a) => &mut a.join,
        Command::Reply(a) => &mut a.join,
        Command::Agent(a) => &mut a.join,
        Command::Listen(a) => &mut a.join,
        Command::Peers(a) => &mut a.join,
        Command::Stream(a) => &mut a.join,
        Command::Bench(a) => &mut a.join,
        Command::Stats(a) | Command::Health(a) => &mut a.join,
        Command::Top(a) => &mut a.inspect.join,
        Command::Certs(_)
        | Command::Node(_)
        | Command::Context(_)
        | Command::Completions { .. } => {
            return None;
        }
    })
}

/// One line on stderr: what failed and why, down to the first cause.
fn report(e: &CliError) -> ExitCode {
    let mut line = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    eprintln!("aqe: {}", line.replace('\n', " "));
    e.exit_code()
}

/// The file log's span fields. Span fields are formatted once per formatter type and
/// reused: with stderr's own type, a file got stderr's colour codes inside its spans.
#[derive(Default)]
struct PlainFields(tracing_subscriber::fmt::format::DefaultFields);

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for PlainFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        self.0.format_fields(writer, fields)
    }
}

/// Logs to stderr (and to `log_file`), filtered by `RUST_LOG` or `-v`; a node logs what it
/// does (info), a one-shot command only its warnings.
fn init_tracing(
    verbose: u8,
    node: bool,
    log_file: Option<&std::path::Path>,
) -> Result<(), CliError> {
    use tracing_subscriber::prelude::*;
    let default = match verbose {
        0 if node => "info",
        // A one-shot command says what went wrong in its one error line.
        0 => "error",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a person at a terminal, and never with NO_COLOR set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let file = match log_file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| CliError::File {
                    path: path.to_path_buf(),
                    source,
                })?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .fmt_fields(PlainFields::default())
                    .with_writer(std::sync::Mutex::new(f)),
            )
        }
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .try_init();
    Ok(())
}

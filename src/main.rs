//! The `augpro` binary: parse flags, set up logging and threads, run, map errors to exit codes.

use clap::Parser;
use tracing_subscriber::prelude::*;

fn main() {
    augpro::util::tune_allocator();
    let cli = augpro::cli::Cli::parse();
    let level = if cli.quiet {
        "error"
    } else {
        ["warn,augpro=info", "debug", "trace"][cli.verbose.min(2) as usize]
    };
    // Log lines as filtered; the stage and method spans always reach the timing layer.
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(augpro::timing::SpanTimes)
        .init();
    augpro::util::init_threads(cli.threads);
    if let Err(e) = ctrlc::set_handler(|| {
        augpro::util::remove_temporaries();
        eprintln!("augpro: interrupted (SIGINT/SIGTERM); finished shards are kept, rerun the same command to resume");
        std::process::exit(130);
    }) {
        tracing::debug!("no signal handler: {e}");
    }
    if let Err(e) = augpro::cli::run(cli) {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

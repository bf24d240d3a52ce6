//! The `tallyproxy` binary: CLI, logging, config, signals; then [`tallyproxy::run`].
#![forbid(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use tallyproxy::Config;

#[derive(Parser)]
#[command(version, about = "A Redis protocol proxy built for counters")]
struct Args {
    /// Path to proxy.toml.
    #[arg(long, short, default_value = "proxy.toml")]
    config: PathBuf,
    /// Log as JSON lines (overrides `log.json`).
    #[arg(long)]
    log_json: bool,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tallyproxy: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    init_tracing(&config, args.log_json);
    // One worker (the default on two CPUs) runs tokio's current-thread scheduler, where
    // every connection the I/O driver wakes waits in one FIFO queue. With 1,000 clients the
    // multi-threaded scheduler with one worker had twice its INCR p99 (medians 22 ms against
    // 11: docs/performance.md, sixth round); likely its 256-task local queue, past which
    // wake-ups wait in a global queue looked at every 61 tasks (not profiled).
    let threads = config.runtime_threads();
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tallyproxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(config, args.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tallyproxy stopped");
            eprintln!("tallyproxy: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(config: &Config, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json || config.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(config: Config, path: PathBuf) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let http = tokio::net::TcpListener::bind(config.http_listen).await?;
    let (trigger, _) = tallyproxy::shutdown::channel();
    let signals = trigger.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        signals.trigger();
    });
    // SIGHUP re-reads the config; its shard list is applied as a rebalance (other keys take
    // effect at the next restart).
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match Config::load(&path) {
                Ok(c) => {
                    tracing::info!(path = %path.display(), "SIGHUP: config re-read");
                    let _ = reload_tx.try_send(c);
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: config not reloaded"),
            }
        }
    });
    tallyproxy::server::run_with_reload(config, listener, http, trigger, Some(reload_rx)).await
}

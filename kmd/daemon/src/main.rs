//! `kmd`: command line only; the work is in the library (see its documentation).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use kmd::config::{self, Config};
use kmd::{app, enrol, logging, metrics::Metrics};
use qutemail_service_notify::Notifier;

/// QuteMail key management daemon: QKD key blocks in, HSM-wrapped key pool, ETSI GS QKD 014 out.
///
/// Without a subcommand, runs the daemon (systemd Type=notify with watchdog; stops on SIGTERM).
/// The configuration reference is docs/kmd-config.md.
#[derive(Debug, Parser)]
#[command(name = "kmd", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file [default: /etc/qutemail/kmd.toml].
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
    }
}

#[derive(Debug, clap::Args)]
struct DaemonArgs {
    #[command(flatten)]
    config: ConfigArg,

    /// Log filter overriding `[log] level` (for example `debug` or `info,kmd=trace`).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run(DaemonArgs),
    /// Validate the configuration and the files it names, print a summary; exit 0 if valid,
    /// 1 otherwise. Does not open the HSM or bind listeners.
    CheckConfig(ConfigArg),
    /// Show what the running kmd is doing: HSM health, each link (device state, peer, QBER, key
    /// rate, keys available, blocks), each SAE pair's keys, ETSI 014 requests. Reads kmd's
    /// metrics listener ([metrics] listen in the configuration, or --metrics).
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// The metrics listener to ask (host:port), instead of the configuration's.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Print the raw samples as JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Issue a client certificate for a local SAE from the site CA; prints its SHA-256
    /// fingerprint and a [[sae]] table for kmd.toml.
    EnrolSae {
        /// The site CA's certificate, PEM.
        #[arg(long, value_name = "FILE")]
        ca_cert: PathBuf,
        /// The site CA's private key, PEM.
        #[arg(long, value_name = "FILE")]
        ca_key: PathBuf,
        /// The SAE ID; becomes the certificate's subject CN and the file names.
        #[arg(long, value_name = "ID")]
        sae_id: String,
        /// Directory for <SAE_ID>.pem (certificate) and <SAE_ID>.key (key, mode 0600).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Days of validity from today.
        #[arg(long, value_name = "N", default_value_t = 825)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(&cli.daemon.config.path(), cli.daemon.log_level.as_deref()),
        Some(Command::Run(args)) => run(&args.config.path(), args.log_level.as_deref()),
        Some(Command::CheckConfig(args)) => check_config(&args.path()),
        Some(Command::Status { config, metrics, json }) => status(&config.path(), metrics, json),
        Some(Command::EnrolSae { ca_cert, ca_key, sae_id, out, days, force }) => {
            let request = enrol::EnrolRequest { ca_cert, ca_key, sae_id, out, days, force };
            match enrol::enrol_sae(&request) {
                Ok(done) => {
                    println!("certificate  {}", done.cert_path.display());
                    println!("key          {}", done.key_path.display());
                    println!("valid until  {}", done.not_after);
                    println!("sha256       {}", done.fingerprint);
                    println!();
                    println!("[[sae]]");
                    println!("sae_id = {:?}", request.sae_id);
                    println!("certificate_sha256 = {:?}", done.fingerprint);
                    println!("links = []  # the [[link]] ids this SAE may use");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kmd enrol-sae: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn status(path: &std::path::Path, metrics: Option<std::net::SocketAddr>, json: bool) -> ExitCode {
    let addr = match metrics {
        Some(a) => a,
        None => match Config::load(path) {
            Ok(c) if c.metrics.enabled => c.metrics.listen,
            Ok(_) => {
                eprintln!("kmd status: [metrics] is disabled in {}; pass --metrics ADDR", path.display());
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match kmd::status::fetch(addr) {
        Ok(text) => {
            let samples = kmd::status::parse(&text);
            if json {
                match serde_json::to_string_pretty(&samples) {
                    Ok(t) => println!("{t}"),
                    Err(e) => {
                        eprintln!("kmd status: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", kmd::status::render(&samples));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kmd status: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems = config.check_files();
    problems.extend(config.check_hsm_files());
    if !problems.is_empty() {
        for p in problems {
            eprintln!("{}: {}", path.display(), p.message);
        }
        return ExitCode::FAILURE;
    }
    println!("{}: valid", path.display());
    println!("{}", config.summary());
    ExitCode::SUCCESS
}

fn run(path: &std::path::Path, log_level: Option<&str>) -> ExitCode {
    let notifier = Notifier::from_env();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            notifier.status("failed: invalid configuration");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = logging::init(&config.log, log_level) {
        eprintln!("kmd: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("kmd").build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(Metrics::new());
    let result = runtime.block_on(app::run(config, notifier.clone(), metrics));
    // Tasks still running (drivers, connections) are dropped with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            notifier.status(&format!("failed: {e}"));
            ExitCode::FAILURE
        }
    }
}

//! `qutemail`: the QuteMail mail gateway daemon (`serve`) and the commands that do by hand what
//! it does (site card, seal, accept, open). Operators' commands (users, queue, links, DNS,
//! certificates) are in `qutemailctl`.

use qutemail_gateway::{commands, serve, systemd};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qutemail_vault::Protection;

/// The QuteMail quantum-secure mail gateway.
#[derive(Debug, Parser)]
#[command(name = "qutemail", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the gateway's services ([smtp] listeners and the outbound queue) until SIGTERM or
    /// SIGINT. Prints `READY name=address …` once every listener is bound.
    Serve {
        /// The gateway configuration file.
        #[arg(long, short, default_value = "/etc/qutemail/qutemail.toml")]
        config: PathBuf,
    },
    /// Prints this site's public card (its domain, ML-KEM-768 and certificate keys) as JSON, to
    /// give to peer sites; creates the site keys, wrapped by the HSM, on first use.
    SiteCard {
        /// The gateway configuration file.
        #[arg(long, short, default_value = "/etc/qutemail/qutemail.toml")]
        config: PathBuf,
        /// Write the card to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Seals an RFC 5322 message for a peer site with QKD keys from kmd (what outbound SMTP
    /// does); writes the sealed MIME message.
    Seal {
        /// The gateway configuration file.
        #[arg(long, short, default_value = "/etc/qutemail/qutemail.toml")]
        config: PathBuf,
        /// The recipient's mail domain (a `[[peer]]`).
        #[arg(long)]
        to_domain: String,
        /// Protection: hybrid, qaes, otp or pqc (default: the policy's choice for the peer).
        #[arg(long, value_parser = parse_protection)]
        protection: Option<Protection>,
        /// The message to seal (its From, To, Cc, Date and Message-ID become the outer headers).
        #[arg(long = "in")]
        input: PathBuf,
        /// Where to write the sealed message.
        #[arg(long)]
        out: PathBuf,
    },
    /// Accepts a sealed message from a peer site (what inbound SMTP does): fetches its keys from
    /// kmd once, verifies it and its certificate, and writes the protection record to keep with
    /// it (its keys sealed under an HSM-wrapped data key).
    Accept {
        /// The gateway configuration file.
        #[arg(long, short, default_value = "/etc/qutemail/qutemail.toml")]
        config: PathBuf,
        /// The sealed message.
        #[arg(long = "in")]
        input: PathBuf,
        /// Where to write the protection record (JSON).
        #[arg(long)]
        record: PathBuf,
    },
    /// Opens a stored sealed message with its protection record and writes the inner message.
    Open {
        /// The gateway configuration file.
        #[arg(long, short, default_value = "/etc/qutemail/qutemail.toml")]
        config: PathBuf,
        /// The sealed message (an envelope or an at-rest blob).
        #[arg(long = "in")]
        input: PathBuf,
        /// Its protection record (from `accept`).
        #[arg(long)]
        record: PathBuf,
        /// Where to write the inner message; it is written only once the whole message verified.
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_protection(text: &str) -> Result<Protection, String> {
    match text {
        "hybrid" => Ok(Protection::Hybrid),
        "qaes" => Ok(Protection::Qaes),
        "otp" => Ok(Protection::Otp),
        "pqc" => Ok(Protection::Pqc),
        other => Err(format!("{other:?} is not one of hybrid, qaes, otp, pqc")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("QUTEMAIL_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                if matches!(std::env::args().nth(1).as_deref(), Some("serve")) { "info" } else { "warn" },
            )
        }))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // Sockets passed by systemd (socket activation) are taken before any thread or file is
    // opened, while descriptors 3.. are still exactly the ones systemd handed over.
    let inherited = match &cli.command {
        Command::Serve { .. } => match systemd::InheritedListeners::from_env() {
            Ok(sockets) => sockets,
            Err(e) => {
                eprintln!("qutemail: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => systemd::InheritedListeners::default(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qutemail: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve::serve(&config, inherited).await,
            Command::SiteCard { config, out } => commands::site_card(&config, out.as_deref()).await,
            Command::Seal { config, to_domain, protection, input, out } => {
                commands::seal(&config, &to_domain, protection, &input, &out).await
            }
            Command::Accept { config, input, record } => commands::accept(&config, &input, &record).await,
            Command::Open { config, input, record, out } => {
                commands::open(&config, &input, &record, &out).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qutemail: {e:#}");
            ExitCode::FAILURE
        }
    }
}

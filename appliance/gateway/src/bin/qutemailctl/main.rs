//! `qutemailctl`: the operator's tool for a QuteMail site. Parses arguments, then hands over to
//! the commands in `qutemail_gateway::operator`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Args, Parser, Subcommand};
use qutemail_gateway::operator::{certs, dns, links, queue, users};

/// Operate a QuteMail site: users, QKD links and key pools, the queue, certificates, backups and
/// the DNS records to publish. Commands read the gateway's configuration and its store directly; the
/// gateway (`qutemail serve`) may keep running.
#[derive(Debug, Parser)]
#[command(name = "qutemailctl", version)]
struct Cli {
    /// The gateway configuration file (the one `qutemail serve` runs with).
    #[arg(long, short, global = true, default_value = "/etc/qutemail/qutemail.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mail accounts of this site.
    #[command(subcommand)]
    Users(UsersCommand),
    /// The outbound queue: what waits for delivery, retrying it now, deleting it.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Each QKD link and its key pool as kmd reports them (link state, peer kmd, QBER, secret
    /// key rate, keys available, key blocks) and the SAE pairs kmd serves. Read from kmd's
    /// Prometheus metrics listener.
    Links {
        /// kmd's metrics URL (default: `[web] kmd_metrics_url` in the configuration), e.g.
        /// `http://127.0.0.1:9461/metrics`.
        #[arg(long, value_name = "URL")]
        kmd_metrics: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Per-message "Quantum Secured" certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Prints every DNS record this site must publish for its mail: MX (from [smtp] hostname),
    /// SPF, DKIM (from the [dkim] keys), DMARC, MTA-STS and SMTP TLS reporting, as zone-file
    /// lines, with the MTA-STS policy file to serve. SPF and DMARC are strict starting points
    /// to adapt to the site's other senders.
    Dns {
        /// Print JSON (records, the MTA-STS policy and its URL) instead of zone-file lines.
        #[arg(long, conflicts_with = "mta_sts_policy")]
        json: bool,
        /// Print only the MTA-STS policy file, to serve at
        /// https://mta-sts.DOMAIN/.well-known/mta-sts.txt.
        #[arg(long)]
        mta_sts_policy: bool,
    },
    /// Writes the whole mail store (every account, folder, flag and sealed message, the queue)
    /// and the site's keys to one encrypted file, while the gateway keeps running. Every key
    /// is re-wrapped from the HSM under a key derived from a passphrase (argon2id), read from
    /// the first line of standard input or --passphrase-file; messages stay sealed.
    Backup {
        /// The backup file to write (mode 0600; written as FILE.partial, then renamed).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        /// Read the passphrase (first line) from this file instead of standard input.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Restores a backup into this site, whose mail store must hold no mail (a freshly
    /// installed appliance, same [site] domain; its accounts without mail, such as the
    /// first-boot admin, are replaced): re-wraps every key under this site's HSM, writes the
    /// store, the sealed messages and the site keys. Refuses, changing nothing, on a wrong
    /// passphrase, a damaged or altered archive, or a store that holds mail.
    Restore {
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// Read the passphrase (first line) from this file instead of standard input.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
}

/// An account's address.
#[derive(Debug, Args)]
struct Address {
    /// The account's address, e.g. alice@a.example.
    address: String,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Creates an account with its INBOX, Sent, Drafts, Trash and Junk; the password is read
    /// from the first line of standard input (never the command line).
    Add {
        /// The address, in this site's domain ([site] domain).
        address: String,
        /// Display name (default: the local part).
        #[arg(long)]
        name: Option<String>,
        /// Most bytes the account's messages may take (default: unlimited).
        #[arg(long, value_name = "BYTES")]
        quota: Option<u64>,
    },
    /// Sets a new password, read from the first line of standard input.
    Passwd(Address),
    /// Disables an account: it can no longer log in or receive mail (its mail is kept).
    Disable(Address),
    /// Enables a disabled account.
    Enable(Address),
    /// Lists the accounts: address, active or disabled, display name.
    List {
        /// Print JSON (with quota and use) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Shows one account: state, quota and use, and each mailbox's message counts.
    Show {
        /// The account's address.
        address: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Lists queued messages and each recipient's state, attempts, next attempt and last reply.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Makes waiting recipients due now (e.g. once a peer or link is back); the running
    /// gateway attempts them within seconds.
    #[command(group = ArgGroup::new("which").required(true).args(["queue_id", "all"]))]
    Retry {
        /// The message's queue ID (from `queue list`).
        queue_id: Option<String>,
        /// Every waiting message.
        #[arg(long)]
        all: bool,
    },
    /// Deletes a message from the queue. Its sender, when an account of this site, gets a
    /// delivery status notification (a bounce) naming the recipients that were still waiting,
    /// as when the queue gives up; mail from other sites is dropped without a report.
    Delete {
        /// The message's queue ID (from `queue list`).
        queue_id: String,
        /// Drop the message without telling the sender.
        #[arg(long)]
        no_bounce: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Verifies a sealed message file's certificate offline, with no key but the sender's
    /// public card: signature, ciphertext digest and bound headers. Exits 0 when it verifies,
    /// 1 when it does not.
    Verify {
        /// The sealed message (as it travelled between sites).
        #[arg(long, value_name = "FILE")]
        message: PathBuf,
        /// The sending site's card (JSON, from `qutemail site-card`).
        #[arg(long, value_name = "FILE")]
        sender_card: PathBuf,
        /// Print the certificate as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Shows and verifies the certificate of a message in an account's mailbox, against the
    /// sending peer's key in this site's [[peer]] directory (mode, key IDs, link, QBER, key
    /// rate, signature). Exits 0 when it verifies, 1 when it does not or there is none.
    Show {
        /// The account's address.
        address: String,
        /// The message's IMAP UID in the mailbox.
        #[arg(long)]
        uid: u32,
        /// The mailbox.
        #[arg(long, default_value = "INBOX")]
        mailbox: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUTEMAIL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qutemailctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = cli.config;
    let result = runtime.block_on(async {
        match cli.command {
            Command::Users(command) => match command {
                UsersCommand::Add { address, name, quota } => {
                    users::add(&config, &address, name.as_deref(), quota).await
                }
                UsersCommand::Passwd(a) => users::passwd(&config, &a.address).await,
                UsersCommand::Disable(a) => users::set_disabled(&config, &a.address, true).await,
                UsersCommand::Enable(a) => users::set_disabled(&config, &a.address, false).await,
                UsersCommand::List { json } => users::list(&config, json).await,
                UsersCommand::Show { address, json } => users::show(&config, &address, json).await,
            },
            Command::Queue(command) => match command {
                QueueCommand::List { json } => queue::list(&config, json).await,
                QueueCommand::Retry { queue_id, all: _ } => queue::retry(&config, queue_id.as_deref()).await,
                QueueCommand::Delete { queue_id, no_bounce } => {
                    queue::delete(&config, &queue_id, no_bounce).await
                }
            },
            Command::Links { kmd_metrics, json } => links::links(&config, kmd_metrics.as_deref(), json).await,
            Command::Cert(CertCommand::Verify { message, sender_card, json }) => {
                certs::verify(&message, &sender_card, json)
            }
            Command::Cert(CertCommand::Show { address, uid, mailbox, json }) => {
                certs::show(&config, &address, &mailbox, uid, json).await
            }
            Command::Dns { json, mta_sts_policy } => dns::dns(&config, json, mta_sts_policy),
            Command::Backup { out, force, passphrase_file } => {
                qutemail_gateway::backup::run_backup(&config, &out, force, passphrase_file.as_deref()).await
            }
            Command::Restore { input, passphrase_file } => {
                qutemail_gateway::backup::run_restore(&config, &input, passphrase_file.as_deref()).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qutemailctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `qutemailctl users …`: the site's mail accounts in the store.

use std::path::Path;
use std::process::ExitCode;

use qutemail_store::NewAccount;
use serde::Serialize;
use zeroize::Zeroizing;

use super::{OperatorError, domain_of, load, print_json, unix};
use crate::secret_input::{Confirm, read_secret_line};
use crate::wiring;

/// Reads a new password from the first line of standard input (never from the command line,
/// where other users could see it); typed at a terminal, without echo and twice.
fn password_from_stdin() -> Result<Zeroizing<String>, OperatorError> {
    let password = read_secret_line("New password: ", Confirm::Twice).map_err(OperatorError::Stdin)?;
    if password.is_empty() {
        return Err(OperatorError::NoPassword);
    }
    Ok(password)
}

/// `users add ADDRESS [--name NAME] [--quota BYTES]`: creates an account with its standard
/// mailboxes; the password is the first line of standard input.
pub async fn add(
    config: &Path,
    address: &str,
    name: Option<&str>,
    quota: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    let (local, domain) = domain_of(address)?;
    if !domain.eq_ignore_ascii_case(&config.site.domain) {
        return Err(
            OperatorError::WrongDomain { address: address.to_owned(), domain: config.site.domain }.into()
        );
    }
    let password = password_from_stdin()?;
    let store = wiring::store(&config).await?;
    let created = store
        .create_account(NewAccount {
            address,
            display_name: name.unwrap_or(local),
            password: &password,
            quota_bytes: quota,
        })
        .await;
    store.close().await;
    let account = created?;
    println!("created {} (mailboxes INBOX, Sent, Drafts, Trash, Junk)", account.address);
    Ok(ExitCode::SUCCESS)
}

/// `users passwd ADDRESS`: sets a new password, read from standard input.
pub async fn passwd(config: &Path, address: &str) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    let password = password_from_stdin()?;
    let store = wiring::store(&config).await?;
    let changed = store.set_password(address, &password).await;
    store.close().await;
    changed?;
    println!("password of {address} changed");
    Ok(ExitCode::SUCCESS)
}

/// `users disable|enable ADDRESS`.
pub async fn set_disabled(config: &Path, address: &str, disabled: bool) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    let store = wiring::store(&config).await?;
    let changed = store.set_disabled(address, disabled).await;
    store.close().await;
    changed?;
    println!("{address} {}", if disabled { "disabled" } else { "enabled" });
    Ok(ExitCode::SUCCESS)
}

/// An account as `users list --json` and `users show --json` print it.
#[derive(Debug, Serialize)]
pub struct UserView {
    /// The address.
    pub address: String,
    /// Display name.
    pub name: String,
    /// `active` or `disabled`.
    pub state: &'static str,
    /// Quota in bytes (`None`: unlimited).
    pub quota_bytes: Option<u64>,
    /// Bytes in use (sum of message sizes).
    pub used_bytes: u64,
    /// Created, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Mailboxes with their message counts (`users show` only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mailboxes: Vec<MailboxView>,
}

/// A mailbox's counts.
#[derive(Debug, Serialize)]
pub struct MailboxView {
    /// Name.
    pub name: String,
    /// Messages.
    pub messages: u32,
    /// Messages not yet seen.
    pub unseen: u32,
    /// Bytes.
    pub bytes: u64,
    /// The UID the next message will get (the newest message has a lower one).
    pub uid_next: u32,
}

fn view(a: qutemail_store::Account) -> UserView {
    UserView {
        address: a.address,
        name: a.display_name,
        state: if a.disabled { "disabled" } else { "active" },
        quota_bytes: a.quota_bytes,
        used_bytes: a.used_bytes,
        created_unix: unix(a.created_at),
        mailboxes: Vec::new(),
    }
}

/// `users list [--json]`.
pub async fn list(config: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    let store = wiring::store(&config).await?;
    let accounts = store.list_accounts().await;
    store.close().await;
    let users: Vec<UserView> = accounts?.into_iter().map(view).collect();
    if json {
        print_json(&users)?;
    } else {
        for u in users {
            println!("{}\t{}\t{}", u.address, u.state, u.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `users show ADDRESS [--json]`: state, quota and use, and each mailbox's counts.
pub async fn show(config: &Path, address: &str, json: bool) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    let store = wiring::store(&config).await?;
    let shown = async {
        let account = store.account(address).await?;
        let mut mailboxes = Vec::new();
        for m in store.list_mailboxes(account.id).await? {
            let status = store.status(m.id).await?;
            mailboxes.push(MailboxView {
                name: m.name,
                messages: status.messages,
                unseen: status.unseen,
                bytes: status.total_size,
                uid_next: status.uidnext,
            });
        }
        Ok::<_, qutemail_store::StoreError>(UserView { mailboxes, ..view(account) })
    }
    .await;
    store.close().await;
    let user = shown?;
    if json {
        print_json(&user)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}  ({})", user.address, user.state);
    println!("  name       {}", user.name);
    let quota = user.quota_bytes.map_or("unlimited".to_owned(), |q| format!("{q} bytes"));
    println!("  used       {} bytes of {quota}", user.used_bytes);
    println!("  created    {} (Unix time)", user.created_unix);
    println!("  mailboxes  {}", user.mailboxes.len());
    for m in &user.mailboxes {
        println!(
            "    {:<20} {:>6} messages, {:>6} unseen, {:>10} bytes",
            m.name, m.messages, m.unseen, m.bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}

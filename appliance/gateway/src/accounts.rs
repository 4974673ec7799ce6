//! `qutemail account …` and `qutemail queue list`: operator commands on the mail store.

use std::io::BufRead as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use qutemail_store::NewAccount;
use zeroize::Zeroizing;

use crate::config::GatewayConfig;
use crate::wiring;

/// Reads a password from the first line of standard input (never from the command line, where
/// other users could see it).
fn password_from_stdin() -> anyhow::Result<Zeroizing<String>> {
    let mut line = Zeroizing::new(String::new());
    std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
    let password = Zeroizing::new(line.trim_end_matches(['\r', '\n']).to_owned());
    anyhow::ensure!(!password.is_empty(), "no password on standard input (give it as the first line)");
    Ok(password)
}

pub async fn add(config: &Path, address: &str, name: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let (local, domain) = address.rsplit_once('@').context("the address has no @")?;
    anyhow::ensure!(
        domain.eq_ignore_ascii_case(&config.site.domain),
        "{address} is not in this site's domain {}",
        config.site.domain
    );
    let password = password_from_stdin()?;
    let store = wiring::store(&config).await?;
    let account = store
        .create_account(NewAccount {
            address,
            display_name: name.unwrap_or(local),
            password: &password,
            quota_bytes: None,
        })
        .await?;
    println!("created {} (mailboxes INBOX, Sent, Drafts, Trash, Junk)", account.address);
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn passwd(config: &Path, address: &str) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let password = password_from_stdin()?;
    let store = wiring::store(&config).await?;
    store.set_password(address, &password).await?;
    println!("password of {address} changed");
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn set_disabled(config: &Path, address: &str, disabled: bool) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let store = wiring::store(&config).await?;
    store.set_disabled(address, disabled).await?;
    println!("{address} {}", if disabled { "disabled" } else { "enabled" });
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn list(config: &Path) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let store = wiring::store(&config).await?;
    for a in store.list_accounts().await? {
        println!("{}\t{}\t{}", a.address, if a.disabled { "disabled" } else { "active" }, a.display_name);
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn queue_list(config: &Path) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let store = wiring::store(&config).await?;
    let listing = store.queue_listing().await?;
    if listing.is_empty() {
        println!("the queue is empty");
    }
    for m in listing {
        let age = m.created_at.elapsed().map_or(0, |d| d.as_secs());
        println!("{}  {} bytes  from <{}>  queued {age} s ago", m.queue_id, m.size, m.sender);
        for (address, state, attempts, next, reply) in m.recipients {
            let wait = next.duration_since(std::time::SystemTime::now()).map_or(0, |d| d.as_secs());
            println!(
                "    <{address}>  {state}  {attempts} attempt(s){}{}",
                if state == "queued" { format!(", next in {wait} s") } else { String::new() },
                reply.map(|r| format!(": {r}")).unwrap_or_default()
            );
        }
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

//! `qutemailctl queue …`: the outbound queue as the store keeps it. The running gateway's
//! queue looks for due recipients every few seconds, so `retry` takes effect without a signal.

use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use qutemail_queue::dsn;
use qutemail_queue::{DsnAction, DsnRequest, RecipientReport, build_dsn};
use qutemail_store::{QueuedMessage, QueuedRecipient, Store};
use qutemail_vault::{AppendRequest, MailVault, Protection, StoredProtection};
use serde::Serialize;
use tokio::io::AsyncReadExt as _;
use zeroize::Zeroizing;

use super::{OperatorError, load, print_json, unix};
use crate::config::GatewayConfig;
use crate::wiring;

/// The enhanced status code a bounce for a deleted message carries (RFC 3463: permanent, other).
const DELETED_STATUS: &str = "5.0.0";
/// The diagnostic the sender reads.
const DELETED_DIAGNOSTIC: &str = "deleted from the queue by the mail system's administrator; not delivered";

/// A queued message as `queue list --json` prints it.
#[derive(Debug, Serialize)]
pub struct QueuedView {
    /// Queue ID.
    pub queue_id: String,
    /// Envelope sender (`""`: the null sender).
    pub sender: String,
    /// Size as submitted, bytes.
    pub size: u64,
    /// Queued at, seconds since the Unix epoch.
    pub queued_unix: u64,
    /// Its recipients.
    pub recipients: Vec<RecipientView>,
}

/// A recipient's delivery state.
#[derive(Debug, Serialize)]
pub struct RecipientView {
    /// The address.
    pub address: String,
    /// `queued`, `delivered` or `failed`.
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
    /// The next attempt (for `queued`), seconds since the Unix epoch.
    pub next_attempt_unix: u64,
    /// The last reply or diagnosis.
    pub last_reply: Option<String>,
}

/// `queue list [--json]`.
pub async fn list(config: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    let store = wiring::store(&config).await?;
    let listing = store.queue_listing().await;
    store.close().await;
    let queued: Vec<QueuedView> = listing?
        .into_iter()
        .map(|m| QueuedView {
            queue_id: m.queue_id,
            sender: m.sender,
            size: m.size,
            queued_unix: unix(m.created_at),
            recipients: m
                .recipients
                .into_iter()
                .map(|(address, state, attempts, next, last_reply)| RecipientView {
                    address,
                    state,
                    attempts,
                    next_attempt_unix: unix(next),
                    last_reply,
                })
                .collect(),
        })
        .collect();
    if json {
        print_json(&queued)?;
        return Ok(ExitCode::SUCCESS);
    }
    if queued.is_empty() {
        println!("the queue is empty");
    }
    let now = unix(SystemTime::now());
    for m in queued {
        let sender = if m.sender.is_empty() { "<>".to_owned() } else { format!("<{}>", m.sender) };
        println!(
            "{}  {} bytes  from {sender}  queued {} s ago",
            m.queue_id,
            m.size,
            now.saturating_sub(m.queued_unix)
        );
        for r in m.recipients {
            let next = if r.state == "queued" {
                format!(", next in {} s", r.next_attempt_unix.saturating_sub(now))
            } else {
                String::new()
            };
            let reply = r.last_reply.map(|r| format!(": {r}")).unwrap_or_default();
            println!("    <{}>  {}  {} attempt(s){next}{reply}", r.address, r.state, r.attempts);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `queue retry QUEUE_ID` or `queue retry --all`: waiting recipients become due now.
pub async fn retry(config: &Path, queue_id: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    let store = wiring::store(&config).await?;
    let result = async {
        if let Some(id) = queue_id
            && store.queued_message(id).await?.is_none()
        {
            return Ok(None);
        }
        store.retry_queued_now(queue_id).await.map(Some)
    }
    .await;
    store.close().await;
    match (result?, queue_id) {
        (None, Some(id)) => Err(OperatorError::NoSuchQueuedMessage { queue_id: id.to_owned() }.into()),
        (n, _) => {
            let n = n.unwrap_or(0);
            let what = queue_id.map_or_else(|| "the queue".to_owned(), |id| format!("message {id}"));
            println!(
                "{n} recipient(s) of {what} due now; the gateway's queue attempts them within seconds \
                 (recipients being attempted right now keep their attempt)"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `queue delete QUEUE_ID [--no-bounce]`: removes a message from the queue. Unless
/// `no_bounce`, its local sender gets a delivery status notification naming every recipient
/// that was still waiting (as when the queue gives up); a remote or null sender gets none, as
/// the queue itself never bounces to them.
pub async fn delete(config: &Path, queue_id: &str, no_bounce: bool) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    let store = wiring::store(&config).await?;
    let result = delete_in(&config, &store, queue_id, no_bounce).await;
    store.close().await;
    let outcome = result?;
    println!("deleted {queue_id} from the queue; {outcome}");
    Ok(ExitCode::SUCCESS)
}

async fn delete_in(
    config: &GatewayConfig,
    store: &Store,
    queue_id: &str,
    no_bounce: bool,
) -> anyhow::Result<String> {
    let no_such = || OperatorError::NoSuchQueuedMessage { queue_id: queue_id.to_owned() };
    let (message, _) = store.queued_message(queue_id).await?.ok_or_else(no_such)?;
    let local_sender =
        message.sender.rsplit_once('@').is_some_and(|(_, d)| d.eq_ignore_ascii_case(&config.site.domain));
    if no_bounce {
        store.delete_queued(queue_id).await?.ok_or_else(no_such)?;
        return Ok("no report was sent to the sender (--no-bounce)".to_owned());
    }
    if !local_sender {
        store.delete_queued(queue_id).await?.ok_or_else(no_such)?;
        return Ok(format!(
            "no report was sent: the sender {} is not an account of this site",
            if message.sender.is_empty() { "<> (a report itself)" } else { message.sender.as_str() }
        ));
    }
    // The header block is read before the message goes, so the report can quote it.
    let vault = wiring::vault(config).await?;
    let original = original_for_report(store, &vault, &message).await.map_err(|e| {
        e.context(format!(
            "cannot open {queue_id} to quote it in the bounce (nothing was deleted; --no-bounce drops it \
             without a report)"
        ))
    })?;
    let waiting = store.delete_queued(queue_id).await?.ok_or_else(no_such)?;
    let reported: Vec<RecipientReport> =
        waiting.iter().filter(|r| wants_failure_report(&r.notify)).map(report_of).collect();
    if reported.is_empty() {
        return Ok("no recipient was still waiting or asked for a failure report: no report was sent".into());
    }
    let now = dsn::unix_now();
    let token = format!("{}-{now}-deleted", message.queue_id);
    let report = Zeroizing::new(build_dsn(&DsnRequest {
        reporting_domain: &config.site.domain,
        sender: &message.sender,
        envelope_id: message.envid.as_deref(),
        arrival_unix: unix(message.created_at),
        last_attempt_unix: now,
        retry_until_unix: None,
        recipients: &reported,
        original: &original,
        full: message.ret_full,
        token: &token,
    }));
    let account = store.account(&message.sender).await?;
    let inbox = store.mailbox(account.id, "INBOX").await?;
    vault
        .append_plain(store, inbox.id, Protection::Normal, &AppendRequest::default(), report)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the message was deleted, but its bounce could not be put in {}'s INBOX: {e}",
                message.sender
            )
        })?;
    Ok(format!(
        "a delivery status notification for {} recipient(s) went to {}'s INBOX",
        reported.len(),
        message.sender
    ))
}

/// The part of the queued message a report returns: the header block, or with `RET=FULL` the
/// whole message (kept in memory only, wiped when dropped).
async fn original_for_report(
    store: &Store,
    vault: &MailVault,
    message: &QueuedMessage,
) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut sealed = Vec::new();
    store.read_queued_blob(message).await?.read_to_end(&mut sealed).await?;
    let stored = StoredProtection::from_store(&message.protection)?;
    let opened = vault.open_stored(&stored, std::io::Cursor::new(sealed), Vec::new()).await?;
    let plain = Zeroizing::new(opened.output);
    if message.ret_full {
        return Ok(plain);
    }
    Ok(Zeroizing::new(dsn::header_block(&plain).to_vec()))
}

/// RFC 3461 § 4.1: without NOTIFY a failure is reported; with it, only if it names FAILURE.
fn wants_failure_report(notify: &str) -> bool {
    notify.is_empty() || notify.split(',').any(|n| n.trim().eq_ignore_ascii_case("FAILURE"))
}

fn report_of(r: &QueuedRecipient) -> RecipientReport {
    RecipientReport {
        recipient: r.address.clone(),
        original_recipient: r.orcpt.clone(),
        action: DsnAction::Failed,
        status: DELETED_STATUS.to_owned(),
        remote_mta: None,
        diagnostic: DELETED_DIAGNOSTIC.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reports_follow_notify() {
        assert!(wants_failure_report(""));
        assert!(wants_failure_report("SUCCESS,FAILURE"));
        assert!(wants_failure_report("failure"));
        assert!(!wants_failure_report("NEVER"));
        assert!(!wants_failure_report("DELAY,SUCCESS"));
    }
}

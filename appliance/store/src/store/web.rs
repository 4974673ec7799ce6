//! State of the web API (`qutemail-web`): login sessions with rotating refresh tokens, password
//! reset tokens, per-account web settings, sealed uploads awaiting a compose, and what was
//! submitted through the web. Tokens are kept only as hashes the caller computes; uploads only
//! as sealed bytes the caller (the vault) produced, so nothing secret reaches the disk in clear.

use std::time::SystemTime;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, int, ms_of, now_ms, random_hex, time_of, u64_of};
use crate::db::DbResult;
use crate::error::StoreError;
use crate::types::{AccountId, Mailbox, MessageMeta, Protection};

/// Per-account settings of the web client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WebSettings {
    /// Protection mode used when a compose names none (`None`: the site policy).
    pub default_mode: Option<String>,
    /// Where password reset tokens are mailed.
    pub recovery_address: Option<String>,
}

/// A change of web settings; `None` fields are left alone, `Some(None)` clears.
#[derive(Debug, Clone, Default)]
pub struct WebSettingsUpdate {
    /// New display name.
    pub display_name: Option<String>,
    /// New default mode.
    pub default_mode: Option<Option<String>>,
    /// New recovery address.
    pub recovery_address: Option<Option<String>>,
}

/// What became of a presented refresh token ([`Store::web_rotate_refresh`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was live: it is now spent and the new one replaces it.
    Rotated {
        /// The session it belongs to.
        session_id: String,
        /// The account's address.
        address: String,
    },
    /// The token had been spent already: someone replayed it, so its whole session is revoked.
    Reused {
        /// The session now revoked.
        session_id: String,
    },
    /// Unknown, expired, or its session was revoked.
    Invalid,
}

/// An upload to keep (sealed by the caller).
#[derive(Debug, Clone)]
pub struct NewUpload<'a> {
    /// Owner.
    pub account: AccountId,
    /// File name as given by the client.
    pub filename: &'a str,
    /// Content type as given by the client.
    pub content_type: &'a str,
    /// Plaintext size.
    pub size: u64,
    /// Sealed bytes.
    pub sealed: &'a [u8],
    /// How they are sealed (kind, wrapped key record).
    pub protection: &'a Protection,
    /// When it may be deleted.
    pub expires_at: SystemTime,
}

/// A stored upload.
#[derive(Debug, Clone)]
pub struct Upload {
    /// Its id.
    pub upload_id: String,
    /// File name.
    pub filename: String,
    /// Content type.
    pub content_type: String,
    /// Plaintext size.
    pub size: u64,
    /// Sealed bytes.
    pub sealed: Vec<u8>,
    /// How they are sealed.
    pub protection: Protection,
}

/// A message submitted through the web ([`Store::web_record_sent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRecord {
    /// The protection mode asked for or chosen.
    pub mode: String,
    /// Recipient and its queue ID (`local` for a recipient on this site).
    pub recipients: Vec<(String, String)>,
    /// When it was submitted.
    pub created_at: SystemTime,
}

fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(format!("web state row: {e}"))
}

impl Store {
    /// Starts a login session for `account` with its first refresh token (by hash); returns the
    /// session ID.
    pub async fn web_create_session(
        &self,
        account: AccountId,
        refresh_hash: &str,
        refresh_expires_at: SystemTime,
    ) -> Result<String, StoreError> {
        let session_id = random_hex()?;
        let now = now_ms();
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO web_sessions (session_id, account_id, created_at) VALUES ($1, $2, $3)")
            .bind(&session_id)
            .bind(account.0)
            .bind(now)
            .execute(&mut **tx)
            .await
            .db(self.b())?;
        sqlx::query(
            "INSERT INTO web_refresh_tokens (token_hash, session_id, spent, expires_at, created_at) \
             VALUES ($1, $2, 0, $3, $4)",
        )
        .bind(refresh_hash)
        .bind(&session_id)
        .bind(ms_of(refresh_expires_at))
        .bind(now)
        .execute(&mut **tx)
        .await
        .db(self.b())?;
        self.commit(tx).await?;
        Ok(session_id)
    }

    /// Spends the refresh token `old_hash` and stores `new_hash` in its place (same session).
    /// A spent token presented again revokes the session: the legitimate holder and the thief
    /// both have to log in again.
    pub async fn web_rotate_refresh(
        &self,
        old_hash: &str,
        new_hash: &str,
        new_expires_at: SystemTime,
    ) -> Result<RefreshOutcome, StoreError> {
        let now = now_ms();
        let mut tx = self.write().await?;
        let sql = format!(
            "SELECT t.session_id, t.spent, t.expires_at, s.revoked_at, a.address, a.disabled \
             FROM web_refresh_tokens t JOIN web_sessions s ON s.session_id = t.session_id \
             JOIN accounts a ON a.id = s.account_id WHERE t.token_hash = $1{}",
            self.b().for_update()
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(old_hash)
            .fetch_optional(&mut **tx)
            .await
            .db(self.b())?;
        let Some(row) = row else { return Ok(RefreshOutcome::Invalid) };
        let session_id: String = row.try_get("session_id").map_err(corrupt)?;
        let spent: i64 = row.try_get("spent").map_err(corrupt)?;
        let expires_at: i64 = row.try_get("expires_at").map_err(corrupt)?;
        let revoked_at: Option<i64> = row.try_get("revoked_at").map_err(corrupt)?;
        let address: String = row.try_get("address").map_err(corrupt)?;
        let disabled: i64 = row.try_get("disabled").map_err(corrupt)?;
        if revoked_at.is_some() {
            return Ok(RefreshOutcome::Invalid);
        }
        if spent != 0 {
            sqlx::query("UPDATE web_sessions SET revoked_at = $1 WHERE session_id = $2")
                .bind(now)
                .bind(&session_id)
                .execute(&mut **tx)
                .await
                .db(self.b())?;
            self.commit(tx).await?;
            tracing::warn!(session = %session_id, "a spent refresh token was presented again; session revoked");
            return Ok(RefreshOutcome::Reused { session_id });
        }
        if expires_at <= now || disabled != 0 {
            return Ok(RefreshOutcome::Invalid);
        }
        sqlx::query("UPDATE web_refresh_tokens SET spent = 1 WHERE token_hash = $1")
            .bind(old_hash)
            .execute(&mut **tx)
            .await
            .db(self.b())?;
        sqlx::query(
            "INSERT INTO web_refresh_tokens (token_hash, session_id, spent, expires_at, created_at) \
             VALUES ($1, $2, 0, $3, $4)",
        )
        .bind(new_hash)
        .bind(&session_id)
        .bind(ms_of(new_expires_at))
        .bind(now)
        .execute(&mut **tx)
        .await
        .db(self.b())?;
        self.commit(tx).await?;
        Ok(RefreshOutcome::Rotated { session_id, address })
    }

    /// The address of the account whose session `session_id` is live (not revoked, account
    /// enabled), if any.
    pub async fn web_session_account(&self, session_id: &str) -> Result<Option<String>, StoreError> {
        let address: Option<String> = sqlx::query_scalar(
            "SELECT a.address FROM web_sessions s JOIN accounts a ON a.id = s.account_id \
             WHERE s.session_id = $1 AND s.revoked_at IS NULL AND a.disabled = 0",
        )
        .bind(session_id)
        .fetch_optional(&self.inner.pool)
        .await
        .db(self.b())?;
        Ok(address)
    }

    /// Revokes one session (logout).
    pub async fn web_revoke_session(&self, session_id: &str) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE web_sessions SET revoked_at = $1 WHERE session_id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(session_id)
            .execute(&mut **tx)
            .await
            .db(self.b())?;
        self.commit(tx).await
    }

    /// Revokes every session of `account` except `keep` (password change and reset).
    pub async fn web_revoke_account_sessions(
        &self,
        account: AccountId,
        keep: Option<&str>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let n = sqlx::query(
            "UPDATE web_sessions SET revoked_at = $1 WHERE account_id = $2 AND revoked_at IS NULL \
             AND session_id <> $3",
        )
        .bind(now_ms())
        .bind(account.0)
        .bind(keep.unwrap_or(""))
        .execute(&mut **tx)
        .await
        .db(self.b())?
        .rows_affected();
        self.commit(tx).await?;
        Ok(n)
    }

    /// Keeps a password reset token (by hash) for `account`, valid until `expires_at`.
    pub async fn web_create_reset_token(
        &self,
        account: AccountId,
        token_hash: &str,
        expires_at: SystemTime,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO web_reset_tokens (token_hash, account_id, expires_at, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(token_hash)
        .bind(account.0)
        .bind(ms_of(expires_at))
        .bind(now_ms())
        .execute(&mut **tx)
        .await
        .db(self.b())?;
        self.commit(tx).await
    }

    /// Spends a reset token: returns its account's address if it was unused and unexpired.
    /// Spent at most once, also under concurrent use.
    pub async fn web_consume_reset_token(&self, token_hash: &str) -> Result<Option<String>, StoreError> {
        let now = now_ms();
        let mut tx = self.write().await?;
        let address: Option<String> = sqlx::query_scalar(
            "UPDATE web_reset_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL \
             AND expires_at > $1 RETURNING (SELECT address FROM accounts WHERE accounts.id = web_reset_tokens.account_id)",
        )
        .bind(now)
        .bind(token_hash)
        .fetch_optional(&mut **tx)
        .await
        .db(self.b())?;
        self.commit(tx).await?;
        Ok(address)
    }

    /// The account's web settings (defaults when never set).
    pub async fn web_settings(&self, account: AccountId) -> Result<WebSettings, StoreError> {
        let row =
            sqlx::query("SELECT default_mode, recovery_address FROM web_settings WHERE account_id = $1")
                .bind(account.0)
                .fetch_optional(&self.inner.pool)
                .await
                .db(self.b())?;
        match row {
            None => Ok(WebSettings::default()),
            Some(row) => Ok(WebSettings {
                default_mode: row.try_get("default_mode").map_err(corrupt)?,
                recovery_address: row.try_get("recovery_address").map_err(corrupt)?,
            }),
        }
    }

    /// Changes the display name and web settings in one transaction.
    pub async fn web_update_settings(
        &self,
        account: AccountId,
        update: &WebSettingsUpdate,
    ) -> Result<WebSettings, StoreError> {
        if let Some(name) = &update.display_name {
            super::check_display_name(name)?;
        }
        let recovery = match &update.recovery_address {
            Some(Some(a)) => Some(Some(super::normalize_address(a)?)),
            other => other.clone(),
        };
        let current = self.web_settings(account).await?;
        let next = WebSettings {
            default_mode: update.default_mode.clone().unwrap_or(current.default_mode),
            recovery_address: recovery.unwrap_or(current.recovery_address),
        };
        let mut tx = self.write().await?;
        if let Some(name) = &update.display_name {
            sqlx::query("UPDATE accounts SET display_name = $1 WHERE id = $2")
                .bind(name.as_str())
                .bind(account.0)
                .execute(&mut **tx)
                .await
                .db(self.b())?;
        }
        sqlx::query("DELETE FROM web_settings WHERE account_id = $1")
            .bind(account.0)
            .execute(&mut **tx)
            .await
            .db(self.b())?;
        sqlx::query(
            "INSERT INTO web_settings (account_id, default_mode, recovery_address) VALUES ($1, $2, $3)",
        )
        .bind(account.0)
        .bind(next.default_mode.clone())
        .bind(next.recovery_address.clone())
        .execute(&mut **tx)
        .await
        .db(self.b())?;
        self.commit(tx).await?;
        Ok(next)
    }

    /// Keeps a sealed upload; returns its new id.
    pub async fn web_put_upload(&self, upload: &NewUpload<'_>) -> Result<String, StoreError> {
        let id = random_hex()?;
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO web_uploads (upload_id, account_id, filename, content_type, size, sealed, protection, \
             wrapped_key, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&id)
        .bind(upload.account.0)
        .bind(upload.filename)
        .bind(upload.content_type)
        .bind(int(upload.size, "upload size")?)
        .bind(upload.sealed.to_vec())
        .bind(upload.protection.kind.as_str())
        .bind(upload.protection.wrapped_key.clone())
        .bind(ms_of(upload.expires_at))
        .bind(now_ms())
        .execute(&mut **tx)
        .await
        .db(self.b())?;
        self.commit(tx).await?;
        Ok(id)
    }

    /// The account's unexpired upload `upload_id`, if any (another account's is `None`).
    pub async fn web_upload(
        &self,
        account: AccountId,
        upload_id: &str,
    ) -> Result<Option<Upload>, StoreError> {
        let row = sqlx::query(
            "SELECT upload_id, filename, content_type, size, sealed, protection, wrapped_key FROM web_uploads \
             WHERE upload_id = $1 AND account_id = $2 AND expires_at > $3",
        )
        .bind(upload_id)
        .bind(account.0)
        .bind(now_ms())
        .fetch_optional(&self.inner.pool)
        .await
        .db(self.b())?;
        row.as_ref().map(upload_of).transpose()
    }

    /// Deletes uploads past their expiry; returns how many.
    pub async fn web_delete_expired_uploads(&self) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM web_uploads WHERE expires_at <= $1")
            .bind(now_ms())
            .execute(&mut **tx)
            .await
            .db(self.b())?
            .rows_affected();
        self.commit(tx).await?;
        Ok(n)
    }

    /// How many uploads the account has (for tests and quotas).
    pub async fn web_upload_count(&self, account: AccountId) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM web_uploads WHERE account_id = $1")
            .bind(account.0)
            .fetch_one(&self.inner.pool)
            .await
            .db(self.b())?;
        u64_of(n, "upload count")
    }

    /// Records a submission: the Sent copy's unique id, the mode, and each recipient's queue ID.
    pub async fn web_record_sent(
        &self,
        account: AccountId,
        sent_unique_id: &str,
        mode: &str,
        recipients: &[(String, String)],
    ) -> Result<(), StoreError> {
        let mut text = String::new();
        for (rcpt, queue_id) in recipients {
            if [rcpt, queue_id].iter().any(|s| s.contains(['\t', '\n'])) {
                return Err(StoreError::Invalid {
                    what: "recipient",
                    reason: format!("{rcpt:?} is malformed"),
                });
            }
            text.push_str(&format!("{rcpt}\t{queue_id}\n"));
        }
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO web_sent (unique_id, account_id, mode, recipients, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(sent_unique_id)
        .bind(account.0)
        .bind(mode)
        .bind(text)
        .bind(now_ms())
        .execute(&mut **tx)
        .await
        .db(self.b())?;
        self.commit(tx).await
    }

    /// The account's submission record of the Sent copy `sent_unique_id`, if any.
    pub async fn web_sent(
        &self,
        account: AccountId,
        sent_unique_id: &str,
    ) -> Result<Option<SentRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT mode, recipients, created_at FROM web_sent WHERE unique_id = $1 AND account_id = $2",
        )
        .bind(sent_unique_id)
        .bind(account.0)
        .fetch_optional(&self.inner.pool)
        .await
        .db(self.b())?;
        let Some(row) = row else { return Ok(None) };
        let text: String = row.try_get("recipients").map_err(corrupt)?;
        let recipients = text
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(r, q)| (r.to_owned(), q.to_owned()))
            .collect();
        Ok(Some(SentRecord {
            mode: row.try_get("mode").map_err(corrupt)?,
            recipients,
            created_at: time_of(row.try_get("created_at").map_err(corrupt)?),
        }))
    }

    /// The account's message with unique id `unique_id` and its mailbox; `None` when there is
    /// none or it belongs to another account (so ids never reveal other accounts' mail).
    pub async fn web_message(
        &self,
        account: AccountId,
        unique_id: &str,
    ) -> Result<Option<(Mailbox, MessageMeta)>, StoreError> {
        let Some((mailbox, meta)) = self.message_by_unique_id(unique_id).await? else { return Ok(None) };
        let mailbox = self.mailbox_by_id(mailbox).await?;
        Ok((mailbox.account_id == account).then_some((mailbox, meta)))
    }
}

fn upload_of(row: &AnyRow) -> Result<Upload, StoreError> {
    Ok(Upload {
        upload_id: row.try_get("upload_id").map_err(corrupt)?,
        filename: row.try_get("filename").map_err(corrupt)?,
        content_type: row.try_get("content_type").map_err(corrupt)?,
        size: u64_of(row.try_get("size").map_err(corrupt)?, "upload size")?,
        sealed: row.try_get("sealed").map_err(corrupt)?,
        protection: Protection {
            kind: row.try_get("protection").map_err(corrupt)?,
            wrapped_key: row.try_get("wrapped_key").map_err(corrupt)?,
            key_ids: Vec::new(),
            certificate: None,
        },
    })
}

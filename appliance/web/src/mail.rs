//! `/api/mail/*` and `/api/modes/`: folders, lists, reading, flags, move, delete, drafts,
//! search, uploads and compose.

use std::io::Read;

use axum::Json;
use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use qutemail_store::{
    ExpungeScope, FlagChange, FlagOp, Flags, Mailbox, MessageMeta, NumberSet, Selection, SpecialUse,
};
use qutemail_vault::{AppendRequest, Protection, StoredProtection, VaultError};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use zeroize::Zeroizing;

use crate::Shared;
use crate::auth::check_mode;
use crate::download::{self, Download};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiQuery, AuthUser};
use crate::message::{self, MessageView, OpenedMessage, Summary};

/// How many of the newest messages a text search opens at most (each is decrypted on request).
const SEARCH_SCAN: usize = 500;
/// Most recipients of one message.
const MAX_RECIPIENTS: usize = 100;
/// How long an upload waits for its compose.
const UPLOAD_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A folder.
#[derive(Debug, Serialize, ToSchema)]
pub struct FolderView {
    /// Name (`/` separates levels).
    pub name: String,
    /// `inbox|sent|drafts|trash|junk` or null.
    pub role: Option<&'static str>,
    /// Unread messages.
    pub unread: u32,
    /// Messages.
    pub total: u32,
}

/// `{"folders":[...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Folders {
    /// The account's folders.
    pub folders: Vec<FolderView>,
}

/// Paging and search of a list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page, from 1.
    #[param(minimum = 1, maximum = 1_000_000)]
    pub page: Option<u32>,
    /// Messages per page, 1..=100 (default 50).
    #[param(minimum = 1, maximum = 100)]
    pub per_page: Option<u32>,
    /// Search text (subject, addresses, body, attachment names).
    pub q: Option<String>,
}

/// A page of messages, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageList {
    /// The messages.
    pub messages: Vec<Summary>,
    /// Matching messages in all pages.
    pub total: usize,
    /// This page.
    pub page: u32,
    /// Page size.
    pub per_page: u32,
}

/// `{"seen"?,"flagged"?,"folder"?}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MessagePatch {
    /// Mark read or unread.
    pub seen: Option<bool>,
    /// Flag or unflag.
    pub flagged: Option<bool>,
    /// Move to this folder.
    pub folder: Option<String>,
}

/// A message to send or keep as a draft.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ComposeRequest {
    /// Recipients.
    #[serde(default)]
    pub to: Vec<String>,
    /// Copy recipients.
    #[serde(default)]
    pub cc: Vec<String>,
    /// Blind copy recipients (not written into the message).
    #[serde(default)]
    pub bcc: Vec<String>,
    /// Subject.
    #[serde(default)]
    pub subject: String,
    /// Plain text body.
    #[serde(default)]
    pub text: String,
    /// Optional HTML body.
    #[serde(default)]
    pub html: Option<String>,
    /// `hybrid|qaes|otp|normal`, or null for the account default / site policy.
    #[serde(default)]
    pub mode: Option<String>,
    /// Upload ids to attach.
    #[serde(default)]
    pub attachments: Vec<String>,
    /// The id of the message this replies to.
    #[serde(default)]
    pub in_reply_to: Option<String>,
    /// The draft this message replaces (deleted once sent).
    #[serde(default)]
    pub draft_id: Option<String>,
}

/// A recipient's queue entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueuedView {
    /// Recipient.
    pub recipient: String,
    /// Queue ID, or `local` for a recipient on this site (already delivered).
    pub queue_id: String,
}

/// What a compose did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ComposeResult {
    /// The Sent copy's id.
    pub id: String,
    /// The Message-ID.
    pub message_id: String,
    /// The protection mode for recipients at other sites (`normal` when all are local).
    pub mode: String,
    /// Per recipient.
    pub queued: Vec<QueuedView>,
}

/// `{"id"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct IdView {
    /// The id.
    pub id: String,
}

/// An upload.
#[derive(Debug, Serialize, ToSchema)]
pub struct UploadView {
    /// Its id, for compose's `attachments`.
    pub upload_id: String,
    /// File name.
    pub filename: String,
    /// Content type.
    pub content_type: String,
    /// Size, bytes.
    pub size: u64,
}

/// A protection mode.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModeView {
    /// `hybrid|qaes|otp|normal`.
    pub id: &'static str,
    /// Name.
    pub name: &'static str,
    /// What it does.
    pub description: &'static str,
    /// Largest message, bytes (OTP only).
    pub max_bytes: Option<u64>,
}

/// `{"modes":[...],"default"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Modes {
    /// The modes.
    pub modes: Vec<ModeView>,
    /// The site's default for linked peers.
    pub default: String,
}

/// A message id in a path: malformed ones are simply not found.
pub(crate) async fn load(state: &Shared, user: &AuthUser, id: &str) -> ApiResult<(Mailbox, MessageMeta)> {
    if !message::is_message_id(id) {
        return Err(ApiError::not_found("no such message"));
    }
    state
        .deps
        .store
        .web_message(user.account.id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such message"))
}

pub(crate) async fn open(state: &Shared, mailbox: &Mailbox, meta: &MessageMeta) -> ApiResult<OpenedMessage> {
    let presented = state.deps.vault.present(&state.deps.store, meta).await?;
    Ok(message::build(&mailbox.name, meta, presented))
}

/// The account's folders with counts.
#[utoipa::path(get, path = "/api/mail/folders/", tag = "mail", security(("bearer" = [])),
    responses((status = 200, body = Folders), (status = 401, body = ErrorBody)))]
pub(crate) async fn folders(State(state): State<Shared>, user: AuthUser) -> ApiResult<Json<Folders>> {
    let mut out = Vec::new();
    for m in state.deps.store.list_mailboxes(user.account.id).await? {
        let status = state.deps.store.status(m.id).await?;
        out.push(FolderView {
            role: message::role_of(&m),
            name: m.name,
            unread: status.unseen,
            total: status.messages,
        });
    }
    Ok(Json(Folders { folders: out }))
}

fn paging(q: &ListQuery) -> ApiResult<(u32, u32)> {
    let page = q.page.unwrap_or(1);
    let per_page = q.per_page.unwrap_or(50);
    if page == 0 || page > 1_000_000 {
        return Err(ApiError::validation("page counts from 1"));
    }
    if !(1..=100).contains(&per_page) {
        return Err(ApiError::validation("per_page must be between 1 and 100"));
    }
    Ok((page, per_page))
}

/// Opens `uids` of `mailbox` (newest first).
async fn open_uids(state: &Shared, mailbox: &Mailbox, uids: &[u32]) -> ApiResult<Vec<OpenedMessage>> {
    if uids.is_empty() {
        return Ok(Vec::new());
    }
    let mut metas = state
        .deps
        .store
        .fetch(mailbox.id, &Selection::Uids(NumberSet::from_numbers(uids.iter().copied())))
        .await?;
    metas.sort_by_key(|m| std::cmp::Reverse(m.uid));
    let mut out = Vec::with_capacity(metas.len());
    for meta in &metas {
        out.push(open(state, mailbox, meta).await?);
    }
    Ok(out)
}

async fn list_mailbox(state: &Shared, mailbox: &Mailbox, q: &ListQuery) -> ApiResult<MessageList> {
    let (page, per_page) = paging(q)?;
    let mut uids = state.deps.store.uids(mailbox.id).await?;
    uids.reverse();
    let skip = (page as usize - 1) * per_page as usize;
    match q.q.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        None => {
            let total = uids.len();
            let chosen: Vec<u32> = uids.into_iter().skip(skip).take(per_page as usize).collect();
            let messages =
                open_uids(state, mailbox, &chosen).await?.into_iter().map(|o| o.view.summary).collect();
            Ok(MessageList { messages, total, page, per_page })
        }
        Some(text) => {
            uids.truncate(SEARCH_SCAN);
            let mut hits = Vec::new();
            for chunk in uids.chunks(50) {
                hits.extend(
                    open_uids(state, mailbox, chunk)
                        .await?
                        .into_iter()
                        .filter(|o| message::matches(&o.view, text))
                        .map(|o| o.view.summary),
                );
            }
            let total = hits.len();
            let messages = hits.into_iter().skip(skip).take(per_page as usize).collect();
            Ok(MessageList { messages, total, page, per_page })
        }
    }
}

async fn mailbox_named(state: &Shared, user: &AuthUser, name: &str) -> ApiResult<Mailbox> {
    state.deps.store.mailbox(user.account.id, name).await.map_err(|e| match e {
        qutemail_store::StoreError::Invalid { .. } | qutemail_store::StoreError::NoSuchMailbox(_) => {
            ApiError::not_found(format!("there is no folder {name:?}"))
        }
        e => e.into(),
    })
}

/// A folder's messages, newest first.
#[utoipa::path(get, path = "/api/mail/folders/{name}/messages/", tag = "mail", security(("bearer" = [])),
    params(("name" = String, Path, description = "folder name"), ListQuery),
    responses((status = 200, body = MessageList), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub(crate) async fn folder_messages(
    State(state): State<Shared>,
    user: AuthUser,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<MessageList>> {
    let mailbox = mailbox_named(&state, &user, &name).await?;
    Ok(Json(list_mailbox(&state, &mailbox, &q).await?))
}

/// The INBOX (as the brief names it).
#[utoipa::path(get, path = "/api/mail/inbox/", tag = "mail", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = MessageList), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn inbox(
    State(state): State<Shared>,
    user: AuthUser,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<MessageList>> {
    let mailbox = mailbox_named(&state, &user, "INBOX").await?;
    Ok(Json(list_mailbox(&state, &mailbox, &q).await?))
}

/// Search across folders (newest first; up to 500 newest messages per folder are searched).
#[utoipa::path(get, path = "/api/mail/search/", tag = "mail", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = MessageList), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn search(
    State(state): State<Shared>,
    user: AuthUser,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<MessageList>> {
    let (page, per_page) = paging(&q)?;
    let text = q.q.as_deref().map(str::trim).unwrap_or_default().to_owned();
    if text.is_empty() {
        return Err(ApiError::validation("give a search text in q"));
    }
    let mut hits: Vec<Summary> = Vec::new();
    for mailbox in state.deps.store.list_mailboxes(user.account.id).await? {
        let mut uids = state.deps.store.uids(mailbox.id).await?;
        uids.reverse();
        uids.truncate(SEARCH_SCAN);
        for chunk in uids.chunks(50) {
            hits.extend(
                open_uids(&state, &mailbox, chunk)
                    .await?
                    .into_iter()
                    .filter(|o| message::matches(&o.view, &text))
                    .map(|o| o.view.summary),
            );
        }
    }
    hits.sort_by(|a, b| b.date.cmp(&a.date));
    let total = hits.len();
    let skip = (page as usize - 1) * per_page as usize;
    let messages = hits.into_iter().skip(skip).take(per_page as usize).collect();
    Ok(Json(MessageList { messages, total, page, per_page }))
}

/// Opens a message with its certificate; marks it read.
#[utoipa::path(get, path = "/api/mail/{id}/decrypt/", tag = "mail", security(("bearer" = [])),
    params(("id" = String, Path, description = "message id")),
    responses((status = 200, body = MessageView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn decrypt(
    State(state): State<Shared>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Json<MessageView>> {
    let (mailbox, meta) = load(&state, &user, &id).await?;
    let mut opened = open(&state, &mailbox, &meta).await?;
    if !meta.flags.contains(Flags::SEEN) {
        let change = FlagChange { op: FlagOp::Add, flags: Flags::SEEN, keywords: Vec::new() };
        let set = NumberSet::from_numbers([meta.uid]);
        state.deps.store.store_flags(mailbox.id, &Selection::Uids(set), &change, None).await?;
        opened.view.summary.seen = true;
    }
    Ok(Json(opened.view))
}

/// The message as a mail client sees it (`X-QKD-*` headers, then the message).
#[utoipa::path(get, path = "/api/mail/{id}/raw/", tag = "mail", security(("bearer" = [])),
    params(("id" = String, Path, description = "message id")),
    responses((status = 200, content_type = "message/rfc822", body = String), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn raw(
    State(state): State<Shared>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (mailbox, meta) = load(&state, &user, &id).await?;
    let opened = open(&state, &mailbox, &meta).await?;
    let bytes = opened.presented.message.to_vec();
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("message/rfc822"))], bytes).into_response())
}

fn attachment_disposition(filename: &str) -> HeaderValue {
    let ascii: String = filename
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { '_' })
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(filename, percent_encoding::NON_ALPHANUMERIC);
    HeaderValue::from_str(&format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// Downloads an attachment, streamed as the message is decrypted (see [`crate::download`]).
#[utoipa::path(get, path = "/api/mail/{id}/attachments/{index}/", tag = "mail", security(("bearer" = [])),
    params(("id" = String, Path, description = "message id"), ("index" = usize, Path, description = "attachment index")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn attachment(
    State(state): State<Shared>,
    user: AuthUser,
    Path((id, index)): Path<(String, String)>,
) -> ApiResult<Response> {
    let index: usize = index.parse().map_err(|_| ApiError::not_found("no such attachment"))?;
    let (mailbox, meta) = load(&state, &user, &id).await?;
    match download::start(&state, &meta, index).await {
        Download::Streaming { head, body } => {
            Ok(attachment_response(&head.filename, &head.content_type, body))
        }
        Download::NotFound => Err(ApiError::not_found("no such attachment")),
        Download::InMemory => {
            let opened = open(&state, &mailbox, &meta).await?;
            let (filename, content_type, bytes) = message::attachment(&opened.presented, index)
                .ok_or_else(|| ApiError::not_found("no such attachment"))?;
            Ok(attachment_response(&filename, &content_type, Body::from(bytes)))
        }
    }
}

fn attachment_response(filename: &str, content_type: &str, body: Body) -> Response {
    let ct = HeaderValue::from_str(content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    ([(header::CONTENT_TYPE, ct), (header::CONTENT_DISPOSITION, attachment_disposition(filename))], body)
        .into_response()
}

/// Marks, flags or moves a message.
#[utoipa::path(patch, path = "/api/mail/{id}/", tag = "mail", security(("bearer" = [])),
    params(("id" = String, Path, description = "message id")), request_body = MessagePatch,
    responses((status = 200, body = Summary), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 400, body = ErrorBody)))]
pub(crate) async fn patch_message(
    State(state): State<Shared>,
    user: AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MessagePatch>,
) -> ApiResult<Json<Summary>> {
    let (mut mailbox, meta) = load(&state, &user, &id).await?;
    let target = match req.folder.as_deref() {
        Some(name) => Some(mailbox_named(&state, &user, name).await.map_err(|e| {
            if e.status == StatusCode::NOT_FOUND { ApiError::validation(e.message) } else { e }
        })?),
        None => None,
    };
    let set = NumberSet::from_numbers([meta.uid]);
    for (wanted, flag) in [(req.seen, Flags::SEEN), (req.flagged, Flags::FLAGGED)] {
        let Some(on) = wanted else { continue };
        let change = FlagChange {
            op: if on { FlagOp::Add } else { FlagOp::Remove },
            flags: flag,
            keywords: Vec::new(),
        };
        state.deps.store.store_flags(mailbox.id, &Selection::Uids(set.clone()), &change, None).await?;
    }
    if let Some(target) = target
        && target.id != mailbox.id
    {
        state.deps.store.move_messages(mailbox.id, &set, target.id).await?;
        mailbox = target;
    }
    let (_, meta) = state
        .deps
        .store
        .web_message(user.account.id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such message"))?;
    Ok(Json(open(&state, &mailbox, &meta).await?.view.summary))
}

/// Moves a message to Trash, or deletes it for good when it is in Trash already.
#[utoipa::path(delete, path = "/api/mail/{id}/", tag = "mail", security(("bearer" = [])),
    params(("id" = String, Path, description = "message id")),
    responses((status = 204, description = "deleted"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_message(
    State(state): State<Shared>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let (mailbox, meta) = load(&state, &user, &id).await?;
    let set = NumberSet::from_numbers([meta.uid]);
    if mailbox.special_use == Some(SpecialUse::Trash) {
        state.deps.store.expunge(mailbox.id, &ExpungeScope::Uids(set)).await?;
    } else {
        let trash = state
            .deps
            .store
            .list_mailboxes(user.account.id)
            .await?
            .into_iter()
            .find(|m| m.special_use == Some(SpecialUse::Trash))
            .ok_or_else(|| ApiError::internal("the account has no Trash folder"))?;
        state.deps.store.move_messages(mailbox.id, &set, trash.id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Feeds uploaded chunks to the sealing thread (which reads synchronously).
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    current: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) => self.current = b,
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("uploads are limited to {limit} bytes"),
    )
    .with_details(serde_json::json!({ "limit_bytes": limit }))
}

/// Uploads an attachment (multipart field `file`), streamed and sealed at rest as it arrives;
/// kept 24 h for a compose.
#[utoipa::path(post, path = "/api/mail/attachments/", tag = "mail", security(("bearer" = [])),
    request_body(content_type = "multipart/form-data", content = UploadForm),
    responses((status = 201, body = UploadView), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn upload(
    State(state): State<Shared>,
    user: AuthUser,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let limit = state.config.max_upload_bytes;
    // A declared length far over the limit is refused before anything is read.
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.saturating_add(64 * 1024)) {
        return Err(too_large(limit));
    }
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "validation_failed",
            format!("expected multipart/form-data: {}", e.body_text()),
        )
    })?;
    loop {
        let field = multipart.next_field().await.map_err(|e| multipart_error(&e, limit))?;
        let Some(mut field) = field else {
            return Err(ApiError::validation("the form has no field named `file`"));
        };
        if field.name() != Some("file") {
            continue;
        }
        let Some(filename) = field.file_name().map(clean_filename) else {
            return Err(ApiError::validation("the `file` field must be a file (with a file name)"));
        };
        let content_type = field
            .content_type()
            .filter(|c| HeaderValue::from_str(c).is_ok() && c.contains('/') && c.len() <= 200)
            .unwrap_or("application/octet-stream")
            .to_owned();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let vault = state.deps.vault.clone();
        let sealing = tokio::spawn(async move {
            vault
                .seal_at_rest(Protection::Normal, ChunkReader { rx, current: Bytes::new() }, Vec::new())
                .await
        });
        let mut size: u64 = 0;
        let mut refused = None;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    size += chunk.len() as u64;
                    if size > limit {
                        refused = Some(too_large(limit));
                        break;
                    }
                    if tx.send(Ok(chunk)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    refused = Some(multipart_error(&e, limit));
                    break;
                }
            }
        }
        if let Some(e) = refused {
            // The sealing thread sees an error and stops; nothing is stored.
            let _ = tx.send(Err(std::io::Error::other("upload refused"))).await;
            drop(tx);
            let _ = sealing.await;
            return Err(e);
        }
        drop(tx);
        let (stored, _, sealed) = sealing.await.map_err(ApiError::internal)??;
        let protection = stored.to_store();
        let upload_id = state
            .deps
            .store
            .web_put_upload(&qutemail_store::NewUpload {
                account: user.account.id,
                filename: &filename,
                content_type: &content_type,
                size,
                sealed: &sealed,
                protection: &protection,
                expires_at: std::time::SystemTime::now() + UPLOAD_LIFETIME,
            })
            .await?;
        tracing::info!(account = %user.account.address, size, "attachment uploaded (sealed at rest)");
        let view = UploadView { upload_id, filename, content_type, size };
        return Ok((StatusCode::CREATED, Json(view)).into_response());
    }
}

/// The multipart form of an upload.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The file.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

fn multipart_error(e: &axum::extract::multipart::MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "validation_failed",
            format!("malformed multipart body: {}", e.body_text()),
        )
    }
}

fn clean_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let cleaned: String = base.chars().filter(|c| !c.is_control()).take(200).collect();
    if cleaned.trim().is_empty() { "attachment".into() } else { cleaned }
}

/// A plaintext buffer wiped on drop.
#[derive(Default)]
struct SecretBuf(Zeroizing<Vec<u8>>);

impl std::io::Write for SecretBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn parse_recipients(list: &[String], what: &str) -> ApiResult<Vec<qutemail_smtp::Address>> {
    list.iter()
        .map(|a| {
            qutemail_smtp::Address::parse(a.trim(), true)
                .map_err(|e| ApiError::validation(format!("{what} {a:?} is not a mail address: {e}")))
        })
        .collect()
}

/// A built message and its recipients.
struct Built {
    message: Zeroizing<Vec<u8>>,
    message_id: String,
    envelope: Vec<qutemail_smtp::Address>,
}

async fn build_message(state: &Shared, user: &AuthUser, req: &ComposeRequest) -> ApiResult<Built> {
    let to = parse_recipients(&req.to, "recipient")?;
    let cc = parse_recipients(&req.cc, "cc recipient")?;
    let bcc = parse_recipients(&req.bcc, "bcc recipient")?;
    if to.len() + cc.len() + bcc.len() > MAX_RECIPIENTS {
        return Err(ApiError::validation(format!("at most {MAX_RECIPIENTS} recipients per message")));
    }
    if req.subject.contains(['\r', '\n']) {
        return Err(ApiError::validation("the subject cannot contain line breaks"));
    }
    let message_id = format!("{}@{}", uuid::Uuid::new_v4(), state.deps.domain);
    let mut b = mail_builder::MessageBuilder::new()
        .from((user.account.display_name.as_str(), user.account.address.as_str()))
        .subject(req.subject.as_str())
        .message_id(message_id.as_str())
        .date(mail_builder::headers::date::Date::new(
            i64::try_from(crate::token::unix_now()).unwrap_or_default(),
        ))
        .text_body(req.text.as_str());
    if !to.is_empty() {
        b = b.to(to.iter().map(ToString::to_string).collect::<Vec<_>>());
    }
    if !cc.is_empty() {
        b = b.cc(cc.iter().map(ToString::to_string).collect::<Vec<_>>());
    }
    if let Some(html) = req.html.as_deref().filter(|h| !h.is_empty()) {
        b = b.html_body(html);
    }
    if let Some(parent) = req.in_reply_to.as_deref() {
        let (mailbox, meta) = load(state, user, parent)
            .await
            .map_err(|_| ApiError::validation("in_reply_to names no message of yours"))?;
        let opened = open(state, &mailbox, &meta).await?;
        if let Some(Some(id)) = opened.view.headers.get("message-id") {
            let id = id.trim_start_matches('<').trim_end_matches('>').to_owned();
            b = b.in_reply_to(id.clone()).references(id);
        }
    }
    for upload_id in &req.attachments {
        let up = state.deps.store.web_upload(user.account.id, upload_id).await?.ok_or_else(|| {
            ApiError::validation(format!("no upload {upload_id:?} (expired, or not yours)"))
        })?;
        let stored = StoredProtection::from_store(&up.protection)?;
        let opened = state
            .deps
            .vault
            .open_stored(&stored, std::io::Cursor::new(up.sealed), SecretBuf::default())
            .await?;
        b = b.attachment(up.content_type, up.filename, opened.output.0.to_vec());
    }
    let message = Zeroizing::new(b.write_to_vec().map_err(ApiError::internal)?);
    let mut envelope = to;
    envelope.extend(cc);
    envelope.extend(bcc);
    Ok(Built { message, message_id: format!("<{message_id}>"), envelope })
}

/// The protection for each remote domain; refuses modes that cannot reach a recipient.
fn choose_modes(
    state: &Shared,
    recipients: &[qutemail_smtp::Address],
    requested: Option<Protection>,
) -> ApiResult<Protection> {
    let mut effective: Option<Protection> = None;
    for r in recipients.iter().filter(|r| !r.domain().eq_ignore_ascii_case(&state.deps.domain)) {
        match state.deps.vault.choose(r.domain(), requested) {
            Ok(p) => {
                effective.get_or_insert(p);
            }
            Err(VaultError::Policy(refusal)) => {
                return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "mode_unavailable", refusal.to_string())
                    .with_details(serde_json::json!({ "recipient": r.to_string(), "requested": requested.map(Protection::as_str) })));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(effective.unwrap_or(Protection::Normal))
}

/// Sends a message: builds the MIME message, keeps a sealed copy in Sent, delivers to local
/// recipients and queues the rest (sealed per mode when delivered).
#[utoipa::path(post, path = "/api/mail/compose/", tag = "mail", security(("bearer" = [])),
    request_body = ComposeRequest,
    responses((status = 202, body = ComposeResult), (status = 401, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "validation_failed, otp_too_large or mode_unavailable"),
        (status = 400, body = ErrorBody)))]
pub(crate) async fn compose(
    State(state): State<Shared>,
    user: AuthUser,
    ApiJson(req): ApiJson<ComposeRequest>,
) -> ApiResult<impl IntoResponse> {
    if req.to.is_empty() && req.cc.is_empty() && req.bcc.is_empty() {
        return Err(ApiError::validation("the message needs at least one recipient"));
    }
    let requested = match req.mode.as_deref() {
        Some(m) => Some(check_mode(m)?),
        None => match state.deps.store.web_settings(user.account.id).await?.default_mode {
            Some(m) => Some(check_mode(&m)?),
            None => None,
        },
    };
    let built = build_message(&state, &user, &req).await?;
    let mode = choose_modes(&state, &built.envelope, requested)?;
    if mode == Protection::Otp && built.message.len() > state.deps.policy.otp_max_bytes {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "otp_too_large",
            format!(
                "a one-time pad protects messages up to {} bytes; this one has {}: choose another mode or send less",
                state.deps.policy.otp_max_bytes,
                built.message.len()
            ),
        )
        .with_details(serde_json::json!({
            "limit_bytes": state.deps.policy.otp_max_bytes,
            "message_bytes": built.message.len(),
        })));
    }
    let from = qutemail_smtp::ReversePath::Mailbox(
        qutemail_smtp::Address::parse(&user.account.address, true).map_err(ApiError::internal)?,
    );
    let recipients: Vec<qutemail_smtp::Recipient> = built
        .envelope
        .iter()
        .map(|a| qutemail_smtp::Recipient {
            address: a.clone(),
            params: qutemail_smtp::RcptParams::default(),
        })
        .collect();
    let submission = qutemail_queue::Submission {
        from: &from,
        params: &qutemail_smtp::MailParams::default(),
        recipients: &recipients,
        sent_by: Some(&user.account.address),
        requested,
        message: built.message,
    };
    let done = qutemail_queue::submit(
        &state.deps.store,
        &state.deps.vault,
        &state.deps.queue,
        &state.deps.domain,
        submission,
    )
    .await
    .map_err(|e| match e {
        qutemail_queue::SubmitError::NoSuchRecipient(a) => {
            ApiError::validation(format!("there is no mailbox for {a} on this site"))
                .with_details(serde_json::json!({ "recipient": a }))
        }
        e => ApiError::internal(e),
    })?;
    if !done.delivered_locally.is_empty()
        && let Some(wake) = &state.deps.on_delivery
    {
        wake();
    }
    let sent = done.sent.ok_or_else(|| ApiError::internal("the Sent copy was not kept"))?;
    let mut queued = Vec::new();
    for r in &built.envelope {
        let address = r.to_string();
        let local = r.domain().eq_ignore_ascii_case(&state.deps.domain);
        let queue_id = if local { "local".to_owned() } else { done.queue_id.clone().unwrap_or_default() };
        queued.push(QueuedView { recipient: address, queue_id });
    }
    let pairs: Vec<(String, String)> =
        queued.iter().map(|q| (q.recipient.clone(), q.queue_id.clone())).collect();
    state.deps.store.web_record_sent(user.account.id, &sent.unique_id, mode.as_str(), &pairs).await?;
    if let Some(draft) = req.draft_id.as_deref() {
        delete_draft(&state, &user, draft).await?;
    }
    tracing::info!(account = %user.account.address, mode = %mode, recipients = queued.len(), "message submitted from the web");
    Ok((
        StatusCode::ACCEPTED,
        Json(ComposeResult {
            id: sent.unique_id,
            message_id: built.message_id,
            mode: mode.as_str().into(),
            queued,
        }),
    ))
}

async fn delete_draft(state: &Shared, user: &AuthUser, id: &str) -> ApiResult<()> {
    let (mailbox, meta) = load(state, user, id).await?;
    if mailbox.special_use != Some(SpecialUse::Drafts) {
        return Err(ApiError::validation("draft_id names a message that is not a draft"));
    }
    state.deps.store.expunge(mailbox.id, &ExpungeScope::Uids(NumberSet::from_numbers([meta.uid]))).await?;
    Ok(())
}

async fn save_draft(state: &Shared, user: &AuthUser, req: &ComposeRequest) -> ApiResult<String> {
    if let Some(m) = req.mode.as_deref() {
        check_mode(m)?;
    }
    let built = build_message(state, user, req).await?;
    let drafts = state
        .deps
        .store
        .list_mailboxes(user.account.id)
        .await?
        .into_iter()
        .find(|m| m.special_use == Some(SpecialUse::Drafts))
        .ok_or_else(|| ApiError::internal("the account has no Drafts folder"))?;
    let request = AppendRequest { flags: Flags::DRAFT | Flags::SEEN, ..AppendRequest::default() };
    let appended = state
        .deps
        .vault
        .append_plain(&state.deps.store, drafts.id, Protection::Normal, &request, built.message)
        .await?;
    Ok(appended.unique_id)
}

/// Saves a draft (sealed at rest in Drafts).
#[utoipa::path(post, path = "/api/mail/drafts/", tag = "mail", security(("bearer" = [])),
    request_body = ComposeRequest,
    responses((status = 201, body = IdView), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 400, body = ErrorBody)))]
pub(crate) async fn create_draft(
    State(state): State<Shared>,
    user: AuthUser,
    ApiJson(req): ApiJson<ComposeRequest>,
) -> ApiResult<impl IntoResponse> {
    let id = save_draft(&state, &user, &req).await?;
    Ok((StatusCode::CREATED, Json(IdView { id })))
}

/// Replaces a draft; the answer names the new draft's id.
#[utoipa::path(put, path = "/api/mail/drafts/{id}", tag = "mail", security(("bearer" = [])),
    params(("id" = String, Path, description = "draft id")), request_body = ComposeRequest,
    responses((status = 200, body = IdView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 400, body = ErrorBody)))]
pub(crate) async fn update_draft(
    State(state): State<Shared>,
    user: AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ComposeRequest>,
) -> ApiResult<Json<IdView>> {
    let (mailbox, _) = load(&state, &user, &id).await?;
    if mailbox.special_use != Some(SpecialUse::Drafts) {
        return Err(ApiError::not_found("no such draft"));
    }
    let new = save_draft(&state, &user, &req).await?;
    delete_draft(&state, &user, &id).await?;
    Ok(Json(IdView { id: new }))
}

/// The protection modes and the site default.
#[utoipa::path(get, path = "/api/modes/", tag = "mail", responses((status = 200, body = Modes)))]
pub(crate) async fn modes(State(state): State<Shared>) -> Json<Modes> {
    let otp = u64::try_from(state.deps.policy.otp_max_bytes).unwrap_or(u64::MAX);
    Json(Modes {
        modes: vec![
            ModeView {
                id: "hybrid",
                name: "Hybrid (QKD + ML-KEM)",
                description: "A QKD key and an ML-KEM-768 shared secret combined: safe if either holds. Needs a QKD link to the recipient's site.",
                max_bytes: None,
            },
            ModeView {
                id: "qaes",
                name: "Quantum-Aided AES",
                description: "AES-256-GCM under a key from QKD alone. Needs a QKD link to the recipient's site.",
                max_bytes: None,
            },
            ModeView {
                id: "otp",
                name: "One-Time Pad",
                description: "Information-theoretic secrecy with QKD key material as long as the message: small messages only.",
                max_bytes: Some(otp),
            },
            ModeView {
                id: "normal",
                name: "Normal",
                description: "TLS in transit, encrypted at rest; for recipients without a QKD link.",
                max_bytes: None,
            },
        ],
        default: state.deps.policy.linked_default.as_str().to_owned(),
    })
}

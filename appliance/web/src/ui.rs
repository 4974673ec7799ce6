//! The webmail's static files, embedded at build time (see `build.rs`), with their content
//! types and ETags.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

include!(concat!(env!("OUT_DIR"), "/ui_files.rs"));

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, e)| e) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

fn etag(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("\"{}\"", hex::encode(&sha2::Sha256::digest(bytes)[..12]))
}

fn serve_file(name: &str, headers: &HeaderMap) -> Response {
    let Some((_, bytes)) = UI_FILES.iter().find(|(n, _)| *n == name) else {
        return ApiError::not_found(format!("no file {name:?}")).into_response();
    };
    let tag = etag(bytes);
    let tag_value = HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == tag.as_bytes()) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag_value)]).into_response();
    }
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type(name))),
            (header::ETAG, tag_value),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        *bytes,
    )
        .into_response()
}

/// `GET /` and `GET /admin`: the single-page app.
pub(crate) async fn index(headers: HeaderMap) -> Response {
    if !UI_FILES.iter().any(|(n, _)| *n == "index.html") {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ui_missing", "this build has no webmail UI")
            .into_response();
    }
    serve_file("index.html", &headers)
}

/// `GET /assets/{file}`.
pub(crate) async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve_file(&file, &headers)
}

//! ETSI GS QKD 014 V1.1.1 — the REST-based key delivery API — in one place.
//!
//! QuteMail speaks ETSI 014 on both sides: the key management daemon (`kmd`) serves it to local
//! applications, the mail gateway calls it as an SAE, the KME device driver pulls keys from
//! vendor KMEs with it, and the simulator plays a vendor KME pair. They all share this crate:
//!
//! - [`types`] (always): the data formats of clause 6 as serde types, with the specification's
//!   exact member names. Key bytes live in [`types::KeyMaterial`]: zeroized on drop, never
//!   printed by `Debug`.
//! - `client` (feature): [`client::Etsi014Client`], an async HTTPS client authenticating with
//!   an SAE certificate; pooled keep-alive connections, HTTP/1.1 or HTTP/2 by ALPN, errors that
//!   map the HTTP status and the spec's error body and name the URL.
//! - `server` (feature): [`server`], the mTLS serving piece of a KME — a rustls configuration
//!   requiring client certificates, an accept loop serving an axum router over HTTP/1.1 and
//!   HTTP/2 with graceful shutdown, the caller's certificate and SAE ID as extractors, and
//!   [`server::ApiError`] rendering the spec's error body with its status.
//! - `pki` (feature): a throw-away certificate authority (rcgen) for tests and demos.
//!
//! TLS is rustls on the *ring* provider only; no OpenSSL, no aws-lc.
//!
//! # The API (clause 5)
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | Get status | `GET /api/v1/keys/{slave_SAE_ID}/status` | | [`types::Status`] |
//! | Get key | `GET …/{slave_SAE_ID}/enc_keys?number=&size=`, `POST …/enc_keys` | [`types::KeyRequest`] | [`types::KeyContainer`] |
//! | Get key with key IDs | `GET …/{master_SAE_ID}/dec_keys?key_ID=`, `POST …/dec_keys` | [`types::KeyIds`] | [`types::KeyContainer`] |
//!
//! Errors are 400 (bad request), 401 (unauthorized) and 503 (server error), each with a
//! [`types::ErrorBody`].
//!
//! # Who is calling
//! A KME knows the calling SAE only from its TLS client certificate. [`server::SaeIdentityMap`]
//! maps a verified certificate to an SAE ID: first by pinned SHA-256 fingerprint, then (if
//! enabled) by the subject common name, which is then the SAE ID as the client CA vouches for it.

#![warn(missing_docs)]

pub mod types;

#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "client")]
pub mod client;

#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "pki")]
pub mod pki;

pub use types::{ErrorBody, Key, KeyContainer, KeyIdEntry, KeyIds, KeyMaterial, KeyRequest, Status};

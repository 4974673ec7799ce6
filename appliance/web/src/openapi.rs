//! The OpenAPI 3.1 document, generated from the handlers' annotations (utoipa).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::{admin, auth, mail, qkd};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build(),
            ),
        );
        // Every operation with a body may also be refused for the body's type or size.
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.post, &mut item.put, &mut item.patch].into_iter().flatten() {
                if op.request_body.is_none() {
                    continue;
                }
                for (status, what) in [
                    ("413", "payload_too_large: the body is too large"),
                    ("415", "unsupported_media_type: the body has another content type"),
                ] {
                    let response = ResponseBuilder::new()
                        .description(what)
                        .content("application/json", Content::new(Some(Ref::from_schema_name("ErrorBody"))))
                        .build();
                    op.responses.responses.entry(status.to_owned()).or_insert(response.into());
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "QuteMail REST API", description = "Quantum-secured mail: accounts, mail, QKD status and administration. See docs/rest-api.md."),
    paths(
        auth::signup, auth::login, auth::refresh, auth::logout, auth::change_password, auth::reset_request,
        auth::reset_confirm, auth::admin_reset_token, auth::account, auth::update_settings,
        mail::folders, mail::inbox, mail::folder_messages, mail::search, mail::decrypt, mail::raw, mail::attachment,
        mail::patch_message, mail::delete_message, mail::upload, mail::compose, mail::create_draft, mail::update_draft,
        mail::modes,
        qkd::request_key, qkd::confirm,
        admin::users, admin::create_user, admin::patch_user, admin::links, admin::queue, admin::saes,
    ),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Sign-up, login, tokens, password reset"),
        (name = "account", description = "The logged-in account"),
        (name = "mail", description = "Folders, messages, compose"),
        (name = "qkd", description = "QKD key readiness and sent-message state"),
        (name = "admin", description = "Operators (admin role)"),
    )
)]
struct ApiDoc;

/// The OpenAPI document as JSON.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_json().unwrap_or_else(|_| "{}".into())
}

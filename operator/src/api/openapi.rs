//! The OpenAPI 3 document, generated from the handlers' `#[utoipa::path]` annotations and the
//! types' `ToSchema` derives, served at `/api/openapi.json`.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Atelier API",
        description = "Multi-tenant Flux image generation. Authenticate with `Authorization: Bearer <access token>` \
(a JWT from the OpenID provider whose audience is this API), or with the web page's session cookie plus the \
`X-CSRF-Token` header on requests that change state. Errors: `{\"error\": {\"reason\", \"message\"}}`."
    ),
    modifiers(&Security),
    components(schemas(crate::api::error::ErrorBody)),
    tags(
        (name = "me", description = "The caller"),
        (name = "generations", description = "Generation jobs"),
        (name = "images", description = "The caller's image history"),
        (name = "presets", description = "Saved parameter sets"),
        (name = "admin", description = "Tenant administration (tenant admins)"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "atelier_session",
                "Session of the web page (`__Host-atelier_session` with secure cookies); state-changing requests also need X-CSRF-Token",
            ))),
        );
    }
}

//! The OpenAPI 3.1 document of the HTTP API, generated from the code: every routed handler
//! carries a `#[utoipa::path]` and is registered through `utoipa_axum::routes!`, so a route and
//! its documentation come from the same list in `http/mod.rs`; the schemas are the
//! `scaibunker-api` types (its `openapi` feature). Served at `GET /openapi.json`; a committed copy
//! is `docs/openapi.json`, kept equal by `tests/openapi.rs`.
//!
//! utoipa inlines a generic argument into each instance (`Ok_Bunker.data` would repeat the whole
//! `Bunker` schema); [`reference_envelope_data`] turns such copies back into `$ref`s, so
//! generated clients share one type per record.

use utoipa::Modify;
use utoipa::openapi::schema::{ArrayItems, Schema};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi, Ref, RefOr};

/// The document's fixed parts; the paths and schemas are added by the router.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "ScaiBunker API",
        version = env!("CARGO_PKG_VERSION"),
        description = "Bunkers (microVM sandboxes) and the platform routes they need. \
            Success bodies are `{\"status\":\"ok\",\"data\":…}`; lists add `has_more` and \
            `next_cursor`; errors are `{\"status\":\"error\",\"error\":{code,message,details?},\
            \"meta\":{request_id}}` and clients branch on `code`. Every response carries \
            `x-request-id`. `GET /health` and `GET /metrics` (Prometheus text) are served too. \
            The prose reference is docs/api.md."
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "bunkers", description = "Create, list, inspect, pause, resume and delete bunkers"),
        (name = "exec", description = "Run commands in a bunker and read its exec log"),
        (name = "files", description = "Upload, download, list and remove files in a bunker"),
        (name = "snapshots", description = "Snapshots of bunkers in object storage, restored with `POST /bunkers {\"snapshot_id\"}`"),
        (name = "audit", description = "Audit events of the module and the platform"),
        (name = "platform", description = "Tenants, users, groups and API keys (the minimal ScaiGrid core)"),
        (name = "workers", description = "Worker administration"),
        (name = "images", description = "Images (upload, baking, warm) and availability groups"),
        (name = "quotas", description = "Quota profiles, their assignments and usage"),
        (name = "internal", description = "Worker daemons only, authenticated by the worker token"),
        (name = "storage", description = "The storage proxy: objects streamed in and out of object storage, by the worker token or a capability token"),
    )
)]
pub(super) struct ApiDoc;

/// Declares the two ways to authenticate that the operations name.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`sgk_` + at least 32 characters, from `POST /v1/api-keys` \
                         or the bootstrap key) or a JWT (HS256 or RS256, as configured).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "worker_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The shared worker token (`SCAIBUNKER_WORKER_TOKEN`); worker daemons only.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "capability",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A storage capability token (`sbc1.…`, from `POST /storage/capabilities`): \
                         some verbs on the keys under one prefix, until it expires.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Replaces the `data` of each envelope schema (`Ok_*`, `List_*`), or its array items, by a
/// `$ref` to the component schema it is an exact copy of.
pub(super) fn reference_envelope_data(doc: &mut OpenApi) {
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    let named: Vec<(String, serde_json::Value)> = components
        .schemas
        .iter()
        .filter_map(|(name, schema)| Some((name.clone(), serde_json::to_value(schema).ok()?)))
        .collect();
    let copy_of = |schema: &RefOr<Schema>| {
        let value = serde_json::to_value(schema).ok()?;
        named
            .iter()
            .find(|(_, v)| *v == value)
            .map(|(name, _)| Ref::from_schema_name(name.clone()))
    };
    for schema in components.schemas.values_mut() {
        let RefOr::T(Schema::Object(envelope)) = schema else {
            continue;
        };
        let Some(data) = envelope.properties.get_mut("data") else {
            continue;
        };
        if let Some(r) = copy_of(data) {
            *data = RefOr::Ref(r);
        } else if let RefOr::T(Schema::Array(array)) = data
            && let ArrayItems::RefOrSchema(items) = &mut array.items
            && let Some(r) = copy_of(items)
        {
            **items = RefOr::Ref(r);
        }
    }
}

/// Writes axum's catch-all parameters (`{*key}`, a key with `/` in it) as the plain OpenAPI
/// parameters (`{key}`) that the operations declare.
pub(super) fn document_wildcards(doc: &mut OpenApi) {
    let wild: Vec<String> = doc
        .paths
        .paths
        .keys()
        .filter(|p| p.contains("{*"))
        .cloned()
        .collect();
    for path in wild {
        if let Some(item) = doc.paths.paths.remove(&path) {
            doc.paths.paths.insert(path.replace("{*", "{"), item);
        }
    }
}

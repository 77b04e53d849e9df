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

/// A query string or header cannot carry JSON `null`: an optional parameter is one left out.
/// utoipa writes an `Option<T>` parameter as `[T, "null"]`; this keeps `T` alone, so clients
/// (and fuzzers) never send the text `null` for a number or a boolean.
pub(super) fn parameters_never_null(doc: &mut OpenApi) {
    use utoipa::openapi::schema::{SchemaType, Type};
    for item in doc.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
        ];
        for op in ops.into_iter().flatten() {
            for param in op.parameters.iter_mut().flatten() {
                if let RefOr::T(param) = param
                    && let Some(RefOr::T(Schema::Object(o))) = param.schema.as_mut()
                    && let SchemaType::Array(types) = &o.schema_type
                {
                    let kept: Vec<Type> = types
                        .iter()
                        .filter(|t| **t != Type::Null)
                        .cloned()
                        .collect();
                    o.schema_type = match kept.as_slice() {
                        [one] => SchemaType::Type(one.clone()),
                        _ => SchemaType::Array(kept),
                    };
                }
            }
        }
    }
}

/// What the derive cannot say about request bodies, stated so that every request the document
/// allows is one the server takes:
/// - exactly one of `command` and `argv`, at most one of `stdin` and `stdin_b64` (exec);
/// - `image` or `snapshot_id` (create);
/// - the key and value rules of the `env`, `env_vars` and `label_set` maps (the server's caps
///   on their JSON size are kept by asking for fewer, shorter entries than it allows);
/// - permission names from the known set.
pub(super) fn body_rules(doc: &mut OpenApi) {
    use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, OneOfBuilder, Type};
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    let present = |field: &str, ty: Type| {
        ObjectBuilder::new()
            .required(field)
            .property(field, ObjectBuilder::new().schema_type(ty))
    };
    let absent_or_null = |field: &str| {
        ObjectBuilder::new().property(field, ObjectBuilder::new().schema_type(Type::Null))
    };
    wrap(
        components,
        "ExecRequest",
        vec![
            Schema::OneOf(
                OneOfBuilder::new()
                    .item(present("command", Type::String))
                    .item(present("argv", Type::Array))
                    .build(),
            ),
            Schema::AnyOf(
                AnyOfBuilder::new()
                    .item(absent_or_null("stdin"))
                    .item(absent_or_null("stdin_b64"))
                    .build(),
            ),
        ],
    );
    wrap(
        components,
        "CreateBunker",
        vec![Schema::AnyOf(
            AnyOfBuilder::new()
                .item(present("image", Type::String))
                .item(present("snapshot_id", Type::String))
                .build(),
        )],
    );
    let env_key = "^[A-Za-z_][A-Za-z0-9_]{0,63}$";
    let label_key = "^[^\\x00]{1,15}$";
    for (schema, field, key, max) in [
        ("ExecRequest", "env", env_key, 32),
        ("CreateBunker", "env_vars", env_key, 32),
        ("CreateBunker", "label_set", label_key, 16),
    ] {
        if let Some(o) = property(components, schema, field) {
            o.property_names = Some(Box::new(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(key))
                    .build(),
            )));
            o.max_properties = Some(max);
            o.additional_properties = Some(Box::new(
                utoipa::openapi::schema::AdditionalProperties::RefOr(RefOr::T(Schema::Object(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .max_length(Some(64))
                        .pattern(Some("^[^\\x00]*$"))
                        .build(),
                ))),
            ));
        }
    }
    // No NUL in an argument (the guest takes C strings).
    if let Some(RefOr::T(Schema::AllOf(all))) = components.schemas.get_mut("ExecRequest")
        && let Some(RefOr::T(Schema::Object(o))) = all.items.first_mut()
        && let Some(RefOr::T(Schema::Array(a))) = o.properties.get_mut("argv")
        && let ArrayItems::RefOrSchema(items) = &mut a.items
        && let RefOr::T(Schema::Object(item)) = items.as_mut()
    {
        item.pattern = Some("^[^\\x00]*$".to_owned());
    }
    // A user's extra permissions never include `scaibunker:admin:platform`: only a
    // `super_admin` holds it, and its role already does.
    let names = |except: Option<&str>| -> Vec<serde_json::Value> {
        crate::service::auth::ALL_PERMISSIONS
            .iter()
            .filter(|p| Some(**p) != except)
            .map(|p| serde_json::Value::from(*p))
            .collect()
    };
    for (schema, field, except) in [
        ("CreateApiKey", "permissions", None),
        (
            "CreateUser",
            "module_permissions",
            Some(crate::service::auth::ADMIN_PLATFORM),
        ),
    ] {
        if let Some(RefOr::T(Schema::Object(o))) = components.schemas.get_mut(schema)
            && let Some(RefOr::T(Schema::Array(a))) = o.properties.get_mut(field)
            && let ArrayItems::RefOrSchema(items) = &mut a.items
            && let RefOr::T(Schema::Object(item)) = items.as_mut()
        {
            item.enum_values = Some(names(except));
        }
    }
    // Which modes each kind of assignment target takes.
    let pair = |kind: &str, modes: &[&str]| {
        ObjectBuilder::new()
            .property(
                "target_kind",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([serde_json::Value::from(kind)])),
            )
            .property(
                "mode",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(modes.iter().map(|m| serde_json::Value::from(*m)))),
            )
    };
    wrap(
        components,
        "CreateAssignment",
        vec![Schema::OneOf(
            OneOfBuilder::new()
                .item(pair("user", &["individual"]))
                .item(pair("group", &["shared", "per_user"]))
                .item(pair("tenant", &["per_user"]))
                .build(),
        )],
    );
}

/// Makes the component `name` its old schema and all of `extra`.
fn wrap(components: &mut utoipa::openapi::Components, name: &str, extra: Vec<Schema>) {
    use utoipa::openapi::schema::AllOfBuilder;
    if let Some(schema) = components.schemas.remove(name) {
        let mut all = AllOfBuilder::new().item(schema);
        for e in extra {
            all = all.item(e);
        }
        components
            .schemas
            .insert(name.to_owned(), RefOr::T(Schema::AllOf(all.build())));
    }
}

/// The object schema of `field` in the component `schema`, if it is one.
fn property<'a>(
    components: &'a mut utoipa::openapi::Components,
    schema: &str,
    field: &str,
) -> Option<&'a mut utoipa::openapi::schema::Object> {
    let RefOr::T(Schema::AllOf(all)) = components.schemas.get_mut(schema)? else {
        return None;
    };
    let RefOr::T(Schema::Object(o)) = all.items.first_mut()? else {
        return None;
    };
    match o.properties.get_mut(field)? {
        RefOr::T(Schema::Object(p)) => Some(p),
        _ => None,
    }
}

/// Every operation a key or JWT opens is rate limited per key, user and tenant (`429
/// RATE_LIMITED`, `Retry-After`): operations that do not list it get the same answer as those
/// that do.
pub(super) fn rate_limited_everywhere(doc: &mut OpenApi) {
    let mut limited = None;
    for item in doc.paths.paths.values() {
        for op in [&item.get, &item.put, &item.post, &item.delete, &item.patch]
            .into_iter()
            .flatten()
        {
            if let Some(r) = op.responses.responses.get("429") {
                limited = Some(r.clone());
            }
        }
    }
    let Some(limited) = limited else { return };
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            let bearer = op
                .security
                .iter()
                .flatten()
                .any(|s| serde_json::to_value(s).is_ok_and(|v| v.get("bearer").is_some()));
            if bearer {
                op.responses
                    .responses
                    .entry("429".to_owned())
                    .or_insert_with(|| limited.clone());
            }
        }
    }
}

//! The OpenAPI document of the control API, served at `GET /v1/openapi.json`.
//!
//! Each handler in [`crate::router`] carries its own `#[utoipa::path]` description, and
//! the router is built from those handlers (`utoipa_axum`), so a route cannot exist
//! without being described. What every operation shares is added here, once, to the
//! operations it applies to: the key that authenticates it, the team header, and the
//! JSON error body of every 4xx and 5xx answer.

use axum::http::StatusCode;
use model::revision::{AuthMode, KeyScope, RevisionStatus, RunnerState, Strategy};
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Required};

use crate::error::ErrorBody;

/// The name of the security scheme of the API key.
const KEY_SCHEME: &str = "api_key";

/// The name of the shared response for errors.
const ERROR_RESPONSE: &str = "Error";

/// The regular expression of app and team names (`model::manifest::validate_app_name`).
pub(crate) const NAME_PATTERN: &str = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

/// The document's fixed parts: what the API is and how it authenticates.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "hangar control API",
        description = "Deploys apps and manages their revisions, runners, secrets, keys and teams. \
                       Every `/v1` operation but this document needs an API key: \
                       `Authorization: Key <id>:<secret>` (`Bearer` is taken too). Errors are \
                       answered with a JSON body `{\"error\": {\"code\", \"message\"}}` whose \
                       code names one HTTP status.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "apps", description = "Apps, their revisions and their history"),
        (name = "runners", description = "The processes that serve apps"),
        (name = "access", description = "Teams, keys and secrets"),
        (name = "server", description = "Health, metrics and this document"),
    )
)]
pub(crate) struct ApiDoc;

/// Marks every operation of `api` as needing the API key, and gives each the optional
/// team header that root keys use to act for another team.
pub(crate) fn require_key(api: &mut OpenApi) {
    for item in api.paths.paths.values_mut() {
        for operation in operations(item) {
            operation.security = Some(vec![SecurityRequirement::new(KEY_SCHEME, Vec::<String>::new())]);
            // `TEAM_HEADER`, spelled as people write it (header names ignore case).
            let team = ParameterBuilder::new()
                .name("X-Hangar-Team")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some("Act for this team instead of the key's own (root keys only)."))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some(NAME_PATTERN))))
                .build();
            operation.parameters.get_or_insert_with(Vec::new).push(team);
        }
    }
}

/// Finishes the document: the key's security scheme, the JSON error body as the answer
/// of every operation's 4xx and 5xx, and the ranges of unsigned integers. Returns it as
/// JSON.
pub(crate) fn finish(mut api: OpenApi) -> serde_json::Value {
    api.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        KEY_SCHEME,
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "Authorization",
            "`Key <id>:<secret>`, as `hangar keys create` prints it (`Bearer <id>:<secret>` is taken too).",
        ))),
    );
    let error = ResponseBuilder::new()
        .description("An error: the code names what went wrong, the message says how.")
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
        .build();
    components.responses.insert(ERROR_RESPONSE.to_owned(), RefOr::T(error));
    // A scale, and a change of the guard, name at least one value. (utoipa's
    // `min_properties` attribute writes `maxProperties`, so this is set here.)
    for name in ["ScaleRequest", "GuardRequest"] {
        if let Some(RefOr::T(Schema::Object(request))) = components.schemas.get_mut(name) {
            request.min_properties = Some(1);
        }
    }
    for item in api.paths.paths.values_mut() {
        for operation in operations(item) {
            for (status, response) in &mut operation.responses.responses {
                if let RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    let reason = status.parse().ok().and_then(|s| StatusCode::from_u16(s).ok());
                    response.description = reason.and_then(|s| s.canonical_reason()).unwrap_or("Success").to_owned();
                }
            }
            for range in ["4XX", "5XX"] {
                operation
                    .responses
                    .responses
                    .entry(range.to_owned())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name(ERROR_RESPONSE)));
            }
        }
    }
    let mut document = serde_json::to_value(&api).unwrap_or_default();
    state_unsigned_ranges(&mut document);
    document
}

/// Gives every unsigned integer of the document its whole range: utoipa marks them with
/// a format and a minimum of 0 only, and a client must know that a `u32` ends at
/// 4294967295. Bounds the document already states are kept.
fn state_unsigned_ranges(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let max = match map.get("format").and_then(|f| f.as_str()) {
                Some("u-int32") => Some(u64::from(u32::MAX)),
                Some("u-int64") => Some(u64::MAX),
                _ => None,
            };
            if let Some(max) = max {
                let format = if max == u64::MAX { "uint64" } else { "uint32" };
                map.insert("format".to_owned(), format.into());
                map.entry("minimum").or_insert(0.into());
                map.entry("maximum").or_insert(max.into());
            }
            map.values_mut().for_each(state_unsigned_ranges);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(state_unsigned_ranges),
        _ => {}
    }
}

/// The operations of a path, whatever their method.
fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

/// A string that is one of `values`, or null too when `nullable`.
fn choice<'a>(values: impl IntoIterator<Item = &'a str>, nullable: bool) -> Schema {
    let mut values: Vec<serde_json::Value> = values.into_iter().map(serde_json::Value::from).collect();
    let schema_type = if nullable {
        values.push(serde_json::Value::Null);
        utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null])
    } else {
        utoipa::openapi::schema::SchemaType::new(Type::String)
    };
    Schema::Object(ObjectBuilder::new().schema_type(schema_type).enum_values(Some(values)).build())
}

pub(crate) fn auth_mode() -> Schema {
    choice(AuthMode::ALL.iter().map(|m| m.as_str()), false)
}

pub(crate) fn nullable_auth_mode() -> Schema {
    choice(AuthMode::ALL.iter().map(|m| m.as_str()), true)
}

pub(crate) fn strategy() -> Schema {
    choice(Strategy::ALL.iter().map(|s| s.as_str()), false)
}

pub(crate) fn nullable_strategy() -> Schema {
    choice(Strategy::ALL.iter().map(|s| s.as_str()), true)
}

pub(crate) fn revision_status() -> Schema {
    choice(RevisionStatus::ALL.iter().map(|s| s.as_str()), false)
}

pub(crate) fn runner_state() -> Schema {
    choice(RunnerState::ALL.iter().map(|s| s.as_str()), false)
}

pub(crate) fn key_scope() -> Schema {
    choice(KeyScope::ALL.iter().map(|s| s.as_str()), false)
}

/// The scopes a new key may have: not root.
pub(crate) fn new_key_scope() -> Schema {
    choice([KeyScope::Admin.as_str(), KeyScope::Api.as_str()], false)
}

pub(crate) fn health_status() -> Schema {
    choice(["ok"], false)
}

pub(crate) fn sandbox_mode() -> Schema {
    choice(["bwrap", "none"], false)
}

pub(crate) fn limits_mode() -> Schema {
    choice(["cgroup-v1", "cgroup-v2", "none"], false)
}

/// A comma-separated list of runner states, with spaces around the commas allowed.
pub(crate) fn runner_states() -> Schema {
    let one = RunnerState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("|");
    Schema::Object(
        ObjectBuilder::new().schema_type(Type::String).pattern(Some(format!("^ *({one}) *(, *({one}) *)*$"))).build(),
    )
}

/// The values of a secrets update: at least one, by environment variable name.
pub(crate) fn secret_values() -> Schema {
    let value = ObjectBuilder::new().schema_type(Type::String).max_length(Some(crate::wire::MAX_SECRET_BYTES));
    let name = ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[A-Za-z_][A-Za-z0-9_]*$"));
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property_names(Some(name))
            .additional_properties(Some(value))
            .min_properties(Some(1))
            .build(),
    )
}

/// An uploaded app archive: a gzipped tar of the app's directory.
pub(crate) fn archive() -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .build(),
    )
}

/// The request body of a deploy, for the document.
pub(crate) struct Archive;

impl utoipa::PartialSchema for Archive {
    fn schema() -> RefOr<Schema> {
        RefOr::T(archive())
    }
}

impl utoipa::ToSchema for Archive {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("Archive")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unsigned_integers_get_their_whole_range_and_keep_stated_bounds() {
        let mut schema = json!({"properties": {
            "a": {"type": "integer", "format": "u-int32", "minimum": 0},
            "b": {"type": ["integer", "null"], "format": "u-int64", "minimum": 1, "maximum": 1000},
            "c": {"type": "array", "items": {"type": "integer", "format": "u-int64"}},
            "d": {"type": "integer", "format": "int32"},
        }});
        state_unsigned_ranges(&mut schema);
        assert_eq!(
            schema,
            json!({"properties": {
                "a": {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 4294967295_u64},
                "b": {"type": ["integer", "null"], "format": "uint64", "minimum": 1, "maximum": 1000},
                "c": {"type": "array", "items": {"type": "integer", "format": "uint64", "minimum": 0,
                      "maximum": 18446744073709551615_u64}},
                "d": {"type": "integer", "format": "int32"},
            }})
        );
    }
}

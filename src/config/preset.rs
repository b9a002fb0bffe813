//! Built-in knowledge of each upstream's API, as data.
//!
//! A preset is an ordered table of route rules; the first rule whose pattern
//! matches the upstream path applies. A rule says where the team's upstream
//! credential goes and in which JSON shape the gateway answers errors there.
//! Facts come from the specs in `shared/upstream/` (cited per rule).

use http::HeaderName;

use crate::error::ErrorShape;
use crate::route::PathPattern;

/// Where the team's upstream credential is put on a forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialPlacement {
    /// A header carrying the key as is, e.g. `X-API-Key: <key>`.
    Header(HeaderName),
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// A query parameter, e.g. `/ws?token=<key>` (browsers cannot set headers on websockets).
    QueryParam(&'static str),
}

/// One row of a preset's route table.
#[derive(Debug, Clone)]
pub struct RouteRule {
    pub pattern: PathPattern,
    pub credential: CredentialPlacement,
    pub error_shape: ErrorShape,
}

/// An upstream's route table, selected by `preset = "…"` in the config.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub rules: Vec<RouteRule>,
}

/// The names `preset = "…"` accepts.
pub const PRESET_NAMES: &[&str] = &["comfy-cloud"];

pub fn by_name(name: &str) -> Option<Preset> {
    match name {
        "comfy-cloud" => Some(comfy_cloud()),
        _ => None,
    }
}

fn rule(pattern: &str, credential: CredentialPlacement, error_shape: ErrorShape) -> RouteRule {
    RouteRule {
        pattern: PathPattern::parse(pattern).expect("built-in patterns are valid"),
        credential,
        error_shape,
    }
}

/// Comfy Cloud: v1 (`comfy-cloud-openapi.yaml`) and v2 (`comfy-api-v2-openapi.yaml`).
fn comfy_cloud() -> Preset {
    Preset {
        name: "comfy-cloud",
        rules: vec![
            // v1 WEBSOCKET MESSAGE SCHEMAS: "Connect with: /ws?clientId={uuid}&token={auth_token}".
            rule(
                "/ws",
                CredentialPlacement::QueryParam("token"),
                ErrorShape::ComfyFlat,
            ),
            // v2 `securitySchemes.bearerAuth`; errors are the v2 `ErrorEnvelope`.
            rule(
                "/api/v2/**",
                CredentialPlacement::Bearer,
                ErrorShape::ComfyEnvelope,
            ),
            // v1 `securitySchemes.ApiKeyAuth`: header `X-API-Key`; errors are `ErrorResponse`.
            rule(
                "/**",
                CredentialPlacement::Header(HeaderName::from_static("x-api-key")),
                ErrorShape::ComfyFlat,
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_for<'a>(preset: &'a Preset, path: &str) -> &'a RouteRule {
        preset
            .rules
            .iter()
            .find(|rule| rule.pattern.matches(path))
            .expect("the last rule catches everything")
    }

    #[test]
    fn comfy_cloud_places_the_credential_where_each_api_version_expects_it() {
        let preset = by_name("comfy-cloud").unwrap();
        let cases = [
            ("/ws", CredentialPlacement::QueryParam("token")),
            ("/api/v2/jobs/1/events", CredentialPlacement::Bearer),
            ("/api/v2", CredentialPlacement::Bearer),
            (
                "/api/assets",
                CredentialPlacement::Header(HeaderName::from_static("x-api-key")),
            ),
            (
                "/api/v2assets",
                CredentialPlacement::Header(HeaderName::from_static("x-api-key")),
            ),
        ];
        for (path, expected) in cases {
            assert_eq!(rule_for(&preset, path).credential, expected, "{path}");
        }
        assert_eq!(
            rule_for(&preset, "/api/v2/jobs").error_shape,
            ErrorShape::ComfyEnvelope
        );
        assert_eq!(
            rule_for(&preset, "/api/jobs").error_shape,
            ErrorShape::ComfyFlat
        );
    }

    #[test]
    fn every_advertised_preset_exists() {
        for name in PRESET_NAMES {
            assert!(by_name(name).is_some(), "{name}");
        }
        assert!(by_name("nope").is_none());
    }
}

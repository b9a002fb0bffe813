//! Built-in knowledge of each upstream's API, as data.
//!
//! A preset is an ordered table of route rules; the first rule whose pattern
//! matches the upstream path applies. A rule says where the team's upstream
//! credential goes and in which JSON shape the gateway answers errors there.
//! Facts come from the specs in `shared/upstream/` (cited per rule).

use std::time::Duration;

use http::HeaderName;

use crate::cache::policy::{CachePolicy, ReadRule, ScopeTemplate, WriteRule, parse_match};
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
    /// `Authorization: Basic <base64(key:secret)>` (the token is built at config load).
    Basic,
}

/// What a team configures for the upstream: one key, or a key and a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    Token,
    KeyAndSecret,
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
    /// The built-in cache rules; config rules are matched before these.
    pub cache: CachePolicy,
    pub credential: CredentialKind,
    /// `GET` routes the upstream serves without an account when the client
    /// sends `Authorization: public-auth-token` (used only with `public_reads = true`).
    pub public_reads: Vec<PathPattern>,
}

/// The `Authorization` value that marks a public read (Scenario).
pub const PUBLIC_AUTH_TOKEN: &str = "public-auth-token";

/// One built-in read rule: match, TTL, scope, stale-while-revalidate, stale-if-error.
type ReadRow = (&'static str, u64, &'static str, u64, u64);

fn reads(rows: &[ReadRow]) -> Vec<ReadRule> {
    rows.iter()
        .map(|&(source, ttl, scope, swr, sie)| {
            let (_, pattern) = parse_match(source).expect("built-in rules are valid");
            ReadRule {
                scope: ScopeTemplate::parse(scope, &pattern).expect("built-in scopes are valid"),
                pattern,
                ttl: Duration::from_secs(ttl),
                shared: false,
                stale_while_revalidate: Duration::from_secs(swr),
                stale_if_error: Duration::from_secs(sie),
            }
        })
        .collect()
}

fn writes(rows: &[(&'static str, &[&'static str])]) -> Vec<WriteRule> {
    rows.iter()
        .map(|&(source, scopes)| {
            let (methods, pattern) = parse_match(source).expect("built-in rules are valid");
            WriteRule {
                scopes: scopes
                    .iter()
                    .map(|scope| {
                        ScopeTemplate::parse(scope, &pattern).expect("built-in scopes are valid")
                    })
                    .collect(),
                methods,
                pattern,
            }
        })
        .collect()
}

/// The names `preset = "…"` accepts.
pub const PRESET_NAMES: &[&str] = &["comfy-cloud", "scenario"];

pub fn by_name(name: &str) -> Option<Preset> {
    match name {
        "comfy-cloud" => Some(comfy_cloud()),
        "scenario" => Some(scenario()),
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
        cache: comfy_cloud_cache(),
        credential: CredentialKind::Token,
        public_reads: Vec::new(),
    }
}

/// Scenario (`scenario-openapi.DERIVED-from-python-sdk.json`): HTTP Basic with
/// the API key and secret (`securitySchemes.basicAuth`) on every route.
fn scenario() -> Preset {
    Preset {
        name: "scenario",
        rules: vec![rule(
            "/**",
            CredentialPlacement::Basic,
            ErrorShape::Scenario,
        )],
        cache: scenario_cache(),
        credential: CredentialKind::KeyAndSecret,
        public_reads: vec![
            PathPattern::parse("/assets").expect("valid"),
            PathPattern::parse("/assets/{assetId}").expect("valid"),
        ],
    }
}

/// Scenario's asset reads and the writes that change them. Scopes: `assets`
/// (lists) and `asset:{assetId}` (one detail, wrapped as `{asset}`).
fn scenario_cache() -> CachePolicy {
    const MINUTE: u64 = 60;
    CachePolicy {
        reads: reads(&[
            // The key holds the exact query: paginationToken, pageSize, projectId, sortBy, types …
            ("GET /assets", 30, "assets", 0, 5 * MINUTE),
            (
                "GET /assets/{assetId}",
                5 * MINUTE,
                "asset:{assetId}",
                0,
                10 * MINUTE,
            ),
        ]),
        writes: writes(&[
            // Reads made over POST invalidate nothing; they come before the catch-all.
            ("POST /assets/get-bulk", &[]),
            ("POST /assets/download", &[]),
            ("POST /assets/{assetId}/download", &[]),
            ("POST /search/assets", &[]),
            // DELETE /assets names its assets in the JSON body: {"assetIds": [...]}.
            ("DELETE /assets", &["asset:{body.assetIds}", "assets"]),
            ("PUT /assets/{assetId}", &["asset:{assetId}", "assets"]),
            ("PUT /assets/{assetId}/tags", &["asset:{assetId}", "assets"]),
            ("PUT /assets/{assetId}/lock", &["asset:{assetId}", "assets"]),
            (
                "PUT /assets/{assetId}/unlock",
                &["asset:{assetId}", "assets"],
            ),
            ("POST /assets", &["assets"]),
            ("POST /assets/{assetId}/copy", &["assets"]),
            ("POST /assets/restore", &["assets"]),
            ("PUT|DELETE /collections/{collectionId}/assets", &["assets"]),
            ("POST /uploads/**", &["assets"]),
            ("POST /generate/**", &["assets"]),
            // The safe default for any other write under /assets.
            ("* /assets/**", &["assets", "asset"]),
        ]),
    }
}

/// Comfy Cloud's asset reads and the writes that change them (v1 spec, tag `asset`).
/// Literal routes come before `{id:uuid}`; scopes: `assets` (lists), `tags`
/// (tag lists and histograms), `asset:{id}` (one detail; `asset` is all of
/// them), `remote-metadata`.
fn comfy_cloud_cache() -> CachePolicy {
    const MINUTE: u64 = 60;
    CachePolicy {
        reads: reads(&[
            // (match, ttl s, scope, stale-while-revalidate s, stale-if-error s)
            ("GET /api/assets", 30, "assets", 0, 5 * MINUTE),
            (
                "GET /api/assets/remote-metadata",
                60 * MINUTE,
                "remote-metadata",
                0,
                60 * MINUTE,
            ),
            ("GET /api/assets/tags/refine", 30, "tags", 0, 5 * MINUTE),
            ("GET /api/tags", 30, "tags", 0, 5 * MINUTE),
            (
                "GET /api/assets/{id:uuid}",
                5 * MINUTE,
                "asset:{id}",
                0,
                10 * MINUTE,
            ),
        ]),
        writes: writes(&[
            ("POST /api/assets/from-hash", &["assets", "tags"]),
            (
                "PUT|DELETE /api/assets/{id:uuid}",
                &["asset:{id}", "assets", "tags"],
            ),
            (
                "POST|DELETE /api/assets/{id:uuid}/tags",
                &["asset:{id}", "assets", "tags"],
            ),
            ("POST /api/assets", &["assets", "tags"]),
            ("POST /api/assets/download", &["assets", "tags"]),
            ("POST /api/upload/**", &["assets", "tags"]),
            // The safe default: any other write under /api/assets touches every asset scope.
            (
                "* /api/assets/**",
                &["assets", "tags", "asset", "remote-metadata"],
            ),
        ]),
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
    fn scenario_signs_every_route_with_basic_and_answers_in_its_shape() {
        let preset = by_name("scenario").unwrap();
        let rule = rule_for(&preset, "/assets/asset_1/tags");
        assert_eq!(rule.credential, CredentialPlacement::Basic);
        assert_eq!(rule.error_shape, ErrorShape::Scenario);
        assert_eq!(preset.credential, CredentialKind::KeyAndSecret);
        assert!(
            preset
                .public_reads
                .iter()
                .any(|p| p.matches("/assets/asset_1"))
        );
        assert!(
            !preset
                .public_reads
                .iter()
                .any(|p| p.matches("/assets/asset_1/tags"))
        );
    }

    #[test]
    fn scenario_cache_rules_follow_the_issue() {
        use crate::cache::policy::CacheRoute;
        let preset = by_name("scenario").unwrap();
        let classify =
            |method: &str, path: &str| preset.cache.classify(&method.parse().unwrap(), path);
        let write_scopes = |method: &str, path: &str| match classify(method, path) {
            Some(CacheRoute::Write { scopes, from_body }) => {
                let mut names: Vec<String> = scopes
                    .iter()
                    .map(|s| {
                        format!(
                            "{}{}",
                            s.family,
                            s.member
                                .as_deref()
                                .map(|m| format!(":{m}"))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                names.extend(
                    from_body
                        .iter()
                        .map(|b| format!("{}:{{body.{}}}", b.family, b.field)),
                );
                names.sort();
                names
            }
            other => panic!("{method} {path}: {other:?}"),
        };
        assert!(matches!(
            classify("GET", "/assets"),
            Some(CacheRoute::Read { .. })
        ));
        assert!(matches!(
            classify("GET", "/assets/asset_1"),
            Some(CacheRoute::Read { .. })
        ));
        assert_eq!(
            write_scopes("DELETE", "/assets"),
            ["asset:{body.assetIds}", "assets"]
        );
        assert_eq!(
            write_scopes("PUT", "/assets/a1/lock"),
            ["asset:a1", "assets"]
        );
        assert_eq!(write_scopes("POST", "/assets/a1/copy"), ["assets"]);
        assert_eq!(write_scopes("DELETE", "/collections/c1/assets"), ["assets"]);
        assert_eq!(write_scopes("POST", "/uploads/u1/action"), ["assets"]);
        assert_eq!(write_scopes("POST", "/generate/custom/m1"), ["assets"]);
        // A trailing `/` is the same write (the path check refuses `//` and
        // encoded letters before classification).
        assert_eq!(
            write_scopes("DELETE", "/collections/c1/assets/"),
            ["assets"]
        );
        assert_eq!(
            write_scopes("PUT", "/assets/a1/lock/"),
            ["asset:a1", "assets"]
        );
        assert!(matches!(
            classify("GET", "/assets/asset_1/"),
            Some(CacheRoute::Read { .. })
        ));
        for read_over_post in [
            "/assets/get-bulk",
            "/search/assets",
            "/assets/download",
            "/assets/a1/download",
        ] {
            assert!(
                write_scopes("POST", read_over_post).is_empty(),
                "{read_over_post}"
            );
        }
    }

    #[test]
    fn every_advertised_preset_exists() {
        for name in PRESET_NAMES {
            assert!(by_name(name).is_some(), "{name}");
        }
        assert!(by_name("nope").is_none());
    }
}

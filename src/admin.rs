//! The admin listener: health, readiness, and the cache admin API.
//!
//! It listens on its own address (loopback by default) so probes and admin
//! calls never share a port with client traffic.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | the process is up |
//! | `GET /readyz` | 200 when serving; 503 while draining |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /admin/cache` | entries, bytes and bounds of the cache |
//! | `DELETE /admin/cache[?team=T][&upstream=U]` | purge all, one team's, one upstream's (bearer `admin.token`) |
//! | `GET /admin/teams` | the teams served now: client key hashes, upstreams with a credential (bearer `admin.token`) |
//! | `POST /admin/reload` | read the config file again and apply its teams (bearer `admin.token`; see [`crate::reload`]) |

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::body::Body;
use crate::cache::policy::Partition;
use crate::reload::{Live, ReloadError};
use crate::shared::Invalidation;
use crate::stack::Shared;

/// Whether the gateway should receive traffic; false once shutdown has begun.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
}

impl Readiness {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }
}

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub readiness: Readiness,
    /// The running config, cache and metrics; reloads go through it.
    pub live: Arc<Live>,
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::full(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, json!({ "code": code, "message": message }))
}

/// Answers one admin request.
pub async fn handle<B>(
    state: AdminState,
    request: Request<B>,
) -> Result<Response<Body>, Infallible> {
    let method = request.method().clone();
    let is_read = method == Method::GET || method == Method::HEAD;
    Ok(match request.uri().path() {
        // The process is up and answering: no dependency is checked on purpose.
        "/healthz" if is_read => json_response(StatusCode::OK, json!({ "status": "ok" })),
        "/readyz" if is_read && state.readiness.is_ready() => {
            json_response(StatusCode::OK, json!({ "status": "ready" }))
        }
        "/readyz" if is_read => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "draining" }),
        ),
        "/admin/cache" if is_read => {
            json_response(StatusCode::OK, json!(state.live.shared().cache.stats()))
        }
        "/metrics" if is_read => {
            let Shared { cache, metrics, .. } = state.live.shared();
            let stats = cache.stats();
            let mut response =
                Response::new(Body::full(metrics.render(stats.entries, stats.bytes)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/admin/cache" if method == Method::DELETE => purge(&state.live.shared(), &request).await,
        "/admin/reload" if method == Method::POST => reload(&state.live, &request).await,
        "/admin/teams" if is_read => teams(&state.live.shared(), &request),
        "/healthz" | "/readyz" | "/admin/cache" | "/admin/reload" | "/admin/teams" | "/metrics" => {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "see the admin API in the README",
            )
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "admin endpoints: /healthz, /readyz, /metrics, /admin/cache, /admin/reload, /admin/teams",
        ),
    })
}

/// The answer refusing `request`, unless it carries `admin.token` as its bearer token.
fn refusal<B>(state: &Shared, request: &Request<B>) -> Option<Response<Body>> {
    let Some(token) = &state.config.admin.token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "the admin API is off: set admin.token in the config",
        ));
    };
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    let valid = bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes()));
    (!valid).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid admin bearer token is required",
        )
    })
}

/// `POST /admin/reload`, bearer-authenticated with `admin.token`: 200 with
/// what was applied, or why nothing was (the running config stays).
async fn reload<B>(live: &Arc<Live>, request: &Request<B>) -> Response<Body> {
    if let Some(refused) = refusal(&live.shared(), request) {
        return refused;
    }
    // A task of its own: a caller that hangs up does not cancel a reload
    // half way (it would then go unlogged and uncounted).
    let reloading = tokio::spawn({
        let live = Arc::clone(live);
        async move { live.reload().await }
    });
    let Ok(outcome) = reloading.await else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the reload task failed; see the gateway's log",
        );
    };
    match outcome {
        Ok(reloaded) => json_response(StatusCode::OK, json!({ "reloaded": reloaded })),
        Err(ReloadError::NoFile) => error(
            StatusCode::CONFLICT,
            "reload_unavailable",
            "this gateway's config was not read from a file",
        ),
        Err(ReloadError::Invalid(invalid)) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({
                "code": "invalid_config",
                "message": format!("{} does not load; the running config stays", invalid.origin),
                "problems": invalid.problems.iter()
                    .map(|problem| json!({ "key": problem.key, "message": problem.message }))
                    .collect::<Vec<_>>(),
            }),
        ),
        Err(ReloadError::NeedsRestart(keys)) => json_response(
            StatusCode::CONFLICT,
            json!({
                "code": "restart_required",
                "message": "only [teams] and [admin] changes apply on reload; the running config stays",
                "keys": keys,
            }),
        ),
    }
}

/// `GET /admin/teams`, bearer-authenticated with `admin.token`: the teams
/// the gateway serves now — what key-management tooling checks a reload
/// against. Keys appear as the hashes the config lists (their first eight
/// hex digits are the `key` fingerprint on request spans), never as keys;
/// upstream credentials only as the names of the upstreams a team holds one for.
fn teams<B>(state: &Shared, request: &Request<B>) -> Response<Body> {
    if let Some(refused) = refusal(state, request) {
        return refused;
    }
    let config = &state.config;
    let mut keys: std::collections::HashMap<&str, Vec<String>> = std::collections::HashMap::new();
    for (digest, team) in config.keys.iter() {
        keys.entry(team.name.as_str())
            .or_default()
            .push(digest.to_stored());
    }
    let teams: Vec<_> = config
        .teams
        .iter()
        .map(|team| {
            let mut client_keys = keys.remove(team.name.as_str()).unwrap_or_default();
            client_keys.sort_unstable();
            let upstreams: Vec<&str> = config
                .upstreams
                .iter()
                .filter(|upstream| team.credential_for(upstream).is_some())
                .map(|upstream| upstream.name.as_str())
                .collect();
            json!({ "name": team.name, "client_keys": client_keys, "upstreams": upstreams })
        })
        .collect();
    json_response(StatusCode::OK, json!({ "teams": teams }))
}

/// `DELETE /admin/cache[?team=T][&upstream=U]`, bearer-authenticated with
/// `admin.token`; shared with the other instances (`crate::shared`).
async fn purge<B>(state: &Shared, request: &Request<B>) -> Response<Body> {
    if let Some(refused) = refusal(state, request) {
        return refused;
    }
    let query = request.uri().query().unwrap_or_default();
    let team_name = crate::auth::query_param(query, "team");
    let upstream_name = crate::auth::query_param(query, "upstream");
    let upstream = match upstream_name.as_deref() {
        None => None,
        Some(name) => match state.config.upstreams.iter().find(|u| u.name == name) {
            Some(upstream) => Some(upstream),
            None => return error(StatusCode::NOT_FOUND, "not_found", "no such upstream"),
        },
    };
    let team = match team_name.as_deref() {
        None => None,
        Some(name) => match state.config.teams.iter().find(|t| t.name == name) {
            Some(team) => Some(team),
            None => return error(StatusCode::NOT_FOUND, "not_found", "no such team"),
        },
    };
    let partitions: Vec<Partition>;
    let (purged, invalidation) = match (team, upstream) {
        (None, None) => {
            state.cache.purge_all();
            (json!({ "purged": "all" }), Invalidation::All)
        }
        (None, Some(upstream)) => {
            state.cache.purge_upstream(upstream.index);
            (
                json!({ "purged": { "upstream": upstream.name } }),
                Invalidation::Upstream(upstream.index),
            )
        }
        (Some(team), only) => {
            partitions = team
                .cache_partitions()
                .filter(|partition| only.is_none_or(|only| partition.upstream() == only.index))
                .collect();
            state.cache.purge_partitions(partitions.clone());
            (
                json!({ "purged": { "team": team.name, "upstream": only.map(|u| u.name.clone()) } }),
                Invalidation::Partitions {
                    partitions: &partitions,
                    team: &team.name,
                },
            )
        }
    };
    if let Some(fanout) = &state.fanout {
        fanout.publish(invalidation).await;
    }
    tracing::info!(%purged, "cache purged through the admin API");
    json_response(StatusCode::OK, purged)
}

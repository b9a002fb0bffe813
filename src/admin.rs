//! The admin listener: health, readiness, metrics, the cache admin API,
//! reloads, the teams served and managed keys.
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
//! | `GET /admin/teams` | the teams served now: client key hashes (managed ones with their records), upstreams with a credential (bearer `admin.token`) |
//! | `POST /admin/teams/{team}/keys` | make a managed key (`[shared] redis`; bearer `admin.token`; see [`crate::auth::managed`]) |
//! | `DELETE /admin/teams/{team}/keys/{hash}` | revoke a managed key, on every instance (bearer `admin.token`) |
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
pub async fn handle<B>(state: AdminState, request: Request<B>) -> Result<Response<Body>, Infallible>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = request.method().clone();
    let is_read = method == Method::GET || method == Method::HEAD;
    if let Some((team, hash)) = key_path(request.uri().path()) {
        let (team, hash) = (team.to_owned(), hash.map(str::to_owned));
        return Ok(match (method, hash) {
            (Method::POST, None) => add_key(&state.live, &team, request).await,
            (Method::DELETE, Some(hash)) => revoke_key(&state.live, &team, &hash, &request).await,
            _ => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "POST /admin/teams/{team}/keys makes a key, DELETE /admin/teams/{team}/keys/{hash} revokes one",
            ),
        });
    }
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
            "admin endpoints: /healthz, /readyz, /metrics, /admin/cache, /admin/reload, /admin/teams, /admin/teams/{team}/keys",
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
            let mut managed_keys: Vec<_> = config
                .managed_keys
                .iter()
                .filter(|(_, key)| key.team == team.name)
                .map(|(digest, key)| {
                    json!({ "hash": digest.to_stored(), "label": key.label, "created": key.created })
                })
                .collect();
            managed_keys.sort_unstable_by(|a, b| a["hash"].as_str().cmp(&b["hash"].as_str()));
            let upstreams: Vec<&str> = config
                .upstreams
                .iter()
                .filter(|upstream| team.credential_for(upstream).is_some())
                .map(|upstream| upstream.name.as_str())
                .collect();
            json!({
                "name": team.name,
                "client_keys": client_keys,
                "managed_keys": managed_keys,
                "upstreams": upstreams,
            })
        })
        .collect();
    json_response(StatusCode::OK, json!({ "teams": teams }))
}

/// `/admin/teams/{team}/keys[/{hash}]`: the team, and the hash if there is one.
fn key_path(path: &str) -> Option<(&str, Option<&str>)> {
    let (team, rest) = path.strip_prefix("/admin/teams/")?.split_once('/')?;
    match rest.strip_prefix("keys")? {
        "" => Some((team, None)),
        hash => {
            let hash = hash.strip_prefix('/')?;
            (!hash.is_empty() && !hash.contains('/')).then_some((team, Some(hash)))
        }
    }
}

/// What a managed-key request needs: the admin token, `[shared] redis`,
/// and the team in the served config; or the answer refusing it.
fn managed_key_refusal<B>(
    state: &Shared,
    team: &str,
    request: &Request<B>,
) -> Result<Arc<crate::shared::Fanout>, Box<Response<Body>>> {
    if let Some(refused) = refusal(state, request) {
        return Err(Box::new(refused));
    }
    let Some(fanout) = &state.fanout else {
        return Err(Box::new(error(
            StatusCode::CONFLICT,
            "keys_not_shared",
            "keys are managed in the config file (teams.<team>.client_keys, then reload); set [shared] redis to manage them through the admin API",
        )));
    };
    if !state.config.teams.iter().any(|t| t.name == team) {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such team",
        )));
    }
    Ok(Arc::clone(fanout))
}

/// The answer to a managed-key change Redis did not take.
fn redis_unavailable(failure: &str) -> Response<Body> {
    tracing::warn!(error = %failure, "a managed-key change could not be made: Redis");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "redis_unavailable",
        "the key store (Redis) cannot be reached from this instance; nothing changed",
    )
}

/// `POST /admin/teams/{team}/keys`, optionally with `{"label": "…"}`:
/// makes a managed key of `team` and answers it — the only time it is
/// shown — once every instance serves it.
async fn add_key<B>(live: &Arc<Live>, team: &str, request: Request<B>) -> Response<Body>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let state = live.shared();
    let fanout = match managed_key_refusal(&state, team, &request) {
        Ok(fanout) => fanout,
        Err(refused) => return *refused,
    };
    let Ok(body) = http_body_util::Limited::new(request.into_body(), 4096)
        .collect()
        .await
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a body of at most 4 KiB: {\"label\": \"…\"}",
        );
    };
    let body = body.to_bytes();
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewKey {
        label: Option<String>,
    }
    let new = if body.is_empty() {
        NewKey { label: None }
    } else {
        match serde_json::from_slice::<NewKey>(&body) {
            Ok(new) => new,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the body is {\"label\": \"…\"} or empty",
                );
            }
        }
    };
    let key = crate::auth::keys::generate_key();
    let digest = crate::auth::keys::KeyDigest::of_key(&key);
    let record = crate::auth::managed::ManagedKey {
        team: team.to_owned(),
        label: new.label,
        created: now_rfc3339(),
    };
    let Some(mut connection) = fanout.connection() else {
        return redis_unavailable("not connected to Redis");
    };
    match crate::auth::managed::add(&mut connection, fanout.channel(), digest, &record).await {
        Ok(true) => {}
        Ok(false) => {
            // 192 random bits: a collision means something else is wrong.
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the new key's hash is taken; nothing changed",
            );
        }
        Err(failure) => return redis_unavailable(&failure),
    }
    let confirmed = announce_key_change(&fanout).await;
    tracing::info!(team, key = %digest.fingerprint(), confirmed, "managed key made");
    json_response(
        StatusCode::CREATED,
        json!({
            "key": key,
            "hash": digest.to_stored(),
            "team": team,
            "label": record.label,
            "created": record.created,
            "confirmed_by_every_instance": confirmed,
        }),
    )
}

/// `DELETE /admin/teams/{team}/keys/{hash}`: revokes a managed key of
/// `team` and answers once every instance refuses it (or says which may not).
async fn revoke_key<B>(
    live: &Arc<Live>,
    team: &str,
    hash: &str,
    request: &Request<B>,
) -> Response<Body> {
    let state = live.shared();
    let fanout = match managed_key_refusal(&state, team, request) {
        Ok(fanout) => fanout,
        Err(refused) => return *refused,
    };
    let Ok(digest) = crate::auth::keys::KeyDigest::parse(hash) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a key is named by its hash: sha256:<64 hex digits>",
        );
    };
    let managed = state.config.managed_keys.iter().any(|(d, _)| *d == digest);
    if !managed
        && state
            .config
            .keys
            .owner(&digest)
            .is_some_and(|owner| owner.name == team)
    {
        return error(
            StatusCode::CONFLICT,
            "key_in_config_file",
            "this key is listed in the config file: remove it there and reload",
        );
    }
    let Some(mut connection) = fanout.connection() else {
        return redis_unavailable("not connected to Redis");
    };
    match crate::auth::managed::remove(&mut connection, fanout.channel(), digest, team).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such managed key of this team",
            );
        }
        Err(failure) => return redis_unavailable(&failure),
    }
    let confirmed = announce_key_change(&fanout).await;
    tracing::info!(team, key = %digest.fingerprint(), confirmed, "managed key revoked");
    json_response(
        StatusCode::OK,
        json!({ "revoked": digest.to_stored(), "team": team, "confirmed_by_every_instance": confirmed }),
    )
}

/// After a change in Redis: serves it here and announces it to the other
/// instances; whether every one confirmed it serves it. A change not
/// announced is in Redis all the same: an instance that missed it reads it
/// when it next hears of a change, or when it reconnects.
async fn announce_key_change(fanout: &crate::shared::Fanout) -> bool {
    match fanout.managed_keys_changed().await {
        Ok(confirmed) => confirmed,
        Err(failure) => {
            tracing::warn!(error = %failure, "a managed-key change was made in Redis but not announced to the other instances");
            false
        }
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("the time formats")
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

//! Client authentication: gateway key → [`Team`], before anything goes upstream.
//!
//! The gateway key is read from `X-API-Key` (what existing Comfy clients
//! already send), `Authorization: Bearer` (v2 clients), or — only on routes
//! whose upstream credential itself travels in a query parameter, i.e. the
//! Comfy `/ws` upgrade — from that parameter. The first of these present
//! decides. A missing or unknown key, or a team without a credential for the
//! routed upstream, is answered here and nothing is forwarded.
//!
//! [`inject`] then swaps the client's credential for the team's upstream one.

pub mod inject;
pub mod keys;
pub mod managed;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{HeaderName, Request, Response, header};
use percent_encoding::percent_decode_str;
use tower::{Layer, Service};

use crate::body::Body;
use crate::config::{Config, CredentialPlacement, Team};
use crate::error::GatewayError;
use crate::route::RouteMatch;
use crate::telemetry::RequestRecord;
use keys::KeyDigest;

/// Whether `request` is a public read its upstream lets through without a team.
fn is_public_read<B>(request: &Request<B>, route: &RouteMatch) -> bool {
    let upstream = &route.upstream;
    upstream.public_reads
        && matches!(*request.method(), http::Method::GET | http::Method::HEAD)
        && request
            .headers()
            .get(header::AUTHORIZATION)
            .is_some_and(|value| {
                value.as_bytes() == crate::config::preset::PUBLIC_AUTH_TOKEN.as_bytes()
            })
        && upstream
            .preset
            .public_reads
            .iter()
            .any(|pattern| pattern.matches(route.upstream_path(request.uri().path())))
}

/// The team a request was authenticated as.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub team: Arc<Team>,
    /// The hash of the client key that was used (never the key itself).
    pub key: KeyDigest,
}

impl Authenticated {
    /// Whether `config` (a reload's) still lets this key reach `upstream`
    /// as it did: the key is listed for the same team, and that team holds
    /// the same credential for `upstream`.
    pub fn still_granted(&self, config: &Config, upstream: &crate::config::Upstream) -> bool {
        config.keys.owner(&self.key).is_some_and(|team| {
            team.name == self.team.name
                && team.credential_id_for(upstream) == self.team.credential_id_for(upstream)
        })
    }
}

/// Who a request was let through as; set by [`Authenticate`] in the
/// request's record.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A team, by one of its client keys.
    Team(Authenticated),
    /// Nobody: a keyless public read the upstream allows (Scenario's
    /// `public-auth-token`), which goes upstream with the client's own
    /// `Authorization`.
    PublicRead,
}

pub(crate) static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Finds the client's gateway key in the request, if any.
fn client_key<'r, B>(
    request: &'r Request<B>,
    route: &RouteMatch,
) -> Option<std::borrow::Cow<'r, str>> {
    let headers = request.headers();
    if let Some(value) = crate::wire::rare_field(headers, &X_API_KEY) {
        return value.to_str().ok().map(|key| key.trim().into());
    }
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().into());
    }
    if let CredentialPlacement::QueryParam(name) = route.rule().credential {
        return query_param(request.uri().query()?, name);
    }
    None
}

/// The percent-decoded value of the first `name=` parameter in a raw query.
pub(crate) fn query_param<'q>(query: &'q str, name: &str) -> Option<std::borrow::Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode_str(key).decode_utf8().ok()? == name)
            .then(|| percent_decode_str(value).decode_utf8().ok())
            .flatten()
    })
}

/// Resolves the gateway key to its team; the single decision this layer makes.
fn authenticate<B>(
    config: &Config,
    request: &Request<B>,
    route: &RouteMatch,
) -> Result<Authenticated, GatewayError> {
    let key = client_key(request, route)
        .filter(|key| !key.is_empty())
        .ok_or(GatewayError::MissingKey)?;
    let entry = config.keys.lookup(&key).ok_or(GatewayError::UnknownKey)?;
    if entry.owner.credential_for(&route.upstream).is_none() {
        return Err(GatewayError::NoUpstreamCredential);
    }
    Ok(Authenticated {
        team: Arc::clone(&entry.owner),
        key: entry.digest,
    })
}

/// Tower layer for [`Authenticate`].
#[derive(Debug, Clone)]
pub struct AuthenticateLayer {
    config: Arc<Config>,
}

impl AuthenticateLayer {
    pub fn new(config: Arc<Config>) -> Self {
        AuthenticateLayer { config }
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            config: Arc::clone(&self.config),
            inner,
        }
    }
}

/// Answers 401/403 itself, or passes the request on with its [`Caller`] in its record.
#[derive(Debug, Clone)]
pub struct Authenticate<S> {
    config: Arc<Config>,
    inner: S,
}

impl<S> Service<Request<Body>> for Authenticate<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // `Classify`, above, routed it: a request without a route is a bug.
        let routed = RequestRecord::of(&request).and_then(|record| Some((record, record.route()?)));
        let Some((record, route)) = routed else {
            let error = GatewayError::Internal;
            return Either::Left(ready(Ok(crate::error::reject(&request, error))));
        };
        let caller = match authenticate(&self.config, &request, route) {
            Ok(authenticated) => {
                if let Some(span) =
                    crate::telemetry::request_span().filter(|span| !span.is_disabled())
                {
                    span.record("team", authenticated.team.name.as_str());
                    span.record("key", authenticated.key.fingerprint().as_str());
                }
                Caller::Team(authenticated)
            }
            Err(GatewayError::MissingKey) if is_public_read(&request, route) => {
                if let Some(span) = crate::telemetry::request_span() {
                    span.record("team", "(public)");
                }
                Caller::PublicRead
            }
            Err(error) => {
                tracing::debug!(%error, "request refused by authentication");
                return Either::Left(ready(Ok(crate::error::reject(&request, error))));
            }
        };
        // Authenticated once: nothing above this layer sets a caller.
        let _ = record.caller.set(caller);
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secrets, load_str};

    /// Two teams on one upstream; `design_keys` are design's client keys,
    /// `research_keys` research's, and `design_upstream` the variable
    /// design's upstream key is read from.
    fn config(design_keys: &[&str], research_keys: &[&str], design_upstream: &str) -> Config {
        let hashes = |keys: &[&str]| {
            keys.iter()
                .map(|key| format!("\"{}\"", KeyDigest::of_key(key).to_stored()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            "[upstreams.comfy]\nbase_url = \"http://127.0.0.1:9\"\n\
             [teams.design]\nupstream_keys = {{ comfy = \"env:{design_upstream}\" }}\nclient_keys = [{}]\n\
             [teams.research]\nupstream_keys = {{ comfy = \"env:RESEARCH\" }}\nclient_keys = [{}]\n",
            hashes(design_keys),
            hashes(research_keys)
        );
        let env = |name: &str| {
            ["DESIGN", "DESIGN_ROTATED", "RESEARCH"]
                .contains(&name)
                .then(|| format!("upstream-key-of-{name}"))
        };
        load_str(&text, "t.toml", None, &env, Secrets::Resolve).unwrap()
    }

    #[test]
    fn a_grant_lasts_while_the_key_reaches_the_upstream_as_it_did() {
        let running = config(&["d1", "d2"], &["r1"], "DESIGN");
        let upstream = &running.upstreams[0];
        let entry = running.keys.lookup("d1").unwrap();
        let d1 = Authenticated {
            team: Arc::clone(&entry.owner),
            key: entry.digest,
        };
        let granted = |config: &Config| d1.still_granted(config, upstream);
        assert!(granted(&running));
        assert!(
            granted(&config(&["d1"], &["r1", "r2"], "DESIGN")),
            "other keys changed"
        );
        assert!(!granted(&config(&["d2"], &["r1"], "DESIGN")), "revoked");
        assert!(
            !granted(&config(&["d2"], &["r1", "d1"], "DESIGN")),
            "moved to another team"
        );
        assert!(
            !granted(&config(&["d1", "d2"], &["r1"], "DESIGN_ROTATED")),
            "the team's upstream key changed"
        );
    }
}

//! Assembles the request path, outermost layer first, in one place.
//!
//! Each layer reads what the layers above attached to the request
//! (`RequestId`, `RouteMatch`, `Authenticated`) and either answers itself or
//! passes the request on. The quota and cache layers slot in where marked.

use std::sync::Arc;

use tower::ServiceBuilder;

use crate::auth::Authenticate;
use crate::auth::AuthenticateLayer;
use crate::auth::inject::{InjectCredentials, InjectCredentialsLayer};
use crate::cache::{CacheLayer, CacheService, Store};
use crate::config::Config;
use crate::proxy::Forward;
use crate::route::{Classify, ClassifyLayer, Router};
use crate::telemetry::{Observe, ObserveLayer};

/// The gateway's request service, concretely typed: no boxing between layers.
pub type GatewayService = Observe<Classify<Authenticate<CacheService<InjectCredentials<Forward>>>>>;

pub fn build(config: &Arc<Config>, cache: &Arc<Store>) -> GatewayService {
    ServiceBuilder::new()
        // Outermost, so every answer — the rejections below included — carries a
        // request id and gets exactly one access-log line.
        .layer(ObserveLayer)
        // Classify once: upstream, rule and class travel as an extension, so no
        // layer below parses the path again. Unroutable targets stop here.
        .layer(ClassifyLayer::new(Router::new(&config.upstreams)))
        // Before anything costs upstream capacity: unknown keys get 401 here,
        // and no limiter or cache state is ever created for them.
        .layer(AuthenticateLayer::new(Arc::clone(config)))
        // (issue #5) client quotas per team and per key go here: they count cache hits too.
        // Cache after authentication, so every entry is keyed by a known team and
        // hits never reach the layers below (upstream budget, injection, the wire).
        // Writes pass through it too: their 2xx answers invalidate what they touched.
        .layer(CacheLayer::new(Arc::clone(cache)))
        // (issue #5) the upstream budget goes here: it counts only what really goes upstream.
        // Last before the wire: swap the client's credential for the team's upstream one.
        .layer(InjectCredentialsLayer::new(config.server.clone()))
        .service(Forward::new(&config.upstreams))
}

//! Assembles the request path, outermost layer first, in one place.
//!
//! Each layer reads what the connection and the layers above put in the
//! request's `RequestRecord` (client address, request id, `RouteMatch`,
//! `Caller`) and either answers itself or passes the request on.

use std::sync::Arc;

use tower::ServiceBuilder;

use crate::auth::Authenticate;
use crate::auth::AuthenticateLayer;
use crate::auth::inject::{InjectCredentials, InjectCredentialsLayer};
use crate::cache::{CacheLayer, CacheService, Store};
use crate::config::Config;
use crate::limit::layer::{ClientQuota, UpstreamBudget};
use crate::limit::shared::{QuotaSync, SharedQuotas};
use crate::limit::{Backend, ClientQuotaLayer, Quotas, UpstreamBudgetLayer};
use crate::proxy::{Forward, ForwardLimits};
use crate::route::{Classify, ClassifyLayer, RequestLimits, Router};
use crate::shared::Fanout;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{Observe, ObserveLayer};

/// The gateway's request service, concretely typed: no boxing between layers.
pub type GatewayService = Observe<
    Classify<Authenticate<ClientQuota<CacheService<UpstreamBudget<InjectCredentials<Forward>>>>>>,
>;

/// The shared state the stack's layers hold.
#[derive(Debug, Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub cache: Arc<Store>,
    pub quotas: Arc<Quotas>,
    pub metrics: Arc<Metrics>,
    /// The upstream clients and their connection pools.
    pub forward: Forward,
    /// Tells what outlives a reload (websocket tunnels) the config served now.
    pub serving: Arc<tokio::sync::watch::Sender<Arc<Config>>>,
    /// Cache invalidations shared with the other instances (`[shared] redis`).
    pub fanout: Option<Arc<Fanout>>,
    /// The task that shares the quotas with the other instances (`[shared] redis`).
    pub quota_sync: Option<Arc<QuotaSync>>,
}

impl Shared {
    /// Fresh state for `config`: empty cache and limiters, zeroed metrics.
    /// With `[shared] redis`, the cache waits for the subscription to the
    /// other instances' invalidations, and the quotas are reconciled with
    /// theirs (must run inside the tokio runtime).
    pub fn new(config: Arc<Config>) -> Self {
        let metrics = Arc::new(Metrics::new());
        let (serving, now) = tokio::sync::watch::channel(Arc::clone(&config));
        let cache = Arc::new(Store::new(
            config.cache.max_bytes,
            config.cache.max_entry_bytes,
            Arc::clone(&metrics),
        ));
        let redis = crate::shared::client(&config.shared);
        let fanout = redis.clone().map(|client| {
            Fanout::start(
                client,
                now.clone(),
                Arc::clone(&cache),
                Arc::clone(&metrics),
            )
        });
        let (backend, quota_sync) = match redis {
            Some(client) => {
                let shared = SharedQuotas::new(&config.shared.channel);
                let sync = QuotaSync::start(
                    client,
                    config.shared.quota_sync,
                    Arc::clone(&shared),
                    Arc::clone(&metrics),
                );
                (Backend::Shared(shared), Some(Arc::new(sync)))
            }
            None => (Backend::Local, None),
        };
        Shared {
            cache,
            fanout,
            quota_sync,
            quotas: Arc::new(Quotas::with_backend(&config, backend)),
            forward: Forward::new(
                now,
                Arc::clone(&metrics),
                ForwardLimits {
                    max_request_body: config.server.max_request_body,
                    first_body_byte: config.server.header_read_timeout,
                    websocket_idle: config.server.websocket_idle_timeout,
                },
            ),
            config,
            metrics,
            serving: Arc::new(serving),
        }
    }

    /// The state for `config`, a reload of `self.config` that changed only
    /// its teams: the same cache, metrics and upstream pools; quotas rebuilt,
    /// keeping the limiter state of every limit that did not change.
    pub fn reloaded(&self, config: Arc<Config>) -> Self {
        Shared {
            quotas: Arc::new(self.quotas.rebuild(&config)),
            config,
            cache: Arc::clone(&self.cache),
            metrics: Arc::clone(&self.metrics),
            forward: self.forward.clone(),
            serving: Arc::clone(&self.serving),
            fanout: self.fanout.clone(),
            quota_sync: self.quota_sync.clone(),
        }
    }
}

pub fn build(shared: &Shared) -> GatewayService {
    let config = &shared.config;
    ServiceBuilder::new()
        // Outermost, so every answer — the rejections below included — carries a
        // request id and gets exactly one access-log line.
        .layer(ObserveLayer::new(Arc::clone(&shared.metrics)))
        // Classify once: upstream, rule and class travel in the request's record,
        // so no layer below parses the path again. Unroutable targets stop here.
        .layer(ClassifyLayer::new(
            Router::new(&config.upstreams),
            RequestLimits {
                max_header_bytes: config.server.max_header_bytes,
                max_request_body: config.server.max_request_body,
            },
        ))
        // Before anything costs upstream capacity: unknown keys get 401 here,
        // and no limiter or cache state is ever created for them.
        .layer(AuthenticateLayer::new(Arc::clone(config)))
        // Team, key and route quotas before the cache: cache hits count too.
        .layer(ClientQuotaLayer::new(
            Arc::clone(&shared.quotas),
            Arc::clone(&shared.metrics),
        ))
        // Cache after authentication, so every entry is keyed by a known team and
        // hits never reach the layers below (upstream budget, injection, the wire).
        // Writes pass through it too: their 2xx answers invalidate what they touched.
        .layer(CacheLayer::new(
            Arc::clone(&shared.cache),
            Arc::clone(&shared.metrics),
            shared.fanout.clone(),
        ))
        // After the cache: only misses, fills, pass-through and writes spend the
        // team's upstream budget; coalesced waiters and hits spend nothing.
        .layer(UpstreamBudgetLayer::new(
            Arc::clone(&shared.quotas),
            Arc::clone(&shared.metrics),
        ))
        // Last before the wire: swap the client's credential for the team's upstream one.
        .layer(InjectCredentialsLayer::new(config.server.clone()))
        .service(shared.forward.clone())
}

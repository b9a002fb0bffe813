//! Micro-benchmarks of the per-request pure work on the hot path:
//! classification, client-key hashing and lookup, cache-key building, and the
//! upstream header rewrite, request and answer heads, one access-log line;
//! a cache hit through the whole stack, head bytes in, answer head out; a
//! pass-through read through the whole stack to the built-in emulator; a
//! cache look-up and a request's metrics, by one thread and by two at once.
//! `cargo bench --bench micro`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Request};
use teamgate::auth::inject::{ClientAddr, prepare_upstream_request, strip_hop_by_hop};
use teamgate::auth::keys::KeyDigest;
use teamgate::auth::{Authenticated, Caller};
use teamgate::body::Body;
use teamgate::cache::policy::{CacheKey, CredentialId, Partition};
use teamgate::config::LogFormat;
use teamgate::config::{self, Config, Secrets};
use teamgate::proxy::http1;
use teamgate::route::{RequestLimits, RouteMatch, Router, check_request};
use teamgate::telemetry::RequestRecord;
use teamgate::telemetry::logging::{self, AccessLine, LogSink};

// The allocator the `teamgate` binary uses, so allocation costs here are the server's.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CLIENT_KEY: &str = "tg_bench_key_0123456789abcdefghijkl";

/// Comfy at `comfy_base_url` (never contacted, except by `stack/cache_hit`'s
/// fill), Scenario mounted at `/scenario`, and team `design` holding
/// `CLIENT_KEY` among 1,001 keys.
fn config(comfy_base_url: &str) -> Arc<Config> {
    let keys: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                "\"{}\"",
                KeyDigest::of_key(&format!("tg_other_{i}")).to_stored()
            )
        })
        .chain(std::iter::once(format!(
            "\"{}\"",
            KeyDigest::of_key(CLIENT_KEY).to_stored()
        )))
        .collect();
    let text = format!(
        r#"
[upstreams.comfy]
base_url = "{comfy_base_url}"
[upstreams.scenario]
base_url = "https://api.cloud.scenario.com/v1"
preset = "scenario"
mount = "/scenario"
[teams.design]
upstream_keys = {{ comfy = "env:K" }}
client_keys = [{}]
"#,
        keys.join(", ")
    );
    let env = |name: &str| (name == "K").then(|| "comfy-upstream-key".to_owned());
    Arc::new(config::load_str(&text, "bench.toml", None, &env, Secrets::Resolve).unwrap())
}

fn request(target: &str) -> Request<Body> {
    Request::get(target)
        .header("host", "gateway.internal:8080")
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("accept", "application/json")
        .header("accept-encoding", "gzip, br")
        .header("user-agent", "comfy-cli/1.0")
        .header("connection", "keep-alive")
        .body(Body::Empty)
        .unwrap()
}

/// What the connection attaches to every request: the client's address (for
/// `X-Forwarded-For`) and whether it came over TLS.
fn client_record() -> Arc<RequestRecord> {
    Arc::new(RequestRecord::for_client(
        &Request::new(()),
        ClientAddr::new("127.0.0.1:5000".parse().unwrap()),
        false,
    ))
}

/// The record of a request `Classify` routed and `Authenticate` let through.
fn routed_record(route: &RouteMatch, authenticated: &Authenticated) -> Arc<RequestRecord> {
    let record = client_record();
    record.route.set(route.clone()).expect("a fresh record");
    let caller = Caller::Team(authenticated.clone());
    record.caller.set(caller).expect("a fresh record");
    record
}

fn benches(c: &mut Criterion) {
    let config = config("https://cloud.comfy.org");
    let router = Router::new(&config.upstreams);
    let limits = RequestLimits {
        max_header_bytes: 64 * 1024,
        max_request_body: 64 << 20,
    };
    let list = request("/api/assets?limit=20&include_tags=input,output");
    let detail = request("/api/assets/3f2504e0-4f89-41d3-9a0c-0305e82c3301");

    c.bench_function("check_and_classify/list", |b| {
        b.iter(|| {
            check_request(black_box(&list), limits).unwrap();
            router.classify(black_box(&list)).unwrap()
        })
    });
    c.bench_function("check_and_classify/detail", |b| {
        b.iter(|| router.classify(black_box(&detail)).unwrap())
    });
    c.bench_function("key_hash_and_lookup/1001_keys", |b| {
        b.iter(|| config.keys.lookup(black_box(CLIENT_KEY)).unwrap())
    });
    let partition = Partition::Team {
        upstream: 0,
        credential: CredentialId::of("comfy-upstream-key"),
    };
    c.bench_function("cache_key/build", |b| {
        b.iter(|| {
            CacheKey::new(
                partition,
                black_box("/api/assets?limit=20&include_tags=input,output"),
                list.headers(),
            )
        })
    });
    c.bench_function("headers/strip_hop_by_hop", |b| {
        b.iter_batched(
            || list.headers().clone(),
            |mut headers: HeaderMap| strip_hop_by_hop(&mut headers, false),
            criterion::BatchSize::SmallInput,
        )
    });
    let entry = config.keys.lookup(CLIENT_KEY).unwrap();
    let authenticated = Authenticated {
        team: Arc::clone(&entry.owner),
        key: entry.digest,
    };
    let route = router.classify(&list).unwrap();
    c.bench_function("headers/prepare_upstream_request", |b| {
        b.iter_batched(
            || {
                let mut request = request("/api/assets?limit=20&include_tags=input,output");
                let record = routed_record(&route, &authenticated);
                request.extensions_mut().insert(record);
                request
            },
            |mut request| prepare_upstream_request(&mut request, &config.server).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });

    // The upstream client's own per-request work: the head it writes for a
    // rewritten list request, and the head of a typical JSON answer it parses.
    let mut upstream_request = request("/api/assets?limit=20&include_tags=input,output");
    upstream_request
        .extensions_mut()
        .insert(routed_record(&route, &authenticated));
    prepare_upstream_request(&mut upstream_request, &config.server).unwrap();
    let (parts, _) = upstream_request.into_parts();
    c.bench_function("upstream/encode_head", |b| {
        let mut out = bytes::BytesMut::with_capacity(1024);
        b.iter(|| {
            out.clear();
            http1::encode_head(&parts, http1::RequestFraming::Empty, &mut out);
            black_box(out.len())
        })
    });
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n\
        Date: Mon, 23 Nov 2026 14:14:21 GMT\r\nContent-Type: application/json\r\n\
        Content-Length: 11912\r\nLast-Modified: Mon, 23 Nov 2026 14:00:10 GMT\r\n\
        Connection: keep-alive\r\nETag: \"6b0446ea-2e88\"\r\nAccept-Ranges: bytes\r\n\r\n";
    // The own HTTP/1 loop's per-request work: a client's request head into
    // an `http::Request`.
    let client_head: &[u8] = b"GET /api/assets?limit=20&include_tags=input,output HTTP/1.1\r\n\
        Host: gateway.internal:8080\r\nAuthorization: Bearer tg_bench_key_0123456789abcdefghijkl\r\n\
        Accept: application/json\r\nAccept-Encoding: gzip, br\r\nUser-Agent: comfy-cli/1.0\r\n\r\n";
    // The names of the connection's last head, as a keep-alive connection
    // has them from its second request on.
    let mut recent = teamgate::wire::RecentNames::default();
    c.bench_function("server/parse_request", |b| {
        b.iter_batched(
            || bytes::BytesMut::from(client_head),
            |mut buf| match teamgate::server::codec::parse_request(&mut buf, &mut recent) {
                teamgate::server::codec::Head::Simple { request, .. } => request,
                _ => panic!("a simple GET head"),
            },
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("upstream/parse_head", |b| {
        b.iter_batched(
            || bytes::BytesMut::from(answer),
            |mut buf| http1::parse_head(&mut buf, &mut recent).unwrap().unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
}

/// One access line through the subscriber `serve` installs (JSON, INFO),
/// into a log sink that drains to nowhere: the whole cost of logging a request.
fn access_line(c: &mut Criterion) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    let (sink, _writer) = LogSink::spawn(std::io::sink());
    let subscriber = tracing_subscriber::registry().with(
        logging::layer(LogFormat::Json, false, sink, true)
            .with_filter(tracing_subscriber::EnvFilter::new("info")),
    );
    let line = AccessLine {
        request_id: "0b6a3f7e-6c1d-4a3e-9f1e-2a5c8d9b7e41",
        method: "GET",
        path: "/api/assets",
        team: "team-a",
        upstream: "comfy",
        route_class: "asset_list",
        cache: "hit",
        status: 200,
        upstream_status: None,
        latency_us: 183,
    };
    let subscriber = tracing::Dispatch::new(subscriber);
    tracing::dispatcher::with_default(&subscriber, || {
        c.bench_function("telemetry/access_line_json", |b| {
            b.iter(|| black_box(&line).log())
        });
    });
    // Two threads logging at once into the one sink, as every worker of a
    // gateway on many cores does: the time per line with both running.
    c.bench_function("telemetry/access_line_json_on_two_threads", |b| {
        b.iter_custom(|iters| {
            on_two_threads(|| {
                tracing::dispatcher::with_default(&subscriber, || {
                    for _ in 0..iters {
                        black_box(&line).log();
                    }
                })
            })
        })
    });
}

/// One answered request counted in the metrics (request counter, latency
/// histogram, cache counter), by one thread and by two at once: every
/// worker of a gateway counts into the same metrics.
fn request_metrics(c: &mut Criterion) {
    use teamgate::telemetry::metrics::{Metrics, RequestLabels};
    let metrics = Metrics::new();
    let labels = RequestLabels {
        route_class: "asset_list",
        ..RequestLabels::default()
    };
    let method = http::Method::GET;
    let record = || {
        metrics.request(
            black_box(&labels),
            &method,
            http::StatusCode::OK,
            "hit",
            black_box(0.000_183),
        )
    };
    c.bench_function("metrics/request", |b| b.iter(record));
    c.bench_function("metrics/request_on_two_threads", |b| {
        b.iter_custom(|iters| {
            on_two_threads(|| {
                for _ in 0..iters {
                    record();
                }
            })
        })
    });
}

/// Runs `work` on this thread and one more at once (started together); the
/// time until both are done.
fn on_two_threads(work: impl Fn() + Sync) -> std::time::Duration {
    on_two_threads_each(|_| work())
}

/// [`on_two_threads`], `work` told which thread it runs on (0 or 1).
fn on_two_threads_each(work: impl Fn(usize) + Sync) -> std::time::Duration {
    let start = std::sync::Barrier::new(2);
    std::thread::scope(|threads| {
        let other = threads.spawn(|| {
            start.wait();
            work(1);
        });
        start.wait();
        let began = std::time::Instant::now();
        work(0);
        other.join().expect("the second thread");
        began.elapsed()
    })
}

/// A client's `GET` head for `target`, as a CLI sends it, with `CLIENT_KEY`.
fn client_get_head(target: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: gateway.internal:8080\r\n\
         Authorization: Bearer {CLIENT_KEY}\r\n\
         Accept: application/json\r\nUser-Agent: comfy-cli/1.0\r\n\r\n"
    )
    .into_bytes()
}

/// A simple request head parsed as the gateway's own HTTP/1 loop parses it
/// (`server::codec`), bodiless.
fn parse_simple(head: &[u8]) -> Request<Body> {
    use teamgate::server::codec::{self, Head};
    let mut recent = teamgate::wire::RecentNames::default();
    match codec::parse_request(&mut bytes::BytesMut::from(head), &mut recent) {
        Head::Simple { request, .. } => request.map(|()| Body::Empty),
        other => panic!("a simple GET head, not {other:?}"),
    }
}

/// A current-thread runtime, and on it one client connection's stack (the
/// benchmarks' config) in front of the built-in emulator, which serves team
/// `design`'s upstream key on a loopback port of its own.
fn stack_before_emulator() -> (
    tokio::runtime::Runtime,
    teamgate::connection::ConnectionService<teamgate::stack::GatewayService>,
    tokio::task::JoinHandle<()>,
) {
    use teamgate::emulator::{Account, Emulator};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The emulator is spawned as a task of this runtime.
    let (connection, emulator) = {
        let _entered = runtime.enter();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let upstream = listener.local_addr().unwrap();
        let emulator = Emulator::new(vec![Account {
            name: "design".into(),
            api_key: "comfy-upstream-key".into(),
        }])
        .spawn(listener);
        let connection = teamgate::connection::ConnectionService::new(
            Arc::new(teamgate::connection::Published::new(
                teamgate::stack::build(&teamgate::stack::Shared::new(config(&format!(
                    "http://{upstream}"
                )))),
            )),
            ClientAddr::new("127.0.0.1:5000".parse().unwrap()),
            false,
        );
        (connection, emulator)
    };
    (runtime, connection, emulator)
}

/// A cache hit through everything the gateway's own HTTP/1 loop runs for
/// one, with no socket: the request head parsed from bytes, the whole layer
/// stack (request id, classification, key lookup, quotas, cache lookup,
/// metrics), the answer head encoded. In the load benchmark a hit costs
/// ~3 µs of user time on the server's core; what this measures is the same
/// work with hot caches, so the difference is what running cold costs
/// (benches/README.md, "Where a hit's time goes").
///
/// The entry is filled first from the built-in emulator on loopback. A hit
/// must complete at its first poll and say it is a hit, or the benchmark
/// fails.
fn stack_cache_hit(c: &mut Criterion) {
    use std::task::{Context, Poll, Waker};
    use teamgate::server::codec;

    let (runtime, connection, emulator) = stack_before_emulator();
    let _context = runtime.enter();
    let head = &client_get_head("/api/assets?limit=20")[..];
    let filled = runtime
        .block_on(connection.call_stack(parse_simple(head)))
        .unwrap();
    assert_eq!(filled.status(), 200, "the fill through the emulator");
    assert_eq!(
        filled.headers()["cache-status"],
        "teamgate; fwd=miss; stored"
    );

    // Returns the body; the head is written into `out`.
    let hit = |bytes: &[u8], out: &mut Vec<u8>| {
        let mut answer = std::pin::pin!(connection.call_stack(parse_simple(bytes)));
        let Poll::Ready(Ok(response)) = answer
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        else {
            panic!("a cache hit suspended");
        };
        let (mut parts, body) = response.into_parts();
        let exact = http_body::Body::size_hint(&body).exact();
        codec::encode_answer_head(
            &mut parts,
            exact,
            false,
            false,
            b"Mon, 23 Nov 2026 12:00:00 GMT",
            out,
        );
        body
    };
    let mut out = Vec::with_capacity(1024);
    let body = hit(head, &mut out);
    assert!(
        http_body::Body::size_hint(&body).exact().unwrap_or(0) > 1000,
        "a list answer"
    );
    let written = String::from_utf8_lossy(&out);
    assert!(
        written.starts_with("HTTP/1.1 200 OK\r\n")
            && written.contains("cache-status: teamgate; hit"),
        "a cache hit's head, not:\n{written}"
    );
    c.bench_function("stack/cache_hit", |b| {
        b.iter(|| hit(black_box(head), &mut out))
    });
    emulator.abort();
}

/// A pass-through read (`GET /api/jobs`, not cached) through the same stack
/// as [`stack_cache_hit`], forwarded over a kept-alive loopback connection to
/// the built-in emulator and its answer body read to the end. The time
/// includes the emulator's own work (same thread), so it is for comparing
/// builds, not servers; under `callgrind` the gateway's share is the
/// inclusive cost of the benchmark's closure (the parse, the stack, the
/// exchange upstream, the body), as the emulator runs as a task of its own.
fn stack_pass_through(c: &mut Criterion) {
    use http_body_util::BodyExt;

    let (runtime, connection, emulator) = stack_before_emulator();
    let _context = runtime.enter();
    let head = &client_get_head("/api/jobs")[..];
    let pass = || async {
        let response = connection.call_stack(parse_simple(head)).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    };
    let (status, body) = runtime.block_on(pass());
    assert_eq!(status, 200, "the emulator's job list");
    assert!(!body.is_empty(), "a job list body");
    c.bench_function("stack/pass_through", |b| {
        b.iter(|| runtime.block_on(pass()))
    });
    emulator.abort();
}

/// One stored entry looked up as a hit: by one thread, then by two threads
/// at once on two cores (the time per look-up with both running). The second
/// is where a lock every hit takes would show: both threads read the same
/// entry, as every core of a gateway does under a hot list. Both are
/// served from the per-thread front after the first two look-ups.
fn cache_get(c: &mut Criterion) {
    use std::time::Duration;
    use teamgate::cache::Store;
    use teamgate::cache::policy::Scope;
    use teamgate::cache::store::{CachedResponse, EntryState};
    use teamgate::fields::EncodedFields;

    let store = Store::new(64 << 20, 1 << 20, Arc::default());
    let partition = Partition::Team {
        upstream: 0,
        credential: CredentialId::of("comfy-upstream-key"),
    };
    let scope = Scope {
        family: "assets".into(),
        member: None,
    };
    let key = CacheKey::new(partition, "/api/assets?limit=20", &HeaderMap::new());
    let stored = store.insert(
        key.clone(),
        &scope,
        Arc::new(CachedResponse {
            status: http::StatusCode::OK,
            fields: Arc::new(EncodedFields::new(HeaderMap::new())),
            prior_cache_status: Box::default(),
            body: bytes::Bytes::from_static(&[b'x'; 12 * 1024]),
            etag: None,
            stored_at: tokio::time::Instant::now(),
            ttl: Duration::from_secs(3600),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            stamp: store.stamp(partition, &scope),
            state: EntryState::default(),
        }),
    );
    assert!(stored, "the entry is stored");
    let hit = || store.get(black_box(&key), &scope).expect("a hit");
    c.bench_function("cache/get", |b| b.iter(hit));
    c.bench_function("cache/get_on_two_threads", |b| {
        b.iter_custom(|iters| {
            on_two_threads(|| {
                for _ in 0..iters {
                    black_box(hit());
                }
            })
        })
    });
}

/// A quota check on the request path: the in-memory backend (governor) and
/// the backend of instances sharing their quotas (`limit::shared`: the same
/// check in memory, reported to Redis by a round off the request path), a
/// team bucket and a per-key one, alone and on two threads at once — one
/// team bucket both share; a per-key quota's buckets of two keys, one each,
/// as two clients of a team. The quotas are wide: every check is admitted.
fn quota_checks(c: &mut Criterion) {
    use teamgate::auth::keys::KeyDigest;
    use teamgate::limit::quota::{GovernorLimit, QuotaSpec, RateLimit, Verdict, parse_rate};
    use teamgate::limit::shared::SharedQuotas;

    let spec = QuotaSpec {
        rate: parse_rate("1000000/s").unwrap(),
        burst: u32::MAX,
    };
    let keys = [
        KeyDigest::of_key(CLIENT_KEY),
        KeyDigest::of_key("tg_second_client"),
    ];
    let shared = SharedQuotas::new("bench");
    let limits: [(&str, Arc<dyn RateLimit>, bool); 4] = [
        (
            "local/team",
            Arc::new(GovernorLimit::single("client", spec)),
            false,
        ),
        (
            "shared/team",
            shared.limit("t", "client", "client", spec, false),
            false,
        ),
        (
            "local/per_key",
            Arc::new(GovernorLimit::per_key("per_key", spec)),
            true,
        ),
        (
            "shared/per_key",
            shared.limit("t", "per_key", "per_key", spec, true),
            true,
        ),
    ];
    for (name, limit, per_key) in &limits {
        let check = |thread: usize| {
            let key = per_key.then_some(&keys[thread]);
            assert!(matches!(limit.check(black_box(key)), Verdict::Allowed(_)));
        };
        c.bench_function(&format!("quota/{name}"), |b| b.iter(|| check(0)));
        c.bench_function(&format!("quota/{name}_on_two_threads"), |b| {
            b.iter_custom(|iters| {
                on_two_threads_each(|thread| {
                    for _ in 0..iters {
                        check(thread);
                    }
                })
            })
        });
    }
}

criterion_group!(
    micro,
    benches,
    quota_checks,
    access_line,
    stack_cache_hit,
    stack_pass_through,
    cache_get,
    request_metrics
);
criterion_main!(micro);

//! Property test (a fuzz target run briefly in CI) over path checking and
//! route classification (issue #3). For every request target:
//! - it is refused, or it maps to exactly one upstream — the one whose mount
//!   is the longest prefix — and exactly one route rule and class;
//! - the path that would be forwarded stays under the upstream's base path
//!   and holds no dot-segment (path parameters aside), encoded separator, empty segment or encoded
//!   unreserved character, so no upstream that normalises it (RFC 3986
//!   §6.2.2, merged slashes) can read a different route than the one
//!   classified.

use std::sync::Arc;

use http::{Method, Request};
use proptest::prelude::*;
use teamgate::cache::policy::CacheRoute;
use teamgate::config::{self, Config, Secrets};
use teamgate::error::GatewayError;
use teamgate::route::{RequestLimits, Router, check_request};

fn config() -> Arc<Config> {
    let text = r#"
[upstreams.comfy]
base_url = "https://cloud.comfy.org"
preset = "comfy-cloud"
[upstreams.scenario]
base_url = "https://api.cloud.scenario.com/v1"
preset = "scenario"
mount = "/scenario"
"#;
    Arc::new(config::load_str(text, "fuzz.toml", None, &|_| None, Secrets::Resolve).unwrap())
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("api".to_owned()),
        Just("assets".to_owned()),
        Just("v2".to_owned()),
        Just("jobs".to_owned()),
        Just("ws".to_owned()),
        Just("scenario".to_owned()),
        Just("from-hash".to_owned()),
        Just("3f2504e0-4f89-41d3-9a0c-0305e82c3301".to_owned()),
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("%2E.".to_owned()),
        Just("%2f".to_owned()),
        Just("a%2Fb".to_owned()),
        Just("%5c".to_owned()),
        Just("%00".to_owned()),
        Just("%ff".to_owned()),
        Just("%61ssets".to_owned()),
        Just("from%2Dhash".to_owned()),
        Just("%7e".to_owned()),
        Just("..;x".to_owned()),
        Just(".;".to_owned()),
        Just(String::new()),
        "[a-zA-Z0-9._~%-]{1,12}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(segment(), 0..7),
        prop::option::of("[a-z_]{1,6}=[a-zA-Z0-9%,+]{0,10}"),
    )
        .prop_map(|(segments, query)| {
            let mut target = format!("/{}", segments.join("/"));
            if let Some(query) = query {
                target.push('?');
                target.push_str(&query);
            }
            target
        })
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::HEAD),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::PATCH),
    ]
}

fn decoded_segments(path: &str) -> Vec<String> {
    path.split('/')
        .map(|segment| {
            percent_encoding::percent_decode_str(segment)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_target_is_refused_or_lands_on_exactly_one_route_it_cannot_escape(target in target(), method in method()) {
        let config = config();
        let router = Router::new(&config.upstreams);
        let limits = RequestLimits { max_header_bytes: 64 * 1024, max_request_body: 1 << 20 };
        let Ok(request) = Request::builder().method(method.clone()).uri(target.as_str()).header("host", "gateway").body(()) else {
            // Not a request target hyper would ever hand over.
            return Ok(());
        };
        let path = request.uri().path().to_owned();
        match check_request(&request, limits).and_then(|()| router.classify(&request)) {
            Err(error) => prop_assert!(
                matches!(error, GatewayError::UnsafePath | GatewayError::InvalidQuery | GatewayError::NoRoute),
                "{target}: unexpected {error:?}"
            ),
            Ok(route) => {
                // Exactly one upstream: the longest mount that covers the path.
                let expected = config
                    .upstreams
                    .iter()
                    .filter(|u| u.mount == "/" || path == u.mount || path.starts_with(&format!("{}/", u.mount)))
                    .max_by_key(|u| u.mount.len())
                    .unwrap();
                prop_assert_eq!(&route.upstream.name, &expected.name);
                // Exactly one rule, and it is the one that matches the forwarded path.
                let upstream_path = route.upstream_path(&path);
                prop_assert!(route.rule().pattern.matches(upstream_path));
                // The forwarded path stays under the base path, with no way out.
                let forwarded = format!("{}{}", route.upstream.base_path, upstream_path);
                prop_assert!(forwarded.starts_with(&route.upstream.base_path));
                for segment in decoded_segments(upstream_path) {
                    let resolved = segment.split(';').next().unwrap_or_default();
                    prop_assert!(resolved != ".." && resolved != ".", "{target}: dot-segment forwarded");
                    prop_assert!(!segment.contains('/') && !segment.contains('\\'), "{target}: encoded separator forwarded");
                }
                let raw: Vec<&str> = upstream_path.split('/').skip(1).collect();
                for (index, segment) in raw.iter().enumerate() {
                    prop_assert!(!segment.is_empty() || index + 1 == raw.len(), "{target}: empty segment forwarded");
                    let encodes_unreserved = segment.split('%').skip(1).any(|rest| {
                        rest.get(..2)
                            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                            .is_some_and(|byte| byte.is_ascii_alphanumeric() || b"-._~".contains(&byte))
                    });
                    prop_assert!(!encodes_unreserved, "{target}: encoded unreserved character forwarded");
                }
                // Reads are only ever GET/HEAD; the decision is deterministic.
                if let Some(CacheRoute::Read { .. }) = route.cache {
                    prop_assert!(method == Method::GET || method == Method::HEAD);
                }
                let again = router.classify(&request).unwrap();
                prop_assert_eq!(again.class, route.class);
                prop_assert_eq!(again.class_label(), route.class_label());
            }
        }
    }
}

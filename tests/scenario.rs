//! The second upstream (issue #8): Scenario behind `/scenario`, Basic-auth
//! injection, its own cache rules and error shape. Shapes follow
//! shared/upstream/scenario-openapi.DERIVED-from-python-sdk.json.

mod common;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use teamgate::emulator::{Account, Emulator};
use tokio::net::TcpListener;

struct Both {
    h: Harness,
    scenario: Emulator,
    scenario_addr: std::net::SocketAddr,
}

/// Comfy and Scenario emulators with the gateway in front. Teams design and
/// research each have their own Scenario account; team nocred has none.
async fn start(public_reads: bool) -> Both {
    let scenario = Emulator::scenario(vec![
        Account {
            name: "design".into(),
            api_key: format!("{SCN_KEY_DESIGN}:{SCN_SECRET_DESIGN}"),
        },
        Account {
            name: "research".into(),
            api_key: format!("{SCN_KEY_RESEARCH}:{SCN_SECRET_RESEARCH}"),
        },
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scenario_addr = listener.local_addr().unwrap();
    scenario.spawn(listener);
    let comfy = Emulator::new(accounts());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let comfy_addr = listener.local_addr().unwrap();
    comfy.spawn(listener);
    let text = config_text(&format!("http://{comfy_addr}"), "", "")
        .replace(
            r#"upstream_keys = { comfy = "env:DESIGN_COMFY_KEY" }"#,
            r#"upstream_keys = { comfy = "env:DESIGN_COMFY_KEY", scenario = { key = "env:SCN_KEY_DESIGN", secret = "env:SCN_SECRET_DESIGN" } }"#,
        )
        .replace(
            r#"upstream_keys = { comfy = "env:RESEARCH_COMFY_KEY" }"#,
            r#"upstream_keys = { comfy = "env:RESEARCH_COMFY_KEY", scenario = { key = "env:SCN_KEY_RESEARCH", secret = "env:SCN_SECRET_RESEARCH" } }"#,
        )
        + &format!(
        r#"
[upstreams.scenario]
base_url = "http://{scenario_addr}/v1"
preset = "scenario"
mount = "/scenario"
public_reads = {public_reads}
"#
    );
    let h = Harness::start_with_text(comfy, comfy_addr, &text).await;
    Both {
        h,
        scenario,
        scenario_addr,
    }
}

impl Both {
    /// A request straight to the Scenario emulator with design's own key pair.
    async fn direct(&self, target: &str) -> Answer {
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{SCN_KEY_DESIGN}:{SCN_SECRET_DESIGN}"));
        let request = Request::get(format!("http://{}/v1{target}", self.scenario_addr))
            .header("authorization", format!("Basic {basic}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.h.send(request).await
    }

    fn ids(answer: &Answer) -> Vec<String> {
        answer.json()["assets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

#[tokio::test]
async fn basic_credentials_are_injected_and_the_client_credential_removed() {
    let both = start(false).await;
    let answer = both
        .h
        .get("/scenario/assets?pageSize=2&sortBy=createdAt", DESIGN_KEY)
        .await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let seen = both.scenario.recorded().pop().unwrap();
    assert_eq!(
        seen.target, "/v1/assets?pageSize=2&sortBy=createdAt",
        "mount stripped, base path added, query kept"
    );
    let expected = base64::engine::general_purpose::STANDARD
        .encode(format!("{SCN_KEY_DESIGN}:{SCN_SECRET_DESIGN}"));
    assert_eq!(
        seen.headers["authorization"],
        format!("Basic {expected}").as_str()
    );
    assert!(seen.headers.get("x-api-key").is_none());
    assert!(!everything_upstream_saw(&both.scenario).contains(DESIGN_KEY));
    assert_eq!(both.h.emulator.total(), 0, "nothing went to Comfy");
    both.h.stop().await;
}

#[tokio::test]
async fn pagination_through_the_gateway_matches_a_direct_walk() {
    let both = start(false).await;
    let walk = async |through_gateway: bool| {
        let mut ids = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..10 {
            let target = match &token {
                Some(token) => format!("/assets?pageSize=2&paginationToken={token}"),
                None => "/assets?pageSize=2".to_owned(),
            };
            let page = if through_gateway {
                both.h.get(&format!("/scenario{target}"), DESIGN_KEY).await
            } else {
                both.direct(&target).await
            };
            assert_eq!(page.status, StatusCode::OK);
            ids.extend(Both::ids(&page));
            match page
                .json()
                .get("nextPaginationToken")
                .and_then(Value::as_str)
            {
                Some(next) => token = Some(next.to_owned()),
                None => return ids,
            }
        }
        panic!("the walk did not end");
    };
    let via_gateway = walk(true).await;
    let direct = walk(false).await;
    assert_eq!(via_gateway.len(), 3, "design's three assets");
    assert_eq!(via_gateway, direct);
    // pageSize outside 1–100 is the upstream's 400, passed through.
    assert_eq!(
        both.h
            .get("/scenario/assets?pageSize=101", DESIGN_KEY)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    both.h.stop().await;
}

#[tokio::test]
async fn delete_with_a_body_invalidates_the_named_details_and_the_lists() {
    let both = start(false).await;
    let list = both.h.get("/scenario/assets", DESIGN_KEY).await;
    let ids = Both::ids(&list);
    let (gone, kept) = (&ids[0], &ids[1]);
    for id in [gone, kept] {
        assert_eq!(
            both.h
                .get(&format!("/scenario/assets/{id}"), DESIGN_KEY)
                .await
                .json()["asset"]["id"],
            id.as_str()
        );
    }
    assert!(
        both.h
            .get(&format!("/scenario/assets/{gone}"), DESIGN_KEY)
            .await
            .cache_status()
            .contains("hit")
    );

    let deleted = both
        .h
        .call(
            Method::DELETE,
            "/scenario/assets",
            Some(DESIGN_KEY),
            Some(json!({"assetIds": [gone]})),
        )
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(
        both.h
            .get(&format!("/scenario/assets/{gone}"), DESIGN_KEY)
            .await
            .status,
        StatusCode::NOT_FOUND,
        "not served stale"
    );
    let after = both.h.get("/scenario/assets", DESIGN_KEY).await;
    assert_eq!(after.cache_status(), "teamgate; fwd=miss; stored");
    assert!(!Both::ids(&after).contains(gone));
    assert!(
        both.h
            .get(&format!("/scenario/assets/{kept}"), DESIGN_KEY)
            .await
            .cache_status()
            .contains("hit"),
        "other details stay cached"
    );
    both.h.stop().await;
}

#[tokio::test]
async fn put_tags_invalidates_that_detail_and_the_lists() {
    let both = start(false).await;
    let id = Both::ids(&both.h.get("/scenario/assets", DESIGN_KEY).await)[0].clone();
    let detail = format!("/scenario/assets/{id}");
    both.h.get(&detail, DESIGN_KEY).await;
    let tagged = both
        .h
        .call(
            Method::PUT,
            &format!("{detail}/tags"),
            Some(DESIGN_KEY),
            Some(json!({"add": ["hero"]})),
        )
        .await;
    assert_eq!(tagged.status, StatusCode::OK);
    let after = both.h.get(&detail, DESIGN_KEY).await;
    assert_eq!(after.cache_status(), "teamgate; fwd=miss; stored");
    assert_eq!(after.json()["asset"]["tags"], json!(["hero"]));
    assert_eq!(
        both.h
            .get("/scenario/assets", DESIGN_KEY)
            .await
            .cache_status(),
        "teamgate; fwd=miss; stored"
    );
    both.h.stop().await;
}

#[tokio::test]
async fn reads_made_over_post_invalidate_nothing() {
    let both = start(false).await;
    let ids = Both::ids(&both.h.get("/scenario/assets", DESIGN_KEY).await);
    let bulk = both
        .h
        .call(
            Method::POST,
            "/scenario/assets/get-bulk",
            Some(DESIGN_KEY),
            Some(json!({"assetIds": [ids[0]]})),
        )
        .await;
    assert_eq!(bulk.status, StatusCode::OK);
    assert_eq!(bulk.json()["assets"].as_array().unwrap().len(), 1);
    let search = both
        .h
        .call(
            Method::POST,
            "/scenario/search/assets",
            Some(DESIGN_KEY),
            Some(json!({"query": "sketch"})),
        )
        .await;
    assert_eq!(search.status, StatusCode::OK);
    assert!(
        both.h
            .get("/scenario/assets", DESIGN_KEY)
            .await
            .cache_status()
            .contains("hit")
    );
    // A real write does invalidate.
    both.h
        .call(
            Method::POST,
            "/scenario/assets",
            Some(DESIGN_KEY),
            Some(json!({"name": "new", "image": "data:image/png;base64,AA=="})),
        )
        .await;
    assert_eq!(
        both.h
            .get("/scenario/assets", DESIGN_KEY)
            .await
            .cache_status(),
        "teamgate; fwd=miss; stored"
    );
    both.h.stop().await;
}

#[tokio::test]
async fn a_team_without_a_scenario_credential_is_refused_in_scenarios_shape() {
    let both = start(false).await;
    let refused = both.h.get("/scenario/assets", NO_CREDENTIAL_KEY).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let body = refused.json();
    assert!(
        body["error"].is_string() && body["message"].is_string(),
        "{body}"
    );
    assert_eq!(body["code"], "forbidden");
    let unknown = both
        .h
        .call(Method::GET, "/scenario/assets", None, None)
        .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert!(unknown.json()["error"].is_string());
    assert_eq!(both.scenario.total(), 0, "nothing forwarded");
    both.h.stop().await;
}

/// Requests the checks refuse before routing are answered in the shape of
/// the upstream their path is under: a Scenario client parses Scenario's.
#[tokio::test]
async fn a_request_refused_before_routing_hears_scenarios_shape() {
    let both = start(false).await;
    for path in [
        "/scenario//assets",
        "/scenario/%61ssets",
        "/scenario/assets/..;/x",
    ] {
        let refused = both.h.get(path, DESIGN_KEY).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{path}");
        let body = refused.json();
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{path}: {body}"
        );
    }
    let comfy = both.h.get("/api//assets", DESIGN_KEY).await;
    assert_eq!(comfy.status, StatusCode::BAD_REQUEST);
    assert_eq!(comfy.json()["code"], "bad_request", "Comfy's flat shape");
    assert!(comfy.json()["error"].is_null());
    assert_eq!(both.scenario.total(), 0, "nothing forwarded");
    both.h.stop().await;
}

#[tokio::test]
async fn teams_never_share_scenario_entries() {
    let both = start(false).await;
    let design = both.h.get("/scenario/assets", DESIGN_KEY).await;
    let research = both.h.get("/scenario/assets", RESEARCH_KEY).await;
    assert_eq!(
        research.cache_status(),
        "teamgate; fwd=miss; stored",
        "no cross-team hit"
    );
    let names = |answer: &Answer| -> Vec<String> {
        answer.json()["assets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        names(&design)
            .iter()
            .all(|name| name.starts_with("design-")),
        "{:?}",
        names(&design)
    );
    assert!(
        names(&research)
            .iter()
            .all(|name| name.starts_with("research-")),
        "{:?}",
        names(&research)
    );
    assert_eq!(both.scenario.count(Method::GET, "/v1/assets"), 2);
    // Each team's Basic credential went with its own request.
    let auths: Vec<String> = both
        .scenario
        .recorded()
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_owned())
        .collect();
    assert_ne!(auths[0], auths[1]);
    // Same path on the other upstream: a different entry too.
    assert_eq!(
        both.h.get("/api/assets", DESIGN_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored"
    );
    both.h.stop().await;
}

async fn public_read(both: &Both, target: &str) -> Answer {
    let request = Request::get(both.h.url(target))
        .header("authorization", "public-auth-token")
        .body(Full::new(Bytes::new()))
        .unwrap();
    both.h.send(request).await
}

#[tokio::test]
async fn public_reads_pass_without_a_team_key_only_when_enabled_and_are_the_only_shared_entries() {
    let off = start(false).await;
    assert_eq!(
        public_read(&off, "/scenario/assets").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(off.scenario.total(), 0);
    off.h.stop().await;

    let on = start(true).await;
    let public = public_read(&on, "/scenario/assets").await;
    assert_eq!(public.status, StatusCode::OK);
    let names: Vec<String> = public.json()["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(
        names.iter().all(|name| name.starts_with("public-")),
        "{names:?}"
    );
    let seen = on.scenario.recorded().pop().unwrap();
    assert_eq!(
        seen.headers["authorization"], "public-auth-token",
        "no team credential is attached"
    );
    assert!(
        public_read(&on, "/scenario/assets")
            .await
            .cache_status()
            .contains("hit"),
        "shared across callers"
    );
    // A team's own read of the same URL is its own entry, with its own (private) assets.
    let team = on.h.get("/scenario/assets", DESIGN_KEY).await;
    assert_eq!(team.cache_status(), "teamgate; fwd=miss; stored");
    assert!(
        Both::ids(&team)
            .iter()
            .all(|id| !Both::ids(&public).contains(id))
    );
    // Only GET /assets and /assets/{id}: a public write is refused by the gateway.
    let write = Request::post(on.h.url("/scenario/assets"))
        .header("authorization", "public-auth-token")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(on.h.send(write).await.status, StatusCode::UNAUTHORIZED);
    on.h.stop().await;
}

//! The Comfy Cloud emulator follows shared/upstream/comfy-cloud-openapi.yaml.
//! These talk to it directly (no gateway), with an account's own API key.

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use teamgate::emulator::demo_blob_hash;

struct Direct<'a>(&'a Harness);

impl Direct<'_> {
    async fn call(&self, method: Method, target: &str, body: Option<Value>) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{target}", self.0.emulator_addr))
            .header("x-api-key", DESIGN_UPSTREAM_KEY);
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        self.0.send(request.body(body).unwrap()).await
    }

    async fn get(&self, target: &str) -> Answer {
        self.call(Method::GET, target, None).await
    }

    async fn create(&self, name: &str, tags: &[&str], metadata: Value) -> String {
        // Each asset needs its own content hash; register it by uploading JSON-by-URL.
        let answer = self
            .call(
                Method::POST,
                "/api/assets",
                Some(json!({"url": format!("https://example.com/{name}"), "name": name, "tags": tags, "user_metadata": metadata})),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        answer.json()["id"].as_str().unwrap().to_owned()
    }
}

fn names(list: &Value) -> Vec<String> {
    list["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn credentials_are_checked_per_api_version() {
    let h = Harness::start().await;
    let no_key = h
        .send(
            Request::get(format!("http://{}/api/assets", h.emulator_addr))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(no_key.status, StatusCode::UNAUTHORIZED);
    assert_eq!(no_key.json()["code"], "unauthorized");
    let v2 = h
        .send(
            Request::get(format!("http://{}/api/v2/jobs/x/events", h.emulator_addr))
                .header("x-api-key", DESIGN_UPSTREAM_KEY)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(
        v2.status,
        StatusCode::UNAUTHORIZED,
        "v2 wants Bearer, not X-API-Key"
    );
    assert_eq!(v2.json()["error"]["code"], "unauthorized");
}

#[tokio::test]
async fn list_filters_sorting_and_pagination() {
    let h = Harness::start().await;
    let d = Direct(&h);
    d.create("Alpha.png", &["input", "red"], json!({"project": "x"}))
        .await;
    d.create("beta.png", &["input", "blue"], json!({"project": "y"}))
        .await;
    d.create("gamma.png", &["output", "red"], json!({})).await;

    let red_inputs = d
        .get("/api/assets?include_tags=input,red&include_public=false")
        .await
        .json();
    assert_eq!(names(&red_inputs), ["Alpha.png"]);
    let not_red = d
        .get("/api/assets?include_tags=input&exclude_tags=red,output&include_public=false")
        .await
        .json();
    // Default order: created_at, newest first.
    assert_eq!(names(&not_red), ["beta.png", "welcome.png"]);
    let by_name = d.get("/api/assets?name_contains=ALPHA").await.json();
    assert_eq!(names(&by_name), ["Alpha.png"]);
    let by_metadata = d
        .get("/api/assets?metadata_filter=%7B%22project%22%3A%22y%22%7D")
        .await
        .json();
    assert_eq!(names(&by_metadata), ["beta.png"]);

    let sorted = d
        .get("/api/assets?sort=name&order=asc&include_public=false")
        .await
        .json();
    assert_eq!(
        names(&sorted),
        [
            "Alpha.png",
            "ComfyUI_00001_.png",
            "beta.png",
            "gamma.png",
            "welcome.png"
        ]
    );
    let page = d
        .get("/api/assets?sort=name&order=asc&include_public=false&limit=2&offset=2")
        .await
        .json();
    assert_eq!(names(&page), ["beta.png", "gamma.png"]);
    assert_eq!(page["total"], 5);
    assert_eq!(page["has_more"], true);
    let last = d
        .get("/api/assets?sort=name&order=asc&include_public=false&limit=2&offset=4")
        .await
        .json();
    assert_eq!(last["has_more"], false);

    let with_public = d.get("/api/assets?limit=500").await.json();
    assert_eq!(with_public["total"], 8, "3 public models + 5 own");
    for bad in [
        "limit=0",
        "limit=501",
        "offset=-1",
        "sort=colour",
        "order=up",
        "include_public=maybe",
        "metadata_filter=%5B%5D",
    ] {
        assert_eq!(
            d.get(&format!("/api/assets?{bad}")).await.status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn from_hash_answers_201_then_200_and_400_or_404_as_the_spec_says() {
    let h = Harness::start().await;
    let d = Direct(&h);
    let body = json!({"hash": demo_blob_hash(), "name": "x.png", "tags": ["input"]});
    let first = d
        .call(Method::POST, "/api/assets/from-hash", Some(body.clone()))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.json()["created_new"], true);
    let again = d
        .call(Method::POST, "/api/assets/from-hash", Some(body))
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["created_new"], false);
    assert_eq!(again.json()["id"], first.json()["id"]);

    let unknown = format!("sha256:{}", "0".repeat(64));
    let missing = d
        .call(
            Method::POST,
            "/api/assets/from-hash",
            Some(json!({"hash": unknown, "tags": ["a"]})),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    for bad in [
        json!({"hash": "md5:abc", "tags": ["a"]}),
        json!({"hash": demo_blob_hash(), "tags": []}),
        json!({"hash": demo_blob_hash()}),
        json!(["not an object"]),
    ] {
        let answer = d
            .call(Method::POST, "/api/assets/from-hash", Some(bad.clone()))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn detail_update_delete_and_tags() {
    let h = Harness::start().await;
    let d = Direct(&h);
    let id = d.create("one.png", &["input"], json!({})).await;
    assert_eq!(
        d.get(&format!("/api/assets/{id}")).await.json()["name"],
        "one.png"
    );
    assert_eq!(
        d.call(Method::PUT, &format!("/api/assets/{id}"), Some(json!({})))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let updated = d
        .call(
            Method::PUT,
            &format!("/api/assets/{id}"),
            Some(json!({"name": "renamed.png"})),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(updated.json()["name"], "renamed.png");

    let added = d
        .call(
            Method::POST,
            &format!("/api/assets/{id}/tags"),
            Some(json!({"tags": ["input", "new"]})),
        )
        .await
        .json();
    assert_eq!(added["added"], json!(["new"]));
    assert_eq!(added["already_present"], json!(["input"]));
    let tags = d
        .get("/api/tags?include_public=false&order=name_asc")
        .await
        .json();
    assert!(
        tags["tags"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "new", "count": 1}))
    );
    let histogram = d
        .get("/api/assets/tags/refine?include_tags=new")
        .await
        .json();
    assert_eq!(histogram["tag_counts"], json!({"input": 1, "new": 1}));

    assert_eq!(
        d.call(Method::DELETE, &format!("/api/assets/{id}"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        d.get(&format!("/api/assets/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        d.get("/api/assets/not-a-uuid").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn hash_check_remote_metadata_view_and_jobs() {
    let h = Harness::start().await;
    let d = Direct(&h);
    let hash = demo_blob_hash();
    assert_eq!(
        d.call(Method::HEAD, &format!("/api/assets/hash/{hash}"), None)
            .await
            .status,
        StatusCode::OK
    );
    let absent = format!("blake3:{}", "f".repeat(64));
    assert_eq!(
        d.call(Method::HEAD, &format!("/api/assets/hash/{absent}"), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        d.call(Method::HEAD, "/api/assets/hash/sha1:00", None)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    assert_eq!(
        d.get("/api/assets/remote-metadata").await.status,
        StatusCode::BAD_REQUEST
    );
    let metadata = d.get("/api/assets/remote-metadata?url=https://civitai.com/api/download/models/123.safetensors").await.json();
    assert_eq!(metadata["filename"], "123.safetensors");
    assert!(metadata["content_length"].as_i64().unwrap() > 0);

    assert_eq!(d.get("/api/view").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        d.get("/api/view?filename=a.png").await.status,
        StatusCode::FOUND
    );

    let job = d
        .call(Method::POST, "/api/prompt", Some(json!({"prompt": {}})))
        .await
        .json();
    let jobs = d.get("/api/jobs?limit=10").await.json();
    assert_eq!(jobs["jobs"][0]["id"], job["prompt_id"]);
    assert_eq!(jobs["pagination"]["total"], 1);
    assert_eq!(
        d.get(&format!("/api/jobs/{}", job["prompt_id"].as_str().unwrap()))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        d.call(Method::POST, "/api/prompt", Some(json!({})))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn requests_are_counted_per_route_and_method() {
    let h = Harness::start().await;
    let d = Direct(&h);
    d.get("/api/assets?limit=1").await;
    d.get("/api/assets?limit=2").await;
    d.get("/api/tags").await;
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 2);
    assert_eq!(h.emulator.count(Method::GET, "/api/tags"), 1);
    assert_eq!(h.emulator.count(Method::POST, "/api/assets"), 0);
    assert_eq!(h.emulator.total(), 3);
}

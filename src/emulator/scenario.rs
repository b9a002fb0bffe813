//! Scenario's asset API, in memory. Shapes follow
//! `shared/upstream/scenario-openapi.DERIVED-from-python-sdk.json`:
//! `GET /assets` answers `{assets, nextPaginationToken?}` (absent on the last
//! page), `GET /assets/{assetId}` wraps the asset as `{asset}`, `DELETE /assets`
//! takes `{"assetIds": […]}` in its body. Credentials: HTTP Basic with
//! `key:secret`; `Authorization: public-auth-token` reads public assets only.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use base64::Engine as _;
use http::{Request, StatusCode, header};
use serde_json::{Value, json};

use super::{Emulator, lock};

/// Who is calling: an account name, or `None` for a public read.
#[derive(Debug, Clone)]
pub struct Caller(Option<String>);

/// The caller, from `Authorization: Basic base64(key:secret)` or `public-auth-token`.
pub fn account<B>(request: &Request<B>, accounts: &HashMap<String, String>) -> Option<Caller> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    if value == "public-auth-token" {
        let is_public_read = request.method() == http::Method::GET
            && (request.uri().path() == "/v1/assets"
                || request.uri().path().starts_with("/v1/assets/"));
        return is_public_read.then_some(Caller(None));
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let pair = String::from_utf8(decoded).ok()?;
    accounts.get(&pair).map(|name| Caller(Some(name.clone())))
}

pub fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// An error answer in the making, small enough to return through `Result`.
struct Rejection(StatusCode, &'static str);

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

#[derive(Debug, Clone)]
struct Asset {
    id: String,
    /// `None` for public assets.
    owner: Option<String>,
    name: String,
    description: String,
    asset_type: String,
    tags: Vec<String>,
    created_at: String,
    updated_at: String,
    deleted: bool,
    seq: u64,
}

impl Asset {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "authorId": self.owner.clone().unwrap_or_else(|| "scenario".into()),
            "ownerId": self.owner.clone().unwrap_or_else(|| "scenario".into()),
            "collectionIds": [],
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "editCapabilities": ["DETECTION", "SEGMENTATION"],
            "kind": "image",
            "metadata": { "type": self.asset_type, "name": self.name },
            "mimeType": "image/png",
            "privacy": if self.owner.is_some() { "private" } else { "public" },
            "properties": { "width": 1024, "height": 1024, "size": 2048 },
            "source": self.asset_type,
            "status": "success",
            "tags": self.tags,
            "description": self.description,
            "url": format!("https://cdn.emulator.invalid/{}.png", self.id),
        })
    }
}

#[derive(Debug, Default)]
pub struct Store {
    assets: Vec<Asset>,
    clock: u64,
}

/// 2026-01-01T00:00:00Z; the logical clock counts seconds from here.
const EPOCH: i64 = 1_767_225_600;

impl Store {
    pub fn seeded(accounts: &[String]) -> Self {
        let mut store = Store::default();
        for name in ["public-texture", "public-character"] {
            store.add(None, name, "uploaded");
        }
        for account in accounts {
            for (name, kind) in [
                ("sketch", "uploaded"),
                ("render", "inference-txt2img"),
                ("variation", "inference-img2img"),
            ] {
                store.add(Some(account), &format!("{account}-{name}"), kind);
            }
        }
        store
    }

    fn now(&mut self) -> String {
        self.clock += 1;
        time::OffsetDateTime::from_unix_timestamp(EPOCH + self.clock as i64)
            .expect("in range")
            .format(&time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 always formats")
    }

    fn add(&mut self, owner: Option<&str>, name: &str, asset_type: &str) -> Asset {
        let now = self.now();
        let asset = Asset {
            id: format!("asset_{}", &uuid::Uuid::new_v4().simple().to_string()[..22]),
            owner: owner.map(str::to_owned),
            name: name.to_owned(),
            description: String::new(),
            asset_type: asset_type.to_owned(),
            tags: Vec::new(),
            created_at: now.clone(),
            updated_at: now,
            deleted: false,
            seq: self.clock,
        };
        self.assets.push(asset.clone());
        asset
    }

    /// What `caller` can read: its own assets, or the public ones for a public read.
    fn visible<'a>(&'a self, caller: &'a Caller) -> impl Iterator<Item = &'a Asset> + 'a {
        self.assets
            .iter()
            .filter(move |asset| !asset.deleted && asset.owner == caller.0)
    }

    fn owned_mut(&mut self, caller: &Caller, id: &str) -> Option<&mut Asset> {
        let owner = caller.0.as_ref()?;
        self.assets
            .iter_mut()
            .find(|asset| !asset.deleted && asset.id == id && asset.owner.as_ref() == Some(owner))
    }
}

pub fn router(emulator: Emulator) -> Router {
    Router::new()
        .route("/v1/assets", get(list).post(create).delete(delete_batch))
        .route("/v1/assets/get-bulk", post(get_bulk))
        .route("/v1/assets/{asset_id}", get(detail).put(update))
        .route("/v1/assets/{asset_id}/tags", put(update_tags))
        .route("/v1/assets/{asset_id}/copy", post(copy))
        .route("/v1/search/assets", post(search))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Not found") })
        .with_state(emulator)
}

fn write_access(caller: &Caller) -> Result<&str, Rejection> {
    caller
        .0
        .as_deref()
        .ok_or(Rejection(StatusCode::UNAUTHORIZED, "Unauthorized"))
}

fn json_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, Rejection> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(Rejection(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        )),
    }
}

fn id_list(body: &serde_json::Map<String, Value>) -> Result<Vec<String>, Rejection> {
    body.get("assetIds")
        .and_then(Value::as_array)
        .and_then(|ids| {
            ids.iter()
                .map(|id| id.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
        .filter(|ids| !ids.is_empty() && ids.len() <= 100)
        .ok_or(Rejection(
            StatusCode::BAD_REQUEST,
            "`assetIds` must list 1 to 100 asset ids",
        ))
}

/// `GET /assets`: `pageSize` 1–100 (default 50), `paginationToken`, `sortBy`,
/// `sortDirection`, `type`/`types`.
async fn list(
    State(emulator): State<Emulator>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let page_size = match query.get("pageSize").map(|raw| raw.parse::<usize>()) {
        None => 50,
        Some(Ok(size)) if (1..=100).contains(&size) => size,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "pageSize must be an integer from 1 to 100",
            );
        }
    };
    let offset = match query.get("paginationToken") {
        None => 0,
        Some(token) => match base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| {
                text.strip_prefix("offset:")
                    .and_then(|n| n.parse::<usize>().ok())
            }) {
            Some(offset) => offset,
            None => return error(StatusCode::BAD_REQUEST, "invalid paginationToken"),
        },
    };
    let by_updated = match query.get("sortBy").map(String::as_str) {
        None | Some("createdAt") => false,
        Some("updatedAt") => true,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "sortBy must be createdAt or updatedAt",
            );
        }
    };
    let descending = match query.get("sortDirection").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => return error(StatusCode::BAD_REQUEST, "sortDirection must be asc or desc"),
    };
    let mut types: Vec<&str> = query
        .get("types")
        .map(|t| t.split(',').collect())
        .unwrap_or_default();
    if let Some(single) = query.get("type") {
        types.push(single);
    }
    let store = lock(&emulator.shared.scenario);
    let mut assets: Vec<&Asset> = store
        .visible(&caller)
        .filter(|asset| types.is_empty() || types.contains(&asset.asset_type.as_str()))
        .collect();
    assets.sort_by(|a, b| {
        let order = if by_updated {
            a.updated_at.cmp(&b.updated_at)
        } else {
            a.created_at.cmp(&b.created_at)
        }
        .then(a.seq.cmp(&b.seq));
        if descending { order.reverse() } else { order }
    });
    let page: Vec<Value> = assets
        .iter()
        .skip(offset)
        .take(page_size)
        .map(|asset| asset.json())
        .collect();
    let mut body = json!({ "assets": page });
    let next = offset + page_size;
    if next < assets.len() {
        body["nextPaginationToken"] = json!(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("offset:{next}"))
        );
    }
    axum::Json(body).into_response()
}

/// `GET /assets/{assetId}`: `{asset}`.
async fn detail(
    State(emulator): State<Emulator>,
    Extension(caller): Extension<Caller>,
    Path(asset_id): Path<String>,
) -> Response {
    let store = lock(&emulator.shared.scenario);
    match store.visible(&caller).find(|asset| asset.id == asset_id) {
        Some(asset) => axum::Json(json!({ "asset": asset.json() })).into_response(),
        None => error(StatusCode::NOT_FOUND, "Asset not found"),
    }
}

/// `POST /assets`: `{name, image}` → `{asset}`.
async fn create(
    State(emulator): State<Emulator>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let owner = match write_access(&caller) {
        Ok(owner) => owner.to_owned(),
        Err(response) => return response.into_response(),
    };
    let body = match json_body(&body) {
        Ok(body) => body,
        Err(response) => return response.into_response(),
    };
    if !body.get("image").is_some_and(Value::is_string) {
        return error(StatusCode::BAD_REQUEST, "`image` (a data URL) is required");
    }
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("upload")
        .to_owned();
    let asset = lock(&emulator.shared.scenario).add(Some(&owner), &name, "uploaded");
    axum::Json(json!({ "asset": asset.json() })).into_response()
}

/// `DELETE /assets` with `{"assetIds": […]}`.
async fn delete_batch(
    State(emulator): State<Emulator>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    if let Err(response) = write_access(&caller) {
        return response.into_response();
    }
    let ids = match json_body(&body).and_then(|body| id_list(&body)) {
        Ok(ids) => ids,
        Err(response) => return response.into_response(),
    };
    let mut store = lock(&emulator.shared.scenario);
    let now = store.now();
    for id in &ids {
        if let Some(asset) = store.owned_mut(&caller, id) {
            asset.deleted = true;
            asset.updated_at = now.clone();
        }
    }
    axum::Json(json!({})).into_response()
}

/// `PUT /assets/{assetId}`: `{name?, description?}` → `{asset}`.
async fn update(
    State(emulator): State<Emulator>,
    Extension(caller): Extension<Caller>,
    Path(asset_id): Path<String>,
    body: Bytes,
) -> Response {
    let body = match json_body(&body) {
        Ok(body) => body,
        Err(response) => return response.into_response(),
    };
    let mut store = lock(&emulator.shared.scenario);
    let now = store.now();
    let Some(asset) = store.owned_mut(&caller, &asset_id) else {
        return error(StatusCode::NOT_FOUND, "Asset not found");
    };
    if let Some(name) = body.get("name").and_then(Value::as_str) {
        asset.name = name.to_owned();
    }
    if let Some(description) = body.get("description").and_then(Value::as_str) {
        asset.description = description.to_owned();
    }
    asset.updated_at = now;
    axum::Json(json!({ "asset": asset.json() })).into_response()
}

/// `PUT /assets/{assetId}/tags`: `{add?, delete?}`.
async fn update_tags(
    State(emulator): State<Emulator>,
    Extension(caller): Extension<Caller>,
    Path(asset_id): Path<String>,
    body: Bytes,
) -> Response {
    let body = match json_body(&body) {
        Ok(body) => body,
        Err(response) => return response.into_response(),
    };
    let strings = |field: &str| -> Vec<String> {
        body.get(field)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (add, delete) = (strings("add"), strings("delete"));
    let mut store = lock(&emulator.shared.scenario);
    let now = store.now();
    let Some(asset) = store.owned_mut(&caller, &asset_id) else {
        return error(StatusCode::NOT_FOUND, "Asset not found");
    };
    asset.tags.retain(|tag| !delete.contains(tag));
    for tag in add {
        if !asset.tags.contains(&tag) {
            asset.tags.push(tag);
        }
    }
    asset.updated_at = now;
    axum::Json(json!({ "added": strings("add"), "deleted": strings("delete"), "tags": asset.tags }))
        .into_response()
}

/// `POST /assets/{assetId}/copy` → `{asset}` (the copy).
async fn copy(
    State(emulator): State<Emulator>,
    Extension(caller): Extension<Caller>,
    Path(asset_id): Path<String>,
) -> Response {
    let mut store = lock(&emulator.shared.scenario);
    let Some(original) = store
        .owned_mut(&caller, &asset_id)
        .map(|asset| asset.clone())
    else {
        return error(StatusCode::NOT_FOUND, "Asset not found");
    };
    let owner = original.owner.clone();
    let copy = store.add(
        owner.as_deref(),
        &format!("{} (copy)", original.name),
        &original.asset_type,
    );
    axum::Json(json!({ "asset": copy.json() })).into_response()
}

/// `POST /assets/get-bulk`: a read made over POST.
async fn get_bulk(
    State(emulator): State<Emulator>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let ids = match json_body(&body).and_then(|body| id_list(&body)) {
        Ok(ids) => ids,
        Err(response) => return response.into_response(),
    };
    let store = lock(&emulator.shared.scenario);
    let assets: Vec<Value> = store
        .visible(&caller)
        .filter(|asset| ids.contains(&asset.id))
        .map(Asset::json)
        .collect();
    axum::Json(json!({ "assets": assets })).into_response()
}

/// `POST /search/assets`: a read made over POST; matches names.
async fn search(
    State(emulator): State<Emulator>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let body = match json_body(&body) {
        Ok(body) => body,
        Err(response) => return response.into_response(),
    };
    let query = body
        .get("query")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_lowercase();
    let store = lock(&emulator.shared.scenario);
    let hits: Vec<Value> = store
        .visible(&caller)
        .filter(|asset| asset.name.to_lowercase().contains(&query))
        .map(Asset::json)
        .collect();
    axum::Json(json!({ "hits": hits })).into_response()
}

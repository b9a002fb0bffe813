//! Comfy Cloud routes and state. Section names in comments refer to
//! `shared/upstream/comfy-cloud-openapi.yaml` (v1) and `comfy-api-v2-openapi.yaml` (v2).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{
    DefaultBodyLimit, FromRequest, Multipart, Path, Query, RawQuery, Request, State,
};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, head, post};
use axum::{Extension, Router};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use std::sync::Arc;

use super::{Emulator, lock};

/// The account a request authenticated as (set by `Emulator::authenticate`).
#[derive(Debug, Clone)]
pub struct AccountName(pub String);

/// Content every emulator has in storage, so `from-hash` works out of the box.
pub const DEMO_BLOB: &[u8] = b"teamgate demo image: the bytes of a small PNG would stand here";

/// `blake3:<hex>` of [`DEMO_BLOB`].
pub fn demo_blob_hash() -> String {
    format!("blake3:{}", blake3::hash(DEMO_BLOB).to_hex())
}

/// `/api/upload/image` and `/api/upload/mask`: "Maximum file size: 50 MB".
const IMAGE_UPLOAD_LIMIT: u64 = 50 * 1024 * 1024;

#[derive(Debug, Clone, Serialize)]
struct Asset {
    id: Uuid,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    asset_hash: Option<String>,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    mime_type: Option<String>,
    tags: Vec<String>,
    user_metadata: Map<String, Value>,
    preview_id: Option<Uuid>,
    prompt_id: Option<Uuid>,
    created_at: String,
    updated_at: String,
    last_access_time: String,
    is_immutable: bool,
    /// `None` for public assets, visible to every account.
    #[serde(skip)]
    owner: Option<String>,
    /// Creation order, the tie-breaker for every sort.
    #[serde(skip)]
    seq: u64,
}

#[derive(Debug, Clone)]
struct Job {
    id: Uuid,
    owner: String,
    status: &'static str,
    create_time: i64,
}

/// All emulator state. Timestamps come from a logical clock so sorts are deterministic.
#[derive(Debug, Default)]
pub struct Store {
    assets: Vec<Asset>,
    /// Content hashes in storage, with their sizes (content-addressed, shared by all).
    blobs: HashMap<String, u64>,
    jobs: Vec<Job>,
    clock: u64,
}

/// 2026-01-01T00:00:00Z; the logical clock counts seconds from here.
const EPOCH: i64 = 1_767_225_600;

impl Store {
    pub fn seeded(accounts: &[String]) -> Self {
        let mut store = Store::default();
        store.blobs.insert(demo_blob_hash(), DEMO_BLOB.len() as u64);
        for (name, tags) in [
            ("sd_xl_base_1.0.safetensors", ["models", "checkpoint"]),
            ("flux1-dev.safetensors", ["models", "checkpoint"]),
            ("detail-tweaker.safetensors", ["models", "lora"]),
        ] {
            let hash = format!("blake3:{}", blake3::hash(name.as_bytes()).to_hex());
            store.blobs.insert(hash.clone(), 6_938_078_334);
            let asset = store.new_asset(
                None,
                name,
                Some(hash),
                6_938_078_334,
                tags.iter().map(|t| t.to_string()).collect(),
            );
            store.assets.push(Asset {
                is_immutable: true,
                mime_type: Some("application/octet-stream".into()),
                ..asset
            });
        }
        for account in accounts {
            for (name, tag) in [("welcome.png", "input"), ("ComfyUI_00001_.png", "output")] {
                let bytes = format!("{account}/{name}");
                let hash = format!("blake3:{}", blake3::hash(bytes.as_bytes()).to_hex());
                store.blobs.insert(hash.clone(), 1024);
                let asset =
                    store.new_asset(Some(account), name, Some(hash), 1024, vec![tag.into()]);
                store.assets.push(Asset {
                    mime_type: Some("image/png".into()),
                    ..asset
                });
            }
        }
        store
    }

    fn now(&mut self) -> String {
        self.clock += 1;
        let at =
            time::OffsetDateTime::from_unix_timestamp(EPOCH + self.clock as i64).expect("in range");
        at.format(&time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 always formats")
    }

    fn new_asset(
        &mut self,
        owner: Option<&str>,
        name: &str,
        hash: Option<String>,
        size: u64,
        tags: Vec<String>,
    ) -> Asset {
        let now = self.now();
        Asset {
            id: Uuid::new_v4(),
            name: name.to_owned(),
            asset_hash: hash,
            size,
            mime_type: None,
            tags,
            user_metadata: Map::new(),
            preview_id: None,
            prompt_id: None,
            created_at: now.clone(),
            updated_at: now.clone(),
            last_access_time: now,
            is_immutable: false,
            owner: owner.map(str::to_owned),
            seq: self.clock,
        }
    }

    fn visible<'a>(
        &'a self,
        account: &'a str,
        include_public: bool,
    ) -> impl Iterator<Item = &'a Asset> + 'a {
        self.assets.iter().filter(move |asset| match &asset.owner {
            Some(owner) => owner == account,
            None => include_public,
        })
    }

    fn owned_mut(&mut self, account: &str, id: &str) -> Option<&mut Asset> {
        let id = Uuid::try_parse(id).ok()?;
        self.assets
            .iter_mut()
            .find(|asset| asset.id == id && asset.owner.as_deref() == Some(account))
    }
}

pub fn router(emulator: Emulator) -> Router {
    Router::new()
        .route("/api/assets", get(list_assets).post(create_asset))
        .route("/api/assets/from-hash", post(from_hash))
        .route("/api/assets/remote-metadata", get(remote_metadata))
        .route("/api/assets/download", post(download))
        .route("/api/assets/tags/refine", get(refine_tags))
        .route("/api/assets/hash/{hash}", head(hash_exists))
        .route(
            "/api/assets/{id}",
            get(get_asset).put(update_asset).delete(delete_asset),
        )
        .route("/api/assets/{id}/tags", post(add_tags).delete(remove_tags))
        .route("/api/tags", get(list_tags))
        .route("/api/view", get(view))
        .route("/api/prompt", post(submit_prompt))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/upload/image", post(upload_image))
        .route("/api/upload/mask", post(upload_image))
        .route("/ws", get(websocket))
        .route("/api/v2/jobs/{id}/events", get(job_events))
        // Test fixtures, not Comfy routes: big bodies without holding them in memory.
        .route("/emulator/bytes/{size}", get(stream_bytes))
        .route("/emulator/sink", post(sink))
        .fallback(not_found)
        // Uploads stream through the handlers; the spec's own limits apply there.
        .layer(DefaultBodyLimit::disable())
        .with_state(emulator)
}

type Query_ = Query<HashMap<String, String>>;

/// A v1 `ErrorResponse`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "code": code, "message": message })),
    )
        .into_response()
}

/// A v2 `ErrorEnvelope`.
pub fn v2_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message, "details": null } })),
    )
        .into_response()
}

fn bad_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

/// A 400 in the making, small enough to return through `Result`.
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        bad_request(&self.0)
    }
}

fn asset_not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "Asset not found")
}

async fn not_found(request: Request) -> Response {
    if request.uri().path().starts_with("/api/v2/") {
        v2_error(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else {
        error(StatusCode::NOT_FOUND, "not_found", "no such route")
    }
}

fn int_param(
    query: &HashMap<String, String>,
    name: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, BadRequest> {
    match query.get(name) {
        None => Ok(default),
        Some(raw) => match raw.parse::<u64>() {
            Ok(value) if (min..=max).contains(&value) => Ok(value),
            _ => Err(BadRequest(format!(
                "`{name}` must be an integer from {min} to {max}"
            ))),
        },
    }
}

fn bool_param(
    query: &HashMap<String, String>,
    name: &str,
    default: bool,
) -> Result<bool, BadRequest> {
    match query.get(name).map(String::as_str) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(BadRequest(format!("`{name}` must be true or false"))),
    }
}

/// `style: form, explode: false` arrays: `include_tags=a,b`.
fn list_param(query: &HashMap<String, String>, name: &str) -> Vec<String> {
    query
        .get(name)
        .map(|raw| {
            raw.split(',')
                .map(str::trim)
                .filter(|tag| !tag.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The filters shared by `GET /api/assets` and `GET /api/assets/tags/refine`.
struct AssetFilter {
    include_tags: Vec<String>,
    exclude_tags: Vec<String>,
    name_contains: Option<String>,
    metadata: Option<Map<String, Value>>,
    include_public: bool,
}

impl AssetFilter {
    fn parse(query: &HashMap<String, String>) -> Result<Self, BadRequest> {
        let metadata = match query.get("metadata_filter") {
            None => None,
            Some(raw) => match serde_json::from_str::<Value>(raw) {
                Ok(Value::Object(map)) => Some(map),
                _ => return Err(BadRequest("`metadata_filter` must be a JSON object".into())),
            },
        };
        Ok(AssetFilter {
            include_tags: list_param(query, "include_tags"),
            exclude_tags: list_param(query, "exclude_tags"),
            name_contains: query.get("name_contains").map(|s| s.to_lowercase()),
            metadata,
            include_public: bool_param(query, "include_public", true)?,
        })
    }

    fn matches(&self, asset: &Asset) -> bool {
        self.include_tags.iter().all(|tag| asset.tags.contains(tag))
            && !self.exclude_tags.iter().any(|tag| asset.tags.contains(tag))
            && self
                .name_contains
                .as_ref()
                .is_none_or(|needle| asset.name.to_lowercase().contains(needle))
            && self.metadata.as_ref().is_none_or(|wanted| {
                wanted
                    .iter()
                    .all(|(key, value)| asset.user_metadata.get(key) == Some(value))
            })
    }
}

/// `GET /api/assets` (listAssets).
async fn list_assets(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Query(query): Query_,
) -> Response {
    let filter = match AssetFilter::parse(&query) {
        Ok(filter) => filter,
        Err(response) => return response.into_response(),
    };
    let (limit, offset) = match (
        int_param(&query, "limit", 20, 1, 500),
        int_param(&query, "offset", 0, 0, u64::MAX),
    ) {
        (Ok(limit), Ok(offset)) => (limit as usize, offset as usize),
        (Err(response), _) | (_, Err(response)) => return response.into_response(),
    };
    let sort = query.get("sort").map_or("created_at", String::as_str);
    if ![
        "name",
        "created_at",
        "updated_at",
        "size",
        "last_access_time",
    ]
    .contains(&sort)
    {
        return bad_request(
            "`sort` must be one of name, created_at, updated_at, size, last_access_time",
        );
    }
    let descending = match query.get("order").map_or("desc", String::as_str) {
        "desc" => true,
        "asc" => false,
        _ => return bad_request("`order` must be asc or desc"),
    };
    let store = lock(&emulator.shared.store);
    let mut matching: Vec<&Asset> = store
        .visible(&account.0, filter.include_public)
        .filter(|asset| filter.matches(asset))
        .collect();
    matching.sort_by(|a, b| {
        let order = match sort {
            "name" => a.name.cmp(&b.name),
            "size" => a.size.cmp(&b.size),
            "updated_at" => a.updated_at.cmp(&b.updated_at),
            "last_access_time" => a.last_access_time.cmp(&b.last_access_time),
            _ => a.created_at.cmp(&b.created_at),
        }
        .then(a.seq.cmp(&b.seq));
        if descending { order.reverse() } else { order }
    });
    let total = matching.len();
    let page: Vec<&Asset> = matching.into_iter().skip(offset).take(limit).collect();
    let has_more = offset.saturating_add(page.len()) < total;
    axum::Json(json!({ "assets": page, "total": total, "has_more": has_more })).into_response()
}

fn created(asset: &Asset, created_new: bool) -> Response {
    let mut body = serde_json::to_value(asset).expect("assets serialize");
    body["created_new"] = Value::Bool(created_new);
    let status = if created_new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, axum::Json(body)).into_response()
}

/// Registers `hash` and creates the account's reference to it, or returns the existing one.
fn reference_blob(
    emulator: &Emulator,
    account: &str,
    hash: String,
    size: u64,
    fill: impl FnOnce(&mut Asset),
) -> Response {
    let mut store = lock(&emulator.shared.store);
    store.blobs.insert(hash.clone(), size);
    if let Some(existing) = store.assets.iter().find(|asset| {
        asset.owner.as_deref() == Some(account) && asset.asset_hash.as_deref() == Some(&hash)
    }) {
        return created(existing, false);
    }
    let mut asset = store.new_asset(Some(account), "", Some(hash), size, Vec::new());
    fill(&mut asset);
    store.assets.push(asset.clone());
    created(&asset, true)
}

fn string_list(value: Option<&Value>) -> Result<Vec<String>, ()> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or(()))
            .collect(),
        Some(_) => Err(()),
    }
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, BadRequest> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(BadRequest("the body must be a JSON object".into())),
    }
}

/// `POST /api/assets` (uploadAsset): multipart file upload or JSON `{url, name}`.
async fn create_asset(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    request: Request,
) -> Response {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = match Multipart::from_request(request, &emulator).await {
            Ok(multipart) => multipart,
            Err(_) => return bad_request("malformed multipart body"),
        };
        let mut file: Option<(String, u64, Option<String>)> = None;
        let mut fields: HashMap<String, String> = HashMap::new();
        let mut tags: Vec<String> = Vec::new();
        loop {
            let mut field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(_) => return bad_request("malformed multipart body"),
            };
            let name = field.name().unwrap_or_default().to_owned();
            if name == "file" {
                let file_name = field.file_name().map(str::to_owned);
                let mut hasher = blake3::Hasher::new();
                let mut size = 0u64;
                loop {
                    match field.chunk().await {
                        Ok(Some(chunk)) => {
                            size += chunk.len() as u64;
                            hasher.update(&chunk);
                        }
                        Ok(None) => break,
                        Err(_) => return bad_request("the upload ended early"),
                    }
                }
                file = Some((
                    format!("blake3:{}", hasher.finalize().to_hex()),
                    size,
                    file_name,
                ));
            } else {
                let Ok(text) = field.text().await else {
                    return bad_request("malformed multipart field");
                };
                if name == "tags" {
                    match serde_json::from_str::<Vec<String>>(&text) {
                        Ok(list) => tags.extend(list),
                        Err(_) => tags.extend(
                            text.split(',')
                                .map(str::trim)
                                .filter(|t| !t.is_empty())
                                .map(str::to_owned),
                        ),
                    }
                } else {
                    fields.insert(name, text);
                }
            }
        }
        let Some((hash, size, file_name)) = file else {
            return bad_request("the `file` field is required");
        };
        let user_metadata = match fields
            .get("user_metadata")
            .map(|raw| serde_json::from_str::<Value>(raw))
        {
            None => Map::new(),
            Some(Ok(Value::Object(map))) => map,
            Some(_) => return bad_request("`user_metadata` must be a JSON object"),
        };
        let name = fields
            .get("name")
            .cloned()
            .or(file_name)
            .unwrap_or_else(|| "upload".into());
        let mime_type = fields.get("mime_type").cloned();
        return reference_blob(&emulator, &account.0, hash, size, |asset| {
            asset.name = name;
            asset.tags = tags;
            asset.mime_type = mime_type;
            asset.user_metadata = user_metadata;
        });
    }
    if !content_type.starts_with("application/json") {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send multipart/form-data or application/json",
        );
    }
    let Ok(body) = Bytes::from_request(request, &emulator).await else {
        return bad_request("unreadable body");
    };
    let object = match json_object(&body) {
        Ok(object) => object,
        Err(response) => return response.into_response(),
    };
    let url = object
        .get("url")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return bad_request("`url` must be an http(s) URL");
    }
    let Some(name) = object
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return bad_request("`name` is required");
    };
    let Ok(tags) = string_list(object.get("tags")) else {
        return bad_request("`tags` must be an array of strings");
    };
    let hash = format!("blake3:{}", blake3::hash(url.as_bytes()).to_hex());
    let metadata = object
        .get("user_metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    reference_blob(&emulator, &account.0, hash, 0, |asset| {
        asset.name = name;
        asset.tags = tags;
        asset.user_metadata = metadata;
    })
}

fn is_content_hash(hash: &str, algorithms: &[&str]) -> bool {
    hash.split_once(':').is_some_and(|(algorithm, hex)| {
        algorithms.contains(&algorithm)
            && hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `POST /api/assets/from-hash` (createAssetFromHash).
async fn from_hash(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    body: Bytes,
) -> Response {
    let object = match json_object(&body) {
        Ok(object) => object,
        Err(response) => return response.into_response(),
    };
    let hash = object
        .get("hash")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !is_content_hash(&hash, &["blake3", "sha256"]) {
        return bad_request("`hash` must be blake3:<64 hex> or sha256:<64 hex>");
    }
    let tags = match string_list(object.get("tags")) {
        Ok(tags) if !tags.is_empty() => tags,
        _ => return bad_request("`tags` must be a non-empty array of strings"),
    };
    let Some(size) = lock(&emulator.shared.store).blobs.get(&hash).copied() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Source asset with given hash not found",
        );
    };
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("asset")
        .to_owned();
    let mime_type = object
        .get("mime_type")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let metadata = object
        .get("user_metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    reference_blob(&emulator, &account.0, hash, size, |asset| {
        asset.name = name;
        asset.tags = tags;
        asset.mime_type = mime_type;
        asset.user_metadata = metadata;
    })
}

/// `GET /api/assets/remote-metadata` (getRemoteAssetMetadata). Synthetic, derived from the URL.
async fn remote_metadata(Query(query): Query_) -> Response {
    let Some(url) = query.get("url") else {
        return bad_request("`url` is required");
    };
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return bad_request("`url` must be an http(s) URL");
    };
    let filename = rest
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty() && rest.contains('/'))
        .unwrap_or("download");
    let name = filename.rsplit_once('.').map_or(filename, |(stem, _)| stem);
    axum::Json(json!({
        "content_length": (url.len() as i64) * 1_048_576,
        "content_type": "application/octet-stream",
        "filename": filename,
        "name": name,
        "tags": ["models"],
        "validation": { "is_valid": true, "errors": [], "warnings": [] },
    }))
    .into_response()
}

/// `POST /api/assets/download` (createAssetDownload): "downloads" complete at once.
async fn download(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    body: Bytes,
) -> Response {
    let object = match json_object(&body) {
        Ok(object) => object,
        Err(response) => return response.into_response(),
    };
    let source = object
        .get("source_url")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let host = source
        .strip_prefix("https://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    if !["huggingface.co", "civitai.com"]
        .iter()
        .any(|allowed| host == *allowed || host.ends_with(&format!(".{allowed}")))
    {
        return bad_request("`source_url` must be an https URL on huggingface.co or civitai.com");
    }
    let hash = format!("blake3:{}", blake3::hash(source.as_bytes()).to_hex());
    let already_stored = lock(&emulator.shared.store).blobs.contains_key(&hash);
    let Ok(tags) = string_list(object.get("tags")) else {
        return bad_request("`tags` must be an array of strings");
    };
    let name = source.rsplit('/').next().unwrap_or("download").to_owned();
    let response = reference_blob(&emulator, &account.0, hash, 2_132_625_894, |asset| {
        asset.name = name;
        asset.tags = tags;
    });
    if already_stored {
        return response;
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "task_id": Uuid::new_v4(),
            "status": "created",
            "message": "Download task created. Use task_id to track progress.",
        })),
    )
        .into_response()
}

/// `HEAD /api/assets/hash/{hash}` (checkAssetByHash).
async fn hash_exists(State(emulator): State<Emulator>, Path(hash): Path<String>) -> StatusCode {
    if !is_content_hash(&hash, &["blake3"]) {
        return StatusCode::BAD_REQUEST;
    }
    if lock(&emulator.shared.store).blobs.contains_key(&hash) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

/// `GET /api/assets/{id}` (getAssetById): own and public assets.
async fn get_asset(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = Uuid::try_parse(&id) else {
        return asset_not_found();
    };
    let store = lock(&emulator.shared.store);
    match store.visible(&account.0, true).find(|asset| asset.id == id) {
        Some(asset) => axum::Json(asset).into_response(),
        None => asset_not_found(),
    }
}

/// `PUT /api/assets/{id}` (updateAsset): at least one of the updatable fields.
async fn update_asset(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let object = match json_object(&body) {
        Ok(object) => object,
        Err(response) => return response.into_response(),
    };
    const FIELDS: [&str; 5] = ["name", "tags", "mime_type", "preview_id", "user_metadata"];
    if !FIELDS.iter().any(|field| object.contains_key(*field)) {
        return bad_request(
            "at least one of name, tags, mime_type, preview_id, user_metadata is required",
        );
    }
    let tags = match object.get("tags").map(|tags| string_list(Some(tags))) {
        Some(Err(())) => return bad_request("`tags` must be an array of strings"),
        Some(Ok(tags)) => Some(tags),
        None => None,
    };
    let mut store = lock(&emulator.shared.store);
    let now = store.now();
    let Some(asset) = store.owned_mut(&account.0, &id) else {
        return asset_not_found();
    };
    if let Some(name) = object.get("name").and_then(Value::as_str) {
        asset.name = name.to_owned();
    }
    if let Some(tags) = tags {
        asset.tags = tags;
    }
    if let Some(mime) = object.get("mime_type").and_then(Value::as_str) {
        asset.mime_type = Some(mime.to_owned());
    }
    if let Some(preview) = object.get("preview_id").and_then(Value::as_str) {
        asset.preview_id = Uuid::try_parse(preview).ok();
    }
    if let Some(metadata) = object.get("user_metadata").and_then(Value::as_object) {
        asset.user_metadata = metadata.clone();
    }
    asset.updated_at = now;
    axum::Json(json!({
        "id": asset.id,
        "name": asset.name,
        "asset_hash": asset.asset_hash,
        "tags": asset.tags,
        "mime_type": asset.mime_type,
        "user_metadata": asset.user_metadata,
        "updated_at": asset.updated_at,
    }))
    .into_response()
}

/// `DELETE /api/assets/{id}` (deleteAsset): 204.
async fn delete_asset(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Path(id): Path<String>,
) -> Response {
    let mut store = lock(&emulator.shared.store);
    let Ok(id) = Uuid::try_parse(&id) else {
        return asset_not_found();
    };
    let before = store.assets.len();
    store
        .assets
        .retain(|asset| !(asset.id == id && asset.owner.as_deref() == Some(account.0.as_str())));
    if store.assets.len() == before {
        return asset_not_found();
    }
    StatusCode::NO_CONTENT.into_response()
}

fn tags_body(body: &[u8]) -> Result<Vec<String>, BadRequest> {
    let object = json_object(body)?;
    match string_list(object.get("tags")) {
        Ok(tags) if !tags.is_empty() => Ok(tags),
        _ => Err(BadRequest(
            "`tags` must be a non-empty array of strings".into(),
        )),
    }
}

/// `POST /api/assets/{id}/tags` (addAssetTags).
async fn add_tags(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let tags = match tags_body(&body) {
        Ok(tags) => tags,
        Err(response) => return response.into_response(),
    };
    let mut store = lock(&emulator.shared.store);
    let now = store.now();
    let Some(asset) = store.owned_mut(&account.0, &id) else {
        return asset_not_found();
    };
    let (mut added, mut already_present) = (Vec::new(), Vec::new());
    for tag in tags {
        if asset.tags.contains(&tag) {
            already_present.push(tag);
        } else {
            asset.tags.push(tag.clone());
            added.push(tag);
        }
    }
    asset.updated_at = now;
    axum::Json(
        json!({ "added": added, "already_present": already_present, "total_tags": asset.tags }),
    )
    .into_response()
}

/// `DELETE /api/assets/{id}/tags` (removeAssetTags): the tags come in a JSON body.
async fn remove_tags(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let tags = match tags_body(&body) {
        Ok(tags) => tags,
        Err(response) => return response.into_response(),
    };
    let mut store = lock(&emulator.shared.store);
    let now = store.now();
    let Some(asset) = store.owned_mut(&account.0, &id) else {
        return asset_not_found();
    };
    let (mut removed, mut not_present) = (Vec::new(), Vec::new());
    for tag in tags {
        if let Some(at) = asset.tags.iter().position(|t| *t == tag) {
            asset.tags.remove(at);
            removed.push(tag);
        } else {
            not_present.push(tag);
        }
    }
    asset.updated_at = now;
    axum::Json(json!({ "removed": removed, "not_present": not_present, "total_tags": asset.tags }))
        .into_response()
}

/// `GET /api/tags` (listTags).
async fn list_tags(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Query(query): Query_,
) -> Response {
    let (limit, offset, include_public) = match (
        int_param(&query, "limit", 100, 1, 1000),
        int_param(&query, "offset", 0, 0, u64::MAX),
        bool_param(&query, "include_public", true),
    ) {
        (Ok(limit), Ok(offset), Ok(public)) => (limit as usize, offset as usize, public),
        (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r.into_response(),
    };
    if let Err(response) = bool_param(&query, "include_zero", false) {
        return response.into_response();
    }
    let by_count = match query.get("order").map_or("count_desc", String::as_str) {
        "count_desc" => true,
        "name_asc" => false,
        _ => return bad_request("`order` must be count_desc or name_asc"),
    };
    let prefix = query.get("prefix").cloned().unwrap_or_default();
    let store = lock(&emulator.shared.store);
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for asset in store.visible(&account.0, include_public) {
        for tag in asset.tags.iter().filter(|tag| tag.starts_with(&prefix)) {
            *counts.entry(tag).or_default() += 1;
        }
    }
    let mut tags: Vec<(&str, u64)> = counts.into_iter().collect();
    if by_count {
        tags.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    }
    let total = tags.len();
    let page: Vec<Value> = tags
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|(name, count)| json!({ "name": name, "count": count }))
        .collect();
    let has_more = offset.saturating_add(page.len()) < total;
    axum::Json(json!({ "tags": page, "total": total, "has_more": has_more })).into_response()
}

/// `GET /api/assets/tags/refine` (getAssetTagHistogram).
async fn refine_tags(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Query(query): Query_,
) -> Response {
    let filter = match AssetFilter::parse(&query) {
        Ok(filter) => filter,
        Err(response) => return response.into_response(),
    };
    let limit = match int_param(&query, "limit", 100, 1, 1000) {
        Ok(limit) => limit as usize,
        Err(response) => return response.into_response(),
    };
    let store = lock(&emulator.shared.store);
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for asset in store
        .visible(&account.0, filter.include_public)
        .filter(|asset| filter.matches(asset))
    {
        for tag in &asset.tags {
            *counts.entry(tag).or_default() += 1;
        }
    }
    let mut ranked: Vec<(&str, u64)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let tag_counts: Map<String, Value> = ranked
        .into_iter()
        .take(limit)
        .map(|(tag, count)| (tag.to_owned(), json!(count)))
        .collect();
    axum::Json(json!({ "tag_counts": tag_counts })).into_response()
}

/// `GET /api/view` (viewFile): 302 to a signed storage URL; 200 with `channel`.
async fn view(Query(query): Query_) -> Response {
    let Some(filename) = query.get("filename").filter(|f| !f.is_empty()) else {
        return bad_request("`filename` is required");
    };
    if query.contains_key("channel") {
        return ([(header::CONTENT_TYPE, "image/png")], DEMO_BLOB).into_response();
    }
    let encoded: String =
        percent_encoding::utf8_percent_encode(filename, percent_encoding::NON_ALPHANUMERIC)
            .collect();
    let signature = blake3::hash(filename.as_bytes()).to_hex();
    // `.invalid` never resolves: a gateway that followed this redirect would fail loudly.
    let location = format!(
        "https://storage.emulator.invalid/comfy-outputs/{encoded}?X-Goog-Signature={signature}"
    );
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

/// `POST /api/prompt`: queues a job, which the emulator completes at once.
async fn submit_prompt(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    body: Bytes,
) -> Response {
    let object = match json_object(&body) {
        Ok(object) => object,
        Err(response) => return response.into_response(),
    };
    if !object.get("prompt").is_some_and(Value::is_object) {
        return bad_request("`prompt` (the workflow graph) is required");
    }
    let mut store = lock(&emulator.shared.store);
    store.clock += 1;
    let job = Job {
        id: Uuid::new_v4(),
        owner: account.0,
        status: "completed",
        create_time: EPOCH + store.clock as i64,
    };
    let number = store.jobs.len();
    let id = job.id;
    store.jobs.push(job);
    axum::Json(json!({ "prompt_id": id, "number": number, "node_errors": {} })).into_response()
}

/// `GET /api/jobs` (listJobs).
async fn list_jobs(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Query(query): Query_,
) -> Response {
    let (limit, offset) = match (
        int_param(&query, "limit", 100, 1, 1000),
        int_param(&query, "offset", 0, 0, u64::MAX),
    ) {
        (Ok(limit), Ok(offset)) => (limit as usize, offset as usize),
        (Err(r), _) | (_, Err(r)) => return r.into_response(),
    };
    let statuses = list_param(&query, "status");
    let store = lock(&emulator.shared.store);
    let mut jobs: Vec<&Job> = store
        .jobs
        .iter()
        .filter(|job| job.owner == account.0)
        .filter(|job| statuses.is_empty() || statuses.iter().any(|s| s == job.status))
        .collect();
    jobs.sort_by_key(|job| std::cmp::Reverse(job.create_time));
    let total = jobs.len();
    let page: Vec<Value> = jobs
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|job| json!({ "id": job.id, "status": job.status, "create_time": job.create_time, "outputs_count": 0 }))
        .collect();
    let has_more = offset.saturating_add(page.len()) < total;
    axum::Json(json!({
        "jobs": page,
        "pagination": { "offset": offset, "limit": limit, "total": total, "has_more": has_more },
    }))
    .into_response()
}

/// `GET /api/jobs/{id}` (getJobDetail).
async fn get_job(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Path(id): Path<String>,
) -> Response {
    let store = lock(&emulator.shared.store);
    let job = Uuid::try_parse(&id).ok().and_then(|id| {
        store
            .jobs
            .iter()
            .find(|job| job.id == id && job.owner == account.0)
    });
    match job {
        Some(job) => axum::Json(json!({
            "id": job.id, "status": job.status, "create_time": job.create_time,
            "update_time": job.create_time, "outputs": {},
        }))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "Job not found"),
    }
}

/// `POST /api/upload/image` and `/api/upload/mask`: multipart `image`, 50 MB at most.
async fn upload_image(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    request: Request,
) -> Response {
    let Ok(mut multipart) = Multipart::from_request(request, &emulator).await else {
        return bad_request("send multipart/form-data with an `image` field");
    };
    let mut image: Option<(String, u64, String)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(_) => return bad_request("malformed multipart body"),
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "image" {
            let file_name = field.file_name().unwrap_or("image.png").to_owned();
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        size += chunk.len() as u64;
                        if size > IMAGE_UPLOAD_LIMIT {
                            return bad_request("image exceeds the 50 MB limit");
                        }
                        hasher.update(&chunk);
                    }
                    Ok(None) => break,
                    Err(_) => return bad_request("the upload ended early"),
                }
            }
            image = Some((
                format!("blake3:{}", hasher.finalize().to_hex()),
                size,
                file_name,
            ));
        } else if let Ok(text) = field.text().await {
            fields.insert(name, text);
        }
    }
    let Some((hash, size, file_name)) = image else {
        return bad_request("the `image` field is required");
    };
    let kind = fields
        .get("type")
        .cloned()
        .unwrap_or_else(|| "input".into());
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    let stored_name = file_name.clone();
    let tag = kind.clone();
    let _ = reference_blob(&emulator, &account.0, hash, size, |asset| {
        asset.name = stored_name;
        asset.tags = vec![tag];
    });
    axum::Json(json!({ "name": file_name, "subfolder": subfolder, "type": kind })).into_response()
}

/// `GET /emulator/bytes/{size}`: `size` generated bytes, streamed in 64 KiB
/// chunks, with a `Content-Length`; `?chunked`: without one (chunked framing).
/// Counts what it produced, so a test can see backpressure at work.
async fn stream_bytes(
    State(emulator): State<Emulator>,
    Path(size): Path<u64>,
    RawQuery(query): RawQuery,
) -> Response {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![0xa5u8; CHUNK]);
    let produced = Arc::clone(&emulator.shared.bytes_streamed);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        let produced = Arc::clone(&produced);
        async move {
            if sent >= size {
                return None;
            }
            let length = (size - sent).min(CHUNK as u64) as usize;
            produced.fetch_add(length as u64, std::sync::atomic::Ordering::Relaxed);
            Some((
                Ok::<_, std::convert::Infallible>(chunk.slice(..length)),
                sent + length as u64,
            ))
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    if query.as_deref() != Some("chunked") {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// `POST /emulator/sink`: reads the body as it streams; answers its size and BLAKE3.
async fn sink(request: Request) -> Response {
    let mut body = request.into_body().into_data_stream();
    let mut hasher = blake3::Hasher::new();
    let mut bytes = 0u64;
    while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
        let Ok(chunk) = chunk else {
            return bad_request("the body ended early");
        };
        bytes += chunk.len() as u64;
        hasher.update(&chunk);
    }
    axum::Json(json!({ "bytes": bytes, "blake3": hasher.finalize().to_hex().to_string() }))
        .into_response()
}

/// `GET /ws?clientId=…&token=…`: a status message, progress messages, then an echo.
async fn websocket(
    State(emulator): State<Emulator>,
    Query(query): Query_,
    upgrade: WebSocketUpgrade,
) -> Response {
    let client_id = query.get("clientId").cloned().unwrap_or_default();
    let interval = emulator.shared.event_interval;
    upgrade.on_upgrade(move |socket| progress_then_echo(socket, client_id, interval))
}

async fn progress_then_echo(mut socket: WebSocket, client_id: String, interval: Duration) {
    let status = json!({ "type": "status", "data": { "status": { "exec_info": { "queue_remaining": 0 } }, "sid": client_id } });
    if socket
        .send(Message::Text(status.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let prompt_id = Uuid::new_v4();
    for value in 1..=3 {
        tokio::time::sleep(interval).await;
        let progress = json!({ "type": "progress", "data": { "value": value, "max": 3, "prompt_id": prompt_id, "node": "3" } });
        if socket
            .send(Message::Text(progress.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(text) => Message::Text(text),
            Message::Binary(bytes) => Message::Binary(bytes),
            Message::Close(frame) => {
                let _ = socket.send(Message::Close(frame)).await;
                return;
            }
            // Pings are answered by the websocket implementation itself.
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

/// `GET /api/v2/jobs/{id}/events` (getJobEvents): SSE, one event per interval.
async fn job_events(
    State(emulator): State<Emulator>,
    Extension(account): Extension<AccountName>,
    Path(id): Path<String>,
) -> Response {
    let known = Uuid::try_parse(&id).ok().is_some_and(|id| {
        lock(&emulator.shared.store)
            .jobs
            .iter()
            .any(|job| job.id == id && job.owner == account.0)
    });
    if !known {
        return v2_error(StatusCode::NOT_FOUND, "not_found", "job not found");
    }
    let interval = emulator.shared.event_interval;
    let mut frames = vec![format!(
        "event: status\ndata: {}\n\n",
        json!({ "id": id, "status": "in_progress" })
    )];
    for value in 1..=5 {
        frames.push(format!(
            "event: progress\ndata: {}\n\n",
            json!({ "node": "3", "value": value, "max": 5 })
        ));
    }
    frames.push(format!(
        "event: status\ndata: {}\n\n",
        json!({ "id": id, "status": "completed", "outputs": [] })
    ));
    let stream = futures_util::stream::unfold(
        (frames.into_iter(), true),
        move |(mut frames, first)| async move {
            let frame = frames.next()?;
            if !first {
                tokio::time::sleep(interval).await;
            }
            Some((
                Ok::<_, std::convert::Infallible>(Bytes::from(frame)),
                (frames, false),
            ))
        },
    );
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

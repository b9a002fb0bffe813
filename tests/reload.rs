//! Config reload (`src/reload.rs`): the running gateway reads its file again
//! on `POST /admin/reload` (and `SIGHUP`, in tests/cli.rs) and applies what
//! changed in `[teams]`; a file that does not load, or changes anything a
//! restart must apply, changes nothing.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::wire::Wire;
use common::*;
use http::{Method, StatusCode};
use teamgate::emulator::Emulator;

/// A config file (and its `file:` secrets) in a directory of its own,
/// removed when the test ends.
struct ConfigDir {
    dir: PathBuf,
}

impl ConfigDir {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("teamgate-reload-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ConfigDir { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("teamgate.toml")
    }

    /// Writes the config file.
    fn write(&self, text: &str) {
        self.write_file("teamgate.toml", text);
    }

    fn write_file(&self, name: &str, text: &str) {
        // Written aside and renamed into place, as deployment tools do: a
        // reload never reads half a file.
        let aside = self.dir.join(format!(".{name}.new"));
        std::fs::write(&aside, text).unwrap();
        std::fs::rename(aside, self.dir.join(name)).unwrap();
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const ADMIN: &str = "[admin]\ntoken = \"env:ADMIN_TOKEN\"\n";

/// The test config with the admin API on, in front of `emulator`.
fn text(emulator: std::net::SocketAddr) -> String {
    config_text(&format!("http://{emulator}"), "", ADMIN)
}

async fn emulator() -> (Emulator, std::net::SocketAddr) {
    serve_emulator(test_emulator()).await
}

/// `POST /admin/reload` with `token` as the bearer token.
async fn reload(h: &Harness, token: Option<&str>) -> Answer {
    h.admin_call(Method::POST, "/admin/reload", token).await
}

async fn reloads_counted(h: &Harness, result: &str) -> Option<f64> {
    h.metric("teamgate_config_reloads_total", &[("result", result)])
        .await
}

/// `GET /admin/teams` with the admin token → each team's name and client key hashes.
async fn teams_served(h: &Harness) -> Vec<(String, Vec<String>)> {
    let answer = h
        .admin_call(Method::GET, "/admin/teams", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    for key in [
        DESIGN_KEY,
        DESIGN_KEY_2,
        RESEARCH_KEY,
        DESIGN_UPSTREAM_KEY,
        RESEARCH_UPSTREAM_KEY,
    ] {
        assert!(!text.contains(key), "a key in {text}");
    }
    answer.json()["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|team| {
            // The test teams: nocred holds no upstream key, the others Comfy's.
            let upstreams = if team["name"] == "nocred" {
                vec![]
            } else {
                vec!["comfy"]
            };
            assert_eq!(team["upstreams"], serde_json::json!(upstreams), "{team}");
            let keys = team["client_keys"].as_array().unwrap();
            let keys = keys
                .iter()
                .map(|key| key.as_str().unwrap().to_owned())
                .collect();
            (team["name"].as_str().unwrap().to_owned(), keys)
        })
        .collect()
}

fn get_with_key(path: &str, key: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n\r\n")
}

/// Keys added to the file work after a reload and revoked ones stop working
/// — on a keep-alive connection opened before the reload too, at its next
/// request.
#[tokio::test]
async fn a_reload_adds_and_revokes_client_keys_even_on_open_connections() {
    let (emulator, addr) = emulator().await;
    let files = ConfigDir::new("keys");
    let second_key_entry = format!(", \"{}\"", hash(DESIGN_KEY_2));
    let before = text(addr);
    assert!(before.contains(&second_key_entry));
    files.write(&before.replace(&second_key_entry, ""));
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;

    let design_keys = |teams: Vec<(String, Vec<String>)>| {
        teams
            .into_iter()
            .find(|(name, _)| name == "design")
            .unwrap()
            .1
    };
    assert_eq!(design_keys(teams_served(&h).await), [hash(DESIGN_KEY)]);
    let unauthorized = h.admin_get("/admin/teams").await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);

    let mut open = Wire::connect(&h).await;
    open.send(&get_with_key("/api/assets", DESIGN_KEY)).await;
    assert_eq!(open.answer(false).await.status, 200);
    assert_eq!(h.get("/api/assets", DESIGN_KEY_2).await.status, 401);

    // Team design's first key revoked, its second added.
    files.write(&before.replace(&format!("\"{}\", ", hash(DESIGN_KEY)), ""));
    let reloaded = reload(&h, Some(ADMIN_TOKEN)).await;
    assert_eq!(reloaded.status, StatusCode::OK);
    assert_eq!(reloaded.json()["reloaded"]["teams"], 3);
    assert_eq!(reloaded.json()["reloaded"]["client_keys"], 3);
    let teams = teams_served(&h).await;
    let names: Vec<&str> = teams.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["design", "nocred", "research"]);
    assert_eq!(design_keys(teams), [hash(DESIGN_KEY_2)]);

    open.send(&get_with_key("/api/assets", DESIGN_KEY)).await;
    let refused = open.answer(false).await;
    assert_eq!(
        refused.status, 401,
        "the revoked key, on the open connection"
    );
    assert_eq!(refused.json()["code"], "unauthorized");
    open.send(&get_with_key("/api/assets", DESIGN_KEY_2)).await;
    assert_eq!(open.answer(false).await.status, 200, "the added key, on it");
    assert_eq!(h.get("/api/assets", DESIGN_KEY).await.status, 401);
    assert_eq!(h.get("/api/assets", DESIGN_KEY_2).await.status, 200);
    assert_eq!(h.get("/api/assets", RESEARCH_KEY).await.status, 200);
    assert_eq!(reloads_counted(&h, "success").await, Some(1.0));
    assert_eq!(reloads_counted(&h, "failure").await, Some(0.0));
    h.stop().await;
}

/// A team's rotated upstream key (a `file:` secret, read again) goes upstream
/// from the reload on, and what the cache holds from the old key is neither
/// served nor kept: entries are partitioned by credential, and the partition
/// of a credential no team holds any more is purged.
#[tokio::test]
async fn a_rotated_upstream_key_is_used_at_once_and_nothing_cached_with_the_old_one_is_served() {
    let (emulator, addr) = emulator().await;
    let files = ConfigDir::new("rotate");
    files.write_file("design.key", DESIGN_UPSTREAM_KEY);
    files.write(&text(addr).replace("env:DESIGN_COMFY_KEY", "file:design.key"));
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;
    let design_asset = h.create_asset(DESIGN_KEY, "design-only.png").await;
    assert!(design_asset.status.is_success());
    let list = "/api/assets?limit=50";
    let first = h.get(list, DESIGN_KEY).await;
    assert!(first.lists("design-only.png"));
    assert!(h.get(list, DESIGN_KEY).await.is_hit());

    // The key file now holds another account's key (research's, which the
    // emulator knows), as a rotation to a new account would.
    files.write_file("design.key", RESEARCH_UPSTREAM_KEY);
    let reloaded = reload(&h, Some(ADMIN_TOKEN)).await;
    assert_eq!(reloaded.status, StatusCode::OK);
    assert_eq!(reloaded.json()["reloaded"]["purged_partitions"], 1);

    let upstream_requests = h.emulator.recorded().len();
    let after = h.get(list, DESIGN_KEY).await;
    assert_eq!(after.status, StatusCode::OK);
    assert!(
        after.cache_status().contains("fwd="),
        "not a hit: {}",
        after.cache_status()
    );
    assert!(
        !after.lists("design-only.png"),
        "nothing fetched with the old key is served"
    );
    let sent = h.emulator.recorded();
    assert_eq!(sent.len(), upstream_requests + 1);
    let key_sent = sent.last().unwrap().headers.get("x-api-key").unwrap();
    assert_eq!(key_sent, RESEARCH_UPSTREAM_KEY);
    let stats = h.admin_get("/admin/cache").await.json();
    assert_eq!(
        stats["entries"], 1,
        "the old key's entry was purged: {stats}"
    );
    h.stop().await;
}

/// The admin token is a secret like the upstream keys: a reload reads its
/// `file:` again, and the rotated token is the only one the admin API takes;
/// a reload may also point it elsewhere.
#[tokio::test]
async fn a_rotated_admin_token_replaces_the_old_one_at_once() {
    let (emulator, addr) = emulator().await;
    let files = ConfigDir::new("admin-token");
    files.write_file("admin.token", ADMIN_TOKEN);
    files.write(&text(addr).replace("env:ADMIN_TOKEN", "file:admin.token"));
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;
    let teams = async |token: &str| {
        h.admin_call(Method::GET, "/admin/teams", Some(token))
            .await
            .status
    };
    assert_eq!(teams(ADMIN_TOKEN).await, StatusCode::OK);

    let rotated = "tg_test_admin_token_rotated_0123456789";
    files.write_file("admin.token", rotated);
    let reloaded = reload(&h, Some(ADMIN_TOKEN)).await;
    assert_eq!(reloaded.status, StatusCode::OK, "{:?}", reloaded.body);
    assert_eq!(teams(ADMIN_TOKEN).await, StatusCode::UNAUTHORIZED);
    assert_eq!(teams(rotated).await, StatusCode::OK);
    assert_eq!(
        reload(&h, Some(ADMIN_TOKEN)).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Back to the environment's token: a new reference, not a restart change.
    files.write(&text(addr));
    assert_eq!(reload(&h, Some(rotated)).await.status, StatusCode::OK);
    assert_eq!(teams(rotated).await, StatusCode::UNAUTHORIZED);
    assert_eq!(teams(ADMIN_TOKEN).await, StatusCode::OK);
    h.stop().await;
}

/// A file that does not load, or that changes a setting only a restart
/// applies, is refused whole: the answer says why, the failure is counted,
/// and the running config — keys included — stays as it was.
#[tokio::test]
async fn a_file_that_does_not_load_or_needs_a_restart_changes_nothing() {
    let (emulator, addr) = emulator().await;
    let files = ConfigDir::new("refused");
    let running = text(addr);
    files.write(&running);
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;
    // A new team with its key, in each refused file below.
    let new_team = format!(
        "[teams.newcomers]\nupstream_keys = {{ comfy = \"env:DESIGN_COMFY_KEY\" }}\nclient_keys = [\"{}\"]\n",
        hash("tg_test_newcomer_key_0123456789abcdef")
    );
    let uses_new_key = async || {
        h.get("/api/assets", "tg_test_newcomer_key_0123456789abcdef")
            .await
            .status
    };

    // Does not load: a secret that resolves nowhere.
    files.write(&format!(
        "{running}\n{new_team}\n[teams.broken]\nupstream_keys = {{ comfy = \"env:NOT_SET_ANYWHERE\" }}\n"
    ));
    let invalid = reload(&h, Some(ADMIN_TOKEN)).await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    let body = invalid.json();
    assert_eq!(body["code"], "invalid_config");
    assert_eq!(
        body["problems"][0]["key"],
        "teams.broken.upstream_keys.comfy"
    );
    assert_eq!(uses_new_key().await, 401);

    // Loads, but moves the listener and the cache rules with the new team.
    files.write(
        &format!("{running}\n{new_team}")
            .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"9s\"")
            .replace(
                "preset = \"comfy-cloud\"",
                "preset = \"comfy-cloud\"\ncache.enabled = false",
            ),
    );
    let needs_restart = reload(&h, Some(ADMIN_TOKEN)).await;
    assert_eq!(needs_restart.status, StatusCode::CONFLICT);
    let body = needs_restart.json();
    assert_eq!(body["code"], "restart_required");
    assert_eq!(
        body["keys"],
        serde_json::json!(["server.shutdown_grace", "upstreams.comfy.cache"])
    );
    assert_eq!(uses_new_key().await, 401);

    // Without the admin token nothing is read at all.
    files.write(&format!("{running}\n{new_team}"));
    assert_eq!(reload(&h, None).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reload(&h, Some("not-the-token")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(uses_new_key().await, 401);
    assert_eq!(h.get("/api/assets", DESIGN_KEY).await.status, 200);
    assert_eq!(reloads_counted(&h, "failure").await, Some(2.0));

    // The same team in a file that changes only teams: applied.
    assert_eq!(reload(&h, Some(ADMIN_TOKEN)).await.status, StatusCode::OK);
    assert_eq!(uses_new_key().await, 200);
    assert_eq!(reloads_counted(&h, "success").await, Some(1.0));
    h.stop().await;
}

/// A reload keeps the state of every limit it did not change — a drained
/// bucket stays drained — and applies the limits it did.
#[tokio::test]
async fn a_reload_keeps_unchanged_limits_state_and_applies_changed_limits() {
    let (emulator, addr) = emulator().await;
    let files = ConfigDir::new("limits");
    let limits = |rate: &str| {
        format!(
            "{}\n[teams.research.limits]\nclient = {{ rate = \"{rate}\", burst = 1 }}\n",
            text(addr)
        )
    };
    files.write(&limits("1/h"));
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;
    assert_eq!(h.get("/api/jobs", RESEARCH_KEY).await.status, 200);
    assert_eq!(h.get("/api/jobs", RESEARCH_KEY).await.status, 429);

    // Another team's key added: research's limit is untouched, and so is its bucket.
    files.write(&limits("1/h").replace(
        &format!("client_keys = [\"{}\"]", hash(NO_CREDENTIAL_KEY)),
        &format!(
            "client_keys = [\"{}\", \"{}\"]",
            hash(NO_CREDENTIAL_KEY),
            hash("tg_test_nocred_key_two_0123456789ab")
        ),
    ));
    assert_eq!(reload(&h, Some(ADMIN_TOKEN)).await.status, StatusCode::OK);
    assert_eq!(h.get("/api/jobs", RESEARCH_KEY).await.status, 429);

    // Research's limit raised: a new bucket, full.
    files.write(&limits("100/h"));
    assert_eq!(reload(&h, Some(ADMIN_TOKEN)).await.status, StatusCode::OK);
    assert_eq!(h.get("/api/jobs", RESEARCH_KEY).await.status, 200);
    h.stop().await;
}

/// The metric series of a team a reload removed leave the exposition
/// (counted requests and quota refusals alike); the teams that stay keep
/// theirs and go on counting from where they were.
#[tokio::test]
async fn a_removed_teams_metric_series_leave_the_exposition() {
    let (emulator, addr) = emulator().await;
    let files = ConfigDir::new("metrics");
    let with_research_limited = format!(
        "{}\n[teams.research.limits]\nclient = {{ rate = \"1/h\", burst = 1 }}\n",
        text(addr)
    );
    files.write(&with_research_limited);
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;
    assert_eq!(h.get("/api/jobs", RESEARCH_KEY).await.status, 200);
    assert_eq!(h.get("/api/jobs", RESEARCH_KEY).await.status, 429);
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, 200);
    let design_ok = [("team", "design"), ("status_class", "2xx")];
    let before = h.metrics_text().await;
    assert_eq!(
        sample(&before, "teamgate_requests_total", &design_ok),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &before,
            "teamgate_requests_total",
            &[("team", "research"), ("status_class", "2xx")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &before,
            "teamgate_ratelimit_rejections_total",
            &[("team", "research")]
        ),
        Some(1.0)
    );

    let research_section = format!(
        "[teams.research]\nupstream_keys = {{ comfy = \"env:RESEARCH_COMFY_KEY\" }}\nclient_keys = [\"{}\"]\n",
        hash(RESEARCH_KEY)
    );
    let without_research = text(addr).replace(&research_section, "");
    assert_ne!(
        without_research,
        text(addr),
        "the research team is in the file"
    );
    // Counted after that scrape, before the reload: not lost by it.
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, 200);
    files.write(&without_research);
    assert_eq!(reload(&h, Some(ADMIN_TOKEN)).await.status, StatusCode::OK);
    assert_eq!(h.get("/api/jobs", RESEARCH_KEY).await.status, 401);
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, 200);

    let after = h.metrics_text().await;
    assert!(!after.contains("team=\"research\""), "{after}");
    assert_eq!(
        sample(&after, "teamgate_requests_total", &design_ok),
        Some(3.0)
    );
    // The refused key is counted as every unauthenticated request is.
    assert_eq!(
        sample(
            &after,
            "teamgate_requests_total",
            &[("team", ""), ("status_class", "4xx")]
        ),
        Some(1.0)
    );
    h.stop().await;
}

/// A gateway whose config was not read from a file says so.
#[tokio::test]
async fn a_gateway_without_a_config_file_answers_that_it_cannot_reload() {
    let h = Harness::start_with_config("", ADMIN).await;
    let answer = reload(&h, Some(ADMIN_TOKEN)).await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert_eq!(answer.json()["code"], "reload_unavailable");
    h.stop().await;
}

/// A websocket opened with a key a reload revokes is closed at the reload
/// (it would otherwise stay open as long as it is used); one whose key the
/// reload kept stays open and its frames keep flowing.
#[tokio::test]
async fn a_reload_closes_the_websockets_of_revoked_keys_only() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (emulator, addr) = emulator().await;
    let files = ConfigDir::new("websockets");
    let running = text(addr);
    files.write(&running);
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;
    let connect = async |key: &str, client: &str| {
        let url = format!("ws://{}/ws?clientId={client}&token={key}", h.gateway);
        let (socket, response) = tokio_tungstenite::connect_async(url)
            .await
            .expect("upgrade");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        socket
    };
    let mut revoked = connect(DESIGN_KEY, "revoked").await;
    let mut kept = connect(DESIGN_KEY_2, "kept").await;

    files.write(&running.replace(&format!("\"{}\", ", hash(DESIGN_KEY)), ""));
    assert_eq!(reload(&h, Some(ADMIN_TOKEN)).await.status, StatusCode::OK);

    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(Ok(_)) = revoked.next().await {}
    })
    .await;
    assert!(closed.is_ok(), "the revoked key's websocket is still open");
    kept.send(Message::Text("still here".into())).await.unwrap();
    let echoed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(Ok(message)) = kept.next().await {
            if message == Message::Text("still here".into()) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(echoed, Ok(true), "the kept key's websocket echoes");
    kept.close(None).await.unwrap();
    h.stop().await;
}

/// An event stream (Comfy's job events, open as long as the job runs) opened
/// with a key a reload revokes ends at once, as an ended stream (its last
/// chunk), so that an `EventSource` reconnects and is refused; another key's
/// stream stays open.
#[tokio::test]
async fn a_reload_ends_the_event_streams_of_revoked_keys_only() {
    use http_body_util::BodyExt;
    use std::time::Duration;

    let (emulator, addr) = serve_slow_events_emulator().await;
    let files = ConfigDir::new("events");
    let running = text(addr);
    files.write(&running);
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;
    let (_, mut revoked) = h.open_job_events(DESIGN_KEY).await;
    let (_, mut kept) = h.open_job_events(DESIGN_KEY_2).await;

    files.write(&running.replace(&format!("\"{}\", ", hash(DESIGN_KEY)), ""));
    assert_eq!(reload(&h, Some(ADMIN_TOKEN)).await.status, StatusCode::OK);

    let ended = tokio::time::timeout(Duration::from_secs(20), revoked.frame())
        .await
        .expect("the revoked key's event stream is still open");
    assert!(
        ended.is_none(),
        "ended as a stream ends, not cut: {ended:?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(1), kept.frame())
            .await
            .is_err(),
        "the kept key's event stream is still open, waiting for its next event"
    );
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, 401);
    drop(kept);
    h.stop().await;
}

/// A long download opened with a key a reload revokes is cut at the next
/// bytes it would send — short of its `Content-Length`, or without its last
/// chunk, so the client sees it broken rather than complete — while another
/// key's download runs to its end, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cuts_the_long_downloads_of_revoked_keys_only() {
    use http_body_util::BodyExt;
    use std::time::Duration;
    const SIZE: u64 = 64 << 20;
    let frame_length = |frame: http_body::Frame<bytes::Bytes>| {
        frame.into_data().map_or(0, |data| data.len() as u64)
    };

    let (emulator, addr) = emulator().await;
    let files = ConfigDir::new("downloads");
    let running = text(addr);
    files.write(&running);
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;
    let mut revoked = [
        h.start_download(DESIGN_KEY, SIZE, false).await,
        h.start_download(DESIGN_KEY, SIZE, true).await,
    ];
    let mut kept = h.start_download(DESIGN_KEY_2, SIZE, true).await;
    // Under way: the gateway sends no faster than the client reads.
    let mut read = [0, 0];
    for (body, read) in revoked.iter_mut().zip(&mut read) {
        while *read < 1 << 20 {
            *read += frame_length(body.frame().await.unwrap().unwrap());
        }
    }

    files.write(&running.replace(&format!("\"{}\", ", hash(DESIGN_KEY)), ""));
    assert_eq!(reload(&h, Some(ADMIN_TOKEN)).await.status, StatusCode::OK);

    for (body, read) in revoked.iter_mut().zip(&mut read) {
        let cut = loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
                .await
                .expect("the revoked key's download neither goes on nor ends");
            match frame {
                Some(Ok(frame)) => *read += frame_length(frame),
                Some(Err(_)) => break true,
                None => break false,
            }
        };
        assert!(
            cut && *read < SIZE,
            "the revoked key's download is cut short: {read} of {SIZE} bytes, cut: {cut}"
        );
    }
    let mut kept_read = 0;
    while let Some(frame) = kept.frame().await {
        kept_read += frame_length(frame.expect("the kept key's download is not cut"));
    }
    assert_eq!(kept_read, SIZE);
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, 401);
    h.stop().await;
}

/// Reloads while requests flow: every request of a key the reloads never
/// touch is answered 200 — none is dropped, refused or answered by a
/// half-built stack — on connections opened before, during and after them.
#[tokio::test]
async fn requests_keep_flowing_through_repeated_reloads() {
    let (emulator, addr) = emulator().await;
    let files = ConfigDir::new("flowing");
    let with_second_key = text(addr);
    let without_second_key = with_second_key.replace(&format!(", \"{}\"", hash(DESIGN_KEY_2)), "");
    files.write(&with_second_key);
    let h = Harness::start_from_file(emulator, addr, &files.config()).await;
    assert_eq!(h.get("/api/assets?limit=5", RESEARCH_KEY).await.status, 200);

    // Each client sends until the reloads are over (and at least 20
    // requests), so every reload lands among requests; at most 5,000.
    let reloads_over = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (gateway, reloads_over) = (h.gateway, Arc::clone(&reloads_over));
            tokio::spawn(async move {
                let mut wire = Wire::connect_to(gateway).await;
                let mut statuses = Vec::new();
                while statuses.len() < 5_000
                    && (statuses.len() < 20 || !reloads_over.load(Ordering::SeqCst))
                {
                    // A cached read and a pass-through, in turn.
                    let path = if statuses.len() % 2 == 0 {
                        "/api/assets?limit=5"
                    } else {
                        "/api/jobs"
                    };
                    wire.send(&get_with_key(path, RESEARCH_KEY)).await;
                    statuses.push(wire.answer(false).await.status);
                    if statuses.len() % 50 == 0 {
                        // Some requests on connections opened mid-way.
                        wire = Wire::connect_to(gateway).await;
                    }
                }
                (client, statuses)
            })
        })
        .collect();
    for round in 0..10 {
        files.write(if round % 2 == 0 {
            &without_second_key
        } else {
            &with_second_key
        });
        assert_eq!(reload(&h, Some(ADMIN_TOKEN)).await.status, StatusCode::OK);
    }
    reloads_over.store(true, Ordering::SeqCst);
    for client in clients {
        let (client, statuses) = client.await.unwrap();
        assert!(
            statuses.iter().all(|status| *status == 200),
            "client {client}: {statuses:?}"
        );
    }
    assert_eq!(reloads_counted(&h, "success").await, Some(10.0));
    h.stop().await;
}

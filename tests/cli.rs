//! The `teamgate` binary: every command, as a user runs it.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::serve_process::ServeProcess;
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_teamgate");

fn teamgate(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_and_help_on_every_command() {
    let version = teamgate(&["--version"]);
    assert!(version.status.success());
    assert_eq!(
        text(&version.stdout).trim(),
        format!("teamgate {}", env!("CARGO_PKG_VERSION"))
    );
    for command in [
        vec![],
        vec!["serve"],
        vec!["demo"],
        vec!["check-config"],
        vec!["keys"],
        vec!["keys", "new"],
        vec!["keys", "hash"],
        vec!["emulator"],
    ] {
        let mut args = command.clone();
        args.push("--help");
        let help = teamgate(&args);
        assert!(help.status.success(), "{command:?} --help");
        assert!(
            text(&help.stdout).contains("Usage: teamgate"),
            "{command:?}"
        );
    }
}

#[test]
fn keys_new_makes_a_strong_prefixed_key_and_its_hash() {
    let output = teamgate(&["keys", "new"]);
    assert!(output.status.success());
    let stdout = text(&output.stdout);
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_owned();
    let hash = stdout
        .lines()
        .find_map(|l| l.strip_prefix("hash:"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(key.starts_with("tg_"));
    // base64url: 6 bits a character; at least 128 bits after the prefix.
    assert!((key.len() - 3) * 6 >= 128, "{key}");
    assert!(
        key[3..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );

    let hashed = teamgate(&["keys", "hash", &key]);
    assert!(hashed.status.success());
    assert_eq!(
        text(&hashed.stdout),
        format!("{hash}\n"),
        "one line, ALGORITHM:VALUE"
    );
    assert!(hash.starts_with("sha256:") && hash.len() == 7 + 64);

    let other = teamgate(&["keys", "new"]);
    assert_ne!(text(&other.stdout), stdout, "keys are random");
}

#[test]
fn keys_hash_reads_stdin_so_keys_stay_out_of_shell_history() {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let output = child.wait_with_output().unwrap();
    // SHA-256("abc"), FIPS 180-2 appendix B.1.
    assert_eq!(
        text(&output.stdout),
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    );
}

#[test]
fn shipped_configs_are_valid() {
    let files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
        .unwrap()
        .map(|entry| entry.unwrap().path().display().to_string())
        .filter(|path| path.ends_with(".toml"))
        .collect();
    assert!(files.len() >= 2);
    let mut args = vec!["check-config", "--no-secrets"];
    args.extend(files.iter().map(String::as_str));
    let output = teamgate(&args);
    assert!(output.status.success(), "{}", text(&output.stderr));

    // With its secrets present, demo.toml passes the full check too.
    let demo = Command::new(BIN)
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"),
        ])
        .env("TEAMGATE_DEMO_COMFY_KEY_DESIGN", "k1")
        .env("TEAMGATE_DEMO_COMFY_KEY_RESEARCH", "k2")
        .env("TEAMGATE_DEMO_SCENARIO_KEY_DESIGN", "k3")
        .env("TEAMGATE_DEMO_SCENARIO_SECRET_DESIGN", "s3")
        .output()
        .unwrap();
    assert!(demo.status.success(), "{}", text(&demo.stderr));
}

#[test]
fn check_config_prints_every_problem_with_file_and_key() {
    let dir = std::env::temp_dir().join(format!("teamgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "localhost"
[upstreams.comfy]
base_url = "cloud.comfy.org"
preset = "comfy"
[teams.design]
upstream_keys = { comfy = "sk-live-inline" }
client_keys = ["sha256:nothex"]
typo = 1
"#,
    )
    .unwrap();
    let output = teamgate(&["check-config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    for key in [
        "server.listen",
        "upstreams.comfy.base_url",
        "upstreams.comfy.preset",
        "teams.design.upstream_keys.comfy",
        "teams.design.client_keys[0]",
        "teams.design.typo",
    ] {
        assert!(
            stderr.contains(&format!("broken.toml: {key}: ")),
            "missing {key} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("sk-live-inline"));

    let serve = teamgate(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(
        serve.status.code(),
        Some(2),
        "serve refuses a broken config"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A running `teamgate demo` (JSON logs), as its banner describes it.
struct Demo {
    child: tokio::process::Child,
    gateway: String,
    key: String,
    /// The hash in the banner's from-hash curl line.
    hash: String,
    /// Everything the process writes to stderr, once it exited.
    logs: tokio::task::JoinHandle<String>,
}

/// Starts `teamgate demo` with `RUST_LOG` as given (unset for `None`) and
/// waits for its banner.
async fn start_demo(rust_log: Option<&str>) -> Demo {
    let mut command = tokio::process::Command::new(BIN);
    command.args([
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let mut child = command
        .env("TEAMGATE_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text)
            .await
            .unwrap();
        text
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("Ctrl-C");
            banner.push(line);
            if done {
                break;
            }
        }
    })
    .await;
    assert!(ready.is_ok(), "the demo printed its banner: {banner:?}");
    let field = |name: &str| {
        banner
            .iter()
            .find_map(|line| line.strip_prefix(name))
            .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no `{name}` in {banner:?}"))
    };
    let hash = banner
        .iter()
        .find_map(|line| line.split("\"hash\":\"").nth(1))
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .expect("the from-hash curl line");
    Demo {
        gateway: field("gateway URL:"),
        key: field("client key:"),
        hash,
        child,
        logs,
    }
}

/// Sends `signal` (`INT`, `HUP`, …) to `child`.
fn send_signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("still running").to_string();
    assert!(
        Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Ctrl-C (SIGINT), then a clean exit within 30 s.
async fn interrupt_and_wait(child: &mut tokio::process::Child) {
    send_signal(child, "INT");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("it stops")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

impl Demo {
    /// Ctrl-C (SIGINT), a clean exit → what it logged.
    async fn stop(mut self) -> String {
        interrupt_and_wait(&mut self.child).await;
        self.logs.await.unwrap()
    }
}

/// `teamgate demo` as a user runs it: read the banner, use the curl lines'
/// requests, then Ctrl-C (SIGINT) and a clean exit.
#[tokio::test]
async fn demo_runs_without_an_account_and_stops_cleanly_on_sigint() {
    let demo = start_demo(None).await;
    let (gateway, key, hash) = (demo.gateway.clone(), demo.key.clone(), demo.hash.clone());

    let client = reqwest_like::Client::new();
    let (status, _) = client
        .get(&format!("{gateway}/api/assets?limit=5"), Some(&key))
        .await;
    assert_eq!(status, 200);
    let (status, _) = client.get(&format!("{gateway}/api/assets"), None).await;
    assert_eq!(status, 401);
    let (status, body) = client
        .post_json(
            &format!("{gateway}/api/assets/from-hash"),
            &key,
            &format!(r#"{{"hash":"{hash}","name":"demo.png","tags":["input"]}}"#),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = client
        .get(&format!("{gateway}/api/assets/{id}"), Some(&key))
        .await;
    assert_eq!(status, 200);
    assert!(body.contains("demo.png"));
    // Both upstreams run: Scenario, with the same gateway key.
    let (status, body) = client
        .get(&format!("{gateway}/scenario/assets?pageSize=2"), Some(&key))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("nextPaginationToken"), "{body}");

    let logs = demo.stop().await;

    // Every log line the process wrote is JSON, written out before it
    // exited; one access line per request, and no key anywhere.
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["target"] == "teamgate::access")
        .collect();
    let detail = access
        .iter()
        .find(|line| line["path"] == format!("/api/assets/{id}"))
        .unwrap_or_else(|| panic!("an access line for the detail read in {logs}"));
    assert_eq!(detail["team"], "design", "{detail}");
    assert_eq!(detail["status"], 200, "{detail}");
    assert_eq!(detail["cache"], "miss", "{detail}");
    assert!(detail["latency_us"].is_u64(), "{detail}");
    assert!(
        detail["request_id"]
            .as_str()
            .is_some_and(|id| id.len() == 36),
        "{detail}"
    );
    assert!(
        access.iter().any(|line| line["status"] == 401),
        "the refused request is logged too: {logs}"
    );
    assert!(access.len() >= 5, "{logs}");
    assert!(!logs.contains(&key), "the client key leaked into the logs");
}

/// `RUST_LOG=…,teamgate::access=off` turns the access lines off and
/// nothing else, in the gateway's own subscriber (where access lines skip
/// the `tracing` event and are written on `tracing::enabled!`'s answer).
#[tokio::test]
async fn rust_log_turns_access_lines_off_and_keeps_the_rest() {
    let demo = start_demo(Some("info,teamgate::access=off")).await;
    let client = reqwest_like::Client::new();
    for _ in 0..3 {
        let (status, _) = client
            .get(
                &format!("{}/api/assets?limit=5", demo.gateway),
                Some(&demo.key),
            )
            .await;
        assert_eq!(status, 200);
    }
    let logs = demo.stop().await;
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|line| line["target"] != "teamgate::access"),
        "no access line: {logs}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line["level"] == "INFO" && line["target"] == "teamgate"),
        "the other INFO lines stay: {logs}"
    );
}

/// A tiny HTTP client over hyper, enough for the demo test.
mod reqwest_like {
    use bytes::Bytes;
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client as Hyper;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    pub struct Client(Hyper<HttpConnector, Full<Bytes>>);

    impl Client {
        pub fn new() -> Self {
            Client(Hyper::builder(TokioExecutor::new()).build_http())
        }

        async fn send(&self, request: Request<Full<Bytes>>) -> (u16, String) {
            let response = self.0.request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }

        pub async fn get(&self, url: &str, key: Option<&str>) -> (u16, String) {
            let mut request = Request::get(url);
            if let Some(key) = key {
                request = request.header("x-api-key", key);
            }
            self.send(request.body(Full::new(Bytes::new())).unwrap())
                .await
        }

        pub async fn post_json(&self, url: &str, key: &str, json: &str) -> (u16, String) {
            let request = Request::post(url)
                .header("x-api-key", key)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(json.to_owned())))
                .unwrap();
            self.send(request).await
        }
    }
}

/// `teamgate serve` reads its file again on SIGHUP: a key added to the file
/// works once the reload is logged, a file that does not load is refused
/// and logged while the gateway keeps serving, and no key reaches the log.
#[tokio::test]
async fn serve_reloads_its_teams_on_sighup() {
    use teamgate::auth::keys::KeyDigest;
    use teamgate::emulator::{Account, Emulator};

    const UPSTREAM_KEY: &str = "comfy-upstream-sighup-5ecret";
    const FIRST_KEY: &str = "tg_sighup_first_key_0123456789abcdef";
    const ADDED_KEY: &str = "tg_sighup_added_key_0123456789abcdef";
    let emulator = Emulator::new(vec![Account {
        name: "team".into(),
        api_key: UPSTREAM_KEY.into(),
    }]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    emulator.spawn(listener);
    let dir = std::env::temp_dir().join(format!("teamgate-sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("teamgate.toml");
    let config = |keys: &[&str]| {
        let hashes: Vec<String> = keys
            .iter()
            .map(|key| format!("\"{}\"", KeyDigest::of_key(key).to_stored()))
            .collect();
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n\
             [upstreams.comfy]\nbase_url = \"http://{upstream}\"\npreset = \"comfy-cloud\"\n\n\
             [teams.team]\nupstream_keys = {{ comfy = \"env:SIGHUP_COMFY_KEY\" }}\nclient_keys = [{}]\n",
            hashes.join(", ")
        )
    };
    std::fs::write(&path, config(&[FIRST_KEY])).unwrap();

    let mut served = ServeProcess::spawn(
        &["serve", "--config", path.to_str().unwrap()],
        &[
            ("SIGHUP_COMFY_KEY", UPSTREAM_KEY),
            ("TEAMGATE_LOG_FORMAT", "json"),
        ],
    );
    let serving = served.logged("teamgate serving").await;
    let gateway = format!("http://{}", serving["listen"].as_str().unwrap());
    let client = reqwest_like::Client::new();
    let assets = format!("{gateway}/api/assets");
    assert_eq!(client.get(&assets, Some(FIRST_KEY)).await.0, 200);
    assert_eq!(client.get(&assets, Some(ADDED_KEY)).await.0, 401);

    std::fs::write(&path, config(&[FIRST_KEY, ADDED_KEY])).unwrap();
    send_signal(&served.child, "HUP");
    let reloaded = served.logged("config reloaded").await;
    assert_eq!(reloaded["client_keys"], 2, "{reloaded}");
    assert_eq!(client.get(&assets, Some(ADDED_KEY)).await.0, 200);

    // A file that does not load — the mistakes an operator makes: the team's
    // upstream key written inline, a client key pasted raw instead of its
    // hash — is refused and logged, nothing changes, and neither key is shown.
    let mistaken = config(&[FIRST_KEY])
        .replace("env:SIGHUP_COMFY_KEY", UPSTREAM_KEY)
        .replace(
            "client_keys = [",
            &format!("client_keys = [\"{ADDED_KEY}\", "),
        );
    std::fs::write(&path, mistaken).unwrap();
    send_signal(&served.child, "HUP");
    let refused = served
        .logged("config reload refused; the running config stays")
        .await;
    assert_eq!(refused["level"], "ERROR", "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("teams.team.upstream_keys.comfy"),
        "{refused}"
    );
    assert!(error.contains("teams.team.client_keys[0]"), "{refused}");
    assert_eq!(client.get(&assets, Some(ADDED_KEY)).await.0, 200);
    assert_eq!(client.get(&assets, Some(FIRST_KEY)).await.0, 200);

    interrupt_and_wait(&mut served.child).await;
    let logs = served.all_logs().await;
    for secret in [UPSTREAM_KEY, FIRST_KEY, ADDED_KEY] {
        assert!(!logs.contains(secret), "a key in the logs: {logs}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! The deployments in deploy/ (Dockerfile, compose.yaml, kustomization.yaml
//! and kubernetes/) against the config they run, deploy/teamgate.toml: the
//! secrets it references are the ones each deployment provides, the ports
//! and paths agree, and the image's command serves that config — run here
//! as the binary, with a real Redis, since no container runtime is at hand.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::redis_server::Redis;
use common::serve_process::ServeProcess;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use teamgate::config::{self, Secrets};

fn deploy_file(path: &str) -> String {
    let path = format!("{}/deploy/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// The names of the `env:` references in `toml`.
fn env_references(toml: &str) -> BTreeSet<String> {
    toml.split("\"env:")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect()
}

/// The JSON array after `CMD` in the Dockerfile: the image's arguments.
fn image_arguments() -> Vec<String> {
    let dockerfile = deploy_file("Dockerfile");
    let line = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("CMD "))
        .expect("a CMD line");
    serde_json::from_str(line).unwrap()
}

#[test]
fn every_deployment_provides_what_the_config_it_runs_needs() {
    let toml = deploy_file("teamgate.toml");
    let config = config::load_str(
        &toml,
        "deploy/teamgate.toml",
        None,
        &|_| None,
        Secrets::FormOnly,
    )
    .unwrap_or_else(|error| panic!("{error}"));
    let redis_url = "TEAMGATE_REDIS_URL";
    let secrets: BTreeSet<String> = env_references(&toml)
        .into_iter()
        .filter(|name| name != redis_url)
        .collect();
    assert!(secrets.contains("TEAMGATE_ADMIN_TOKEN"), "{secrets:?}");
    assert!(secrets.contains("COMFY_KEY_DESIGN"), "{secrets:?}");

    // compose: the env file lists exactly those secrets; Redis is the service's.
    let env_example: BTreeSet<String> = deploy_file("compose.env.example")
        .lines()
        .filter(|line| !line.starts_with('#') && line.contains('='))
        .map(|line| line.split('=').next().unwrap().to_owned())
        .collect();
    assert_eq!(env_example, secrets);
    let compose = deploy_file("compose.yaml");
    assert!(compose.contains(&format!("{redis_url}: redis://redis:6379/0")));
    // Kubernetes: the Secret's example holds exactly those; Redis is the Service's.
    let secret_example: BTreeSet<String> = deploy_file("kubernetes/secrets.example.yaml")
        .split("stringData:")
        .nth(1)
        .unwrap()
        .lines()
        .filter_map(|line| line.trim().split_once(':').map(|(name, _)| name.to_owned()))
        .collect();
    assert_eq!(secret_example, secrets);
    let kubernetes = deploy_file("kubernetes/teamgate.yaml");
    assert!(kubernetes.contains(&format!(
        "- name: {redis_url}\n              value: redis://teamgate-redis:6379/0"
    )));
    assert!(deploy_file("kubernetes/redis.yaml").contains("name: teamgate-redis"));

    // Ports and paths.
    let (listen, admin) = (
        config.server.listen.port(),
        config.server.admin_listen.port(),
    );
    let dockerfile = deploy_file("Dockerfile");
    assert!(dockerfile.contains(&format!("EXPOSE {listen} {admin}")));
    assert!(dockerfile.contains("COPY deploy/teamgate.toml /etc/teamgate/teamgate.toml"));
    for port in [listen, admin] {
        assert!(
            kubernetes.contains(&format!("containerPort: {port}")),
            "{port}"
        );
    }
    assert!(compose.contains(&format!(":{listen}\"")));
    let scraped = deploy_file("compose/prometheus.yml");
    for service in ["teamgate-a", "teamgate-b"] {
        assert!(compose.contains(&format!("\n  {service}:")), "{service}");
        assert!(scraped.contains(&format!("{service}:{admin}")), "{service}");
    }
    assert!(kubernetes.contains("path: /readyz") && kubernetes.contains("path: /healthz"));
    // The pods run the image's command, on the ConfigMap's copy of the file.
    let arguments = image_arguments();
    assert_eq!(
        arguments,
        ["serve", "--config", "/etc/teamgate/teamgate.toml"]
    );
    assert!(kubernetes.contains(
        &format!("args: {}", serde_json::to_string(&arguments).unwrap().replace(",", ", "))
    ));
    assert!(kubernetes.contains("mountPath: /etc/teamgate\n"));
    let kustomization = deploy_file("kustomization.yaml");
    for file in [
        "teamgate.toml",
        "kubernetes/teamgate.yaml",
        "kubernetes/redis.yaml",
    ] {
        assert!(kustomization.contains(&format!("- {file}\n")), "{file}");
        deploy_file(file);
    }
    // Draining ends before Kubernetes kills the pod.
    let grace: u64 = kubernetes
        .split("terminationGracePeriodSeconds: ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(config.server.shutdown_grace < Duration::from_secs(grace));
}

/// `teamgate <the image's arguments>` on deploy/teamgate.toml (its listeners
/// moved to loopback through the environment, as an operator may): ready,
/// the admin API makes a managed key in Redis, and that key is served.
#[tokio::test]
async fn the_images_command_serves_the_deployed_config() {
    let redis = Redis::started("deploy");
    let (emulator, upstream) = serve_emulator(test_emulator()).await;
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config_path = format!("{}/deploy/teamgate.toml", env!("CARGO_MANIFEST_DIR"));
    let arguments: Vec<String> = image_arguments()
        .into_iter()
        .map(|argument| {
            if argument == "/etc/teamgate/teamgate.toml" {
                config_path.clone()
            } else {
                argument
            }
        })
        .collect();
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let (admin_listen, upstream, redis_url) = (
        format!("127.0.0.1:{admin_port}"),
        format!("http://{upstream}"),
        redis.url(),
    );
    let mut served = ServeProcess::spawn(
        &arguments,
        &[
            ("TEAMGATE_LISTEN", "127.0.0.1:0"),
            ("TEAMGATE_ADMIN_LISTEN", &admin_listen),
            ("TEAMGATE_UPSTREAM_COMFY_BASE_URL", &upstream),
            ("TEAMGATE_REDIS_URL", &redis_url),
            ("TEAMGATE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("COMFY_KEY_DESIGN", DESIGN_UPSTREAM_KEY),
            ("SCN_KEY_DESIGN", SCN_KEY_DESIGN),
            ("SCN_SECRET_DESIGN", SCN_SECRET_DESIGN),
        ],
    );
    let serving = served.logged("teamgate serving").await;
    let gateway = serving["listen"].as_str().unwrap().to_owned();

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let send = async |method: Method, url: String, header: (&str, String)| {
        let request = Request::builder()
            .method(method)
            .uri(url)
            .header(header.0, header.1)
            .body(Full::new(Bytes::new()))
            .unwrap();
        Answer::read(client.request(request).await.unwrap()).await
    };
    let admin = format!("http://127.0.0.1:{admin_port}");
    let bearer = ("authorization", format!("Bearer {ADMIN_TOKEN}"));
    let mut ready = false;
    for _ in 0..2000 {
        let answer = send(Method::GET, format!("{admin}/readyz"), bearer.clone()).await;
        let metrics = send(Method::GET, format!("{admin}/metrics"), bearer.clone()).await;
        let text = String::from_utf8_lossy(&metrics.body);
        let hears_redis = sample(&text, "teamgate_cache_fanout_subscribed", &[]) == Some(1.0);
        if answer.status == StatusCode::OK && hears_redis {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "ready and hearing Redis within 20 s");
    let made = send(
        Method::POST,
        format!("{admin}/admin/teams/design/keys"),
        bearer.clone(),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let key = made.json()["key"].as_str().unwrap().to_owned();
    let assets = send(
        Method::GET,
        format!("http://{gateway}/api/assets"),
        ("x-api-key", key),
    )
    .await;
    assert_eq!(assets.status, StatusCode::OK);
    assert_eq!(emulator.count(Method::GET, "/api/assets"), 1);
    served.child.kill().await.unwrap();
}

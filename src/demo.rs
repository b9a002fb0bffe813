//! `teamgate demo`: the built-in Comfy Cloud emulator with the gateway in front.
//!
//! Needs no account and no config file: it runs `config/demo.toml` (compiled
//! in), makes up the emulator's account keys, points the upstream at the
//! emulator's loopback port, and prints copy-paste `curl` lines.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::config::{self, Secrets};
use crate::emulator::{Account, Emulator, demo_blob_hash};
use crate::{Listeners, telemetry};

/// The demo config, as shipped in `config/demo.toml`.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
/// The client key of team `design` in the demo config.
pub const DEMO_KEY_DESIGN: &str = "tg_demo_design_Yq3vN8rT2wLx6pKd0sFh";
/// The client key of team `research` in the demo config.
pub const DEMO_KEY_RESEARCH: &str = "tg_demo_research_Jm5cB1zQ7uEa4nGy9oVi";

#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(options: DemoOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let design_upstream_key = format!("comfy-demo-{}", uuid::Uuid::new_v4().simple());
    let research_upstream_key = format!("comfy-demo-{}", uuid::Uuid::new_v4().simple());
    let emulator = Emulator::new(vec![
        Account {
            name: "design".into(),
            api_key: design_upstream_key.clone(),
        },
        Account {
            name: "research".into(),
            api_key: research_upstream_key.clone(),
        },
    ]);
    let emulator_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the emulator on loopback")?;
    let emulator_addr = emulator_listener.local_addr()?;
    let emulator_task = emulator.spawn(emulator_listener);
    let scenario_key = format!("scn-demo-{}", uuid::Uuid::new_v4().simple());
    let scenario_secret = format!("scn-demo-secret-{}", uuid::Uuid::new_v4().simple());
    let scenario = Emulator::scenario(vec![Account {
        name: "design".into(),
        api_key: format!("{scenario_key}:{scenario_secret}"),
    }]);
    let scenario_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the Scenario emulator on loopback")?;
    let scenario_addr = scenario_listener.local_addr()?;
    let scenario_task = scenario.spawn(scenario_listener);

    // The demo reads nothing from the process environment but the log format
    // (and `RUST_LOG`): what it needs, it made.
    let env = |name: &str| match name {
        "TEAMGATE_DEMO_COMFY_KEY_DESIGN" => Some(design_upstream_key.clone()),
        "TEAMGATE_DEMO_COMFY_KEY_RESEARCH" => Some(research_upstream_key.clone()),
        "TEAMGATE_UPSTREAM_COMFY_BASE_URL" => Some(format!("http://{emulator_addr}")),
        "TEAMGATE_DEMO_SCENARIO_KEY_DESIGN" => Some(scenario_key.clone()),
        "TEAMGATE_DEMO_SCENARIO_SECRET_DESIGN" => Some(scenario_secret.clone()),
        "TEAMGATE_UPSTREAM_SCENARIO_BASE_URL" => Some(format!("http://{scenario_addr}/v1")),
        "TEAMGATE_LISTEN" => Some(options.listen.to_string()),
        "TEAMGATE_ADMIN_LISTEN" => Some(options.admin_listen.to_string()),
        "TEAMGATE_LOG_FORMAT" => std::env::var(name).ok(),
        _ => None,
    };
    let config = config::load_str(
        DEMO_CONFIG,
        "config/demo.toml (built in)",
        None,
        &env,
        Secrets::Resolve,
    )
    .map_err(|error| anyhow::anyhow!("{error}"))?;
    let telemetry = telemetry::traces::init(&config.log, &config.traces)?;
    let listeners = Listeners::bind(&config).await?;
    let gateway = format!("http://{}", listeners.gateway.local_addr()?);
    let admin = format!("http://{}", listeners.admin.local_addr()?);
    println!(
        "{}",
        banner(
            &gateway,
            &admin,
            &emulator_addr.to_string(),
            &scenario_addr.to_string()
        )
    );

    let result = crate::run(listeners, Arc::new(config), shutdown).await;
    emulator_task.abort();
    scenario_task.abort();
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

fn banner(gateway: &str, admin: &str, emulator: &str, scenario: &str) -> String {
    let hash = demo_blob_hash();
    format!(
                "teamgate demo: gateway {gateway} in front of the built-in Comfy Cloud emulator (http://{emulator})
and the Scenario emulator (http://{scenario}/v1, mounted at /scenario)
admin: {admin}/healthz  {admin}/readyz

gateway URL:      {gateway}
client key:       {DEMO_KEY_DESIGN}   (team design)
other team's key: {DEMO_KEY_RESEARCH}   (team research)

Try (each team sees only its own assets):
  # list assets
  curl -s -H 'X-API-Key: {DEMO_KEY_DESIGN}' '{gateway}/api/assets?limit=5'
  # create an asset from content already in storage
  curl -s -X POST -H 'X-API-Key: {DEMO_KEY_DESIGN}' -H 'Content-Type: application/json' \\
       -d '{{\"hash\":\"{hash}\",\"name\":\"demo.png\",\"tags\":[\"input\"]}}' '{gateway}/api/assets/from-hash'
  # read it back: put the \"id\" from the answer above in place of ASSET_ID
  curl -s -H 'X-API-Key: {DEMO_KEY_DESIGN}' '{gateway}/api/assets/ASSET_ID'
  # no key: 401, and nothing is sent upstream
  curl -s '{gateway}/api/assets'
  # Scenario, same key: the gateway signs the request with the team's Basic credentials
  curl -s -H 'X-API-Key: {DEMO_KEY_DESIGN}' '{gateway}/scenario/assets?pageSize=2'


Ctrl-C stops the gateway and the emulator."
    )
}

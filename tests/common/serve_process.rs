//! `teamgate serve` as a child process, as an operator runs it, its JSON
//! log lines read as they come.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

pub struct ServeProcess {
    pub child: Child,
    lines: UnboundedReceiver<String>,
    reader: JoinHandle<()>,
    /// Every line read so far.
    logs: Vec<String>,
}

impl ServeProcess {
    /// `teamgate <args>` with `env` added (and `RUST_LOG` removed); its log
    /// lines must be JSON (the config's `log.format`, or `TEAMGATE_LOG_FORMAT`).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_teamgate"))
            .args(args)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (lines_tx, lines) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = lines_tx.send(line);
            }
        });
        ServeProcess {
            child,
            lines,
            reader,
            logs: Vec::new(),
        }
    }

    /// The next log line whose message is `message`, within 30 s.
    pub async fn logged(&mut self, message: &str) -> serde_json::Value {
        let ServeProcess { lines, logs, .. } = self;
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let line = lines.recv().await.expect("the gateway is still running");
                logs.push(line.clone());
                let line: serde_json::Value = serde_json::from_str(&line).unwrap();
                if line["message"] == message {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no `{message}` line in {:?}", self.logs))
    }

    /// Every line the process logged, once it has ended.
    pub async fn all_logs(mut self) -> String {
        self.reader.await.unwrap();
        while let Ok(line) = self.lines.try_recv() {
            self.logs.push(line);
        }
        self.logs.join("\n")
    }
}

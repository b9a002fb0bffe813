//! A `redis-server` of a test's own, for the tests of what instances share
//! through Redis (`[shared] redis`). Needs `redis-server` on the PATH
//! (`.ci/run` installs it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` of the test's own on 127.0.0.1, stopped when dropped;
/// `url_file` holds its URL, for a `file:` reference.
pub struct Redis {
    port: u16,
    server: Option<Child>,
    dir: PathBuf,
}

impl Redis {
    /// A port no one listens on yet, and the URL file for it.
    pub fn reserve(test: &str) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("teamgate-shared-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("redis.url"), format!("redis://127.0.0.1:{port}/")).unwrap();
        Redis {
            port,
            server: None,
            dir,
        }
    }

    pub fn started(test: &str) -> Redis {
        let mut redis = Redis::reserve(test);
        redis.start();
        redis
    }

    /// Starts the server on the reserved port and waits until it answers.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// [`Self::start`], with more `redis-server` arguments.
    pub fn start_with(&mut self, arguments: &[&str]) {
        let server = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(arguments)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (apt-get install redis-server; .ci/run does)");
        self.server = Some(server);
        for _ in 0..500 {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                // `+PONG`, or `-NOAUTH …` from a server that wants a password.
                let mut answer = [0u8; 5];
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream.read_exact(&mut answer).is_ok()
                    && (&answer == b"+PONG" || &answer == b"-NOAU")
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Starts the server on the reserved port with TLS only (`cert` and
    /// `key` PEM files; clients need no certificate), and waits until it
    /// accepts connections.
    pub fn start_tls(&mut self, cert: &std::path::Path, key: &std::path::Path) {
        let server = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(cert)
            .args(["--tls-auth-clients", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (apt-get install redis-server; .ci/run does)");
        self.server = Some(server);
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server (TLS) did not start on port {}", self.port);
    }

    /// The directory of this server's files (its URL file among them).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        let pid = self.server.as_ref().expect("started").id();
        let sent = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// The URL, for a client of the test's own.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A connection of the test's own, to look at what the gateway stored.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub fn url_file(&self) -> PathBuf {
        self.dir.join("redis.url")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

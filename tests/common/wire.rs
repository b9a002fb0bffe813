//! A raw HTTP/1.1 client connection for tests that must see the wire:
//! answers read one at a time off one keep-alive connection, so nothing a
//! client library smooths over (reconnects, pooling) is hidden.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Harness;

/// One answer read off a keep-alive connection.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A client connection that reads answers one at a time (bounded waits).
pub struct Wire {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    pub async fn connect(h: &Harness) -> Wire {
        Self::connect_to(h.gateway).await
    }

    pub async fn connect_to(gateway: std::net::SocketAddr) -> Wire {
        Wire {
            stream: TcpStream::connect(gateway).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &str) {
        self.stream.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// Reads more bytes; false when the gateway closed the connection.
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let read = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut chunk))
            .await
            .expect("the gateway answers or closes within 20 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..read]);
        read > 0
    }

    /// Reads one answer; `head_only` for the answer to a `HEAD`.
    pub async fn answer(&mut self, head_only: bool) -> RawAnswer {
        let (status, headers, consumed) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(consumed) = parsed.parse(&self.buf).unwrap() {
                let headers = parsed
                    .headers
                    .iter()
                    .map(|field| {
                        let value = String::from_utf8_lossy(field.value).into_owned();
                        (field.name.to_ascii_lowercase(), value)
                    })
                    .collect::<Vec<_>>();
                break (parsed.code.unwrap(), headers, consumed);
            }
            assert!(self.fill().await, "closed before a whole head");
        };
        self.buf.drain(..consumed);
        let mut answer = RawAnswer {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 204 || status == 304 {
            return answer;
        }
        if let Some(length) = answer.header("content-length") {
            let length: usize = length.parse().unwrap();
            while self.buf.len() < length {
                assert!(self.fill().await, "closed inside a body");
            }
            answer.body = self.buf.drain(..length).collect();
        } else {
            assert_eq!(answer.header("transfer-encoding"), Some("chunked"));
            loop {
                let line_end = loop {
                    if let Some(at) = self.buf.windows(2).position(|pair| pair == b"\r\n") {
                        break at;
                    }
                    assert!(self.fill().await, "closed inside a chunk size");
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16)
                        .unwrap();
                while self.buf.len() < line_end + 2 + size + 2 {
                    assert!(self.fill().await, "closed inside a chunk");
                }
                answer
                    .body
                    .extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        }
        answer
    }

    /// The gateway closes the connection, with nothing more sent.
    pub async fn assert_closed(&mut self) {
        while self.fill().await {}
        assert!(
            self.buf.is_empty(),
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }
}

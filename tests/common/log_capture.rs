//! Every line a test's global `tracing` subscriber writes, kept in memory
//! with the moment it was written: for tests that read the gateway's own
//! logs (install it once per test binary, as the subscriber is global).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<(Instant, String)>>>);

impl LogCapture {
    /// Every line so far, with when it was written.
    pub fn lines(&self) -> Vec<(Instant, String)> {
        self.0.lock().unwrap().clone()
    }

    /// Every line so far, as one text.
    pub fn text(&self) -> String {
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .map(|(_, line)| line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Write for LogCapture {
    /// The formatter writes each event whole, in one call.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(bytes).trim_end().to_owned();
        self.0.lock().unwrap().push((Instant::now(), line));
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}

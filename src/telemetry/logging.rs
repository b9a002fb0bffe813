//! Where log lines go, and the fast path for the one line every request writes.
//!
//! [`LogSink`] is an in-process buffer that every log line is appended to,
//! drained to stderr by one background thread. Appending is a copy under a
//! lock nobody holds for long, so a request never waits on the terminal, a
//! pipe or a disk. The buffer is split in shards, about one per core; a
//! thread always appends to the same one, so threads on different cores
//! rarely take the same lock or write the same memory (one buffer for all
//! was one shared lock and one shared cache line per logged request). A
//! thread's lines stay in order; lines of different threads interleave by
//! batch. The writer thread is woken by the first line after it went idle
//! and then drains every shard in batches (at most one pass per
//! [`BATCH_WINDOW`] under load), like nginx's `access_log … buffer= flush=`.
//! If stderr stops draining, the buffer stops growing at
//! [`MAX_BUFFERED_BYTES`]: lines are dropped and counted, and the count is
//! written as its own line once the writer catches up. A gateway that blocks
//! its requests on a stuck log pipe fails everyone; one that drops lines and
//! says so fails nobody.
//!
//! [`layer`] is the `tracing_subscriber::fmt` layer writing into the sink.
//! The access line (one per request, [`AccessLine`]) it writes itself —
//! JSON or text, in the same shape the general formatter gives every other
//! line — from the line's own fields, with a per-second cached timestamp
//! and no intermediate values, and appends it to the sink directly. When
//! the log layer is the subscriber's only layer (the gateway without a
//! trace exporter), [`AccessLine::log`] does so without a `tracing` event;
//! otherwise the line is an ordinary event, which every layer sees, and
//! the layer's event formatter, `FastAccessLines`, writes it. Either way
//! the one log filter decides: `RUST_LOG=teamgate::access=off` turns it
//! off. Every other event goes to the general formatter.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use super::shards::{self, Sharded, lock};
use crate::config::LogFormat;

/// The target of the per-request access-log event, as a literal for `concat!`.
macro_rules! access_target {
    () => {
        "teamgate::access"
    };
}

/// The target of the per-request access-log event.
pub const ACCESS_TARGET: &str = access_target!();

/// What one access line says about a request; [`AccessLine::log`] writes it
/// as an INFO event of target [`ACCESS_TARGET`], message `served`.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    /// The path only, never the query (Comfy's `/ws` carries a key in `token=`).
    pub path: &'a str,
    pub team: &'a str,
    pub upstream: &'a str,
    pub route_class: &'a str,
    pub cache: &'a str,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub latency_us: u64,
}

/// The message of every access line, as a literal for `concat!`.
macro_rules! access_message {
    () => {
        "served"
    };
}

/// The message of every access line.
const ACCESS_MESSAGE: &str = access_message!();

scoped_tls_hkt::scoped_thread_local!(
    /// The line [`AccessLine::log`] is dispatching, while it does.
    static BEING_LOGGED: for<'a> &'a AccessLine<'a>
);

impl<'a> AccessLine<'a> {
    /// Writes the line, when the log filter lets it through.
    ///
    /// Under the gateway's own subscriber with no trace exporter, the log
    /// layer is the only one that takes access lines, and the line goes
    /// straight into its sink, without an event: ~0.6% less CPU per logged
    /// cache hit than the event below (benches/README.md, "The access line
    /// from its own fields"). Otherwise it is an ordinary `tracing` event,
    /// which every subscriber sees with all its fields; while it is
    /// dispatched the line is also in `BEING_LOGGED`, and the gateway's
    /// formatter writes it from there, from the fields as they are, instead
    /// of visiting the event's eleven through `tracing`'s `dyn Visit` one
    /// call at a time (~40 ns of ~220 a line in the micro-benchmark).
    pub fn log(&self) {
        if Self::enabled() {
            self.log_enabled();
        }
    }

    /// Whether the log filter lets access lines through (asked outside
    /// `get_default`: a dispatcher asked from inside it is none).
    pub fn enabled() -> bool {
        tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
    }

    /// [`log`](Self::log) for a caller that has just asked
    /// [`enabled`](Self::enabled): the request's own layer asks as the
    /// request comes in (to keep what the line needs) and writes the line as
    /// the answer goes out, and the filter, fixed for the process, gives the
    /// same answer twice (~100 instructions, each time it is asked).
    pub fn log_enabled(&self) {
        let written = tracing::dispatcher::get_default(|dispatch| {
            let Some(LayerWriter {
                sink,
                direct: Some(how),
            }) = dispatch.downcast_ref::<LayerWriter>()
            else {
                return false;
            };
            append_access_line(sink, self, *how);
            true
        });
        if written {
            return;
        }
        BEING_LOGGED.set(self, || {
            tracing::info!(
                target: ACCESS_TARGET,
                // A `&str`, not format arguments: formatters take it by
                // `record_str`, without a pass through `core::fmt`, and write the
                // same line.
                message = ACCESS_MESSAGE,
                request_id = self.request_id,
                method = self.method,
                path = self.path,
                team = self.team,
                upstream = self.upstream,
                route_class = self.route_class,
                cache = self.cache,
                status = self.status,
                upstream_status = self.upstream_status,
                latency_us = self.latency_us,
            )
        });
    }
}

/// Calls `$each!(name, value)` for each string field of the access line
/// `$access`, in the order every format writes them (the event's): one
/// list, written out as straight-line code in each format, so that every
/// key is a constant the compiler copies inline.
macro_rules! for_each_string_field {
    ($access:expr, $each:ident) => {
        $each!(request_id, $access.request_id);
        $each!(method, $access.method);
        $each!(path, $access.path);
        $each!(team, $access.team);
        $each!(upstream, $access.upstream);
        $each!(route_class, $access.route_class);
        $each!(cache, $access.cache);
    };
}

/// The number fields after them, the same way, each an `Option<u64>`; a
/// `None` is left out.
macro_rules! for_each_number_field {
    ($access:expr, $each:ident) => {
        $each!(status, Some(u64::from($access.status)));
        $each!(upstream_status, $access.upstream_status.map(u64::from));
        $each!(latency_us, Some($access.latency_us));
    };
}

/// How long the writer lets lines gather after a write before it looks
/// again: under load, one write (and one wake-up of this thread) per window.
/// Each wake-up costs the core the requests run on; a longer window means
/// fewer of them but a bigger batch through the caches. On the benchmark's
/// VM, a logged cache hit cost ~0.5% less at 20 ms than at 5 ms (twelve
/// restarts of the two side by side), ~0.6% more at 50 ms, ~4% more at
/// 1 ms (benches/README.md, "The same budget again with fresh gateways").
/// Lines reach the output at most this late; nginx's `flush=` is 1 s.
pub const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// The most bytes the sink buffers, divided evenly among its shards; a
/// line that does not fit in its shard is dropped (and counted). A shard
/// must hold what its core logs in more than one [`BATCH_WINDOW`] even
/// while the output keeps up: one core logs at most ~27 MB/s of access
/// lines (~90k cache hits a second), ~540 KB a window, so even with the
/// most shards ([`shards::MAX_COUNT`]) each holds 1 MiB. (With the 5 ms
/// window the bound was 16 MiB: the same margin.)
pub const MAX_BUFFERED_BYTES: usize = shards::MAX_COUNT * 1024 * 1024;

/// The shared log buffer; cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

struct Shared {
    /// Each thread appends to its own.
    shards: Sharded<Mutex<Shard>>,
    /// Bytes a shard holds before lines are dropped: the sink's bound
    /// divided among the shards.
    max_per_shard: usize,
    /// The writer found every shard empty and waits for the next line: the
    /// next append wakes it (under `wake_lock`, so the wake-up cannot fall
    /// between the writer's last look and its wait).
    writer_idle: AtomicBool,
    /// The guard was dropped: write what is left and stop.
    closed: AtomicBool,
    wake_lock: Mutex<()>,
    wake: Condvar,
}

#[derive(Default)]
struct Shard {
    buffer: Vec<u8>,
    dropped_lines: u64,
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSink").finish_non_exhaustive()
    }
}

/// Stops the writer thread when dropped, after it has written every line.
#[derive(Debug)]
pub struct LogSinkGuard {
    sink: LogSink,
    writer: Option<JoinHandle<()>>,
}

impl LogSink {
    /// A sink draining to `out` from a thread of its own, with a shard for
    /// each core this process may run on ([`shards::count`]).
    pub fn spawn<W: Write + Send + 'static>(out: W) -> (LogSink, LogSinkGuard) {
        Self::spawn_with(out, MAX_BUFFERED_BYTES, shards::count())
    }

    fn spawn_with<W: Write + Send + 'static>(
        out: W,
        max_buffered: usize,
        shards: usize,
    ) -> (LogSink, LogSinkGuard) {
        let shards = Sharded::new(shards, Mutex::<Shard>::default);
        let sink = LogSink {
            shared: Arc::new(Shared {
                max_per_shard: max_buffered / shards.len(),
                shards,
                writer_idle: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                wake_lock: Mutex::new(()),
                wake: Condvar::new(),
            }),
        };
        let shared = Arc::clone(&sink.shared);
        let writer = std::thread::Builder::new()
            .name("teamgate-log".into())
            .spawn(move || drain(&shared, out))
            .expect("spawning the log writer thread");
        let guard = LogSinkGuard {
            sink: sink.clone(),
            writer: Some(writer),
        };
        (sink, guard)
    }

    /// Appends whole lines; never blocks on the output.
    pub fn append(&self, lines: &[u8]) {
        let shared = &*self.shared;
        {
            let mut shard = lock(shared.shards.mine());
            if shard.buffer.len() + lines.len() > shared.max_per_shard {
                shard.dropped_lines += 1;
            } else {
                shard.buffer.extend_from_slice(lines);
            }
        }
        // SeqCst, as the writer's store before its last look: either it sees
        // this line, or this sees it idle and wakes it.
        if shared.writer_idle.load(Ordering::SeqCst) {
            let _wake = lock(&shared.wake_lock);
            if shared.writer_idle.swap(false, Ordering::SeqCst) {
                shared.wake.notify_one();
            }
        }
    }
}

impl Shared {
    /// Whether any shard has lines (or a count of dropped ones) to write.
    fn has_pending(&self) -> bool {
        self.shards.iter().any(|shard| {
            let shard = lock(shard);
            !shard.buffer.is_empty() || shard.dropped_lines > 0
        })
    }
}

/// The writer thread: passes over the shards, writing what each holds, one
/// pass per [`BATCH_WINDOW`] while there are lines, and waits for the next
/// line when there are none.
fn drain<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        // Read before the pass: every line appended before the guard was
        // dropped is in a shard by now, and this pass writes it.
        let closed = shared.closed.load(Ordering::SeqCst);
        // Every shard's lines into one batch, written with one `write`: a
        // write per shard would be a syscall per core per pass.
        let mut dropped = 0;
        for shard in shared.shards.iter() {
            let mut shard = lock(shard);
            if batch.is_empty() {
                // The first shard with lines hands over its buffer whole.
                std::mem::swap(&mut batch, &mut shard.buffer);
            } else {
                batch.extend_from_slice(&shard.buffer);
                shard.buffer.clear();
            }
            dropped += std::mem::take(&mut shard.dropped_lines);
        }
        let wrote = !batch.is_empty() || dropped > 0;
        if wrote {
            // Write errors (a closed stderr) have nowhere to be reported; the
            // lines are gone either way, and the gateway keeps serving.
            let _ = out.write_all(&batch);
            if dropped > 0 {
                let _ = writeln!(
                    out,
                    "teamgate: {dropped} log line(s) dropped: the log output did not keep up"
                );
            }
            let _ = out.flush();
            batch.clear();
        }
        if closed {
            return;
        }
        if wrote {
            std::thread::sleep(BATCH_WINDOW);
            continue;
        }
        let mut waiting = lock(&shared.wake_lock);
        shared.writer_idle.store(true, Ordering::SeqCst);
        // A last look after saying so: a line appended before the store
        // is seen here; one appended after it finds the writer idle.
        if shared.has_pending() || shared.closed.load(Ordering::SeqCst) {
            shared.writer_idle.store(false, Ordering::SeqCst);
            continue;
        }
        while shared.writer_idle.load(Ordering::SeqCst) {
            waiting = shared
                .wake
                .wait(waiting)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for LogSinkGuard {
    fn drop(&mut self) {
        let shared = &self.sink.shared;
        {
            let _wake = lock(&shared.wake_lock);
            shared.closed.store(true, Ordering::SeqCst);
            shared.writer_idle.store(false, Ordering::SeqCst);
            shared.wake.notify_one();
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// [`std::io::Write`] over a [`LogSink`].
#[derive(Debug)]
pub struct SinkWriter<'a>(&'a LogSink);

impl Write for SinkWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.append(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log layer: the stock `tracing_subscriber::fmt` layer (text, or
/// flattened JSON) writing into `sink`, with access lines formatted by
/// `FastAccessLines`. `ansi`: colour the text format. `sole_access_reader`:
/// this layer, behind its filter, is the subscriber's only layer (the
/// gateway's without a trace exporter), so [`AccessLine::log`] may write the
/// line into the sink itself instead of dispatching the event, on
/// `tracing::enabled!`'s answer, which then is the filter's.
pub fn layer<S>(
    format: LogFormat,
    ansi: bool,
    sink: LogSink,
    sole_access_reader: bool,
) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let how = AccessFormat { format, ansi };
    let writer = LayerWriter {
        sink: sink.clone(),
        direct: sole_access_reader.then_some(how),
    };
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .map_event_format(|general| FastAccessLines { general, how, sink })
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .map_event_format(|general| FastAccessLines { general, how, sink })
            .boxed(),
    }
}

/// How the log layer writes an access line itself.
#[derive(Debug, Clone, Copy)]
struct AccessFormat {
    format: LogFormat,
    /// Styled for a terminal (text only).
    ansi: bool,
}

/// The log layer's writer: its sink, and — when the layer is the only one
/// that takes access events — how to write access lines into it directly.
/// [`AccessLine::log`] finds it through the current dispatcher (a `fmt`
/// layer downcasts to its writer, and every layer around it passes the
/// question on), so a subscriber made otherwise (tests, an embedding
/// program) still gets the event.
#[derive(Debug)]
struct LayerWriter {
    sink: LogSink,
    direct: Option<AccessFormat>,
}

/// `tracing_subscriber::fmt` writes each event with one `write_all` of the
/// whole line, so a line is appended in one piece.
impl<'a> MakeWriter<'a> for LayerWriter {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> SinkWriter<'a> {
        SinkWriter(&self.sink)
    }
}

/// An event formatter: the access line [`AccessLine::log`] is dispatching
/// is formatted here, from the line's own fields, and appended to `sink`
/// directly (the fmt layer's writer, given the same sink, then has nothing
/// to write); everything else by `general` (the stock text or JSON format).
#[derive(Debug)]
struct FastAccessLines<F> {
    general: F,
    how: AccessFormat,
    sink: LogSink,
}

/// What an access line is formatted with, one per thread.
#[derive(Default)]
struct Scratch {
    clock: SecondClock,
    /// The line being formatted: bytes, pushed inline (the fmt layer's
    /// `Writer` is a `dyn`), and never checked as UTF-8 on the way — every
    /// piece is a `str` already.
    line: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        line: Vec::with_capacity(512),
        ..Scratch::default()
    });
}

/// Formats `access` as `how` says and appends it to `sink`: one line, one
/// `append`.
fn append_access_line(sink: &LogSink, access: &AccessLine<'_>, how: AccessFormat) {
    let now = SystemTime::now();
    let write = |scratch: &mut Scratch| {
        let Scratch { clock, line } = scratch;
        line.clear();
        match how.format {
            LogFormat::Json => write_json(line, clock, now, access),
            LogFormat::Text => write_text(line, clock, now, access, how.ansi),
        }
        sink.append(line);
    };
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => write(&mut scratch),
        // Formatting calls no code that logs; a fresh scratch all the same.
        Err(_) => write(&mut Scratch::default()),
    });
}

impl<S, N, F> FormatEvent<S, N> for FastAccessLines<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // An access event not dispatched by `AccessLine::log` (nothing in
        // the gateway emits one) is the stock formatter's: the same shape.
        if event.metadata().target() != ACCESS_TARGET || !BEING_LOGGED.is_set() {
            return self.general.format_event(context, writer, event);
        }
        BEING_LOGGED.with(|access| append_access_line(&self.sink, access, self.how));
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` for the current second, its date and time
/// formatted once per second and its microseconds each time.
#[derive(Default)]
struct SecondClock {
    second: u64,
    text: String,
}

impl SecondClock {
    /// Writes `2026-11-23T13:07:39.743223Z`, the shape `tracing_subscriber`'s timer writes.
    fn write(&mut self, out: &mut Vec<u8>, now: SystemTime) {
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since_epoch.as_secs();
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text.clear();
            let at = i64::try_from(second)
                .ok()
                .and_then(|second| time::OffsetDateTime::from_unix_timestamp(second).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            // Writing into a `String` cannot fail.
            let _ = write!(
                self.text,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.000000Z",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second()
            );
        }
        out.extend_from_slice(self.text.as_bytes());
        // The six digits in place, in the copy just written: the six bytes
        // before its last, the `Z`.
        let zone = out.len() - 1;
        let mut micros = since_epoch.subsec_micros();
        for slot in out[zone - 6..zone].iter_mut().rev() {
            *slot = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
    }
}

/// The line `tracing_subscriber::fmt().json().flatten_event(true)` writes
/// for the event [`AccessLine::log`] emits: `{"timestamp":…,"level":"INFO",
/// "message":"served",<the fields in order, a `None` left out>,"target":…}`.
fn write_json(
    out: &mut Vec<u8>,
    clock: &mut SecondClock,
    now: SystemTime,
    access: &AccessLine<'_>,
) {
    // The constant pieces — the level, the message, the keys and the target
    // need no escaping (the tests parse the line) — are written as they are,
    // not checked per line, and each in as few copies as it takes: a string
    // value's key comes with the quote that closes the string before it
    // and the one that opens its own, the last one's closing quote with the
    // first number's key.
    out.extend_from_slice(b"{\"timestamp\":\"");
    clock.write(out, now);
    out.extend_from_slice(
        concat!("\",\"level\":\"INFO\",\"message\":\"", access_message!()).as_bytes(),
    );
    macro_rules! string {
        ($name:ident, $value:expr) => {
            out.extend_from_slice(concat!("\",\"", stringify!($name), "\":\"").as_bytes());
            escape_json_into(out, $value);
        };
    }
    for_each_string_field!(access, string);
    out.push(b'"');
    macro_rules! number {
        ($name:ident, $value:expr) => {
            if let Some(value) = $value {
                out.extend_from_slice(concat!(",\"", stringify!($name), "\":").as_bytes());
                integer(out, value);
            }
        };
    }
    for_each_number_field!(access, number);
    out.extend_from_slice(concat!(",\"target\":\"", access_target!(), "\"}\n").as_bytes());
}

/// The line the default `tracing_subscriber::fmt` format writes for the
/// event [`AccessLine::log`] emits: `2026-11-23T13:07:39.743223Z  INFO
/// teamgate::access: served request_id="…" … status=200 latency_us=183`
/// (strings as `Debug` quotes them). `ansi`: styled for a terminal.
fn write_text(
    out: &mut Vec<u8>,
    clock: &mut SecondClock,
    now: SystemTime,
    access: &AccessLine<'_>,
    ansi: bool,
) {
    // The stock format's styles: dim, green for INFO, italic field names.
    let style = |out: &mut Vec<u8>, code: &str| {
        if ansi {
            out.extend_from_slice(code.as_bytes());
        }
    };
    const RESET: &str = "\x1b[0m";
    style(out, "\x1b[2m");
    clock.write(out, now);
    style(out, RESET);
    out.push(b' ');
    style(out, "\x1b[32m");
    out.extend_from_slice(b" INFO");
    style(out, RESET);
    out.push(b' ');
    style(out, "\x1b[2m");
    out.extend_from_slice(ACCESS_TARGET.as_bytes());
    style(out, RESET);
    style(out, "\x1b[2m");
    out.push(b':');
    style(out, RESET);
    out.push(b' ');
    out.extend_from_slice(ACCESS_MESSAGE.as_bytes());
    let name = |out: &mut Vec<u8>, name: &str| {
        out.push(b' ');
        style(out, "\x1b[3m");
        out.extend_from_slice(name.as_bytes());
        style(out, RESET);
        style(out, "\x1b[2m");
        out.push(b'=');
        style(out, RESET);
    };
    macro_rules! string {
        ($name:ident, $value:expr) => {
            name(out, stringify!($name));
            // Writing into a `Vec` cannot fail.
            let _ = write!(out, "{:?}", $value);
        };
    }
    for_each_string_field!(access, string);
    macro_rules! number {
        ($name:ident, $value:expr) => {
            if let Some(value) = $value {
                name(out, stringify!($name));
                integer(out, value);
            }
        };
    }
    for_each_number_field!(access, number);
    out.push(b'\n');
}

fn integer(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// RFC 8259 string escaping: `"`, `\` and control characters; everything
/// else (UTF-8 included) is copied as is, in runs. Every escaped character
/// is ASCII, so the runs between them are whole UTF-8 sequences.
fn escape_json_into(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    if !needs_escaping(bytes) {
        return out.extend_from_slice(bytes);
    }
    let mut start = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if !NEEDS_ESCAPE[usize::from(byte)] {
            continue;
        }
        out.extend_from_slice(&bytes[start..at]);
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
        }
        start = at + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Whether any byte is in [`NEEDS_ESCAPE`], eight bytes at a time: almost
/// every value logged (ids, names, paths) needs no escaping at all.
fn needs_escaping(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // High bit set for each byte of `word` below `n` (n ≤ 0x80): the classic
    // "has less than" test; a byte with its own high bit set never counts.
    let below = |word: u64, n: u64| word.wrapping_sub(ONES * n) & !word & HIGHS;
    // Controls below 0x20; `"`, `\` and DEL as the zero bytes of a XOR.
    let found = |word: u64| {
        below(word, 0x20)
            | below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            | below(word ^ (ONES * 0x7f), 1)
            != 0
    };
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let quarter = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"));
    const SPACES: u64 = ONES * b' ' as u64;
    let length = bytes.len();
    // The bytes past the last whole word are checked as one more word, made
    // of loads that may overlap bytes already checked (checking a byte twice
    // is harmless) and padded with spaces, which need no escaping: no loop
    // per byte for the values most lines carry (ids, names, paths, mostly
    // under sixteen bytes). A loop that shifted each last byte into place
    // cost ~150 instructions a logged cache hit; a table look-up per byte
    // cost ~1.3% of one (benches/README.md, "The escape check's last bytes").
    match length {
        0 => false,
        1 => found(SPACES << 8 | u64::from(bytes[0])),
        2..=3 => found(SPACES << 32 | u64::from(quarter(length - 2)) << 16 | u64::from(quarter(0))),
        4..=7 => found(u64::from(half(length - 4)) << 32 | u64::from(half(0))),
        _ => {
            let mut at = 0;
            while at + 8 <= length {
                if found(word(at)) {
                    return true;
                }
                at += 8;
            }
            at < length && found(word(length - 8))
        }
    }
}

/// `"`, `\`, the C0 controls and DEL.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table[0x7f] = true;
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// An `io::Write` the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What a `tracing_subscriber::fmt` layer writing into a [`LogSink`]
    /// makes of `emit`'s events: with [`FastAccessLines`] when `fast`, with
    /// the stock formatter alone otherwise.
    fn capture(format: LogFormat, fast: bool, emit: impl FnOnce()) -> String {
        capture_styled(format, false, fast, emit)
    }

    /// [`capture`], styled for a terminal when `ansi` (text only).
    fn capture_styled(format: LogFormat, ansi: bool, fast: bool, emit: impl FnOnce()) -> String {
        let out = Captured::default();
        let (sink, guard) = LogSink::spawn(out.clone());
        let layer = match (format, fast) {
            (_, true) => layer(format, ansi, sink, false),
            (LogFormat::Json, false) => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(LayerWriter { sink, direct: None })
                .boxed(),
            (LogFormat::Text, false) => tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(LayerWriter { sink, direct: None })
                .boxed(),
        };
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        drop(guard); // writes everything, then stops the thread
        out.text()
    }

    /// Drops the timestamp (the first JSON member / the first word).
    fn without_timestamp(format: LogFormat, line: &str) -> String {
        match format {
            LogFormat::Json => {
                let mut value: serde_json::Value = serde_json::from_str(line).expect(line);
                value.as_object_mut().unwrap().remove("timestamp");
                value.to_string()
            }
            LogFormat::Text => line.split_once(' ').unwrap().1.to_owned(),
        }
    }

    /// Every line of `text` without its timestamp.
    fn lines_without_timestamps(format: LogFormat, text: &str) -> Vec<String> {
        text.lines()
            .map(|line| without_timestamp(format, line))
            .collect()
    }

    /// Access lines as the gateway logs them: every string field with
    /// characters JSON and a terminal must not take literally, with and
    /// without an upstream status.
    fn access_line() {
        let odd = AccessLine {
            request_id: "a6ca8185-\"b4c9\"",
            method: "GET",
            path: "/api/\"odd\"\\path\n\u{1}é\u{7f}\u{1b}[2J",
            team: "design\tteam",
            upstream: "comfy\r",
            route_class: "asset_list\u{85}",
            cache: "hit",
            status: 200,
            upstream_status: Some(502),
            latency_us: 183,
        };
        odd.log();
        AccessLine {
            upstream_status: None,
            status: 401,
            latency_us: 0,
            ..odd
        }
        .log();
    }

    /// Counts the access events a subscriber dispatches to it.
    #[derive(Clone, Default)]
    struct AccessEvents(Arc<std::sync::atomic::AtomicUsize>);

    impl<S: Subscriber> Layer<S> for AccessEvents {
        fn on_event(&self, event: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            if event.metadata().target() == ACCESS_TARGET {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// The gateway's subscriber: the log layer behind its level filter,
    /// and `beside` it another layer (as the trace exporter's) or none at
    /// all (as `init` makes it without traces) → the access lines `emit`
    /// writes.
    fn through_the_log_filter(
        format: LogFormat,
        sole_access_reader: bool,
        filter: &str,
        beside: Option<AccessEvents>,
        emit: impl FnOnce(),
    ) -> String {
        let out = Captured::default();
        let (sink, guard) = LogSink::spawn(out.clone());
        let logs = tracing_subscriber::registry().with(
            layer(format, false, sink, sole_access_reader)
                .with_filter(tracing_subscriber::EnvFilter::new(filter)),
        );
        match beside {
            Some(beside) => tracing::subscriber::with_default(logs.with(beside), emit),
            None => tracing::subscriber::with_default(logs, emit),
        }
        drop(guard);
        out.text()
    }

    /// As the only reader of access lines, the log layer takes them
    /// without an event, in the lines the event would have given, and only
    /// what its filter lets through; otherwise the event reaches every layer.
    #[test]
    fn the_sole_access_reader_writes_lines_without_an_event_under_its_filter() {
        for format in [LogFormat::Json, LogFormat::Text] {
            let events = AccessEvents::default();
            let direct =
                through_the_log_filter(format, true, "info", Some(events.clone()), access_line);
            assert_eq!(events.0.load(Ordering::SeqCst), 0, "no event");
            let dispatched =
                through_the_log_filter(format, false, "info", Some(events.clone()), access_line);
            assert_eq!(events.0.load(Ordering::SeqCst), 2, "an event per line");
            assert_eq!(
                lines_without_timestamps(format, &direct).len(),
                2,
                "{direct}"
            );
            assert_eq!(
                lines_without_timestamps(format, &direct),
                lines_without_timestamps(format, &dispatched)
            );
            let stock = capture(format, false, access_line);
            assert_eq!(
                lines_without_timestamps(format, &direct),
                lines_without_timestamps(format, &stock),
                "{format:?}"
            );
            let alone = through_the_log_filter(format, true, "info", None, access_line);
            assert_eq!(
                lines_without_timestamps(format, &alone),
                lines_without_timestamps(format, &direct)
            );
            for off in ["warn", "info,teamgate::access=off"] {
                let text = through_the_log_filter(format, true, off, None, access_line);
                assert_eq!(text, "", "{off}");
            }
        }
    }

    #[test]
    fn access_lines_are_the_lines_the_stock_formatter_writes() {
        for format in [LogFormat::Json, LogFormat::Text] {
            let fast = capture(format, true, access_line);
            let stock = capture(format, false, access_line);
            assert_eq!(fast.lines().count(), 2, "{fast}");
            assert!(!fast.contains('\u{1b}'), "{fast}");
            assert_eq!(
                lines_without_timestamps(format, &fast),
                lines_without_timestamps(format, &stock),
                "{format:?}"
            );
        }
    }

    #[test]
    fn an_access_line_carries_every_field_of_the_request() {
        let line = AccessLine {
            request_id: "req-1",
            method: "GET",
            path: "/api/assets",
            team: "design",
            upstream: "comfy",
            route_class: "asset_list",
            cache: "hit",
            status: 200,
            upstream_status: None,
            latency_us: 183,
        };
        let text = capture(LogFormat::Json, true, || line.log());
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).expect(&text);
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        // None fields are left out.
        assert_eq!(
            keys,
            [
                "cache",
                "latency_us",
                "level",
                "message",
                "method",
                "path",
                "request_id",
                "route_class",
                "status",
                "target",
                "team",
                "timestamp",
                "upstream"
            ]
        );
        assert_eq!(value["request_id"], "req-1");
        assert_eq!(value["method"], "GET");
        assert_eq!(value["path"], "/api/assets");
        assert_eq!(value["team"], "design");
        assert_eq!(value["upstream"], "comfy");
        assert_eq!(value["route_class"], "asset_list");
        assert_eq!(value["cache"], "hit");
        assert_eq!(value["status"], 200);
        assert_eq!(value["latency_us"], 183);
        assert_eq!(value["message"], "served");
        assert_eq!(value["target"], ACCESS_TARGET);
        let with_upstream = capture(LogFormat::Json, true, || {
            AccessLine {
                upstream_status: Some(502),
                ..line
            }
            .log()
        });
        let value: serde_json::Value = serde_json::from_str(with_upstream.trim_end()).unwrap();
        assert_eq!(value["upstream_status"], 502);
    }

    /// Styled for a terminal, the access line's colours are the stock ones.
    #[test]
    fn styled_text_access_lines_are_the_stock_formatters() {
        let fast = capture_styled(LogFormat::Text, true, true, access_line);
        let stock = capture_styled(LogFormat::Text, true, false, access_line);
        assert_eq!(
            lines_without_timestamps(LogFormat::Text, &fast).len(),
            2,
            "{fast}"
        );
        assert!(
            fast.contains("\x1b[3mrequest_id\x1b[0m"),
            "styled: {fast:?}"
        );
        assert_eq!(
            lines_without_timestamps(LogFormat::Text, &fast),
            lines_without_timestamps(LogFormat::Text, &stock)
        );
    }

    #[test]
    fn json_access_lines_are_valid_json_with_every_field_in_order() {
        let text = capture(LogFormat::Json, true, access_line);
        let mut lines = text.lines();
        let line = lines.next().expect("two lines");
        let value: serde_json::Value = serde_json::from_str(line).expect(line);
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["message"], "served");
        assert_eq!(value["request_id"], "a6ca8185-\"b4c9\"");
        assert_eq!(value["method"], "GET");
        assert_eq!(value["path"], "/api/\"odd\"\\path\n\u{1}é\u{7f}\u{1b}[2J");
        assert_eq!(value["team"], "design\tteam");
        assert_eq!(value["upstream"], "comfy\r");
        assert_eq!(value["route_class"], "asset_list\u{85}");
        assert_eq!(value["cache"], "hit");
        assert_eq!(value["status"], 200);
        assert_eq!(value["upstream_status"], 502);
        assert_eq!(value["latency_us"], 183);
        assert_eq!(value["target"], "teamgate::access");
        assert!(!line.contains('\u{1b}'), "escaped: {line:?}");
        let order = [
            "timestamp",
            "level",
            "message",
            "request_id",
            "method",
            "path",
            "team",
            "upstream",
            "route_class",
            "cache",
            "status",
            "upstream_status",
            "latency_us",
            "target",
        ];
        let positions: Vec<usize> = order
            .iter()
            .map(|key| line.find(&format!("\"{key}\":")).unwrap())
            .collect();
        assert!(positions.is_sorted(), "field order in {line}");
        let second: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert!(
            second.get("upstream_status").is_none(),
            "a None field is left out: {second}"
        );
        let timestamp = value["timestamp"].as_str().unwrap();
        assert_eq!(
            timestamp.len(),
            "2026-11-23T13:07:39.743223Z".len(),
            "{timestamp}"
        );
        assert!(
            time::OffsetDateTime::parse(timestamp, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{timestamp}"
        );
    }

    /// Every other event, and an access-target event not from
    /// [`AccessLine::log`] (none in the gateway), goes to the stock
    /// formatter whole, whatever its fields.
    #[test]
    fn other_events_are_left_to_the_stock_formatter() {
        let emit = || {
            tracing::info!(target: "teamgate", answer = 42, "not an access line");
            tracing::warn!("neither");
            tracing::info!(target: "teamgate::access", first = 1u64, "a");
            tracing::info!(target: "teamgate::access", second = -2i64, third = "x", "b");
        };
        for format in [LogFormat::Json, LogFormat::Text] {
            let fast = lines_without_timestamps(format, &capture(format, true, emit));
            let stock = lines_without_timestamps(format, &capture(format, false, emit));
            assert_eq!(fast.len(), 4, "{fast:?}");
            assert_eq!(fast, stock, "{format:?}");
        }
    }

    #[test]
    fn the_clock_formats_each_second_once_and_micros_with_zeros() {
        let mut clock = SecondClock::default();
        let at = UNIX_EPOCH + Duration::new(1_795_440_459, 5_000);
        // Appended after what the line already holds, which stays.
        let mut written = |now| {
            let mut out = b"{\"timestamp\":\"".to_vec();
            clock.write(&mut out, now);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(written(at), "{\"timestamp\":\"2026-11-23T13:27:39.000005Z");
        assert_eq!(
            written(at + Duration::from_micros(999_990)),
            "{\"timestamp\":\"2026-11-23T13:27:39.999995Z"
        );
        assert_eq!(
            written(at + Duration::from_micros(999_990 + 61_000_000)),
            "{\"timestamp\":\"2026-11-23T13:28:40.999995Z"
        );
        assert_eq!(
            written(at + Duration::from_secs(61)),
            "{\"timestamp\":\"2026-11-23T13:28:40.000005Z",
            "the second's text is the date and time only: last call's digits are not kept"
        );
    }

    /// Four threads over two shards: two threads to a shard.
    #[test]
    fn the_sink_keeps_line_order_across_threads_and_writes_everything_on_drop() {
        let out = Captured::default();
        let (sink, guard) = LogSink::spawn_with(out.clone(), MAX_BUFFERED_BYTES, 2);
        let writers: Vec<_> = (0..4)
            .map(|thread| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for n in 0..2000 {
                        sink.append(format!("{thread} {n}\n").as_bytes());
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        drop(guard);
        let text = out.text();
        assert_eq!(text.lines().count(), 8000);
        for thread in 0..4 {
            let numbers: Vec<u32> = text
                .lines()
                .filter_map(|line| line.split_once(' '))
                .filter(|(from, _)| *from == thread.to_string())
                .map(|(_, n)| n.parse().unwrap())
                .collect();
            assert_eq!(numbers, (0..2000).collect::<Vec<_>>(), "thread {thread}");
        }
    }

    /// The writer goes idle when every shard is empty and the next line
    /// wakes it: a line appended at any moment of that hand-over is written
    /// without waiting for the guard. Each round appends one line (from one
    /// of two threads, so from either shard) at another point of the
    /// writer's cycle and waits until it is out. A lost wake-up would leave a
    /// line unwritten: the round would never end, and the test fails. (The
    /// narrowest window, between the writer's last empty pass and raising
    /// its idle flag, is closed by its look after raising it, in `drain`;
    /// this test cannot aim at that window reliably.)
    #[test]
    fn a_line_appended_while_the_writer_goes_idle_is_written_without_the_guard() {
        let out = Captured::default();
        let (sink, _guard) = LogSink::spawn_with(out.clone(), MAX_BUFFERED_BYTES, 2);
        for round in 0..200 {
            let line = format!("round {round}\n");
            std::thread::scope(|threads| {
                if round % 2 == 0 {
                    threads.spawn(|| sink.append(line.as_bytes()));
                } else {
                    sink.append(line.as_bytes());
                }
            });
            let mut waited = 0;
            while !out.text().contains(&line) {
                assert!(waited < 10_000, "{line:?} never written");
                std::thread::sleep(Duration::from_millis(1));
                waited += 1;
            }
            // The next line lands somewhere else in the writer's cycle
            // (writing, sleeping out the window, looking, going idle, idle):
            // 0 to 1.4 windows after the last one was written.
            let thousandths = (round * 397) % 1_400;
            std::thread::sleep(BATCH_WINDOW * thousandths / 1_000);
        }
    }

    /// A writer that blocks until the test lets it go: stderr into a pipe nobody reads.
    struct Stuck {
        release: Arc<(Mutex<bool>, Condvar)>,
        out: Captured,
    }

    impl Write for Stuck {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let (released, wake) = &*self.release;
            let mut released = released.lock().unwrap();
            while !*released {
                released = wake.wait(released).unwrap();
            }
            self.out.write(bytes)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_drops_lines_and_says_how_many_instead_of_blocking() {
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let out = Captured::default();
        let (sink, guard) = LogSink::spawn_with(
            Stuck {
                release: Arc::clone(&release),
                out: out.clone(),
            },
            100,
            1,
        );
        sink.append(b"first line taken by the writer, which then blocks\n");
        // Wait until the writer has taken the first line and is stuck writing it.
        while sink.shared.has_pending() {
            std::thread::yield_now();
        }
        for n in 0..50 {
            sink.append(format!("line {n:02}\n").as_bytes()); // 8 bytes each: 12 fit
        }
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        drop(guard);
        let text = out.text();
        assert!(
            text.contains("line 11\n") && !text.contains("line 12\n"),
            "{text}"
        );
        assert!(text.contains("teamgate: 38 log line(s) dropped"), "{text}");
    }

    #[test]
    fn the_word_at_a_time_check_agrees_with_the_table_for_every_byte_at_every_position() {
        // Every length up to 20: whole words, and a last part of 0–7 bytes.
        for byte in 0..=255u8 {
            for length in 1..=20 {
                for position in 0..length {
                    let mut bytes = vec![b'a'; length];
                    bytes[position] = byte;
                    assert_eq!(
                        needs_escaping(&bytes),
                        NEEDS_ESCAPE[usize::from(byte)],
                        "byte {byte:#04x} at {position} of {length}"
                    );
                }
            }
        }
        assert!(!needs_escaping(b""));
        // Neighbours whose borrows could spill into each other.
        assert!(!needs_escaping(&[
            0x20, 0x80, 0xff, 0x21, 0x23, 0x5b, 0x5d, 0x7e, 0x80
        ]));
        assert!(!needs_escaping(&[
            0xa2, 0xdc, 0xff, 0x80, 0xa0, 0x9f, 0xe2, 0xfe
        ]));
        assert!(needs_escaping(&[
            0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x1f
        ]));
        assert!(needs_escaping(&[
            0x00, 0x01, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80
        ]));
    }

    #[test]
    fn json_escaping_covers_quotes_backslashes_and_control_characters() {
        let mut out = b"kept ".to_vec();
        escape_json_into(&mut out, "a\"b\\c\u{0}\u{1f}\u{7f}\té");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "kept a\\\"b\\\\c\\u0000\\u001f\\u007f\\té"
        );
    }
}

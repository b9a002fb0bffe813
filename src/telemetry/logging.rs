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
//! Its event formatter, `FastAccessLines`, writes `teamgate::access` events
//! (one per request, [`AccessLine`]) itself — JSON or text, in the same
//! shape the general formatter gives every other line — with a per-second
//! cached timestamp, field names prepared once per callsite and no
//! intermediate values, and appends them to the sink directly; every other
//! event goes to the general formatter. The access line
//! stays an ordinary `tracing` event under the one log filter:
//! `RUST_LOG=teamgate::access=off` turns it off, and any other subscriber
//! (tests, an embedding program) sees it like any other.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use super::shards::{self, Sharded, lock};
use crate::config::LogFormat;

/// The target of the per-request access-log event.
pub const ACCESS_TARGET: &str = "teamgate::access";

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

impl AccessLine<'_> {
    pub fn log(&self) {
        tracing::info!(
            target: ACCESS_TARGET,
            // A `&str`, not format arguments: formatters take it by
            // `record_str`, without a pass through `core::fmt`, and write the
            // same line.
            message = "served",
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
        );
    }
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

/// `tracing_subscriber::fmt` writes each event with one `write_all` of the
/// whole line, so a line is appended in one piece.
impl<'a> MakeWriter<'a> for LogSink {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> SinkWriter<'a> {
        SinkWriter(self)
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
/// `FastAccessLines`. `ansi`: colour the text format.
pub fn layer<S>(format: LogFormat, ansi: bool, sink: LogSink) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(sink.clone())
            .with_ansi(ansi)
            .map_event_format(|general| FastAccessLines::new(general, format, sink))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(sink.clone())
            .map_event_format(|general| FastAccessLines::new(general, format, sink))
            .boxed(),
    }
}

/// An event formatter: `teamgate::access` events are formatted here and
/// appended to `sink` directly (the fmt layer's writer, given the same sink,
/// then has nothing to write), everything else by `general` (the stock text
/// or JSON format).
#[derive(Debug)]
struct FastAccessLines<F> {
    general: F,
    format: LogFormat,
    sink: LogSink,
}

impl<F> FastAccessLines<F> {
    fn new(general: F, format: LogFormat, sink: LogSink) -> Self {
        FastAccessLines {
            general,
            format,
            sink,
        }
    }
}

/// Whether an event is the per-request access line.
fn is_access_event(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.target() == ACCESS_TARGET
}

/// What an access line is formatted with, one per thread.
#[derive(Default)]
struct Scratch {
    clock: SecondClock,
    keys: JsonKeys,
    /// The line being formatted (plain `String` pushes inline; the fmt
    /// layer's `Writer` is a `dyn`).
    line: String,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        line: String::with_capacity(512),
        ..Scratch::default()
    });
}

/// The `,"name":` in front of each field of one callsite, escaped once:
/// every access line comes from the same callsite, so its field names are
/// written as prepared bytes instead of being checked and quoted per line.
#[derive(Default)]
struct JsonKeys {
    callsite: Option<tracing::callsite::Identifier>,
    /// By field index.
    keys: Vec<String>,
}

impl JsonKeys {
    fn for_event(&mut self, metadata: &tracing::Metadata<'_>) -> &[String] {
        let callsite = metadata.callsite();
        if self.callsite.as_ref() != Some(&callsite) {
            self.keys.clear();
            for field in metadata.fields() {
                let mut key = String::from(",");
                // Writing into a `String` cannot fail.
                let _ = json_string(&mut key, field.name());
                key.push(':');
                self.keys.push(key);
            }
            self.callsite = Some(callsite);
        }
        &self.keys
    }
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
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if !is_access_event(event.metadata()) {
            return self.general.format_event(context, writer, event);
        }
        let now = SystemTime::now();
        SCRATCH.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                // Only if formatting a field logged an access event itself.
                return self.general.format_event(context, writer.by_ref(), event);
            };
            let Scratch { clock, keys, line } = &mut *scratch;
            line.clear();
            match self.format {
                LogFormat::Json => {
                    let keys = keys.for_event(event.metadata());
                    format_json(line, clock, keys, now, event)?;
                }
                LogFormat::Text => {
                    let style = Style {
                        ansi: writer.has_ansi_escapes(),
                        sanitize: writer.sanitizes_ansi_escapes(),
                    };
                    format_text(line, clock, now, event, style)?;
                }
            }
            self.sink.append(line.as_bytes());
            Ok(())
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SS` for the current second, formatted once per second.
#[derive(Default)]
struct SecondClock {
    second: u64,
    text: String,
}

impl SecondClock {
    /// Writes `2026-11-23T13:07:39.743223Z`, the shape `tracing_subscriber`'s timer writes.
    fn write(&mut self, out: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since_epoch.as_secs();
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text.clear();
            let at = i64::try_from(second)
                .ok()
                .and_then(|second| time::OffsetDateTime::from_unix_timestamp(second).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            write!(
                self.text,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second()
            )?;
        }
        out.write_str(&self.text)?;
        let mut digits = *b".000000Z";
        let mut micros = since_epoch.subsec_micros();
        for slot in digits[1..7].iter_mut().rev() {
            *slot = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
    }
}

/// `{"timestamp":…,"level":…,<fields in order>,"target":…}` — the flattened
/// JSON `tracing_subscriber::fmt().json().flatten_event(true)` writes.
/// `keys`: [`JsonKeys::for_event`] of `event`.
fn format_json(
    out: &mut impl fmt::Write,
    clock: &mut SecondClock,
    keys: &[String],
    now: SystemTime,
    event: &Event<'_>,
) -> fmt::Result {
    out.write_str("{\"timestamp\":\"")?;
    clock.write(out, now)?;
    out.write_str("\",\"level\":\"")?;
    out.write_str(event.metadata().level().as_str())?;
    out.write_char('"')?;
    let mut fields = JsonFields {
        out,
        keys,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    out.write_str(",\"target\":")?;
    json_string(out, event.metadata().target())?;
    out.write_str("}\n")
}

/// Writes each field as `,"name":value`; the first error is kept.
struct JsonFields<'a, W> {
    out: &'a mut W,
    /// `,"name":` by field index.
    keys: &'a [String],
    result: fmt::Result,
}

impl<W: fmt::Write> JsonFields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            match self.keys.get(field.index()) {
                Some(key) => self.out.write_str(key)?,
                None => {
                    self.out.write_char(',')?;
                    json_string(self.out, field.name())?;
                    self.out.write_char(':')?;
                }
            }
            value(self.out)
        })();
    }
}

impl<W: fmt::Write> Visit for JsonFields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| json_string(out, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| integer(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| integer(out, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(JsonEscaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `2026-11-23T13:07:39.743223Z  INFO teamgate::access: served a=1 b="x"` —
/// the default `tracing_subscriber::fmt` line (strings quoted, `%` values bare).
fn format_text(
    out: &mut impl fmt::Write,
    clock: &mut SecondClock,
    now: SystemTime,
    event: &Event<'_>,
    style: Style,
) -> fmt::Result {
    let metadata = event.metadata();
    style.dim(out, |out| clock.write(out, now))?;
    out.write_char(' ')?;
    let level = metadata.level().as_str();
    let color = match *metadata.level() {
        Level::ERROR => "\x1b[31m",
        Level::WARN => "\x1b[33m",
        Level::INFO => "\x1b[32m",
        Level::DEBUG => "\x1b[34m",
        Level::TRACE => "\x1b[35m",
    };
    style.paint(out, color, |out| write!(out, "{level:>5}"))?;
    out.write_char(' ')?;
    style.dim(out, |out| {
        out.write_str(metadata.target())?;
        out.write_char(':')
    })?;
    let mut fields = TextFields {
        out,
        style,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    out.write_char('\n')
}

/// ANSI styling when the output is a terminal, nothing otherwise; and
/// whether the message is made terminal-safe, as the stock formatter does.
#[derive(Clone, Copy)]
struct Style {
    ansi: bool,
    sanitize: bool,
}

impl Style {
    fn paint<W: fmt::Write>(
        self,
        out: &mut W,
        code: &str,
        text: impl FnOnce(&mut W) -> fmt::Result,
    ) -> fmt::Result {
        if self.ansi {
            out.write_str(code)?;
        }
        text(out)?;
        if self.ansi {
            out.write_str("\x1b[0m")?;
        }
        Ok(())
    }

    fn dim<W: fmt::Write>(
        self,
        out: &mut W,
        text: impl FnOnce(&mut W) -> fmt::Result,
    ) -> fmt::Result {
        self.paint(out, "\x1b[2m", text)
    }
}

/// Writes ` message` and ` name=value` (strings quoted); the first error is kept.
struct TextFields<'a, W> {
    out: &'a mut W,
    style: Style,
    result: fmt::Result,
}

impl<W: fmt::Write> TextFields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let style = self.style;
        self.result = (|| {
            self.out.write_char(' ')?;
            if field.name() != "message" {
                style.paint(self.out, "\x1b[3m", |out| out.write_str(field.name()))?;
                self.out.write_char('=')?;
            }
            value(self.out)
        })();
    }
}

impl<W: fmt::Write> Visit for TextFields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.field(field, |out| write!(out, "{value:?}"));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| integer(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| integer(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" && self.style.sanitize {
            self.field(field, |out| write!(TerminalSafe(out), "{value:?}"));
        } else {
            self.field(field, |out| write!(out, "{value:?}"));
        }
    }
}

/// `fmt::Write` adaptor that spells out the characters a terminal would act
/// on (ESC, BEL, BS, FF, DEL, the C1 controls), like the stock formatter
/// does for messages: a logged value cannot restyle or rewrite the terminal.
struct TerminalSafe<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for TerminalSafe<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for ch in text.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", u32::from(ch))?,
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

/// `fmt::Write` adaptor that JSON-escapes what is written through it (no quotes).
struct JsonEscaped<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for JsonEscaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        escape_json_into(self.0, text)
    }
}

fn integer(out: &mut impl fmt::Write, value: impl itoa::Integer) -> fmt::Result {
    out.write_str(itoa::Buffer::new().format(value))
}

fn json_string(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    out.write_char('"')?;
    escape_json_into(out, text)?;
    out.write_char('"')
}

/// RFC 8259 string escaping: `"`, `\` and control characters; everything
/// else (UTF-8 included) is copied as is, in runs. Every escaped character
/// is ASCII, so the runs between them are whole UTF-8 sequences.
fn escape_json_into(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    if !needs_escaping(text.as_bytes()) {
        return out.write_str(text);
    }
    let mut start = 0;
    for (at, byte) in text.bytes().enumerate() {
        if !NEEDS_ESCAPE[usize::from(byte)] {
            continue;
        }
        out.write_str(&text[start..at])?;
        match byte {
            b'"' => out.write_str("\\\"")?,
            b'\\' => out.write_str("\\\\")?,
            b'\n' => out.write_str("\\n")?,
            b'\r' => out.write_str("\\r")?,
            b'\t' => out.write_str("\\t")?,
            _ => {
                out.write_str("\\u00")?;
                out.write_char(char::from(HEX[usize::from(byte >> 4)]))?;
                out.write_char(char::from(HEX[usize::from(byte & 0xf)]))?;
            }
        }
        start = at + 1;
    }
    out.write_str(&text[start..])
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
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        if found(u64::from_le_bytes(chunk.try_into().expect("8 bytes"))) {
            return true;
        }
    }
    // The last 0–7 bytes as one more word, padded with spaces (which need
    // no escaping), not a table look-up per byte: most values are short,
    // and in the running gateway the per-byte look-ups cost ~1.3% of a
    // logged cache hit, though a hot loop over one line says they are
    // faster (benches/README.md, "The escape check's last bytes").
    let mut last = ONES * u64::from(b' ');
    for (at, &byte) in chunks.remainder().iter().enumerate() {
        let shift = 8 * at;
        last = (last & !(0xff << shift)) | (u64::from(byte) << shift);
    }
    found(last)
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
        let out = Captured::default();
        let (sink, guard) = LogSink::spawn(out.clone());
        let layer = match (format, fast) {
            (_, true) => layer(format, false, sink),
            (LogFormat::Json, false) => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(sink)
                .boxed(),
            (LogFormat::Text, false) => tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(sink)
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

    fn access_line() {
        let upstream_status: Option<u16> = Some(200);
        tracing::info!(
            target: "teamgate::access",
            request_id = "a6ca8185-b4c9",
            method = %http::Method::GET,
            path = "/api/\"odd\"\\path\n\u{1}é",
            team = "design",
            status = 200u16,
            upstream_status,
            missing = Option::<u16>::None,
            negative = -3i64,
            ok = true,
            "served"
        );
        // Terminal control characters in a message and in a field.
        tracing::info!(
            target: "teamgate::access",
            path = "/x\u{1b}[2J",
            "odd \u{1b}[31m message\u{7}\u{85}"
        );
    }

    #[test]
    fn access_lines_are_the_lines_the_stock_formatter_writes() {
        for format in [LogFormat::Json, LogFormat::Text] {
            let fast = capture(format, true, access_line);
            let stock = capture(format, false, access_line);
            assert_eq!(fast.lines().count(), 2, "{fast}");
            assert!(!fast.contains('\u{1b}'), "{fast}");
            let strip = |text: &str| -> Vec<String> {
                text.lines()
                    .map(|line| without_timestamp(format, line))
                    .collect()
            };
            assert_eq!(strip(&fast), strip(&stock), "{format:?}");
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

    /// Field names are prepared per callsite: lines from callsites taking
    /// turns on one thread each get their own names.
    #[test]
    fn field_names_follow_the_callsite_when_access_lines_alternate() {
        let text = capture(LogFormat::Json, true, || {
            for round in 0..2u64 {
                tracing::info!(target: "teamgate::access", first = round, "a");
                tracing::info!(target: "teamgate::access", second = round, third = "x", "b");
            }
        });
        let fields: Vec<Vec<String>> = text
            .lines()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).expect(line);
                value
                    .as_object()
                    .unwrap()
                    .keys()
                    .filter(|key| {
                        !["timestamp", "level", "message", "target"].contains(&key.as_str())
                    })
                    .cloned()
                    .collect()
            })
            .collect();
        assert_eq!(
            fields,
            [
                vec!["first"],
                vec!["second", "third"],
                vec!["first"],
                vec!["second", "third"]
            ]
        );
    }

    #[test]
    fn json_access_lines_are_valid_json_with_every_field_in_order() {
        let text = capture(LogFormat::Json, true, access_line);
        let line = text.lines().next().expect("one line");
        let value: serde_json::Value = serde_json::from_str(line).expect(line);
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["message"], "served");
        assert_eq!(value["method"], "GET");
        assert_eq!(value["path"], "/api/\"odd\"\\path\n\u{1}é");
        assert_eq!(value["status"], 200);
        assert_eq!(value["upstream_status"], 200);
        assert_eq!(value["negative"], -3);
        assert_eq!(value["ok"], true);
        assert_eq!(value["target"], "teamgate::access");
        assert!(value.get("missing").is_none(), "None fields are left out");
        let positions: Vec<usize> = ["timestamp", "level", "message", "request_id", "target"]
            .iter()
            .map(|key| line.find(&format!("\"{key}\":")).unwrap())
            .collect();
        assert!(positions.is_sorted(), "field order in {line}");
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

    #[test]
    fn other_events_are_left_to_the_stock_formatter() {
        let emit = || {
            tracing::info!(target: "teamgate", answer = 42, "not an access line");
            tracing::warn!("neither");
        };
        for format in [LogFormat::Json, LogFormat::Text] {
            let fast = capture(format, true, emit);
            let stock = capture(format, false, emit);
            let strip = |text: &str| -> Vec<String> {
                text.lines()
                    .map(|line| without_timestamp(format, line))
                    .collect()
            };
            assert_eq!(strip(&fast).len(), 2, "{fast}");
            assert_eq!(strip(&fast), strip(&stock));
        }
    }

    #[test]
    fn the_clock_formats_each_second_once_and_micros_with_zeros() {
        let mut clock = SecondClock::default();
        let at = UNIX_EPOCH + Duration::new(1_795_440_459, 5_000);
        let mut written = |now| {
            let mut out = String::new();
            clock.write(&mut out, now).unwrap();
            out
        };
        assert_eq!(written(at), "2026-11-23T13:27:39.000005Z");
        assert_eq!(
            written(at + Duration::from_micros(999_990)),
            "2026-11-23T13:27:39.999995Z"
        );
        assert_eq!(
            written(at + Duration::from_secs(61)),
            "2026-11-23T13:28:40.000005Z"
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
        let mut out = String::new();
        escape_json_into(&mut out, "a\"b\\c\u{0}\u{1f}\u{7f}\té").unwrap();
        assert_eq!(out, "a\\\"b\\\\c\\u0000\\u001f\\u007f\\té");
    }
}

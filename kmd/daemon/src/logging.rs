//! Logging: `tracing` to standard error in one of three formats (`[log] format`).
//!
//! - `journald`: each line starts with the syslog priority in angle brackets (`<3>` error,
//!   `<4>` warning, `<6>` info, `<7>` debug/trace), then the target and the message with its
//!   fields; no timestamp and no colours. systemd connects a service's stderr to the journal
//!   and, with `SyslogLevelPrefix=yes` (its default), turns the prefix into the entry's priority,
//!   so `journalctl -p warning -u kmd` works. The default when `JOURNAL_STREAM` is set.
//! - `text`: timestamped human-readable lines (colours only on a terminal). The default
//!   otherwise.
//! - `json`: one JSON object per line, for log shippers.
//!
//! Why not the native journal protocol (`tracing-journald`)? It would add a dependency and a
//! second output path that behaves differently when the journal socket is missing (containers,
//! tests, early boot) and drops entries while journald restarts; stderr with priority prefixes
//! is what systemd documents for services, works identically everywhere, and loses only the
//! custom journal fields (the fields still appear in the message text).
//!
//! Key material and PINs are never logged: key bytes live in types whose `Debug` output omits
//! them (`DeviceKeyBlock`, `KeyMaterial`, `Zeroizing` buffers are never formatted), and the HSM
//! configuration only ever holds the PIN's *source* (a path or a variable name).

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogConfig, LogFormat};

/// The format to use: the configured one, else journald under systemd, else text.
pub fn effective_format(config: &LogConfig) -> LogFormat {
    config.format.unwrap_or_else(|| {
        if std::env::var_os("JOURNAL_STREAM").is_some() { LogFormat::Journald } else { LogFormat::Text }
    })
}

/// Installs the global subscriber. `level_override` (from the command line) replaces
/// `[log] level`.
pub fn init(config: &LogConfig, level_override: Option<&str>) -> Result<LogFormat, String> {
    let level = level_override.unwrap_or(&config.level);
    // The key pool's SQL statements (sqlx logs each at debug) are kept out of kmd's debug logs
    // unless the filter names `sqlx` itself.
    let directives = if level.contains("sqlx") { level.to_owned() } else { format!("{level},sqlx=warn") };
    let filter = EnvFilter::try_new(&directives).map_err(|e| format!("invalid log level {level:?}: {e}"))?;
    let format = effective_format(config);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Journald => builder
            .with_ansi(false)
            .event_format(JournaldFormat(tracing_subscriber::fmt::format().without_time().with_level(false)))
            .try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(format)
}

/// The syslog priority of a level (sd-daemon(3)).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// `<N>` + the default full format without time and level.
struct JournaldFormat(Format<tracing_subscriber::fmt::format::Full, ()>);

impl<S, N> FormatEvent<S, N> for JournaldFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

//! Logging setup: `tracing` to stderr as text or JSON; the filter comes from `RUST_LOG` when it is
//! set, else from `[log] filter`. Access-log events use the target `gatehouse::access`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Returns an error for a filter that does not parse. Lines are
/// written by a background thread through a bounded buffer that drops lines when full, so a
/// slow or stalled log consumer can never block a request. Keep the guard until exit: dropping
/// it flushes what is buffered.
pub fn init(cfg: &LogConfig) -> Result<tracing_appender::non_blocking::WorkerGuard, String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(cfg.filter.get_ref()).map_err(|e| format!("[log] filter: {e}"))?,
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(guard)
}

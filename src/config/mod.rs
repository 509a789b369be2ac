//! Configuration: serde types, loading `gateway.toml` plus every `routes/*.toml`, `${VAR}`
//! expansion, and errors located as `file:line:col`. Semantic checks that need the whole picture
//! (unknown services, route conflicts) run in `gateway::compile`, which reports them the same way.

mod aggregate;
mod auth;
mod broker;
mod cache;
mod defaults;
mod grpc;
mod names;
mod plugins;
mod rate_limit;
mod route;
mod server;
mod service;
pub(crate) mod source;
mod units;
mod view;
pub(crate) mod watch;

use std::path::{Path, PathBuf};

pub(crate) use aggregate::*;
pub(crate) use auth::*;
pub(crate) use broker::*;
pub(crate) use cache::*;
pub(crate) use grpc::*;
pub(crate) use plugins::*;
pub(crate) use rate_limit::*;
pub(crate) use route::*;
pub(crate) use server::*;
pub(crate) use service::*;
pub(crate) use source::SourceFile;
pub use source::{ConfigError, ConfigErrors};
#[cfg(test)]
pub(crate) use units::{Duration, Size};
pub(crate) use view::{mask_userinfo, ConfigView};

/// Everything one load read from disk: gateway.toml and the route files, with their text so that
/// later checks can point into them.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// Whether gateway.toml parsed; when it did not, defaults stand in for it.
    pub(crate) gateway_ok: bool,
    /// The folder of gateway.toml; relative paths in it are relative to this.
    pub(crate) root: PathBuf,
    pub(crate) gateway_file: SourceFile,
    pub gateway: GatewayConfig,
    pub(crate) frontends: Vec<(SourceFile, FrontendFile)>,
}

impl LoadedConfig {
    /// A path from gateway.toml, made absolute against its folder.
    pub(crate) fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        }
    }

    pub(crate) fn routes_dir(&self) -> PathBuf {
        self.resolve(&self.gateway.routes.dir)
    }
}

/// Reads gateway.toml and every `*.toml` in its routes folder. Each file is parsed even when an
/// earlier one failed, so one run reports the mistakes of all of them.
pub fn load(config_path: &Path) -> Result<LoadedConfig, ConfigErrors> {
    let (loaded, errors) = load_partial(config_path);
    errors.into_result(loaded)
}

/// Like `load`, but also returns what did parse, so that later checks can report their errors
/// in the same run. `gateway_ok` is false when gateway.toml itself did not parse.
pub(crate) fn load_partial(config_path: &Path) -> (LoadedConfig, ConfigErrors) {
    let root = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut errors = ConfigErrors::default();
    let mut gateway_ok = true;
    let (gateway_file, gateway) = match source::parse_file::<GatewayConfig>(config_path) {
        Ok(v) => v,
        Err(e) => {
            gateway_ok = false;
            errors.0.extend(e.0);
            // Still read the route files, with default settings, to report their errors too.
            let text: std::sync::Arc<str> = std::sync::Arc::from("");
            let file = SourceFile {
                path: std::sync::Arc::from(config_path),
                text,
            };
            (file, GatewayConfig::default())
        }
    };
    let dir = if gateway.routes.dir.is_absolute() {
        gateway.routes.dir.clone()
    } else {
        root.join(&gateway.routes.dir)
    };
    let mut frontends = Vec::new();
    match route_files(&dir) {
        Ok(files) => {
            for path in files {
                match source::parse_file::<FrontendFile>(&path) {
                    Ok(v) => frontends.push(v),
                    Err(e) => errors.0.extend(e.0),
                }
            }
        }
        Err(e) => errors.push(ConfigError::file(
            config_path,
            format!("[routes] dir {}: cannot read: {e}", dir.display()),
        )),
    }
    let loaded = LoadedConfig {
        gateway_ok,
        root,
        gateway_file,
        gateway,
        frontends,
    };
    (loaded, errors)
}

/// The `*.toml` files of the routes folder, sorted by name so that loads are reproducible.
pub(crate) fn route_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

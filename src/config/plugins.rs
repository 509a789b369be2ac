//! `[plugins]` (where Lua plugins are and what each call may spend) and the `plugins` /
//! `plugin_config` keys of frontends and routes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::defaults::*;
use super::units::{nonzero_size, Duration, Size};

/// `[plugins]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PluginsConfig {
    /// The folder of `NAME.lua` files (relative to gateway.toml's folder).
    #[serde(default = "default_plugins_dir")]
    pub(crate) dir: PathBuf,
    /// The memory one worker's Lua VM may hold.
    #[serde(default = "d_16mib", deserialize_with = "nonzero_size")]
    pub(crate) memory_limit: Size,
    /// The time one call of a phase function may take.
    #[serde(default = "d_5ms")]
    pub(crate) time_budget: Duration,
    /// Request bodies up to this are given to plugins that ask for them (`read_body = true`).
    #[serde(default = "d_64kib", deserialize_with = "nonzero_size")]
    pub(crate) max_body: Size,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: default_plugins_dir(),
            memory_limit: d_16mib(),
            time_budget: d_5ms(),
            max_body: d_64kib(),
        }
    }
}

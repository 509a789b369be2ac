//! Default values of config keys (serde's `default = "…"` functions).

use std::net::SocketAddr;
use std::path::PathBuf;

use toml::Spanned;

use super::server::OneOrMany;
use super::units::{Duration, Size};

pub(super) fn default_listen() -> OneOrMany<SocketAddr> {
    OneOrMany::One(SocketAddr::from(([0, 0, 0, 0], 8080)))
}
pub(super) fn default_admin_listen() -> Spanned<SocketAddr> {
    Spanned::new(0..0, SocketAddr::from(([127, 0, 0, 1], 9901)))
}
pub(super) fn default_routes_dir() -> PathBuf {
    PathBuf::from("routes")
}
pub(super) fn default_plugins_dir() -> PathBuf {
    PathBuf::from("plugins")
}
pub(super) fn default_filter() -> Spanned<String> {
    Spanned::new(0..0, "info".to_owned())
}
pub(super) fn default_max_body() -> Size {
    Size(8 * 1024 * 1024)
}
pub(super) fn default_pool_max_idle() -> usize {
    1024
}
pub(super) fn default_status() -> u16 {
    200
}
pub(super) fn yes() -> bool {
    true
}
pub(super) fn default_health_path() -> String {
    "/health".to_owned()
}
pub(super) fn two() -> u32 {
    2
}
pub(super) fn three() -> u32 {
    3
}
pub(super) fn five() -> u32 {
    5
}
pub(super) fn d_2s() -> Duration {
    Duration::from_secs(2)
}

pub(super) fn d_5s() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn d_300s() -> Duration {
    Duration::from_secs(300)
}
pub(super) fn d_600s() -> Duration {
    Duration::from_secs(600)
}
pub(super) fn default_retry_on() -> Vec<String> {
    ["connect-failure", "reset", "timeout", "502", "503", "504"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
pub(super) fn one() -> u32 {
    1
}
pub(super) fn ten() -> u32 {
    10
}
pub(super) fn twenty() -> u32 {
    20
}
pub(super) fn half() -> f64 {
    0.5
}
pub(super) fn d_5ms() -> Duration {
    Duration::from_millis(5)
}
pub(super) fn d_25ms() -> Duration {
    Duration::from_millis(25)
}
pub(super) fn d_100ms() -> Duration {
    Duration::from_millis(100)
}
pub(super) fn d_250ms() -> Duration {
    Duration::from_millis(250)
}
pub(super) fn d_60s() -> Duration {
    Duration::from_secs(60)
}
pub(super) fn d_16mib() -> Size {
    Size(16 << 20)
}
pub(super) fn d_64kib() -> Size {
    Size(64 * 1024)
}
pub(super) fn d_1s() -> Duration {
    Duration::from_secs(1)
}
pub(super) fn d_10s() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn d_30s() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn d_75s() -> Duration {
    Duration::from_secs(75)
}
pub(super) fn d_90s() -> Duration {
    Duration::from_secs(90)
}
pub(super) fn d_8kib() -> Size {
    Size(8 * 1024)
}
pub(super) fn d_32kib() -> Size {
    Size(32 * 1024)
}
pub(super) fn hundred() -> usize {
    100
}
pub(super) fn default_upgrades() -> Vec<Spanned<String>> {
    vec![Spanned::new(0..0, "websocket".to_owned())]
}

pub(super) fn sixteen() -> usize {
    16
}

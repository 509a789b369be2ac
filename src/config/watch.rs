//! Watches gateway.toml's folder, the routes folder, the `[protos]` folders and the plugins
//! folder and reports, debounced, that a `.toml` file, a `.proto` file, a descriptor set or a
//! `.lua` plugin changed. The reload loop owns the watcher; dropping it stops the watch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// A running watch; it stops when dropped.
pub(crate) struct ConfigWatch {
    _watcher: notify::RecommendedWatcher,
    changes: mpsc::Receiver<()>,
}

impl ConfigWatch {
    /// Waits for the next (debounced) change. Returns false once the watch has ended.
    pub(crate) async fn changed(&mut self) -> bool {
        self.changes.recv().await.is_some()
    }
}

/// Starts watching `dirs` (not recursively). Editors that save by rename are seen too, because
/// the folders are watched, not the files.
pub(crate) fn watch(dirs: &[PathBuf], debounce: Duration) -> notify::Result<ConfigWatch> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let relevant = !ev.kind.is_access()
                && ev.paths.iter().any(|p| {
                    p.extension().is_some_and(|e| {
                        e == "toml"
                            || e == "proto"
                            || e == "binpb"
                            || e == "pb"
                            || e == "desc"
                            || e == "lua"
                    })
                });
            if relevant {
                let _ = raw_tx.send(());
            }
        }
    })?;
    for dir in dirs {
        watcher.watch(dir_or_dot(dir), RecursiveMode::NonRecursive)?;
    }
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Debounce: wait until the burst of events (an editor writes several) is over.
            loop {
                match tokio::time::timeout(debounce, raw_rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(ConfigWatch {
        _watcher: watcher,
        changes: rx,
    })
}

fn dir_or_dot(p: &Path) -> &Path {
    if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    }
}

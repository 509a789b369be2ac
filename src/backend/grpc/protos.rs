//! `[protos]`: the services' `.proto` files, compiled when the config is loaded with `protox`
//! (a protobuf compiler in Rust: no `protoc`, no code generation), or descriptor sets compiled
//! elsewhere. The result is one `prost_reflect::DescriptorPool` per snapshot, from which `grpc`
//! routes take their methods and messages. Compiled on every load, so an edited `.proto` is
//! picked up by a reload like any config file.
//!
//! `google/api/annotations.proto`, `google/api/http.proto` and `google/rpc/status.proto` are
//! built in (when the include folders do not have them), so protos with `google.api.http`
//! rules compile without a copy of googleapis; the well-known types come with protox.

use std::path::{Path, PathBuf};

use miette::Diagnostic;
use prost::Message;
use prost_reflect::prost_types::FileDescriptorSet;
use prost_reflect::DescriptorPool;
use protox::file::{
    ChainFileResolver, DescriptorSetFileResolver, File, FileResolver, GoogleFileResolver,
    IncludeFileResolver,
};

use crate::config::{ConfigError, ConfigErrors, LoadedConfig};

const BUILT_IN: [(&str, &str); 3] = [
    ("google/api/http.proto", include_str!("google/http.proto")),
    (
        "google/api/annotations.proto",
        include_str!("google/annotations.proto"),
    ),
    (
        "google/rpc/status.proto",
        include_str!("google/status.proto"),
    ),
];

/// The built-in googleapis files.
struct BuiltIn;

impl FileResolver for BuiltIn {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match BUILT_IN.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => File::from_source(n, text),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// The folders `[protos]` reads at start (its include folders, and the folders of its files
/// and descriptor sets), for the file watch. Changes of the list itself apply after a restart;
/// an edit of a file in these folders reloads.
pub(crate) fn proto_dirs(loaded: &LoadedConfig) -> Vec<PathBuf> {
    let Some(cfg) = loaded.gateway.protos.as_ref() else {
        return Vec::new();
    };
    let p = cfg.get_ref();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let files = p.files.iter().chain(&p.descriptor_sets).filter_map(|f| {
        loaded
            .resolve(Path::new(f.get_ref()))
            .parent()
            .map(Path::to_path_buf)
    });
    let includes = p
        .include
        .iter()
        .map(|i| loaded.resolve(Path::new(i.get_ref())));
    for d in includes.chain(files) {
        if d.is_dir() && !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// Compiles `[protos]`; `None` (with the errors recorded) when it does not compile, or when
/// there is no `[protos]`.
pub(crate) fn compile(loaded: &LoadedConfig, errors: &mut ConfigErrors) -> Option<DescriptorPool> {
    let cfg = loaded.gateway.protos.as_ref()?;
    let gfile = &loaded.gateway_file;
    let protos = cfg.get_ref();
    if protos.files.is_empty() && protos.descriptor_sets.is_empty() {
        errors.push(gfile.error_at(
            cfg.span(),
            "[protos] lists no `files` and no `descriptor_sets`",
        ));
        return None;
    }
    let before = errors.0.len();
    let mut includes: Vec<PathBuf> = Vec::new();
    for inc in &protos.include {
        let dir = loaded.resolve(Path::new(inc.get_ref()));
        if !dir.is_dir() {
            errors.push(gfile.error_at(
                inc.span(),
                format!("[protos] include `{}` is not a folder", dir.display()),
            ));
        }
        includes.push(dir);
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for f in &protos.files {
        let path = loaded.resolve(Path::new(f.get_ref()));
        if !path.is_file() {
            errors.push(gfile.error_at(
                f.span(),
                format!("[protos] file `{}` cannot be read", path.display()),
            ));
            continue;
        }
        // A file outside every include folder is found through its own folder.
        if !includes.iter().any(|i| path.starts_with(i)) {
            if let Some(parent) = path.parent() {
                includes.push(parent.to_path_buf());
            }
        }
        files.push(path);
    }
    let mut sets = Vec::new();
    for s in &protos.descriptor_sets {
        let path = loaded.resolve(Path::new(s.get_ref()));
        // Decoded twice: for the names of its files, and by protox keeping each file's bytes
        // (options such as google.api.http are extensions a typed decode would drop).
        let decoded = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                let names = FileDescriptorSet::decode(b.as_slice()).map_err(|e| e.to_string())?;
                let set =
                    DescriptorSetFileResolver::decode(b.as_slice()).map_err(|e| e.to_string())?;
                Ok((names, set))
            });
        match decoded {
            Ok(set) => sets.push((path, set)),
            Err(e) => errors.push(gfile.error_at(
                s.span(),
                format!(
                    "[protos] descriptor set `{}` cannot be read: {e}",
                    path.display()
                ),
            )),
        }
    }
    if errors.0.len() != before {
        return None;
    }
    let mut chain = ChainFileResolver::new();
    for inc in &includes {
        chain.add(IncludeFileResolver::new(inc.clone()));
    }
    let mut set_files = Vec::new();
    for (_, (names, set)) in sets {
        // Every file of a set is compiled (a set made with --include_imports lists its imports).
        set_files.extend(names.file.iter().map(|f| f.name().to_owned()));
        chain.add(set);
    }
    chain.add(BuiltIn);
    chain.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(chain);
    compiler.include_imports(true);
    let mut failed = false;
    for path in &files {
        if let Err(e) = compiler.open_file(path) {
            errors.push(locate(&e, &includes, path, loaded));
            failed = true;
        }
    }
    for name in set_files
        .iter()
        .map(String::as_str)
        .chain(["google/api/annotations.proto", "google/rpc/status.proto"])
    {
        if let Err(e) = compiler.open_file(name) {
            errors.push(locate(&e, &includes, Path::new(name), loaded));
            failed = true;
        }
    }
    (!failed).then(|| compiler.descriptor_pool())
}

/// A protox error as `file:line:col: message`, at the place in the `.proto` file it names.
fn locate(
    e: &protox::Error,
    includes: &[PathBuf],
    opened: &Path,
    loaded: &LoadedConfig,
) -> ConfigError {
    let message = e.to_string();
    let name = e.file().map(str::to_owned);
    let file = name
        .as_deref()
        .and_then(|n| includes.iter().map(|i| i.join(n)).find(|p| p.is_file()))
        .unwrap_or_else(|| {
            name.as_deref()
                .map_or_else(|| opened.to_path_buf(), |n| loaded.resolve(Path::new(n)))
        });
    let mut at = (1, 1);
    if let (Some(src), Some(label)) = (e.source_code(), e.labels().and_then(|mut l| l.next())) {
        if let Ok(span) = src.read_span(label.inner(), 0, 0) {
            at = (span.line() + 1, span.column() + 1);
        }
    }
    ConfigError {
        file,
        line: at.0,
        col: at.1,
        message: format!("[protos] {message}"),
    }
}

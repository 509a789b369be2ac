//! `gatehouse check` and refusing to start on an invalid config.

use std::path::Path;
use std::process::Command;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/broken")
}

#[test]
fn check_reports_every_error_with_file_line_and_column() {
    let dir = fixture();
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["check", "--config"])
        .arg(dir.join("gateway.toml"))
        .env_remove("GATEHOUSE_TEST_SURELY_UNSET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let d = dir.display();
    let expected = [
        // Parse errors, one per file, located at the value.
        format!("{d}/routes/c-zero.toml:7:11: duration \"0s\" must be greater than zero"),
        format!("{d}/routes/d-unknown.toml:7:1: unknown field `respnd`"),
        format!("{d}/routes/e-env.toml:8:21: environment variable `GATEHOUSE_TEST_SURELY_UNSET` is not set"),
        format!("{d}/routes/f-backends.toml:6:1: route `two-backends` must have exactly one backend: `proxy`, `respond`, `aggregate`, `grpc` or `publish` (it has 2: proxy, respond)"),
        // Semantic errors of every file that parsed.
        format!("{d}/gateway.toml:13:14: endpoint `127.0.0.1:9000` needs a scheme"),
        format!("{d}/gateway.toml:13:32: endpoint `http://127.0.0.1:9001/v1` must not have a path"),
        format!("{d}/gateway.toml:9:1: service `empty` has no `endpoints`"),
        format!("{d}/gateway.toml:4:7: [server] tls.cert"),
        format!("{d}/gateway.toml:4:7: [server] tls.key"),
        format!("{d}/gateway.toml:16:10: [log] filter `info,,=nonsense==` is not valid"),
        format!("{d}/gateway.toml:24:12: service `checked`: hash_key applies only to load_balancing = \"consistent_hash\""),
        format!("{d}/gateway.toml:25:16: service `checked` health_check: path `health` must start with `/`"),
        format!("{d}/gateway.toml:25:16: service `checked` health_check: timeout (2s) must not be longer than interval (1s)"),
        format!("{d}/gateway.toml:18:1: service `hashed`: consistent_hash needs hash_key"),
        format!("{d}/gateway.toml:30:9: service `fragile` retry: attempts = 0 must be between 1 and 10"),
        format!("{d}/gateway.toml:31:19: service `fragile` circuit_breaker: failure_rate = 1.5 must be above 0 and at most 1"),
        format!("{d}/gateway.toml:29:27: service `fragile`: max_concurrent_requests must be at least 1"),
        format!("{d}/routes/a-web.toml:12:8: route `user` is defined twice in frontend `web`"),
        format!("{d}/routes/a-web.toml:19:21: unknown service `nosuch` (defined services: badurl, checked, empty, fragile, hashed, users)"),
        format!("{d}/routes/a-web.toml:23:8: in path `/files/{{*rest}}/meta`: `{{*rest}}` must be the last segment"),
        format!("{d}/routes/a-web.toml:35:37: upstream path `/v1/orders/{{order}}` uses `{{order}}`"),
        format!("{d}/routes/a-web.toml:40:12: `get` is not an HTTP method"),
        format!("{d}/routes/b-dup.toml:2:8: frontend `web` is already defined at {d}/routes/a-web.toml:2"),
        format!("{d}/routes/a-web.toml:27:8: route matches the same host, path and method as route `web/user`"),
    ];
    for e in &expected {
        assert!(
            stdout.lines().any(|l| l.starts_with(e.as_str())),
            "missing: {e}\n--- got:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.lines().count(),
        expected.len(),
        "unexpected extra errors:\n{stdout}"
    );
}

#[test]
fn check_accepts_the_shipped_demo_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["check", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(": ok ("), "{stdout}");
}

#[test]
fn run_refuses_an_invalid_config_with_the_same_messages() {
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["run", "--config"])
        .arg(fixture().join("gateway.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a-web.toml:19:21: unknown service `nosuch`"),
        "{stderr}"
    );
    assert!(stderr.contains("c-zero.toml:7:11:"), "{stderr}");
    assert!(stderr.contains("not started"), "{stderr}");
}

#[tokio::test]
async fn server_start_returns_located_errors() {
    let dir = crate::support::write_config(
        &crate::support::gateway_toml("request_timeout = \"soon\"", ""),
        &[],
    );
    let err = match gatehouse::Server::start(&dir.path().join("gateway.toml")).await {
        Err(gatehouse::StartError::Config(e)) => e,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an invalid config started"),
    };
    let e = &err.0[0];
    assert_eq!((e.line, e.col), (3, 19), "{e}");
    assert!(e.message.contains("invalid duration \"soon\""), "{e}");
}

//! The `gatehouse` command: `run` (default), `check`, `demo`, and `health` (for container
//! health checks).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use std::io::Write as _;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use gatehouse::config;
use gatehouse::observe::metrics::Metrics;
use gatehouse::Server;

/// jemalloc, configured in `.cargo/config.toml` to give freed pages back to the system within
/// about a second (from a background thread): after a burst of connections glibc's malloc kept
/// its peak (~140 MiB after 2000 concurrent connections), jemalloc returns to ~28 MiB. The
/// request path also runs in ~7% fewer instructions with it (bench/README.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "An edge API gateway and backend-for-frontend"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Path of gateway.toml; route files are read from its `[routes] dir`.
    #[arg(long, short, global = true, default_value = "gateway.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Load and validate every config file; print each error as file:line:col: message.
    Check,
    /// Serve the shipped config together with its sample services.
    Demo,
    /// Exit 0 if the admin listener answers /healthz with 200 (for container health checks).
    Health {
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatehouse: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Check => rt.block_on(async { check(&cli.config) }),
        Command::Run => rt.block_on(run(&cli.config, false)),
        Command::Demo => rt.block_on(run(&cli.config, true)),
        Command::Health { admin } => rt.block_on(health(admin)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gatehouse: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let result = gatehouse::gateway::load_and_compile(path, None, &Metrics::new(), 1);
    match result {
        Ok(gw) => {
            println!(
                "{}: ok ({} frontends, {} routes, {} services)",
                path.display(),
                gw.frontend_count(),
                gw.route_count(),
                gw.service_count()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            eprintln!("{} error(s)", errors.0.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn run(path: &Path, demo: bool) -> anyhow::Result<ExitCode> {
    let loaded = match config::load(path) {
        Ok(l) => l,
        Err(_) => {
            // Report every mistake, the semantic ones of the files that did parse included.
            let errors = gatehouse::gateway::load_and_compile(path, None, &Metrics::new(), 1)
                .err()
                .unwrap_or_default();
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("gatehouse: not started: {} config error(s)", errors.0.len());
            return Ok(ExitCode::FAILURE);
        }
    };
    let _log_guard =
        gatehouse::observe::logging::init(&loaded.gateway.log).map_err(anyhow::Error::msg)?;
    let token = demo
        .then(|| gatehouse::demo::demo_token(&loaded.gateway))
        .flatten();
    let samples = if demo {
        gatehouse::demo::start_samples(&loaded.gateway)
            .await
            .context("starting the demo's sample services")?
    } else {
        Vec::new()
    };
    let server = match Server::start_loaded(path, loaded).await {
        Ok(s) => s,
        Err(gatehouse::StartError::Config(errors)) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("gatehouse: not started: {} config error(s)", errors.0.len());
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    if demo {
        print_demo(&server, &samples, token.as_deref());
    }
    wait_for_signals(&server).await?;
    tracing::info!("shutting down: draining in-flight requests");
    let drained = server.shutdown().await;
    tracing::info!(drained, "stopped");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signals(server: &Server) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                let _ = server.live().reload("sighup").await;
            }
        }
    }
}

fn print_demo(server: &Server, samples: &[(String, SocketAddr)], token: Option<&str>) {
    let base = server
        .http_addrs()
        .first()
        .map(|a| {
            if a.ip().is_unspecified() {
                format!("http://127.0.0.1:{}", a.port())
            } else {
                format!("http://{a}")
            }
        })
        .unwrap_or_default();
    let admin = server.admin_addr();
    // A closed stdout (`gatehouse demo | head`) must not stop the gateway: errors are ignored.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\ngatehouse demo is running.");
    for (name, addr) in samples {
        let _ = writeln!(out, "  sample service {name:<8} on http://{addr}");
    }
    let _ = writeln!(out, "\nTry:");
    for path in [
        "/web/users/1",
        "/web/products",
        "/web/stock/tea-01      (REST → gRPC: the stock service's GetStock, from protos/shop/stock.proto)",
        "/web/stock/cup-02/watch?updates=3   (a gRPC server stream as NDJSON, one line per message)",
        "/web/events            (server-sent events, streamed as produced)",
        "/web/echo/anything?x=1 (what the backend receives: X-Forwarded-*, traceparent ...)",
        "/mobile/v1/me/orders",
        "/mobile/v1/home/1     (BFF: four backend calls composed for the mobile app)",
        "/web/dashboard/1      (BFF: the same services composed for the web app)",
        "/web/ping",
        "/web/nope              (404 as application/problem+json)",
    ] {
        let _ = writeln!(out, "  curl -i {base}{path}");
    }
    let _ = writeln!(
        out,
        "  curl -i -X DELETE {base}/web/users/1   (405 with Allow)"
    );
    let _ = writeln!(
        out,
        "  head -c 100000 /dev/zero | curl -i --data-binary @- {base}/web/orders   (413: the route's max_request_body)"
    );
    let _ = writeln!(
        out,
        "  curl -i -H 'Transfer-Encoding: gzip, chunked' -d x {base}/web/orders   (501: only chunked)"
    );
    let _ = writeln!(
        out,
        "  curl -s -H 'X_Forwarded_For: 6.6.6.6' {base}/web/echo/x   (names with _ are dropped)"
    );
    let _ = writeln!(
        out,
        "  curl -i -H 'Host: partner.localhost' -H 'x-api-key: demo-partner-key' {base}/catalog/products   (API key; without it: 401)"
    );
    if let Some(t) = token {
        let _ = writeln!(
            out,
            "  curl -s -H 'Authorization: Bearer {t}' {base}/web/me   (JWT: the service gets x-user-id; without it: 401)"
        );
    }
    let _ = writeln!(
        out,
        "  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' {base}/web/limited; done; echo   (rate limit, 5 per 10 s per IP: five 200, then 429)"
    );
    let _ = writeln!(
        out,
        "  curl -i {base}/web/limited   (RateLimit-Policy and RateLimit headers)"
    );
    let _ = writeln!(
        out,
        "  curl -i -X OPTIONS -H 'Origin: http://localhost:3000' -H 'Access-Control-Request-Method: GET' {base}/web/users   (CORS preflight, answered by the gateway)"
    );
    let _ = writeln!(
        out,
        "  curl -si -d 'hello' {base}/web/echo/signed   (Lua plugins: x-signature reaches the service, x-frame-options comes back)"
    );
    let _ = writeln!(
        out,
        "  curl -i -A 'badbot/1.0' {base}/web/echo/x   (Lua plugin deny-bots: 403)"
    );
    // The broker route is shown when a NATS server answers where the demo config points.
    let nats = std::net::SocketAddr::from(([127, 0, 0, 1], 4222));
    if std::net::TcpStream::connect_timeout(&nats, std::time::Duration::from_millis(200)).is_ok() {
        let _ = writeln!(
            out,
            "  curl -i -X POST -H 'Idempotency-Key: demo-1' -d '{{\"sku\":\"tea-01\"}}' {base}/web/orders/place   (202 once NATS has the message)"
        );
        let _ = writeln!(
            out,
            "  op=$(curl -s -X POST -d '{{\"sku\":\"tea-01\"}}' {base}/web/orders/quote | sed 's/.*\"operation\":\"\\([0-9a-f]*\\)\".*/\\1/'); curl -i {base}/web/orders/quote/operations/$op; sleep 3; curl -i {base}/web/orders/quote/operations/$op   (async reply: 202 pending, then the quote)"
        );
    }
    let _ = writeln!(out, "  curl http://{admin}/metrics");
    let _ = writeln!(out, "  curl http://{admin}/admin/config");
    let _ = writeln!(out, "  curl -X POST http://{admin}/admin/reload");
    let _ = writeln!(
        out,
        "\nEdit routes/*.toml and the gateway reloads them. Ctrl-C stops.\n"
    );
}

async fn health(admin: SocketAddr) -> anyhow::Result<ExitCode> {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(Ok(buf)) if buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200") => {
            Ok(ExitCode::SUCCESS)
        }
        Ok(Ok(_)) => {
            eprintln!("unhealthy: /healthz did not answer 200");
            Ok(ExitCode::FAILURE)
        }
        Ok(Err(e)) => {
            eprintln!("unhealthy: {e}");
            Ok(ExitCode::FAILURE)
        }
        Err(_) => {
            eprintln!("unhealthy: no answer within 3s");
            Ok(ExitCode::FAILURE)
        }
    }
}

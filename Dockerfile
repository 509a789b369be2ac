# Multi-stage build: compile in the Rust image, ship only the binary on a slim base.
FROM rust:1-slim-bookworm AS build
# jemalloc, the binary's allocator, is compiled from source: it needs make.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Build-time settings: jemalloc's configuration.
COPY .cargo ./.cargo
COPY src ./src
RUN cargo build --release --locked --bin gatehouse

FROM debian:bookworm-slim
# System root certificates, for https services that do not name their own CA.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gatehouse
COPY --from=build /src/target/release/gatehouse /usr/local/bin/gatehouse
# The shipped demo config; mount your own gateway.toml and routes/ over /etc/gatehouse.
COPY gateway.toml /etc/gatehouse/gateway.toml
COPY routes /etc/gatehouse/routes
COPY plugins /etc/gatehouse/plugins
COPY protos /etc/gatehouse/protos
# gateway.toml reads these through ${VAR:-default}. Do not publish the admin port publicly:
# it serves /admin/reload and /admin/config.
ENV GATEHOUSE_LISTEN=0.0.0.0:8080 \
    GATEHOUSE_ADMIN_LISTEN=0.0.0.0:9901
USER 10001:10001
WORKDIR /etc/gatehouse
EXPOSE 8080 9901
# The gateway is PID 1 and handles SIGTERM itself: it stops accepting, drains in-flight
# requests for [server] shutdown_grace, and exits 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/gatehouse", "health", "--admin", "127.0.0.1:9901"]
ENTRYPOINT ["/usr/local/bin/gatehouse"]
CMD ["run", "--config", "/etc/gatehouse/gateway.toml"]

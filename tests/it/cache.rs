//! The response cache against real upstream servers: hits with `Age` and `Cache-Status`, HEAD
//! from a stored GET, what a shared cache must not store, the route's `ttl` only where the
//! service says nothing, revalidation (the service's 304 refreshing the stored headers) and the
//! client's conditional requests, 100 concurrent misses making one upstream request,
//! stale-while-revalidate, stale-if-error with the service killed (and over the route's
//! fallback), `Vary`, per-identity storage on authenticated routes, invalidation by unsafe
//! methods, purges, the object size limit, streaming fills, and reloads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::support::*;

/// An upstream whose answer for each path is `script(path, request headers, n)`, `n` counting
/// that path's requests from 1.
async fn scripted<F>(script: F) -> Upstream
where
    F: Fn(&str, &http::HeaderMap, usize) -> Response<TestBody> + Send + Sync + 'static,
{
    let counts = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        usize,
    >::new()));
    let script = Arc::new(script);
    Upstream::start(move |req: Request<Incoming>| {
        let n = {
            let mut c = counts.lock().unwrap();
            let e = c.entry(req.uri().path().to_owned()).or_default();
            *e += 1;
            *e
        };
        let resp = script(req.uri().path(), req.headers(), n);
        async move { resp }
    })
    .await
}

fn with(mut r: Response<TestBody>, headers: &[(&str, &str)]) -> Response<TestBody> {
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

async fn gateway(up: &Upstream, cache_table: &str, route_cache: &str) -> TestGateway {
    let gwt = gateway_toml(
        "",
        &format!(
            "[services.svc]\nendpoints = [\"{}\"]\n\n{cache_table}\n",
            up.url()
        ),
    );
    let routes = format!(
        "[frontend]\nname = \"web\"\n\n[[route]]\nname = \"all\"\npath = \"/{{*rest}}\"\ncache = {route_cache}\nproxy = {{ service = \"svc\" }}\n"
    );
    TestGateway::start(&gwt, &[("web.toml", &routes)]).await
}

async fn req(method: &str, url: &str, headers: &[(&str, &str)]) -> Resp {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_responses_are_hits_with_age_and_cache_status_and_head_is_served_from_get() {
    let up = scripted(|_, _, n| {
        with(
            text(200, format!("v{n}")),
            &[("cache-control", "max-age=60"), ("etag", "\"e1\"")],
        )
    })
    .await;
    let gw = gateway(&up, "", "true").await;
    let first = get(&gw.url("/a")).await;
    assert_eq!(first.text(), "v1");
    assert!(
        first
            .header("cache-status")
            .starts_with("gatehouse; fwd=uri-miss; fwd-status=200; stored"),
        "{}",
        first.header("cache-status")
    );
    let hit = get(&gw.url("/a")).await;
    assert_eq!(hit.text(), "v1");
    assert!(
        hit.header("cache-status")
            .starts_with("gatehouse; hit; ttl="),
        "{}",
        hit.header("cache-status")
    );
    let age: u64 = hit.header("age").parse().unwrap();
    assert!(age <= 60, "age {age}");
    let head = req("HEAD", &gw.url("/a"), &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert!(head.header("cache-status").contains("hit"));
    assert_eq!(
        up.requests(),
        1,
        "the hit and the HEAD were answered by the cache"
    );
    // The query is part of the key, sorted.
    assert_eq!(get(&gw.url("/a?y=2&x=1")).await.text(), "v2");
    assert_eq!(get(&gw.url("/a?x=1&y=2")).await.text(), "v2");
    assert_eq!(up.requests(), 2);
    // A client's conditional request on a fresh object: 304 from the cache.
    let nm = req("GET", &gw.url("/a"), &[("if-none-match", "\"e1\"")]).await;
    assert_eq!(nm.status, 304);
    assert_eq!(nm.header("etag"), "\"e1\"");
    assert!(nm.header("cache-status").contains("hit"));
    let other = req("GET", &gw.url("/a"), &[("if-none-match", "\"e0\"")]).await;
    assert_eq!((other.status.as_u16(), other.text().as_str()), (200, "v1"));
    // Client Cache-Control: no-cache forwards (and refreshes the object).
    let nc = req("GET", &gw.url("/a"), &[("cache-control", "no-cache")]).await;
    assert!(
        nc.header("cache-status").contains("fwd=request"),
        "{}",
        nc.header("cache-status")
    );
    assert_eq!(up.requests(), 3);
    // Metrics count each result.
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains(r#"gatehouse_cache_total{result="hit",route="web/all"}"#),
        "{m}"
    );
    assert!(m.contains("gatehouse_cache_bytes"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_shared_cache_must_not_store_is_asked_for_each_time() {
    let up = scripted(|path, _, n| {
        let cc: &[(&str, &str)] = match path {
            "/no-store" => &[("cache-control", "no-store, max-age=60")],
            "/private" => &[("cache-control", "private, max-age=60")],
            "/cookie" => &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
            "/vary-star" => &[("cache-control", "max-age=60"), ("vary", "*")],
            "/teapot" => &[],
            "/auth" => &[("cache-control", "max-age=60")],
            "/auth-public" => &[("cache-control", "public, max-age=60")],
            _ => &[("cache-control", "max-age=60")],
        };
        let status = if path == "/teapot" { 418 } else { 200 };
        with(text(status, format!("{path} {n}")), cc)
    })
    .await;
    let gw = gateway(&up, "", "{ ttl = \"60s\" }").await;
    for path in ["/no-store", "/private", "/cookie", "/vary-star", "/teapot"] {
        let a = get(&gw.url(path)).await;
        let b = get(&gw.url(path)).await;
        assert_eq!(b.text(), format!("{path} 2"), "{path} must not be stored");
        assert!(
            !a.header("cache-status").contains("stored"),
            "{path}: {}",
            a.header("cache-status")
        );
    }
    // §3.5: a response to a request with Authorization only when the service allows it.
    let bearer = [("authorization", "Bearer x")];
    req("GET", &gw.url("/auth"), &bearer).await;
    let b = req("GET", &gw.url("/auth"), &bearer).await;
    assert_eq!(b.text(), "/auth 2");
    req("GET", &gw.url("/auth-public"), &bearer).await;
    let b = req("GET", &gw.url("/auth-public"), &bearer).await;
    assert_eq!(b.text(), "/auth-public 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routes_ttl_applies_only_where_the_service_says_nothing_and_304_refreshes_headers() {
    let up = scripted(|path, headers, n| match path {
        "/plain" => text(200, format!("plain {n}")),
        // Always stale: every use is revalidated with the stored validator.
        _ => {
            if headers.get("if-none-match").is_some_and(|v| v == "\"v1\"") {
                with(
                    text(304, ""),
                    &[
                        ("etag", "\"v1\""),
                        ("x-version", &format!("{n}")),
                        ("cache-control", "max-age=0"),
                    ],
                )
            } else {
                with(
                    text(200, "validated body"),
                    &[
                        ("etag", "\"v1\""),
                        ("x-version", "1"),
                        ("cache-control", "max-age=0"),
                    ],
                )
            }
        }
    })
    .await;
    let gw = gateway(&up, "", "{ ttl = \"60s\" }").await;
    assert_eq!(get(&gw.url("/plain")).await.text(), "plain 1");
    assert_eq!(
        get(&gw.url("/plain")).await.text(),
        "plain 1",
        "the ttl applies"
    );
    let first = get(&gw.url("/etag")).await;
    assert_eq!(
        (first.text().as_str(), first.header("x-version")),
        ("validated body", "1")
    );
    let second = get(&gw.url("/etag")).await;
    assert_eq!(second.status, 200);
    assert_eq!(
        second.text(),
        "validated body",
        "the stored body, revalidated"
    );
    assert_eq!(
        second.header("x-version"),
        "2",
        "the 304's headers replace the stored ones"
    );
    assert!(
        second
            .header("cache-status")
            .contains("fwd=stale; fwd-status=304"),
        "{}",
        second.header("cache-status")
    );
    let third = get(&gw.url("/etag")).await;
    assert_eq!(third.header("x-version"), "3");
    // A client's own condition, answered from the revalidated object.
    let nm = req("GET", &gw.url("/etag"), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(nm.status, 304);
    assert_eq!(up.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_make_one_upstream_request() {
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        with(
            text(200, "slow and shared"),
            &[("cache-control", "max-age=60")],
        )
    })
    .await;
    let gw = gateway(&up, "", "true").await;
    let url = gw.url("/popular");
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    let mut collapsed = 0;
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "slow and shared")
        );
        if r.header("cache-status").contains("collapsed") {
            collapsed += 1;
        }
    }
    assert_eq!(
        up.requests(),
        1,
        "one upstream request for 100 concurrent misses"
    );
    assert!(collapsed >= 1, "the waiters are marked collapsed");
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains(r#"gatehouse_cache_total{result="coalesced",route="web/all"}"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() {
    let up = scripted(|_, _, n| {
        with(
            text(200, format!("v{n}")),
            &[
                ("cache-control", "max-age=0"),
                ("etag", &format!("\"{n}\"")),
            ],
        )
    })
    .await;
    let gw = gateway(&up, "", "{ stale_while_revalidate = \"60s\" }").await;
    assert_eq!(get(&gw.url("/s")).await.text(), "v1");
    let stale = get(&gw.url("/s")).await;
    assert_eq!(stale.text(), "v1", "the stale object answers at once");
    assert!(
        stale
            .header("cache-status")
            .contains("detail=stale-while-revalidate"),
        "{}",
        stale.header("cache-status")
    );
    eventually(10, "the background refresh stores v2", || {
        let url = gw.url("/s");
        async move { get(&url).await.text() == "v2" }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_answers_when_the_service_is_killed_or_fails_and_before_the_fallback() {
    let failing = Arc::new(AtomicUsize::new(0));
    let f = failing.clone();
    let up = scripted(move |_, _, n| {
        if f.load(Ordering::SeqCst) == 1 {
            return text(503, "down");
        }
        with(
            text(200, format!("good {n}")),
            &[("cache-control", "max-age=0"), ("etag", "\"g\"")],
        )
    })
    .await;
    let gwt = gateway_toml(
        "",
        &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
    );
    let routes = r#"[frontend]
name = "web"
cache = { stale_if_error = "5m" }

[[route]]
name = "plain"
path = "/plain/{*rest}"
proxy = { service = "svc" }

[[route]]
name = "fb"
path = "/fb/{*rest}"
fallback = { status = 200, body = "canned" }
proxy = { service = "svc" }
"#;
    let gw = TestGateway::start(&gwt, &[("web.toml", routes)]).await;
    assert_eq!(get(&gw.url("/plain/x")).await.text(), "good 1");
    assert_eq!(get(&gw.url("/fb/x")).await.text(), "good 1");
    // The service answers 503: the stale object stands in.
    failing.store(1, Ordering::SeqCst);
    let r = get(&gw.url("/plain/x")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "good 1"));
    assert!(
        r.header("cache-status").contains("fwd-status=503; ttl=")
            && r.header("cache-status").contains("detail=stale-if-error"),
        "{}",
        r.header("cache-status")
    );
    // The service is gone: the stale object, not the route's canned fallback.
    up.kill();
    let r = get(&gw.url("/plain/x")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "good 1"));
    assert!(
        r.header("cache-status").contains("detail=stale-if-error"),
        "{}",
        r.header("cache-status")
    );
    let r = get(&gw.url("/fb/x")).await;
    assert_eq!(r.text(), "good 1", "stale data over the canned fallback");
    // Nothing stored: the fallback answers, and is not stored.
    let r = get(&gw.url("/fb/never-seen")).await;
    assert_eq!(r.text(), "canned");
    // Nothing stored on a route without fallback: the failure itself.
    let r = get(&gw.url("/plain/never-seen")).await;
    assert_eq!(r.status, 502, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_and_the_routes_vary_select_variants() {
    let up = scripted(|path, headers, _| {
        let lang = headers
            .get("accept-language")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let tenant = headers
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let vary: &[(&str, &str)] = if path == "/vary" {
            &[("vary", "Accept-Language")]
        } else {
            &[]
        };
        with(
            with(
                text(200, format!("{lang}{tenant}")),
                &[("cache-control", "max-age=60")],
            ),
            vary,
        )
    })
    .await;
    let gw = gateway(&up, "", "{ vary = [\"x-tenant\"] }").await;
    let de = [("accept-language", "de")];
    let fr = [("accept-language", "fr")];
    assert_eq!(req("GET", &gw.url("/vary"), &de).await.text(), "de");
    let r = req("GET", &gw.url("/vary"), &fr).await;
    assert_eq!(r.text(), "fr");
    assert!(
        r.header("cache-status").contains("fwd=vary-miss"),
        "{}",
        r.header("cache-status")
    );
    assert_eq!(req("GET", &gw.url("/vary"), &de).await.text(), "de");
    assert_eq!(req("GET", &gw.url("/vary"), &fr).await.text(), "fr");
    assert_eq!(up.requests(), 2);
    // The route's `vary`: a header the service does not name.
    assert_eq!(
        req("GET", &gw.url("/t"), &[("x-tenant", "a")]).await.text(),
        "a"
    );
    assert_eq!(
        req("GET", &gw.url("/t"), &[("x-tenant", "b")]).await.text(),
        "b"
    );
    assert_eq!(
        req("GET", &gw.url("/t"), &[("x-tenant", "a")]).await.text(),
        "a"
    );
    assert_eq!(up.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_routes_store_per_identity_and_shared_ones_never_leak() {
    let up = scripted(|path, headers, n| {
        let who = headers
            .get("x-consumer")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let cc = if path.starts_with("/private") {
            "private, max-age=60"
        } else {
            "max-age=60"
        };
        with(text(200, format!("{who} {n}")), &[("cache-control", cc)])
    })
    .await;
    let gwt = gateway_toml(
        "",
        &format!(
            "[services.svc]\nendpoints = [\"{}\"]\n\n[auth.api_keys.k]\nheader = \"x-api-key\"\nkeys = [{{ consumer = \"ann\", sha256 = \"{}\" }}, {{ consumer = \"bob\", sha256 = \"{}\" }}]\n",
            up.url(),
            sha256_hex("key-ann"),
            sha256_hex("key-bob"),
        ),
    );
    let routes = r#"[frontend]
name = "web"
auth = "k"

[[route]]
name = "mine"
path = "/private/{*rest}"
cache = true
proxy = { service = "svc" }

[[route]]
name = "shared"
path = "/shared/{*rest}"
cache = { scope = "shared" }
proxy = { service = "svc" }
"#;
    let gw = TestGateway::start(&gwt, &[("web.toml", routes)]).await;
    let ann = [("x-api-key", "key-ann")];
    let bob = [("x-api-key", "key-bob")];
    assert_eq!(
        req("GET", &gw.url("/private/me"), &ann).await.text(),
        "ann 1"
    );
    assert_eq!(
        req("GET", &gw.url("/private/me"), &bob).await.text(),
        "bob 2"
    );
    assert_eq!(
        req("GET", &gw.url("/private/me"), &ann).await.text(),
        "ann 1",
        "ann's own copy"
    );
    assert_eq!(
        req("GET", &gw.url("/private/me"), &bob).await.text(),
        "bob 2",
        "bob's own copy"
    );
    // A shared route stores an authenticated request's response only when the service marks
    // it shareable (public, s-maxage): here it does not, so bob never sees ann's.
    assert_eq!(req("GET", &gw.url("/shared/x"), &ann).await.text(), "ann 1");
    assert_eq!(req("GET", &gw.url("/shared/x"), &bob).await.text(), "bob 2");
    // Unauthenticated requests never reach the cache.
    assert_eq!(req("GET", &gw.url("/private/me"), &[]).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_invalidate_and_the_admin_api_purges() {
    let up = scripted(|path, _, n| {
        let mut r = with(
            text(200, format!("{path} {n}")),
            &[("cache-control", "max-age=600")],
        );
        if path == "/items/new" {
            r = with(r, &[("location", "/items/1")]);
        }
        r
    })
    .await;
    let gw = gateway(&up, "", "true").await;
    for p in ["/items/1", "/items/2", "/other/1"] {
        get(&gw.url(p)).await;
        assert_eq!(get(&gw.url(p)).await.text(), format!("{p} 1"));
    }
    // A successful POST invalidates its URL and its Location.
    let r = req("POST", &gw.url("/items/new"), &[]).await;
    assert!(r.header("cache-status").contains("fwd=method"));
    assert_eq!(
        get(&gw.url("/items/1")).await.text(),
        "/items/1 2",
        "Location invalidated"
    );
    assert_eq!(req("DELETE", &gw.url("/items/2"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/items/2")).await.text(), "/items/2 3");
    // Purge by URL, by prefix, by route, all.
    let purge = |q: &str| {
        let url = gw.admin_url(&format!("/admin/cache/purge?{q}"));
        async move { req("POST", &url, &[]).await }
    };
    let host = format!("http://{}", gw.addr);
    let r = purge(&format!("url={host}/other/1")).await;
    assert_eq!(r.json()["purged"], 1, "{}", r.text());
    assert_eq!(get(&gw.url("/other/1")).await.text(), "/other/1 2");
    let r = purge(&format!("prefix={host}/items/")).await;
    assert_eq!(r.json()["purged"], 2, "{}", r.text());
    assert_eq!(get(&gw.url("/items/1")).await.text(), "/items/1 3");
    let r = purge("route=web/all").await;
    assert!(r.json()["purged"].as_u64().unwrap() >= 2, "{}", r.text());
    get(&gw.url("/other/1")).await;
    assert_eq!(purge("all=true").await.json()["purged"], 1);
    let r = purge("").await;
    assert_eq!(r.status, 400);
    let r = purge("url=/relative").await;
    assert_eq!(r.status, 400);
    // The purge API is on the admin listener only.
    assert_eq!(
        req("POST", &gw.url("/admin/cache/purge?all=true"), &[])
            .await
            .text(),
        "/admin/cache/purge 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_pass_through_and_fills_stream() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let up = Upstream::start(move |req: Request<Incoming>| {
        let mut release = release_rx.clone();
        async move {
            match req.uri().path() {
                "/big" => with(
                    text(200, vec![b'x'; 4096]),
                    &[("cache-control", "max-age=60")],
                ),
                "/big-chunked" | "/slow" => {
                    let big = req.uri().path() == "/big-chunked";
                    let (tx, rx) =
                        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(4);
                    tokio::spawn(async move {
                        let chunk = if big {
                            vec![b'y'; 1000]
                        } else {
                            b"first ".to_vec()
                        };
                        let _ = tx
                            .send(Ok(http_body::Frame::data(Bytes::from(chunk))))
                            .await;
                        if !big {
                            let _ = release.wait_for(|r| *r).await;
                        }
                        for _ in 0..3 {
                            let chunk = if big {
                                vec![b'y'; 1000]
                            } else {
                                b"more ".to_vec()
                            };
                            let _ = tx
                                .send(Ok(http_body::Frame::data(Bytes::from(chunk))))
                                .await;
                        }
                    });
                    let body = http_body_util::StreamBody::new(tokio_stream_from(rx)).boxed();
                    let mut r = Response::new(body);
                    r.headers_mut()
                        .insert("cache-control", "max-age=60".parse().unwrap());
                    r
                }
                _ => text(404, ""),
            }
        }
    })
    .await;
    let gw = gateway(&up, "[cache]\nmax_object_size = \"2KiB\"\n", "true").await;
    for _ in 0..2 {
        let r = get(&gw.url("/big")).await;
        assert_eq!(r.body.len(), 4096);
        assert!(
            r.header("cache-status").contains("detail=too-large"),
            "{}",
            r.header("cache-status")
        );
    }
    for _ in 0..2 {
        assert_eq!(get(&gw.url("/big-chunked")).await.body.len(), 4000);
    }
    assert_eq!(up.requests(), 4, "nothing over max_object_size is stored");
    // The client reads the first bytes while the service is still sending.
    let resp = open(&gw.url("/slow")).await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first ");
    release_tx.send(true).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "more more more ");
    let hit = get(&gw.url("/slow")).await;
    assert_eq!(hit.text(), "first more more more ");
    assert!(hit.header("cache-status").contains("hit"));
    assert_eq!(up.requests(), 5);
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_survive_reloads_until_the_cache_settings_change() {
    let up = scripted(|_, _, n| {
        with(
            text(200, format!("v{n}")),
            &[("cache-control", "max-age=600")],
        )
    })
    .await;
    let gw = gateway(&up, "", "true").await;
    assert_eq!(get(&gw.url("/r")).await.text(), "v1");
    // A route file changes (a new route): the store is kept.
    gw.write_route(
        "web.toml",
        "[frontend]\nname = \"web\"\n\n[[route]]\nname = \"all\"\npath = \"/{*rest}\"\ncache = true\nproxy = { service = \"svc\" }\n\n[[route]]\nname = \"new\"\npath = \"/new\"\nrespond = { body = \"new\" }\n",
    );
    assert_eq!(admin_reload(&gw).await.status, 200);
    assert_eq!(get(&gw.url("/new")).await.text(), "new");
    assert_eq!(
        get(&gw.url("/r")).await.text(),
        "v1",
        "kept across the reload"
    );
    // [cache] changes: a new, empty store.
    let gwt = gateway_toml(
        "",
        &format!(
            "[services.svc]\nendpoints = [\"{}\"]\n\n[cache]\nmax_size = \"64MiB\"\n",
            up.url()
        ),
    );
    std::fs::write(gw.dir.path().join("gateway.toml"), gwt).unwrap();
    assert_eq!(admin_reload(&gw).await.status, 200);
    assert_eq!(get(&gw.url("/r")).await.text(), "v2");
}

/// Every cache key's mistake names its file, line and key.
#[test]
fn cache_config_mistakes_are_located() {
    let gw = "[services.svc]\nendpoints = [\"http://127.0.0.1:9\"]\n";
    let route = |cache: &str| {
        format!("[frontend]\nname = \"web\"\n\n[[route]]\nname = \"a\"\npath = \"/a\"\ncache = {cache}\nproxy = {{ service = \"svc\" }}\n")
    };
    let no_routes = "[frontend]\nname = \"web\"\n";
    // (gateway.toml, web.toml, where, what the message says)
    let cases: Vec<(String, String, &str, &str)> = vec![
        (
            gw.into(),
            route(r#"{ ttl = "30s", vary = ["bad header"] }"#),
            "web.toml:7",
            "`bad header` is not a header name",
        ),
        (
            gw.into(),
            route(r#"{ key_query = ["page", ""] }"#),
            "web.toml:7",
            "a `key_query` name is empty",
        ),
        (
            gw.into(),
            route(r#"{ scope = "private" }"#),
            "web.toml:7",
            "needs `auth`",
        ),
        (gw.into(), route(r#"{ tll = "30s" }"#), "web.toml:7", "tll"),
        (
            gw.into(),
            route(r#""yes""#),
            "web.toml:7",
            "`true`, `false` or a table",
        ),
        (gw.into(), route(r#"{ ttl = "0s" }"#), "web.toml:7", "0s"),
        (
            "[frontend]\nname = \"web\"\ncache = { stale_if_error = \"soon\" }\n".into(),
            String::new(),
            "web.toml:3",
            "soon",
        ),
        (
            format!("{gw}\n[cache]\ntiers = [\"memory\", \"redis\"]\n"),
            no_routes.into(),
            "gateway.toml:5",
            "needs a [redis] table",
        ),
        (
            format!("{gw}\n[cache]\ntiers = [\"redis\"]\n"),
            no_routes.into(),
            "gateway.toml:5",
            "tiers must hold \"memory\"",
        ),
        (
            format!("{gw}\n[cache]\ntiers = [\"disk\"]\n"),
            no_routes.into(),
            "gateway.toml:5",
            "disk",
        ),
        (
            format!("{gw}\n[cache]\nmax_size = \"0KiB\"\n"),
            no_routes.into(),
            "gateway.toml:5",
            "greater than zero",
        ),
        (
            format!("{gw}\n[cache]\nlock_timeout = \"0s\"\n"),
            no_routes.into(),
            "gateway.toml:5",
            "0s",
        ),
        (
            format!("{gw}\n[cache]\nmax_size = \"1MiB\"\nmax_object_size = \"2MiB\"\n"),
            no_routes.into(),
            "gateway.toml:4",
            "max_object_size is larger than max_size",
        ),
    ];
    for (gateway, routes, at, says) in cases {
        // A frontend-level mistake is given as the gateway text's route file.
        let (gateway, routes) = if routes.is_empty() {
            (gw.to_owned(), gateway)
        } else {
            (gateway, routes)
        };
        let e = compile_errors(&gateway, "web.toml", &routes);
        assert!(e.contains(at) && e.contains(says), "want {at} {says}:\n{e}");
    }
}

/// Waits until Redis holds a key matching `pattern` (a gateway writes to the Redis tier in the
/// background).
async fn wait_in_redis(conn: &mut redis::aio::MultiplexedConnection, pattern: &str, what: &str) {
    for _ in 0..100 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: no key {pattern} in Redis");
}

/// Two gateways of a fleet share the Redis tier: what one stored, the other serves without
/// asking the service; purges reach Redis; a gateway whose Redis is unreachable still caches
/// in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_tier_is_shared_by_a_fleet_and_optional_when_down() {
    assert!(
        std::net::TcpStream::connect("127.0.0.1:6379").is_ok(),
        "Redis is required for this test at 127.0.0.1:6379 (.ci/run starts it)"
    );
    let up = scripted(|path, _, n| {
        with(
            text(200, format!("{path} {n}")),
            &[("cache-control", "max-age=600")],
        )
    })
    .await;
    let gwt = |redis: &str| {
        gateway_toml(
            "",
            &format!(
                "[services.svc]\nendpoints = [\"{}\"]\n\n[redis]\nurl = \"{redis}\"\ntimeout = \"200ms\"\n\n[cache]\ntiers = [\"memory\", \"redis\"]\n",
                up.url()
            ),
        )
    };
    let routes = "[frontend]\nname = \"web\"\n\n[[route]]\nname = \"all\"\npath = \"/{*rest}\"\ncache = true\nproxy = { service = \"svc\" }\n";
    let a = TestGateway::start(&gwt("redis://127.0.0.1:6379"), &[("web.toml", routes)]).await;
    let b = TestGateway::start(&gwt("redis://127.0.0.1:6379"), &[("web.toml", routes)]).await;
    // One public host name for the fleet, new on every run (Redis outlives test runs).
    let host = format!("shop-{}.test", std::process::id());
    let h = [("host", host.as_str())];
    assert_eq!(req("GET", &a.url("/p"), &h).await.text(), "/p 1");
    // The write to Redis is in the background: b is asked once it has landed (asked before,
    // b would miss, fetch and keep its own copy, never reading a's).
    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("gatehouse:cache:*{host}*");
    wait_in_redis(&mut conn, &pattern, "gateway a's object reached Redis").await;
    let mut from_b = None;
    for _ in 0..50 {
        let r = req("GET", &b.url("/p"), &h).await;
        if r.text() == "/p 1" {
            from_b = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = from_b.expect("gateway b serves what gateway a stored");
    assert!(
        r.header("cache-status").contains("hit"),
        "{}",
        r.header("cache-status")
    );
    assert_eq!(up.requests(), 1, "b did not ask the service");
    let m = get(&b.admin_url("/metrics")).await.text();
    assert!(
        m.contains(r#"gatehouse_cache_total{result="shared",route="web/all"}"#),
        "{m}"
    );
    // A purge on a drops the URL from Redis too: a third gateway misses.
    let r = req(
        "POST",
        &a.admin_url(&format!("/admin/cache/purge?prefix=http://{host}/")),
        &[],
    )
    .await;
    assert_eq!(r.json()["purged_shared"], 1, "{}", r.text());
    let c = TestGateway::start(&gwt("redis://127.0.0.1:6379"), &[("web.toml", routes)]).await;
    assert_eq!(req("GET", &c.url("/p"), &h).await.text(), "/p 2");
    wait_in_redis(&mut conn, &pattern, "gateway c's object reached Redis").await;
    // A successful PUT on c invalidates the URL in Redis before it answers: a's next miss
    // (its memory purged above) does not read the old copy back.
    assert_eq!(
        req("GET", &a.url("/p"), &h).await.text(),
        "/p 2",
        "from Redis, stored by c"
    );
    assert_eq!(req("PUT", &c.url("/p"), &h).await.status, 200);
    let d2 = TestGateway::start(&gwt("redis://127.0.0.1:6379"), &[("web.toml", routes)]).await;
    assert_eq!(
        req("GET", &d2.url("/p"), &h).await.text(),
        "/p 4",
        "not the invalidated copy"
    );
    // Redis accepts connections and never answers: a miss waits [redis] timeout at most, then
    // the memory tier works alone (a hit never asks Redis).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s);
        }
    });
    let s = TestGateway::start(
        &gwt(&format!("redis://{silent_addr}")),
        &[("web.toml", routes)],
    )
    .await;
    assert_eq!(req("GET", &s.url("/s"), &h).await.text(), "/s 1");
    let hit = req("GET", &s.url("/s"), &h).await;
    assert_eq!(hit.text(), "/s 1");
    assert!(hit.header("cache-status").contains("hit"));
    held.abort();
    // Redis unreachable: the memory tier still caches.
    let dead = closed_port().await;
    let d = TestGateway::start(&gwt(&format!("redis://{dead}")), &[("web.toml", routes)]).await;
    assert_eq!(req("GET", &d.url("/q"), &h).await.text(), "/q 1");
    assert_eq!(req("GET", &d.url("/q"), &h).await.text(), "/q 1");
    assert_eq!(up.requests(), 6);
}

/// stale-if-error for each way a service fails besides answering 5xx or being gone: a
/// timeout, an open circuit, no healthy endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_covers_timeouts_open_circuits_and_no_healthy_endpoint() {
    let broken = Arc::new(AtomicUsize::new(0));
    let b = broken.clone();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let broken = b.load(Ordering::SeqCst) == 1;
        async move {
            match (req.uri().path(), broken) {
                ("/health", false) => text(200, "ok"),
                ("/health", true) => text(500, "sick"),
                ("/slow/x", true) => {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    text(200, "late")
                }
                (_, true) => text(500, "broken"),
                (p, false) => with(
                    text(200, format!("fresh {p}")),
                    &[("cache-control", "max-age=0"), ("etag", "\"1\"")],
                ),
            }
        }
    })
    .await;
    let u = up.url();
    let gwt = gateway_toml(
        "",
        &format!(
            r#"[services.slow]
endpoints = ["{u}"]
timeout = "300ms"

[services.breaker]
endpoints = ["{u}"]
[services.breaker.circuit_breaker]
consecutive_failures = 1
open_for = "1h"
max_open_for = "1h"

[services.health]
endpoints = ["{u}"]
[services.health.health_check]
path = "/health"
interval = "100ms"
timeout = "100ms"
unhealthy_threshold = 1
"#
        ),
    );
    let routes = r#"[frontend]
name = "web"
cache = { stale_if_error = "5m" }

[[route]]
name = "slow"
path = "/slow/{*rest}"
proxy = { service = "slow", path = "/slow/{rest}" }

[[route]]
name = "breaker"
path = "/breaker/{*rest}"
proxy = { service = "breaker", path = "/breaker/{rest}" }

[[route]]
name = "health"
path = "/health-checked/{*rest}"
proxy = { service = "health", path = "/h/{rest}" }
"#;
    let gw = TestGateway::start(&gwt, &[("web.toml", routes)]).await;
    for p in ["/slow/x", "/breaker/x", "/health-checked/x"] {
        assert!(get(&gw.url(p)).await.text().starts_with("fresh"), "{p}");
    }
    broken.store(1, Ordering::SeqCst);
    let r = get(&gw.url("/slow/x")).await;
    assert_eq!(r.text(), "fresh /slow/x", "a timeout: the stale object");
    assert!(
        r.header("cache-status").contains("fwd-status=504"),
        "{}",
        r.header("cache-status")
    );
    // The first failure (a 500) opens the circuit; the next request is refused by it (503).
    get(&gw.url("/breaker/x")).await;
    let r = get(&gw.url("/breaker/x")).await;
    assert_eq!(
        r.text(),
        "fresh /breaker/x",
        "an open circuit: the stale object"
    );
    assert!(
        r.header("cache-status").contains("fwd-status=503"),
        "{}",
        r.header("cache-status")
    );
    // Once the health check has marked the only endpoint down: 503 no_healthy_endpoint.
    eventually(10, "the health check marks the endpoint down", || {
        let url = gw.url("/health-checked/x");
        async move {
            let r = get(&url).await;
            r.text() == "fresh /h/x" && r.header("cache-status").contains("fwd-status=503")
        }
    })
    .await;
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains(r#"gatehouse_cache_total{result="stale",route="web/breaker"}"#),
        "{m}"
    );
}

/// The store holds at most max_size bytes: beyond it objects are evicted, counted, and the
/// bytes gauge agrees with what the store holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_evicts_beyond_max_size_and_counts_what_it_holds() {
    let up = Upstream::start(|_req| async {
        with(
            text(200, vec![b'z'; 2000]),
            &[("cache-control", "max-age=600")],
        )
    })
    .await;
    let gw = gateway(
        &up,
        "[cache]\nmax_size = \"64KiB\"\nmax_object_size = \"8KiB\"\n",
        "true",
    )
    .await;
    for i in 0..100 {
        assert_eq!(get(&gw.url(&format!("/o/{i}"))).await.body.len(), 2000);
    }
    let stats = get(&gw.admin_url("/admin/cache")).await.json();
    let bytes = stats["bytes"].as_u64().unwrap();
    assert!(bytes <= 64 * 1024, "{stats}");
    assert!(stats["urls"].as_u64().unwrap() < 100, "{stats}");
    let m = get(&gw.admin_url("/metrics")).await.text();
    let value = |name: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
    };
    assert!(value("gatehouse_cache_evictions_total") > 0);
    assert_eq!(
        value("gatehouse_cache_bytes "),
        bytes,
        "the gauge is what the store holds"
    );
    assert_eq!(
        value("gatehouse_cache_objects "),
        stats["urls"].as_u64().unwrap()
    );
}

/// The coalescing bounds: waiters give up after `lock_timeout` and ask the service
/// themselves; beyond `max_waiters` requests do not wait at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_is_bounded_by_lock_timeout_and_max_waiters() {
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        with(text(200, "slow"), &[("cache-control", "max-age=600")])
    })
    .await;
    let burst = |gw: &TestGateway, path: &str| {
        let url = gw.url(path);
        let calls: Vec<_> = (0..5)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { get(&url).await })
            })
            .collect();
        async move {
            for c in calls {
                assert_eq!(c.await.unwrap().text(), "slow");
            }
        }
    };
    let gw = gateway(&up, "[cache]\nlock_timeout = \"100ms\"\n", "true").await;
    burst(&gw, "/t").await;
    assert_eq!(
        up.requests(),
        5,
        "each waiter gave up after 100 ms and asked the service"
    );
    let gw = gateway(&up, "[cache]\nmax_waiters = 1\n", "true").await;
    burst(&gw, "/w").await;
    assert_eq!(
        up.requests(),
        5 + 4,
        "the leader and one waiter share a request; three do not wait"
    );
}

/// An error answer of a cached route carries Cache-Status too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_a_cached_route_carry_cache_status() {
    let dead = closed_port().await;
    let gwt = gateway_toml(
        "",
        &format!("[services.svc]\nendpoints = [\"http://{dead}\"]\n"),
    );
    let routes = "[frontend]\nname = \"web\"\n\n[[route]]\nname = \"all\"\npath = \"/{*rest}\"\ncache = true\nproxy = { service = \"svc\" }\n";
    let gw = TestGateway::start(&gwt, &[("web.toml", routes)]).await;
    let r = get(&gw.url("/x")).await;
    assert_problem(&r, 502, "upstream_connect_failed");
    assert_eq!(
        r.header("cache-status"),
        "gatehouse; fwd=uri-miss; fwd-status=502"
    );
    let r = req("GET", &gw.url("/x"), &[("cache-control", "only-if-cached")]).await;
    assert_problem(&r, 504, "not_cached");
    assert!(r.header("cache-status").contains("only-if-cached"));
}

/// Two routes may serve one URL, told apart by a header: each answers only with what it
/// stored. A client asking for `max-age=0` is not given a stale copy while it is refreshed.
/// Preconditions do not turn a stored 404 into a 304.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_keep_their_own_objects_and_client_freshness_limits_hold() {
    let up = scripted(|path, headers, n| {
        let who = if headers.contains_key("x-internal") {
            "internal"
        } else {
            "public"
        };
        match path {
            "/missing" => with(
                text(404, "nope"),
                &[("cache-control", "max-age=60"), ("etag", "\"m\"")],
            ),
            "/swr" => with(
                text(200, format!("swr {n}")),
                &[
                    ("cache-control", "max-age=0, stale-while-revalidate=60"),
                    ("etag", "\"s\""),
                ],
            ),
            _ => with(
                text(200, format!("{who} {n}")),
                &[("cache-control", "public, max-age=60")],
            ),
        }
    })
    .await;
    let gwt = gateway_toml(
        "",
        &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
    );
    let routes = r#"[frontend]
name = "web"
cache = true

[[route]]
name = "internal"
path = "/{*rest}"
headers = { "x-internal" = "1" }
proxy = { service = "svc" }

[[route]]
name = "public"
path = "/{*rest}"
proxy = { service = "svc" }
"#;
    let gw = TestGateway::start(&gwt, &[("web.toml", routes)]).await;
    assert_eq!(
        req("GET", &gw.url("/data"), &[("x-internal", "1")])
            .await
            .text(),
        "internal 1"
    );
    assert_eq!(
        get(&gw.url("/data")).await.text(),
        "public 2",
        "not the internal route's object"
    );
    assert_eq!(
        req("GET", &gw.url("/data"), &[("x-internal", "1")])
            .await
            .text(),
        "internal 1"
    );
    assert_eq!(get(&gw.url("/data")).await.text(), "public 2");
    // max-age=0 from the client: the service is asked, even within stale-while-revalidate.
    assert_eq!(get(&gw.url("/swr")).await.text(), "swr 1");
    let r = req("GET", &gw.url("/swr"), &[("cache-control", "max-age=0")]).await;
    assert!(
        !r.header("cache-status").contains("hit"),
        "{}",
        r.header("cache-status")
    );
    // A stored 404 answers a conditional request with the 404.
    assert_eq!(get(&gw.url("/missing")).await.status, 404);
    let r = req("GET", &gw.url("/missing"), &[("if-none-match", "\"m\"")]).await;
    assert_eq!(r.status, 404);
    assert!(r.header("cache-status").contains("hit"));
}

/// stale-while-revalidate refreshes one URL with one background request at a time, however
/// many stale hits arrive meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_background_refresh_per_url_at_a_time() {
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    let up = Upstream::start(move |_req| {
        let i = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if i > 1 {
                // Refreshes take a while: stale hits keep arriving during it.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            with(
                text(200, format!("v{i}")),
                &[
                    ("cache-control", "max-age=0, stale-while-revalidate=60"),
                    ("etag", "\"e\""),
                ],
            )
        }
    })
    .await;
    let gw = gateway(&up, "", "true").await;
    assert_eq!(get(&gw.url("/r")).await.text(), "v1");
    let url = gw.url("/r");
    let hits: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for h in hits {
        let r = h.await.unwrap();
        assert_eq!(r.text(), "v1", "stale, at once");
        assert!(r.header("cache-status").contains("stale-while-revalidate"));
    }
    eventually(10, "the refresh reaches the service", || {
        let n = up.requests();
        async move { n >= 2 }
    })
    .await;
    // Past the refresh's end: still the one.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(up.requests(), 2, "one refresh for ten stale hits");
}

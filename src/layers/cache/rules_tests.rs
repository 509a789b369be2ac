//! The rules of `rules.rs`, each against the RFC's examples and edge cases.
use super::*;

fn h(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        m.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    m
}

const A: Assumptions = Assumptions {
    ttl: None,
    heuristic: true,
    store_set_cookie: false,
    per_identity: false,
};

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn fmt(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

fn store(
    status: u16,
    pairs: &[(&str, &str)],
    auth: bool,
    a: &Assumptions,
) -> Result<Timing, NotStorable> {
    let headers = h(pairs);
    let cc = ResponseDirectives::parse(&headers);
    storable(
        StatusCode::from_u16(status).unwrap(),
        &headers,
        &cc,
        auth,
        a,
        at(0),
        at(0),
    )
}

#[test]
fn directives_parse_with_quotes_case_and_repeats() {
    let d = ResponseDirectives::parse(&h(&[
        (
            "cache-control",
            r#"Max-Age=60, no-cache="set-cookie, x-foo", public"#,
        ),
        (
            "cache-control",
            "max-age=5, s-maxage=99999999999, stale-if-error=30",
        ),
    ]));
    assert_eq!(d.max_age, Some(60), "the first max-age wins");
    assert_eq!(d.s_maxage, Some(DELTA_MAX));
    assert!(d.no_cache && d.public && !d.private);
    assert_eq!(d.stale_if_error, Some(30));
    assert!(!d.allows_stale());
    let d = ResponseDirectives::parse(&h(&[("cache-control", "max-age=abc")]));
    assert_eq!(d.max_age, Some(0), "an invalid max-age is stale");
    let r = RequestDirectives::parse(&h(&[("pragma", "no-cache")]));
    assert!(r.no_cache);
    let r = RequestDirectives::parse(&h(&[
        ("pragma", "no-cache"),
        ("cache-control", "max-stale"),
    ]));
    assert!(!r.no_cache, "Pragma counts only without Cache-Control");
    assert_eq!(r.max_stale, Some(None));
}

#[test]
fn freshness_precedence_is_s_maxage_then_max_age_then_expires_then_ttl_then_heuristic() {
    let t = store(
        200,
        &[("cache-control", "s-maxage=10, max-age=20")],
        false,
        &A,
    )
    .unwrap();
    assert_eq!(t.lifetime, Duration::from_secs(10));
    let t = store(
        200,
        &[("cache-control", "max-age=20"), ("expires", &fmt(at(100)))],
        false,
        &A,
    )
    .unwrap();
    assert_eq!(t.lifetime, Duration::from_secs(20));
    let t = store(
        200,
        &[("date", &fmt(at(0))), ("expires", &fmt(at(100)))],
        false,
        &A,
    )
    .unwrap();
    assert_eq!(t.lifetime, Duration::from_secs(100));
    // An invalid Expires is in the past: stored only to be revalidated.
    assert_eq!(
        store(200, &[("expires", "0")], false, &A),
        Err(NotStorable::NoFreshness)
    );
    let ttl = Assumptions {
        ttl: Some(Duration::from_secs(30)),
        ..A
    };
    // The route's ttl applies only where the service says nothing.
    assert_eq!(
        store(200, &[], false, &ttl).unwrap().lifetime,
        Duration::from_secs(30)
    );
    assert_eq!(
        store(200, &[("cache-control", "max-age=5")], false, &ttl)
            .unwrap()
            .lifetime,
        Duration::from_secs(5)
    );
    // Heuristic: 10% of the time since Last-Modified.
    let lm = [("date", fmt(at(1000))), ("last-modified", fmt(at(0)))];
    let lm: Vec<(&str, &str)> = lm.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        store(200, &lm, false, &A).unwrap().lifetime,
        Duration::from_secs(100)
    );
    let off = Assumptions {
        heuristic: false,
        ..A
    };
    assert_eq!(
        store(200, &lm, false, &off).unwrap().lifetime,
        Duration::ZERO,
        "kept for revalidation only"
    );
    // Not heuristically cacheable: 302 needs explicit freshness, and no ttl applies.
    assert_eq!(store(302, &[], false, &ttl), Err(NotStorable::Status));
    assert!(store(302, &[("cache-control", "max-age=5")], false, &A).is_ok());
}

#[test]
fn what_a_shared_cache_never_stores() {
    assert_eq!(
        store(200, &[("cache-control", "no-store, max-age=5")], false, &A),
        Err(NotStorable::NoStore)
    );
    assert_eq!(
        store(200, &[("cache-control", "private, max-age=5")], false, &A),
        Err(NotStorable::Private)
    );
    assert_eq!(
        store(206, &[("cache-control", "max-age=5")], false, &A),
        Err(NotStorable::Status)
    );
    assert_eq!(
        store(
            200,
            &[("cache-control", "max-age=5"), ("set-cookie", "a=1")],
            false,
            &A
        ),
        Err(NotStorable::SetCookie)
    );
    assert_eq!(
        store(
            200,
            &[("cache-control", "max-age=5"), ("vary", "Accept, *")],
            false,
            &A
        ),
        Err(NotStorable::VaryStar)
    );
    // §3.5: an authorized request's response only when the service allows it.
    assert_eq!(
        store(200, &[("cache-control", "max-age=5")], true, &A),
        Err(NotStorable::Authorization)
    );
    for ok in [
        "public, max-age=5",
        "s-maxage=5",
        "must-revalidate, max-age=5",
    ] {
        assert!(
            store(200, &[("cache-control", ok)], true, &A).is_ok(),
            "{ok}"
        );
    }
    let per = Assumptions {
        per_identity: true,
        ..A
    };
    assert!(store(200, &[("cache-control", "private, max-age=5")], true, &per).is_ok());
    let cookies = Assumptions {
        store_set_cookie: true,
        ..A
    };
    assert!(store(
        200,
        &[("cache-control", "max-age=5"), ("set-cookie", "a=1")],
        false,
        &cookies
    )
    .is_ok());
}

#[test]
fn the_initial_age_counts_age_date_and_the_round_trip() {
    let headers = h(&[("age", "30")]);
    assert_eq!(
        initial_age(&headers, at(10), at(8), at(10)),
        Duration::from_secs(32)
    );
    let headers = h(&[]);
    assert_eq!(
        initial_age(&headers, at(0), at(8), at(10)),
        Duration::from_secs(10),
        "apparent age"
    );
}

#[test]
fn cdn_cache_control_wins_when_valid_and_is_ignored_whole_when_not() {
    let d = ResponseDirectives::parse(&h(&[
        ("cdn-cache-control", "max-age=600"),
        ("cache-control", "no-store"),
    ]));
    assert!(d.targeted && !d.no_store && d.max_age == Some(600));
    // Expires does not count beside it.
    let t = store(
        200,
        &[
            ("cdn-cache-control", "private"),
            ("cache-control", "max-age=60"),
        ],
        false,
        &A,
    );
    assert_eq!(t, Err(NotStorable::Private));
    for bad in [
        "max-age=10000, &&&&&",
        "max-age=\"10000\"",
        "max-age=1;&x",
        "\"open",
    ] {
        let d = ResponseDirectives::parse(&h(&[
            ("cdn-cache-control", bad),
            ("cache-control", "no-store"),
        ]));
        assert!(!d.targeted && d.no_store, "`{bad}` is ignored");
    }
    let d = ResponseDirectives::parse(&h(&[(
        "cdn-cache-control",
        "max-age=60, foo=\"a, b\";p=?1, bar=tok/1",
    )]));
    assert!(d.targeted && d.max_age == Some(60));
}

#[test]
fn must_understand_lifts_no_store_for_a_known_status_and_ages_take_the_first_member() {
    assert!(store(
        200,
        &[("cache-control", "no-store, must-understand, max-age=60")],
        false,
        &A
    )
    .is_ok());
    let headers = h(&[("age", "7200, 0")]);
    assert_eq!(
        initial_age(&headers, at(0), at(0), at(0)),
        Duration::from_secs(7200)
    );
    let wrong_case = HeaderValue::from_static("wed, 02 DEC 2026 18:46:36 gmt");
    assert!(http_date(&wrong_case).is_some());
}

#[test]
fn if_none_match_compares_weakly() {
    let etag = HeaderValue::from_static("\"v1\"");
    assert!(none_match(
        &h(&[("if-none-match", "\"x\", W/\"v1\"")]),
        Some(&etag)
    ));
    assert!(none_match(&h(&[("if-none-match", "*")]), Some(&etag)));
    assert!(!none_match(&h(&[("if-none-match", "\"v2\"")]), Some(&etag)));
    assert!(!none_match(&h(&[("if-none-match", "\"v2\"")]), None));
}

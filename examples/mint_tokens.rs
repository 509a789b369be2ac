//! Mints JWTs for the benchmark's JWT scenarios: `mint_tokens ALG COUNT OUT` writes COUNT
//! distinct tokens (one per line) signed with bench/keys (ALG: RS256 or ES256), each valid for
//! an hour, issuer `https://bench.test/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, alg, count, out] = &args[..] else {
        eprintln!("usage: mint_tokens RS256|ES256 COUNT OUT");
        std::process::exit(2);
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/keys");
    let (alg, key) = match alg.as_str() {
        "RS256" => (
            jsonwebtoken::Algorithm::RS256,
            jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(root.join("rsa.pem")).unwrap())
                .unwrap(),
        ),
        "ES256" => (
            jsonwebtoken::Algorithm::ES256,
            jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(root.join("ec.pem")).unwrap())
                .unwrap(),
        ),
        other => panic!("unknown algorithm {other}"),
    };
    let n: usize = count.parse().expect("COUNT is a number");
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let header = jsonwebtoken::Header::new(alg);
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    for i in 0..n {
        let claims = serde_json::json!({
            "iss": "https://bench.test/", "sub": format!("user-{i}"), "exp": exp, "scope": "bench",
        });
        writeln!(
            f,
            "{}",
            jsonwebtoken::encode(&header, &claims, &key).unwrap()
        )
        .unwrap();
    }
}

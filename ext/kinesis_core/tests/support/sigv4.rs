//! Checks an AWS Signature Version 4 `Authorization` header against the request it came with,
//! computed here from the specification (canonical request, string to sign, derived key), not
//! with the SDK's signer: a test then learns whether what the client signed is what it sent.
//! Covers what our clients send: a POST to `/` without a query string, signed headers only.

use hmac::{Hmac, KeyInit, Mac};
use hyper::http::request::Parts;
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A header value as SigV4 canonicalizes it: trimmed, inner runs of spaces made one.
fn canonical_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether the request's signature is the one `secret` gives for its method, path, signed
/// headers and `body`. False for an unsigned request or a malformed header.
pub fn verify(parts: &Parts, body: &[u8], secret: &str) -> bool {
    let Some(auth) = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(fields) = auth.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return false;
    };
    let field = |name: &str| {
        fields
            .split(',')
            .map(str::trim)
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    };
    let (Some(credential), Some(signed), Some(signature)) = (
        field("Credential"),
        field("SignedHeaders"),
        field("Signature"),
    ) else {
        return false;
    };
    // Credential=AKID/DATE/REGION/SERVICE/aws4_request
    let Some((_, scope)) = credential.split_once('/') else {
        return false;
    };
    let scope_parts: Vec<&str> = scope.split('/').collect();
    let Some(amz_date) = parts
        .headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if scope_parts.len() != 4 || !amz_date.starts_with(scope_parts[0]) {
        return false;
    }
    let mut canonical_headers = String::new();
    for name in signed.split(';') {
        let values: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(canonical_value)
            .collect();
        if values.is_empty() {
            return false;
        }
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let canonical_request = format!(
        "{}\n{path}\n{query}\n{canonical_headers}\n{signed}\n{}",
        parts.method,
        hex(&Sha256::digest(body))
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = format!("AWS4{secret}").into_bytes();
    for part in &scope_parts {
        key = hmac(&key, part);
    }
    hex(&hmac(&key, &string_to_sign)) == signature
}

//! Requests `object_store` has no call for (listing multipart uploads, object versions,
//! retention), built here and signed with the client's own SigV4 signer and credentials, sent
//! through one HTTP client kept for the backend's life.

use std::sync::atomic::Ordering;

use object_store::aws::AwsAuthorizer;
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::ClientOptions;
use sbk_store::{Kind, Result, StoreError};

use crate::Inner;

/// What the storage answered.
pub(crate) struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The body, as text (S3 answers in XML).
    pub body: String,
}

impl Reply {
    /// The S3 error code of a refusal (`<Code>…</Code>`), or "" for none.
    pub fn code(&self) -> &str {
        elements(&self.body, "Code").first().copied().unwrap_or("")
    }
}

impl Inner {
    /// The HTTP client of the signed requests, made on first use.
    fn http(&self) -> Result<&HttpClient> {
        if let Some(c) = self.http.get() {
            return Ok(c);
        }
        let client = ReqwestConnector::default()
            .connect(
                &ClientOptions::new()
                    .with_allow_http(self.endpoint.starts_with("http://"))
                    .with_connect_timeout(std::time::Duration::from_secs(5))
                    .with_timeout(std::time::Duration::from_secs(120)),
            )
            .map_err(|e| self.err(e, Kind::Pack, ""))?;
        Ok(self.http.get_or_init(|| client))
    }

    /// The URL of the bucket (`key` empty) or of an object key, with a query string.
    pub(crate) fn url(&self, key: &str, query: &str) -> String {
        let mut url = format!(
            "{}/{}",
            self.endpoint.trim_end_matches('/'),
            encode(&self.at.bucket)
        );
        if !key.is_empty() {
            url.push('/');
            url += &key.split('/').map(encode).collect::<Vec<_>>().join("/");
        }
        if !query.is_empty() {
            url.push('?');
            url += query;
        }
        url
    }

    /// Sends one signed request and returns whatever the storage answered; only a storage that
    /// cannot be reached is an error here (callers judge the status). `what` names the
    /// request in messages.
    pub(crate) fn signed(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
        what: &str,
    ) -> Result<Reply> {
        let (status, body) = self.signed_bytes(method, url, headers, body, what)?;
        Ok(Reply {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// [`Inner::signed`] with the answer's body as bytes. Retried a few times at growing
    /// intervals when the storage is unreachable or answers 5xx (every request sent here is
    /// idempotent).
    pub(crate) fn signed_bytes(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
        what: &str,
    ) -> Result<(u16, Vec<u8>)> {
        let mut wait = std::time::Duration::from_millis(200);
        for _ in 0..3 {
            match self.signed_once(method.clone(), url, headers, body.clone(), what) {
                Ok((status, _)) if status >= 500 => {}
                Err(StoreError::StorageUnreachable { .. }) => {}
                r => return r,
            }
            std::thread::sleep(wait);
            wait *= 3;
        }
        self.signed_once(method, url, headers, body, what)
    }

    fn signed_once(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
        what: &str,
    ) -> Result<(u16, Vec<u8>)> {
        let client = self.http()?;
        self.rt.block_on(async {
            let credential = self
                .store
                .credentials()
                .get_credential()
                .await
                .map_err(|e| self.err(e, Kind::Pack, ""))?;
            let mut builder = http::Request::builder().method(method).uri(url);
            for (name, value) in headers {
                builder = builder.header(*name, value);
            }
            let mut request = builder
                .body(HttpRequestBody::from(body))
                .map_err(|e| self.unreachable(format!("cannot build the request {url}: {e}")))?;
            AwsAuthorizer::new(&credential, "s3", &self.region)
                .try_authorize(&mut request, None)
                .map_err(|e| self.err(e, Kind::Pack, ""))?;
            let response = client
                .execute(request)
                .await
                .map_err(|e| self.unreachable(format!("{what}: {e}")))?;
            let status = response.status().as_u16();
            if let Some(date) = response
                .headers()
                .get(http::header::DATE)
                .and_then(|d| d.to_str().ok())
                .and_then(parse_http_date)
            {
                // The storage's clock, as offset from ours: retention dates and `--as-of`
                // times are the storage's, whatever this host's clock says.
                self.clock_offset
                    .store(date - sbk_store::unix_now(), Ordering::Relaxed);
            }
            let body = response
                .into_body()
                .bytes()
                .await
                .map_err(|e| self.unreachable(format!("{what}: {e}")))?;
            Ok((status, body.to_vec()))
        })
    }

    /// A reply that is not a success, as the store's error: a missing bucket, a refusal of the
    /// credentials or permissions, or anything else (the storage failing).
    pub(crate) fn refused(&self, reply: &Reply, what: &str) -> StoreError {
        let detail = format!("{what}: HTTP {}: {}", reply.status, reply.body);
        match (reply.status, reply.code()) {
            (_, "NoSuchBucket") => StoreError::NoBucket {
                bucket: self.at.bucket.clone(),
                location: self.at.to_string(),
            },
            (401 | 403, _) => StoreError::StorageDenied {
                location: self.at.to_string(),
                detail,
            },
            _ => self.unreachable(detail),
        }
    }

    pub(crate) fn unreachable(&self, detail: String) -> StoreError {
        StoreError::StorageUnreachable {
            location: self.at.to_string(),
            detail,
        }
    }
}

/// Parses an HTTP date (`Mon, 07 Dec 2026 00:12:09 GMT`, RFC 9110's IMF-fixdate) to seconds
/// since the Unix epoch.
pub(crate) fn parse_http_date(s: &str) -> Option<i64> {
    let mut parts = s.split_whitespace().skip(1);
    let day: i64 = parts.next()?.parse().ok()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an RFC 3339 time as S3 writes it (`2026-11-26T04:11:52.000Z`) to seconds since the
/// Unix epoch.
pub(crate) fn parse_time(s: &str) -> std::result::Result<i64, String> {
    let at = humantime::parse_rfc3339_weak(s).map_err(|e| format!("time {s:?}: {e}"))?;
    Ok(match at.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    })
}

/// The contents of each `<tag>…</tag>` in `xml`, in order.
pub(crate) fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    tagged(xml, &[tag])
        .into_iter()
        .map(|(_, body)| body)
        .collect()
}

/// The contents of each element named by one of `tags`, in document order, with its tag (S3
/// documents nest no element inside one of the same name).
pub(crate) fn tagged<'a, 't>(xml: &'a str, tags: &[&'t str]) -> Vec<(&'t str, &'a str)> {
    let mut out = Vec::new();
    let mut rest = xml;
    loop {
        let next = tags
            .iter()
            .filter_map(|t| rest.find(&format!("<{t}>")).map(|at| (at, *t)))
            .min();
        let Some((start, tag)) = next else { break };
        let body = &rest[start + tag.len() + 2..];
        let close = format!("</{tag}>");
        let Some(end) = body.find(&close) else { break };
        out.push((tag, &body[..end]));
        rest = &body[end + close.len()..];
    }
    out
}

/// XML's five predefined entities.
pub(crate) fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Percent-encodes a query value or path segment (RFC 3986 unreserved characters stay).
pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            parse_http_date("Mon, 07 Dec 2026 00:12:09 GMT"),
            Some(parse_time("2026-12-07T00:12:09Z").unwrap())
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("Mon, 07 Foo 2026 00:12:09 GMT"), None);
        assert_eq!(parse_http_date("Mon, 07 Dec 2026 25:12:09 GMT"), None);
        assert_eq!(parse_http_date("07 Dec 2026"), None);
    }

    #[test]
    fn elements_come_in_document_order() {
        let xml = "<A>1</A><B>2</B><A>3</A><B>4";
        assert_eq!(
            tagged(xml, &["A", "B"]),
            vec![("A", "1"), ("B", "2"), ("A", "3")]
        );
        assert_eq!(elements(xml, "B"), vec!["2"]);
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("a b/c~d"), "a%20b%2Fc~d");
    }
}

//! Multipart uploads left behind. A mover killed in the middle of uploading a large pack leaves
//! an unfinished multipart upload: no listing of objects shows it, and the storage keeps (and
//! bills) its parts until it is aborted. `object_store` can abort an upload by id but cannot
//! list them, so this module sends the one request it lacks, `ListMultipartUploads` (a signed
//! `GET /BUCKET?uploads`), through the client's own HTTP stack and SigV4 signer.

use object_store::aws::AwsAuthorizer;
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::ClientOptions;
use sbk_store::{Result, StoreError};

use crate::Inner;

/// An unfinished multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The object key it would create.
    pub key: String,
    /// The storage's id of the upload.
    pub id: String,
    /// When it was started, by the storage's clock (seconds since the Unix epoch).
    pub initiated: i64,
}

impl Inner {
    /// Every unfinished multipart upload whose key starts with `prefix`, all pages of them.
    pub(crate) fn list_uploads(&self, prefix: &str) -> Result<Vec<Upload>> {
        let mut out = Vec::new();
        // One client for every page: a connection per page would be set up anew each time.
        let client = ReqwestConnector::default()
            .connect(&ClientOptions::new().with_allow_http(self.endpoint.starts_with("http://")))
            .map_err(|e| self.err(e, sbk_store::Kind::Pack, ""))?;
        let mut markers: Option<(String, String)> = None;
        // A bound on the pages, so that a storage handing back pages in a cycle cannot keep us
        // listing for ever (a million uploads at 1000 a page).
        for _ in 0..1000 {
            let mut url = format!(
                "{}/{}?uploads=&prefix={}",
                self.endpoint.trim_end_matches('/'),
                encode(&self.at.bucket),
                encode(prefix)
            );
            if let Some((key, id)) = &markers {
                url += &format!(
                    "&key-marker={}&upload-id-marker={}",
                    encode(key),
                    encode(id)
                );
            }
            let xml = self.signed_get_retrying(&client, &url)?;
            let page = parse_uploads(&xml).map_err(|detail| self.unreachable(detail))?;
            out.extend(page.uploads);
            match page.next {
                // A storage that hands back the same markers would have us loop for ever.
                Some(next) if markers.as_ref() == Some(&next) => {
                    return Err(self.unreachable(format!(
                        "listing multipart uploads: the storage repeats the page after {next:?}"
                    )))
                }
                Some(next) => markers = Some(next),
                None => return Ok(out),
            }
        }
        Err(self.unreachable(
            "listing multipart uploads: more than 1000 pages; not aborting any".into(),
        ))
    }

    /// Aborts an unfinished multipart upload (its parts are freed).
    pub(crate) fn abort_upload(&self, upload: &Upload) -> Result<()> {
        self.rt
            .block_on(
                self.store
                    .abort_multipart(&Path::from(upload.key.as_str()), &upload.id),
            )
            .map_err(|e| self.err(e, sbk_store::Kind::Pack, &upload.key))
    }

    /// [`Inner::signed_get`], retried a few times at growing intervals when the storage is
    /// unreachable or answers with anything but success or a refusal of the credentials.
    fn signed_get_retrying(&self, client: &HttpClient, url: &str) -> Result<String> {
        let mut wait = std::time::Duration::from_millis(200);
        for _ in 0..3 {
            match self.signed_get(client, url) {
                Err(StoreError::StorageUnreachable { .. }) => {
                    std::thread::sleep(wait);
                    wait *= 3;
                }
                r => return r,
            }
        }
        self.signed_get(client, url)
    }

    /// GETs `url`, signed with the store's credentials; the body as text.
    fn signed_get(&self, client: &HttpClient, url: &str) -> Result<String> {
        self.rt.block_on(async {
            let credential = self
                .store
                .credentials()
                .get_credential()
                .await
                .map_err(|e| self.err(e, sbk_store::Kind::Pack, ""))?;
            let mut request = http::Request::get(url)
                .body(HttpRequestBody::empty())
                .map_err(|e| self.unreachable(format!("cannot build the request {url}: {e}")))?;
            AwsAuthorizer::new(&credential, "s3", &self.region)
                .try_authorize(&mut request, None)
                .map_err(|e| self.err(e, sbk_store::Kind::Pack, ""))?;
            let response = client
                .execute(request)
                .await
                .map_err(|e| self.unreachable(format!("listing multipart uploads: {e}")))?;
            let status = response.status();
            let body = response
                .into_body()
                .bytes()
                .await
                .map_err(|e| self.unreachable(format!("listing multipart uploads: {e}")))?;
            let text = String::from_utf8_lossy(&body).into_owned();
            match status.as_u16() {
                200..=299 => Ok(text),
                401 | 403 => Err(StoreError::StorageDenied {
                    location: self.at.to_string(),
                    detail: format!("listing multipart uploads: {status}: {text}"),
                }),
                _ => Err(self.unreachable(format!("listing multipart uploads: {status}: {text}"))),
            }
        })
    }

    fn unreachable(&self, detail: String) -> StoreError {
        StoreError::StorageUnreachable {
            location: self.at.to_string(),
            detail,
        }
    }
}

/// One page of a `ListMultipartUploads` answer.
#[derive(Debug, PartialEq, Eq)]
struct Page {
    uploads: Vec<Upload>,
    /// The key and upload-id markers of the next page, when the listing is truncated.
    next: Option<(String, String)>,
}

/// Parses a `ListMultipartUploadsResult` document (only the elements read here; S3 documents
/// nest no element inside the ones of the same name).
fn parse_uploads(xml: &str) -> std::result::Result<Page, String> {
    let mut uploads = Vec::new();
    for u in elements(xml, "Upload") {
        let field = |name: &str| {
            elements(u, name)
                .first()
                .map(|v| unescape(v))
                .ok_or_else(|| format!("an upload without <{name}> in the listing"))
        };
        let initiated = field("Initiated")?;
        let at = humantime::parse_rfc3339_weak(&initiated)
            .map_err(|e| format!("upload start {initiated:?}: {e}"))?;
        uploads.push(Upload {
            key: field("Key")?,
            id: field("UploadId")?,
            initiated: at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        });
    }
    let truncated = elements(xml, "IsTruncated").first() == Some(&"true");
    let next = match (
        elements(xml, "NextKeyMarker").first(),
        elements(xml, "NextUploadIdMarker").first(),
    ) {
        (Some(k), Some(i)) if truncated => Some((unescape(k), unescape(i))),
        _ if truncated => return Err("a truncated listing without its next markers".into()),
        _ => None,
    };
    Ok(Page { uploads, next })
}

/// Fuzz entry point: a `ListMultipartUploads` answer (bytes the storage sends) parses to pages
/// or to an error, never a panic.
pub fn fuzz_uploads_listing(data: &[u8]) {
    let _ = parse_uploads(&String::from_utf8_lossy(data));
}

/// The contents of each `<tag>…</tag>` in `xml`, in order.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        out.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    out
}

/// XML's five predefined entities.
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn encode(s: &str) -> String {
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
    fn a_listing_parses_with_its_markers() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>sbk</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>r/packs/b&amp;c</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>
  <MaxUploads>2</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>r/packs/aa</Key><UploadId>u1</UploadId>
    <Initiator><ID>x</ID></Initiator><Initiated>2026-11-26T04:11:52.000Z</Initiated></Upload>
  <Upload><Key>r/packs/b&amp;c</Key><UploadId>u2</UploadId><Initiated>2026-11-26T04:11:53Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let page = parse_uploads(xml).unwrap();
        assert_eq!(
            page.uploads,
            vec![
                Upload {
                    key: "r/packs/aa".into(),
                    id: "u1".into(),
                    initiated: 1_795_666_312,
                },
                Upload {
                    key: "r/packs/b&c".into(),
                    id: "u2".into(),
                    initiated: 1_795_666_313,
                },
            ]
        );
        assert_eq!(page.next, Some(("r/packs/b&c".into(), "u2".into())));
        let last = xml.replace("<IsTruncated>true", "<IsTruncated>false");
        assert_eq!(parse_uploads(&last).unwrap().next, None);
    }

    #[test]
    fn bad_listings_are_errors_not_panics() {
        assert!(parse_uploads("<Upload><Key>k</Key></Upload>").is_err());
        assert!(parse_uploads(
            "<Upload><Key>k</Key><UploadId>u</UploadId><Initiated>yesterday</Initiated></Upload>"
        )
        .is_err());
        assert!(parse_uploads("<IsTruncated>true</IsTruncated>").is_err());
        assert_eq!(parse_uploads("<Upload><Key>").unwrap().uploads, vec![]);
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("a b/c~d"), "a%20b%2Fc~d");
    }
}

//! Multipart uploads left behind. A mover killed in the middle of uploading a large pack leaves
//! an unfinished multipart upload: no listing of objects shows it, and the storage keeps (and
//! bills) its parts until it is aborted. `object_store` can abort an upload by id but cannot
//! list them, so this module sends the one request it lacks, `ListMultipartUploads` (a signed
//! `GET /BUCKET?uploads`, signed.rs).

use object_store::multipart::MultipartStore;
use object_store::path::Path;
use sbk_store::Result;

use crate::signed::{elements, encode, parse_time, unescape};
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
        let mut markers: Option<(String, String)> = None;
        // A bound on the pages, so that a storage handing back pages in a cycle cannot keep us
        // listing for ever (a million uploads at 1000 a page).
        for _ in 0..1000 {
            let mut query = format!("uploads=&prefix={}", encode(prefix));
            if let Some((key, id)) = &markers {
                query += &format!(
                    "&key-marker={}&upload-id-marker={}",
                    encode(key),
                    encode(id)
                );
            }
            let what = "listing multipart uploads";
            let reply = self.signed(
                http::Method::GET,
                &self.url("", &query),
                &[],
                Vec::new(),
                what,
            )?;
            if reply.status != 200 {
                return Err(self.refused(&reply, what));
            }
            let page = parse_uploads(&reply.body).map_err(|detail| self.unreachable(detail))?;
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
        uploads.push(Upload {
            key: field("Key")?,
            id: field("UploadId")?,
            initiated: parse_time(&field("Initiated")?)?,
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
}

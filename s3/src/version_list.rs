//! The `ListObjectVersions` answer: parsed (never a panic on what the storage sends: a fuzz
//! target holds it to that) and put in the order the rest of sbk relies on.

use sbk_store::backend::ObjectVersion;

use crate::signed::{elements, parse_time, tagged, unescape};

/// One page of a `ListObjectVersions` answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Page {
    /// Versions and delete markers in document order (by key, newest first), keys as names.
    pub versions: Vec<ObjectVersion>,
    /// The key and version-id markers of the next page, when the listing is truncated.
    pub next: Option<(String, String)>,
}

/// Parses a `ListVersionsResult` document.
pub(crate) fn parse_versions(xml: &str) -> std::result::Result<Page, String> {
    let mut versions = Vec::new();
    for (tag, body) in tagged(xml, &["Version", "DeleteMarker"]) {
        let field = |name: &str| {
            elements(body, name)
                .first()
                .map(|v| unescape(v))
                .ok_or_else(|| format!("a {tag} without <{name}> in the listing"))
        };
        let delete_marker = tag == "DeleteMarker";
        versions.push(ObjectVersion {
            name: field("Key")?,
            version_id: field("VersionId")?,
            modified: parse_time(&field("LastModified")?)?,
            size: if delete_marker {
                0
            } else {
                field("Size")?
                    .parse()
                    .map_err(|e| format!("version size: {e}"))?
            },
            delete_marker,
            latest: elements(body, "IsLatest").first() == Some(&"true"),
        });
    }
    let truncated = elements(xml, "IsTruncated").first() == Some(&"true");
    let next = match (
        elements(xml, "NextKeyMarker").first(),
        elements(xml, "NextVersionIdMarker").first(),
    ) {
        (Some(k), Some(v)) if truncated => Some((unescape(k), unescape(v))),
        _ if truncated => return Err("a truncated listing without its next markers".into()),
        _ => None,
    };
    Ok(Page { versions, next })
}

/// Versions by name, the current one first within a name, then newest first, whatever order
/// the storage listed them in (S3 interleaves versions and delete markers by key, newest first;
/// a storage may list them apart). Ties keep the listing's order.
pub(crate) fn in_order(mut versions: Vec<ObjectVersion>) -> Vec<ObjectVersion> {
    versions.sort_by(|a, b| {
        a.name
            .cmp(&b.name)
            .then(b.latest.cmp(&a.latest))
            .then(b.modified.cmp(&a.modified))
    });
    versions
}

/// Fuzz entry point: a `ListObjectVersions` answer (bytes the storage sends) parses to a page
/// or to an error, never a panic.
pub fn fuzz_versions_listing(data: &[u8]) {
    let _ = parse_versions(&String::from_utf8_lossy(data));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_keeps_versions_and_markers_in_order() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
<IsTruncated>true</IsTruncated><NextKeyMarker>r/packs/b</NextKeyMarker><NextVersionIdMarker>v3</NextVersionIdMarker>
<DeleteMarker><Key>r/packs/a</Key><VersionId>v2</VersionId><IsLatest>true</IsLatest><LastModified>2026-12-07T00:12:11.000Z</LastModified></DeleteMarker>
<Version><Key>r/packs/a</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest><LastModified>2026-12-07T00:12:10Z</LastModified><ETag>"x"</ETag><Size>5</Size></Version>
<Version><Key>r/packs/b&amp;</Key><VersionId>v3</VersionId><LastModified>2026-12-07T00:12:12Z</LastModified><Size>7</Size></Version>
</ListVersionsResult>"#;
        let page = parse_versions(xml).unwrap();
        let t = parse_time("2026-12-07T00:12:10Z").unwrap();
        assert_eq!(
            page.versions,
            vec![
                ObjectVersion {
                    name: "r/packs/a".into(),
                    modified: t + 1,
                    version_id: "v2".into(),
                    size: 0,
                    delete_marker: true,
                    latest: true,
                },
                ObjectVersion {
                    name: "r/packs/a".into(),
                    modified: t,
                    version_id: "v1".into(),
                    size: 5,
                    delete_marker: false,
                    latest: false,
                },
                ObjectVersion {
                    name: "r/packs/b&".into(),
                    modified: t + 2,
                    version_id: "v3".into(),
                    size: 7,
                    delete_marker: false,
                    latest: false,
                },
            ]
        );
        assert_eq!(page.next, Some(("r/packs/b".into(), "v3".into())));
    }

    #[test]
    fn versions_listed_apart_come_back_in_order() {
        // Every version first, then every delete marker, as some storage lists them.
        let xml = r#"<ListVersionsResult>
<Version><Key>a</Key><VersionId>a1</VersionId><IsLatest>false</IsLatest><LastModified>2026-12-07T00:00:10Z</LastModified><Size>1</Size></Version>
<Version><Key>b</Key><VersionId>b2</VersionId><IsLatest>true</IsLatest><LastModified>2026-12-07T00:00:30Z</LastModified><Size>1</Size></Version>
<Version><Key>b</Key><VersionId>b1</VersionId><IsLatest>false</IsLatest><LastModified>2026-12-07T00:00:20Z</LastModified><Size>1</Size></Version>
<DeleteMarker><Key>a</Key><VersionId>a2</VersionId><IsLatest>true</IsLatest><LastModified>2026-12-07T00:00:40Z</LastModified></DeleteMarker>
</ListVersionsResult>"#;
        let ordered: Vec<String> = in_order(parse_versions(xml).unwrap().versions)
            .into_iter()
            .map(|v| v.version_id)
            .collect();
        assert_eq!(ordered, ["a2", "a1", "b2", "b1"]);
    }

    #[test]
    fn bad_listings_are_errors_not_panics() {
        assert!(parse_versions("<Version><Key>k</Key></Version>").is_err());
        assert!(parse_versions(
            "<Version><Key>k</Key><VersionId>v</VersionId><LastModified>x</LastModified><Size>1</Size></Version>"
        )
        .is_err());
        assert!(parse_versions(
            "<Version><Key>k</Key><VersionId>v</VersionId><LastModified>2026-12-07T00:12:10Z</LastModified><Size>-1</Size></Version>"
        )
        .is_err());
        assert!(parse_versions("<IsTruncated>true</IsTruncated>").is_err());
    }
}

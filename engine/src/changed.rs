//! Changed-block lists: which byte ranges of a source changed since its parent snapshot.
//!
//! Three formats, told apart by their first non-blank byte:
//! - Ceph `rbd diff --format json`: `[{"offset":N,"length":N,"exists":"true"|"false"}, …]`
//!   (a range that no longer "exists" was discarded: it reads as zeros now, so it changed too;
//!   an entry without "exists", as scripts write them, changed as well);
//! - LVM `thin_delta` XML, default and `--verbose`: `<different|right_only|left_only begin
//!   length/>`, possibly holding `<range begin length/>` elements, in thin-device blocks of the
//!   superblock's `data_block_size` sectors of 512 bytes (`<same …/>` is unchanged);
//! - plain text: one `OFFSET LENGTH` per line, decimal or `0x` hex, `#` comments.
//!
//! The result is a sorted list of disjoint byte ranges. A malformed list is an error naming the
//! line or byte where it went wrong, never a guess: a wrong list would make a wrong snapshot.

use std::ops::Range;

/// A changed-block list that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("changed-block list ({format}), {place}: {what}")]
pub struct ListError {
    /// The format it was read as.
    pub format: &'static str,
    /// Where: "line N" or "byte N".
    pub place: String,
    /// What is wrong.
    pub what: String,
}

/// A parsed changed-block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedList {
    /// The format it was read as: `rbd-json`, `thin-delta`, `text`.
    pub format: &'static str,
    /// Changed byte ranges, sorted and disjoint (touching ranges merged).
    pub ranges: Vec<Range<u64>>,
}

impl ChangedList {
    /// Reads a list in any of the three formats.
    pub fn parse(bytes: &[u8]) -> Result<ChangedList, ListError> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
        if first.is_none() {
            // An empty list is more often a tool that failed in a pipe than a disk where nothing
            // changed; a list that means "nothing" says so (`[]`, or a `#` comment line).
            return Err(ListError {
                format: "text",
                place: "byte 0".into(),
                what: "the list is empty (if nothing changed, write a comment line such as \"# nothing changed\")".into(),
            });
        }
        let (format, ranges) = match first {
            Some(b'[') => ("rbd-json", rbd_json(bytes)?),
            Some(b'<') => ("thin-delta", thin_delta(bytes)?),
            _ => ("text", text(bytes)?),
        };
        Ok(ChangedList {
            format,
            ranges: merge(ranges),
        })
    }

    /// Bytes the list marks as changed.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Which of a source's `count` segments (of `seg_size` bytes) a changed range touches.
    /// Ranges past the end of the source touch nothing (a shrunk source's tail is read anyway).
    pub fn segments(&self, seg_size: u64, count: u64) -> Vec<bool> {
        let mut touched = vec![false; count as usize];
        for r in &self.ranges {
            let first = r.start / seg_size;
            if first >= count {
                break;
            }
            let last = ((r.end - 1) / seg_size).min(count - 1);
            touched[first as usize..=last as usize].fill(true);
        }
        touched
    }

    /// The changed ranges inside `segment`, relative to its start.
    pub fn within(&self, segment: Range<u64>) -> Vec<Range<usize>> {
        let first = self.ranges.partition_point(|r| r.end <= segment.start);
        self.ranges[first..]
            .iter()
            .take_while(|r| r.start < segment.end)
            .map(|r| {
                (r.start.max(segment.start) - segment.start) as usize
                    ..(r.end.min(segment.end) - segment.start) as usize
            })
            .collect()
    }
}

fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.end > r.start);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

fn range(
    format: &'static str,
    place: String,
    start: u64,
    len: u64,
) -> Result<Range<u64>, ListError> {
    start
        .checked_add(len)
        .map(|end| start..end)
        .ok_or(ListError {
            format,
            place,
            what: format!("offset {start} + length {len} overflows"),
        })
}

fn rbd_json(bytes: &[u8]) -> Result<Vec<Range<u64>>, ListError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        offset: u64,
        length: u64,
        /// Absent in lists written by scripts rather than `rbd diff`: every entry of a
        /// changed-block list says a range changed, whatever `exists` says, so absent is
        /// "changed" too (null stands for it).
        #[serde(default)]
        exists: serde_json::Value,
    }
    let entries: Vec<Entry> = serde_json::from_slice(bytes).map_err(|e| ListError {
        format: "rbd-json",
        place: format!("line {} column {}", e.line(), e.column()),
        what: e.to_string(),
    })?;
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let place = format!("entry {}", i + 1);
            match &e.exists {
                serde_json::Value::String(s) if s == "true" || s == "false" => {}
                serde_json::Value::Bool(_) | serde_json::Value::Null => {}
                other => {
                    return Err(ListError {
                        format: "rbd-json",
                        place,
                        what: format!("\"exists\" must be \"true\" or \"false\", not {other}"),
                    })
                }
            }
            range("rbd-json", place, e.offset, e.length)
        })
        .collect()
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn text(bytes: &[u8]) -> Result<Vec<Range<u64>>, ListError> {
    let err = |line: usize, what: String| ListError {
        format: "text",
        place: format!("line {line}"),
        what,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| ListError {
        format: "text",
        place: format!("byte {}", e.valid_up_to()),
        what: "not UTF-8 text".into(),
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [offset, length] = fields[..] else {
            return Err(err(
                line_no,
                format!("expected OFFSET LENGTH, found {line:?}"),
            ));
        };
        let offset = parse_number(offset)
            .ok_or_else(|| err(line_no, format!("{offset:?} is not a number")))?;
        let length = parse_number(length)
            .ok_or_else(|| err(line_no, format!("{length:?} is not a number")))?;
        out.push(range("text", format!("line {line_no}"), offset, length)?);
    }
    Ok(out)
}

/// One `<name attr="value" …>` tag of an XML document, with the byte it starts at.
struct Tag<'a> {
    at: usize,
    name: &'a str,
    attrs: Vec<(&'a str, &'a str)>,
}

/// The tags of a simple XML document (no CDATA, no entities needed by thin_delta's output).
fn tags(text: &str) -> Result<Vec<Tag<'_>>, ListError> {
    let err = |at: usize, what: &str| ListError {
        format: "thin-delta",
        place: format!("byte {at}"),
        what: what.into(),
    };
    let mut out = Vec::new();
    let mut rest = text;
    let mut base = 0;
    while let Some(open) = rest.find('<') {
        let at = base + open;
        let close = rest[open..]
            .find('>')
            .ok_or_else(|| err(at, "a tag is not closed"))?;
        let inner = &rest[open + 1..open + close];
        base += open + close + 1;
        rest = &rest[open + close + 1..];
        if inner.starts_with('/') || inner.starts_with('?') || inner.starts_with('!') {
            continue;
        }
        let inner = inner.trim_end_matches('/').trim();
        let (name, mut attrs_text) = inner.split_once(char::is_whitespace).unwrap_or((inner, ""));
        let mut attrs = Vec::new();
        loop {
            attrs_text = attrs_text.trim_start();
            if attrs_text.is_empty() {
                break;
            }
            let (key, after) = attrs_text
                .split_once('=')
                .ok_or_else(|| err(at, "an attribute has no value"))?;
            let after = after.trim_start();
            let quote = after
                .chars()
                .next()
                .filter(|c| *c == '"' || *c == '\'')
                .ok_or_else(|| err(at, "an attribute value is not quoted"))?;
            let end = after[1..]
                .find(quote)
                .ok_or_else(|| err(at, "an attribute value is not closed"))?;
            attrs.push((key.trim(), &after[1..1 + end]));
            attrs_text = &after[end + 2..];
        }
        out.push(Tag { at, name, attrs });
    }
    Ok(out)
}

/// The ranges a `thin_delta` XML report marks as changed. Long (about 100 lines) because it is
/// one pass over the report's tags, checking each attribute where it is read so that an error
/// can name its place; split, the checks would lose the position they report.
fn thin_delta(bytes: &[u8]) -> Result<Vec<Range<u64>>, ListError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ListError {
        format: "thin-delta",
        place: format!("byte {}", e.valid_up_to()),
        what: "not UTF-8".into(),
    })?;
    let tags = tags(text)?;
    if let Some(t) = tags.iter().find(|t| {
        !matches!(
            t.name,
            "superblock" | "diff" | "different" | "right_only" | "left_only" | "same" | "range"
        )
    }) {
        return Err(ListError {
            format: "thin-delta",
            place: format!("byte {}", t.at),
            what: format!("unknown element <{}>", t.name),
        });
    }
    if !text.contains("</superblock>") {
        // Cut off (a thin_delta that died mid-way): ranges after the cut would be missing.
        return Err(ListError {
            format: "thin-delta",
            place: format!("byte {}", text.len()),
            what: "the list ends before </superblock>: it is incomplete".into(),
        });
    }
    let attr = |t: &Tag<'_>, key: &str| -> Result<u64, ListError> {
        let v = t
            .attrs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| ListError {
                format: "thin-delta",
                place: format!("byte {}", t.at),
                what: format!("<{}> has no {key}", t.name),
            })?;
        v.parse().map_err(|_| ListError {
            format: "thin-delta",
            place: format!("byte {}", t.at),
            what: format!("{key}={v:?} is not a number"),
        })
    };
    let sb = tags
        .iter()
        .find(|t| t.name == "superblock")
        .ok_or_else(|| ListError {
            format: "thin-delta",
            place: "byte 0".into(),
            what: "no <superblock> (its data_block_size gives the block size)".into(),
        })?;
    let block = attr(sb, "data_block_size")?
        .checked_mul(512)
        .filter(|b| *b > 0)
        .ok_or_else(|| ListError {
            format: "thin-delta",
            place: format!("byte {}", sb.at),
            what: "data_block_size out of range".into(),
        })?;
    let mut out = Vec::new();
    let mut inside_changed = false;
    for t in &tags {
        let changed = match t.name {
            "different" | "right_only" | "left_only" => true,
            "range" => inside_changed,
            "same" => {
                inside_changed = false;
                continue;
            }
            _ => continue,
        };
        if t.name != "range" {
            inside_changed = true;
            // The verbose form lists <range>s inside; the compact one gives begin/length here.
            if !t.attrs.iter().any(|(k, _)| *k == "begin") {
                continue;
            }
        }
        if !changed {
            continue;
        }
        let place = format!("byte {}", t.at);
        let begin = attr(t, "begin")?;
        let length = attr(t, "length")?;
        let (start, len) = begin
            .checked_mul(block)
            .zip(length.checked_mul(block))
            .ok_or_else(|| ListError {
                format: "thin-delta",
                place: place.clone(),
                what: "block numbers overflow".into(),
            })?;
        out.push(range("thin-delta", place, start, len)?);
    }
    Ok(out)
}

/// Entry point for fuzzing: any bytes give a list or an error, never a panic.
pub fn fuzz_changed_list(data: &[u8]) {
    if let Ok(l) = ChangedList::parse(data) {
        assert!(l.ranges.windows(2).all(|w| w[0].end < w[1].start));
        let _ = l.segments(1 << 24, 1 << 16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rbd_json() {
        let l = ChangedList::parse(
            br#"[{"offset":0,"length":4096,"exists":"true"},{"offset":4096,"length":10,"exists":"false"},{"offset":1048576,"length":65536,"exists":"true"}]"#,
        )
        .unwrap();
        assert_eq!(l.format, "rbd-json");
        assert_eq!(l.ranges, vec![0..4106, 1048576..1114112]);
        assert_eq!(l.segments(1 << 20, 3), vec![true, true, false]);
        assert_eq!(l.within(0..1 << 20), vec![0..4106]);
        assert_eq!(l.within(1 << 20..2 << 20), vec![0..65536]);
        assert_eq!(l.within(1_000_000..1_050_000), vec![48576..50000]);
        assert!(l.within(2 << 20..3 << 20).is_empty());
        assert_eq!(
            l.segments(1 << 20, 1),
            vec![true],
            "ranges past the end touch nothing"
        );
        // Lists written by scripts leave "exists" out: every entry is a change.
        let l = ChangedList::parse(br#"[{"offset":8192,"length":100},{"offset":0,"length":10}]"#)
            .unwrap();
        assert_eq!(l.ranges, vec![0..10, 8192..8292]);
        let e =
            ChangedList::parse(b"[{\"offset\":1,\"length\":2,\"exists\":\"maybe\"}]").unwrap_err();
        assert!(e.to_string().contains("entry 1"), "{e}");
        let e = ChangedList::parse(b"[{\"offset\":1,\n\"length\":}]").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn thin_delta_default_and_verbose() {
        let default = br#"<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="100">
  <diff left="1" right="2">
    <different begin="0" length="2"/>
    <right_only begin="10" length="1"/>
    <left_only begin="20" length="1"/>
  </diff>
</superblock>"#;
        let l = ChangedList::parse(default).unwrap();
        assert_eq!(l.format, "thin-delta");
        let b = 128 * 512;
        assert_eq!(l.ranges, vec![0..2 * b, 10 * b..11 * b, 20 * b..21 * b]);
        let verbose = br#"<superblock data_block_size="128">
  <diff left="1" right="2">
    <same>
      <range begin="0" length="5"/>
    </same>
    <different>
      <range begin="5" length="2"/>
    </different>
    <same><range begin="7" length="1"/></same>
  </diff>
</superblock>"#;
        let l = ChangedList::parse(verbose).unwrap();
        assert_eq!(l.ranges, vec![5 * b..7 * b]);
        let e =
            ChangedList::parse(b"<diff><different begin=\"0\" length=\"1\"/></diff>").unwrap_err();
        assert!(e.to_string().contains("superblock"), "{e}");
        let e = ChangedList::parse(
            b"<superblock data_block_size=\"128\"><different begin=\"x\" length=\"1\"/></superblock>",
        )
        .unwrap_err();
        assert!(e.to_string().contains("byte 34"), "{e}");
        // Cut off, or with an element thin_delta does not write: refused.
        assert!(ChangedList::parse(&default[..default.len() - 40]).is_err());
        let cut = &default[..default.len() - "</superblock>".len()];
        assert!(ChangedList::parse(cut)
            .unwrap_err()
            .to_string()
            .contains("incomplete"));
        let e = ChangedList::parse(
            b"<superblock data_block_size=\"128\"><diferent begin=\"1\" length=\"1\"/></superblock>",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown element"), "{e}");
        // Empty input is refused; a list that says nothing changed is fine.
        assert!(ChangedList::parse(b"  \n").is_err());
        assert!(ChangedList::parse(b"# nothing changed\n")
            .unwrap()
            .ranges
            .is_empty());
    }

    #[test]
    fn plain_text() {
        let l = ChangedList::parse(b"# changed\n0x1000 0x1000\n\n8192 4096  # adjacent\n100 0\n")
            .unwrap();
        assert_eq!(l.format, "text");
        assert_eq!(l.ranges, vec![4096..12288]);
        let e = ChangedList::parse(b"0 4096\n12 banana\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = ChangedList::parse(b"1 2 3\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = ChangedList::parse(format!("{} 2\n", u64::MAX).as_bytes()).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
    }

    proptest! {
        #[test]
        fn text_lists_round_trip_to_merged_ranges(ranges in proptest::collection::vec((0u64..1 << 40, 1u64..1 << 30), 1..40)) {
            let text: String = ranges.iter().map(|(o, l)| format!("{o} {l}\n")).collect();
            let l = ChangedList::parse(text.as_bytes()).unwrap();
            // Sorted, disjoint, and covering exactly the union of the input.
            prop_assert!(l.ranges.windows(2).all(|w| w[0].end < w[1].start));
            for (o, len) in &ranges {
                prop_assert!(l.ranges.iter().any(|r| r.start <= *o && o + len <= r.end));
            }
            let covered: u64 = l.bytes();
            prop_assert!(covered <= ranges.iter().map(|(_, l)| l).sum::<u64>());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_changed_list(&bytes);
        }

        #[test]
        fn xml_garbage_never_panics(s in "<[a-z_ =\"0-9/<>]{0,80}") {
            fuzz_changed_list(s.as_bytes());
        }
    }
}

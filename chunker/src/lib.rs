//! Content-defined chunking for sbk: bytes in, extents out.
//!
//! A segment of a disk (a fixed, aligned slice of the source) is split into an ordered list of
//! [`Span`]s that cover it exactly: runs of zero bytes long enough to be worth a hole
//! ([`Span::Zero`]), and data chunks cut by FastCDC ([`Span::Data`]). The cut points depend only on
//! the segment's bytes and the [`ChunkerParams`], never on where the segment sits in the source
//! or on how many threads chunk segments at once; that is what lets sbk chunk segments in
//! parallel and still produce the same chunk list every time.
//!
//! The crate is pure: no I/O, no threads, no allocation beyond the returned list.

use std::fmt;

use fastcdc::v2020::{FastCDC, Normalization};

mod resplit;
pub use resplit::{split_changed, Fill, Piece};

/// Zero detection works on blocks of this many bytes, aligned to the segment start. It is the
/// page and filesystem block size, so zero runs (and so restored holes) fall on block bounds.
pub const ZERO_BLOCK: usize = 4096;

/// Smallest average chunk size sbk accepts (64 KiB).
pub const MIN_AVERAGE: u32 = 64 * 1024;
/// Largest average chunk size sbk accepts (4 MiB, the largest FastCDC supports with max = 4×avg).
pub const MAX_AVERAGE: u32 = 4 * 1024 * 1024;

/// Parameters of the chunker, recorded in the repository config so that every backup into one
/// repository cuts the same data at the same places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerParams {
    /// Smallest chunk FastCDC cuts (the last chunk of a span may be shorter).
    pub min: u32,
    /// Average chunk size FastCDC aims for: a power of two.
    pub avg: u32,
    /// Largest chunk FastCDC cuts.
    pub max: u32,
    /// Seed mixed into the gear table, chosen at random per repository, so that the cut points
    /// of one repository do not reveal content to someone who knows another's.
    pub seed: u64,
    /// Zero runs shorter than this stay inside data chunks; longer runs (in whole
    /// [`ZERO_BLOCK`]s) become [`Span::Zero`]. A multiple of [`ZERO_BLOCK`].
    pub zero_min: u32,
}

/// Why a set of chunker parameters was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamsError(pub String);

impl fmt::Display for ParamsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParamsError {}

impl ChunkerParams {
    /// The parameters sbk derives from an average chunk size: min = avg/4, max = avg×4, zero runs
    /// of at least 64 KiB. `avg` must be a power of two in [`MIN_AVERAGE`]..=[`MAX_AVERAGE`].
    pub fn for_average(avg: u32, seed: u64) -> Result<Self, ParamsError> {
        let params = ChunkerParams {
            min: avg / 4,
            avg,
            max: avg.saturating_mul(4),
            seed,
            zero_min: 64 * 1024,
        };
        params.validate()?;
        Ok(params)
    }

    /// Checks every bound FastCDC and sbk rely on, so that decoding a config with bad values is a
    /// typed error instead of a panic deep inside the chunker.
    pub fn validate(&self) -> Result<(), ParamsError> {
        let ChunkerParams {
            min,
            avg,
            max,
            zero_min,
            ..
        } = *self;
        if !avg.is_power_of_two() || !(MIN_AVERAGE..=MAX_AVERAGE).contains(&avg) {
            return Err(ParamsError(format!(
                "average chunk size {avg} must be a power of two between {MIN_AVERAGE} and {MAX_AVERAGE}"
            )));
        }
        if !(fastcdc::v2020::MINIMUM_MIN..=fastcdc::v2020::MINIMUM_MAX).contains(&min) || min > avg
        {
            return Err(ParamsError(format!(
                "minimum chunk size {min} is out of range"
            )));
        }
        if !(fastcdc::v2020::MAXIMUM_MIN..=fastcdc::v2020::MAXIMUM_MAX).contains(&max) || max < avg
        {
            return Err(ParamsError(format!(
                "maximum chunk size {max} is out of range"
            )));
        }
        if zero_min == 0 || !(zero_min as usize).is_multiple_of(ZERO_BLOCK) {
            return Err(ParamsError(format!(
                "zero-run minimum {zero_min} must be a positive multiple of {ZERO_BLOCK}"
            )));
        }
        Ok(())
    }
}

/// One piece of a segment, in order; the spans of a segment cover it without gaps or overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Span {
    /// `len` zero bytes starting at `offset` (relative to the segment start).
    Zero {
        /// Start, relative to the segment.
        offset: usize,
        /// Length in bytes.
        len: usize,
    },
    /// A data chunk of `len` bytes starting at `offset` (relative to the segment start).
    Data {
        /// Start, relative to the segment.
        offset: usize,
        /// Length in bytes.
        len: usize,
    },
}

impl Span {
    /// Length of the span in bytes.
    pub fn len(&self) -> usize {
        match *self {
            Span::Zero { len, .. } | Span::Data { len, .. } => len,
        }
    }

    /// Start of the span, relative to the segment.
    pub fn offset(&self) -> usize {
        match *self {
            Span::Zero { offset, .. } | Span::Data { offset, .. } => offset,
        }
    }

    /// End of the span (exclusive), relative to the segment.
    pub fn end(&self) -> usize {
        self.offset() + self.len()
    }

    /// True for an empty span (never produced by [`split_segment`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// True when every byte of `block` is zero. Written as OR-folds so the compiler vectorises them;
/// callers pass blocks of [`ZERO_BLOCK`] bytes, which bounds the work past the first non-zero byte.
pub fn is_zero(block: &[u8]) -> bool {
    // A block of data nearly always has a non-zero byte among its first 64, so it costs one
    // cache line instead of a pass over all of it (which was the first touch of every byte read,
    // and 16% of a changed-block incremental's CPU); only zero blocks are read whole.
    let (head, rest) = block.split_at(block.len().min(64));
    let or = |b: &[u8]| b.iter().fold(0u8, |acc, &b| acc | b);
    or(head) == 0 && or(rest) == 0
}

/// Splits one segment into zero runs and FastCDC data chunks.
///
/// `data` is the whole segment (holes of a sparse source already zero). Zero runs are found on
/// [`ZERO_BLOCK`] boundaries relative to the segment start (a short last block counts too); runs
/// of at least `params.zero_min` bytes become [`Span::Zero`]. Each stretch of data between them is
/// chunked by FastCDC from its own start, so the result depends on the bytes alone.
///
/// `params` must have passed [`ChunkerParams::validate`].
pub fn split_segment(data: &[u8], params: &ChunkerParams) -> Vec<Span> {
    let mut spans = Vec::with_capacity(data.len() / params.avg as usize + 2);
    split_from(data, 0, params, &mut |span| {
        spans.push(span);
        true
    });
    spans
}

/// [`split_segment`] from `start` on, handing each span to `each` in order until it returns
/// false. `start` must be a span boundary of the whole segment's split (its start, or where
/// [`split_segment`] ends a span). Blocks stay aligned to the segment start. A zero run that
/// reaches back over `start` is clipped there: it cannot qualify as a zero span, or `start` would
/// lie inside one, so its clipped part (shorter) cannot either. Chunks are cut lazily: stopping
/// early saves the hashing of the rest.
pub(crate) fn split_from(
    data: &[u8],
    start: usize,
    params: &ChunkerParams,
    each: &mut dyn FnMut(Span) -> bool,
) {
    let mut data_start = start; // start of the data stretch not yet chunked
    let mut pos = start - start % ZERO_BLOCK;
    while pos < data.len() {
        if !is_zero(&data[pos..(pos + ZERO_BLOCK).min(data.len())]) {
            pos += ZERO_BLOCK;
            continue;
        }
        let run_start = pos.max(start);
        while pos < data.len() && is_zero(&data[pos..(pos + ZERO_BLOCK).min(data.len())]) {
            pos += ZERO_BLOCK;
        }
        let run_end = pos.min(data.len());
        if run_end - run_start >= params.zero_min as usize
            || (run_start == 0 && run_end == data.len())
        {
            if !chunk_data(data, data_start..run_start, params, each)
                || !each(Span::Zero {
                    offset: run_start,
                    len: run_end - run_start,
                })
            {
                return;
            }
            data_start = run_end;
        }
    }
    chunk_data(data, data_start..data.len(), params, each);
}

/// Cuts `data[range]` with FastCDC (restarted at `range.start`) and hands the chunks to `each`;
/// false when `each` asked to stop.
fn chunk_data(
    data: &[u8],
    range: std::ops::Range<usize>,
    params: &ChunkerParams,
    each: &mut dyn FnMut(Span) -> bool,
) -> bool {
    if range.is_empty() {
        return true;
    }
    let base = range.start;
    let mut cdc = FastCDC::with_level_and_seed(
        &data[range],
        params.min,
        params.avg,
        params.max,
        Normalization::Level1,
        params.seed,
    );
    cdc.all(|c| {
        each(Span::Data {
            offset: base + c.offset,
            len: c.length,
        })
    })
}

/// Checks the invariants every caller of [`split_segment`] relies on: the spans are contiguous,
/// non-empty, cover `data` exactly, data chunks are at most `params.max` long, and zero spans start
/// on a [`ZERO_BLOCK`] and hold only zeros. Used by the tests and the fuzz target.
pub fn check_spans(data: &[u8], params: &ChunkerParams, spans: &[Span]) -> Result<(), String> {
    let mut pos = 0;
    for (i, s) in spans.iter().enumerate() {
        let (offset, len) = match *s {
            Span::Zero { offset, len } => {
                if offset % ZERO_BLOCK != 0 {
                    return Err(format!("zero span {i} starts off a block at {offset}"));
                }
                if !is_zero(&data[offset..offset + len]) {
                    return Err(format!("zero span {i} holds data"));
                }
                (offset, len)
            }
            Span::Data { offset, len } => {
                if len > params.max as usize {
                    return Err(format!("chunk {i} is {len} bytes, over the maximum"));
                }
                (offset, len)
            }
        };
        if offset != pos || len == 0 {
            return Err(format!(
                "span {i} at {offset}+{len} does not continue at {pos}"
            ));
        }
        pos += len;
    }
    if pos != data.len() {
        return Err(format!("spans cover {pos} of {} bytes", data.len()));
    }
    Ok(())
}

/// Fuzz entry point: chunks `data` with small parameters and checks [`check_spans`],
/// determinism, and that [`split_changed`] after a rewrite of a stretch gives what a full split
/// gives. Panics on a violation (that is what the fuzzer looks for).
pub fn fuzz_split(data: &[u8]) {
    let params = ChunkerParams {
        min: 256,
        avg: 1024,
        max: 4096,
        seed: 1,
        zero_min: 8192,
    };
    let spans = split_segment(data, &params);
    if let Err(e) = check_spans(data, &params, &spans) {
        panic!("{e}");
    }
    assert_eq!(
        spans,
        split_segment(data, &params),
        "chunking is deterministic"
    );
    // The same bytes with a stretch rewritten (zeroed where the input's first byte is even):
    // a re-split against the old spans must equal a full split.
    let (at, n) = (data.len() / 3, data.len() / 10 + 1);
    let changed = at..(at + n).min(data.len());
    let mut new = data.to_vec();
    for b in &mut new[changed.clone()] {
        *b = if data.first().is_some_and(|f| f % 2 == 0) {
            0
        } else {
            *b ^ 0x5a
        };
    }
    let mut buf = vec![0u8; new.len().div_ceil(ZERO_BLOCK) * ZERO_BLOCK];
    let mut fill = |r: std::ops::Range<usize>, b: &mut [u8]| -> Result<(), ()> {
        b[r.clone()].copy_from_slice(&new[r]);
        Ok(())
    };
    let (pieces, _) = split_changed(
        &mut buf,
        new.len(),
        &params,
        &spans,
        std::slice::from_ref(&changed),
        &mut fill,
    )
    .expect("fill does not fail");
    let resplit: Vec<Span> = pieces.into_iter().map(|p| p.span(&spans)).collect();
    assert_eq!(
        resplit,
        split_segment(&new, &params),
        "re-split equals a full split"
    );
}

/// What the property tests of the crate share.
#[cfg(test)]
pub(crate) mod testing {
    use super::ChunkerParams;

    /// Small sizes so that property tests see many chunks in little data.
    pub fn params() -> ChunkerParams {
        ChunkerParams {
            min: 1024,
            avg: 4096,
            max: 16384,
            seed: 7,
            zero_min: 8192,
        }
    }

    /// `len` bytes of xorshift64 from `seed`.
    pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{params, pseudo_random};
    use super::*;
    use proptest::prelude::*;

    /// Splits and checks the invariants, returning the spans.
    fn check_invariants(data: &[u8], p: &ChunkerParams) -> Vec<Span> {
        let spans = split_segment(data, p);
        check_spans(data, p, &spans).unwrap();
        spans
    }

    #[test]
    fn empty_segment_has_no_spans() {
        assert!(split_segment(&[], &params()).is_empty());
    }

    #[test]
    fn all_zero_segment_is_one_zero_span() {
        let data = vec![0u8; 100_000];
        assert_eq!(
            split_segment(&data, &params()),
            vec![Span::Zero {
                offset: 0,
                len: 100_000
            }]
        );
        // Even a segment shorter than zero_min is a zero span when it is zero throughout.
        assert_eq!(
            split_segment(&[0u8; 10], &params()),
            vec![Span::Zero { offset: 0, len: 10 }]
        );
    }

    #[test]
    fn short_zero_runs_stay_inside_data() {
        let mut data = pseudo_random(64 * 1024, 1);
        data[8192..12288].fill(0); // one block, below zero_min
        let spans = check_invariants(&data, &params());
        assert!(spans.iter().all(|s| matches!(s, Span::Data { .. })));
    }

    #[test]
    fn long_zero_run_becomes_a_zero_span_on_block_bounds() {
        let mut data = pseudo_random(128 * 1024, 2);
        data[10_000..60_000].fill(0); // whole zero blocks: 12288..57344
        let spans = check_invariants(&data, &params());
        assert!(spans.contains(&Span::Zero {
            offset: 12288,
            len: 57344 - 12288
        }));
    }

    #[test]
    fn params_validation() {
        assert!(ChunkerParams::for_average(1 << 20, 0).is_ok());
        assert!(ChunkerParams::for_average(MIN_AVERAGE, 0).is_ok());
        assert!(ChunkerParams::for_average(MAX_AVERAGE, 0).is_ok());
        assert!(ChunkerParams::for_average(1_000_000, 0).is_err());
        assert!(ChunkerParams::for_average(MAX_AVERAGE * 2, 0).is_err());
        assert!(ChunkerParams::for_average(MIN_AVERAGE / 2, 0).is_err());
        let mut p = ChunkerParams::for_average(1 << 20, 0).unwrap();
        p.zero_min = 100;
        assert!(p.validate().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn spans_cover_input_and_respect_bounds(
            seed in any::<u64>(),
            len in 0usize..200_000,
            zeros in proptest::collection::vec((0usize..200_000, 0usize..40_000), 0..4),
        ) {
            let mut data = pseudo_random(len, seed);
            for (start, n) in zeros {
                let start = start.min(len);
                let end = (start + n).min(len);
                data[start..end].fill(0);
            }
            check_invariants(&data, &params());
        }

        #[test]
        fn chunking_is_deterministic_and_local(seed in any::<u64>(), len in 1usize..100_000) {
            let data = pseudo_random(len, seed);
            let a = split_segment(&data, &params());
            prop_assert_eq!(&a, &split_segment(&data.clone(), &params()));
            // The gear hash forgets a byte after 64 steps and no cut comes before `min`, so an
            // edit of the first byte moves no cut point at all.
            if len >= 2 * ZERO_BLOCK {
                let mut edited = data.clone();
                edited[0] ^= 0xff;
                prop_assert_eq!(&a, &split_segment(&edited, &params()));
            }
        }
    }
}

/// Cut-point test vectors (docs/format.md, "chunker"): a compatible writer must cut exactly
/// here, or its chunks would not dedup against sbk's.
#[cfg(test)]
mod vectors {
    use super::*;

    /// 1 MiB from xorshift64 (x ^= x << 13; x ^= x >> 7; x ^= x << 17; low byte; x starts at
    /// 0x5eed | 1), a 256 KiB zero run at 512 KiB, chunked with the smallest sbk average.
    fn input() -> Vec<u8> {
        let mut x: u64 = 0x5eed | 1;
        let mut data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        data[512 << 10..768 << 10].fill(0);
        data
    }

    #[test]
    fn cut_points_are_pinned() {
        let p = ChunkerParams::for_average(MIN_AVERAGE, 0x0123_4567_89ab_cdef).unwrap();
        let spans = split_segment(&input(), &p);
        let got: Vec<(char, usize, usize)> = spans
            .iter()
            .map(|s| match *s {
                Span::Zero { offset, len } => ('z', offset, len),
                Span::Data { offset, len } => ('d', offset, len),
            })
            .collect();
        assert_eq!(got, EXPECTED);
    }

    const EXPECTED: &[(char, usize, usize)] = &[
        ('d', 0, 74961),
        ('d', 74961, 51282),
        ('d', 126243, 78918),
        ('d', 205161, 40696),
        ('d', 245857, 90985),
        ('d', 336842, 74968),
        ('d', 411810, 105386),
        ('d', 517196, 7092),
        ('z', 524288, 262144),
        ('d', 786432, 82341),
        ('d', 868773, 131419),
        ('d', 1000192, 48384),
    ];
}

//! Identifiers: chunk (blob) ids, pack ids, snapshot ids.

use std::fmt;
use std::str::FromStr;

/// Writes bytes as lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parses exactly `N` bytes of hex; `None` on any other input.
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub [u8; $len]);

        /// The order of the bytes. The first eight, read as a big-endian number, order ids as
        /// their bytes do and settle nearly every comparison of two keyed hashes without a
        /// call to memcmp: sorting and merging 10^8 ids spent a fifth of their time in it.
        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                let head = |id: &Self| {
                    u64::from_be_bytes(id.0[..8].try_into().expect("ids are longer than 8 bytes"))
                };
                head(self)
                    .cmp(&head(other))
                    .then_with(|| self.0.cmp(&other.0))
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl $name {
            /// Length of the id in bytes.
            pub const LEN: usize = $len;

            /// The id as lower-case hex.
            pub fn to_hex(&self) -> String {
                to_hex(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                from_hex::<$len>(s)
                    .map($name)
                    .ok_or_else(|| format!("{s:?} is not a {}-digit hex id", 2 * $len))
            }
        }
    };
}

hex_id!(
    /// Identifies a blob (a data chunk or a tree): BLAKE3 of its raw bytes keyed with the
    /// repository's chunk-id key.
    ChunkId,
    32
);
hex_id!(
    /// Identifies a pack file: 16 random bytes.
    PackId,
    16
);
hex_id!(
    /// Identifies a snapshot: unkeyed BLAKE3 of its manifest file.
    SnapshotId,
    32
);

hex_id!(
    /// Identifies an index file: unkeyed BLAKE3 of its bytes.
    IndexId,
    32
);

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)?;
    Ok(b)
}

impl PackId {
    /// A fresh random pack id.
    pub fn random() -> std::io::Result<Self> {
        random_bytes().map(PackId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId([0xab; 32]);
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert!("zz".parse::<PackId>().is_err());
        assert!("ab".repeat(15).parse::<PackId>().is_err());
        assert_eq!(from_hex::<2>("00fF"), Some([0, 255]));
    }

    proptest::proptest! {
        /// Ids compare as their bytes do, whichever byte first differs.
        #[test]
        fn ids_order_as_their_bytes(a: [u8; 32], b: [u8; 32], shared in 0usize..=32) {
            let mut b = b;
            b[..shared].copy_from_slice(&a[..shared]);
            proptest::prop_assert_eq!(ChunkId(a).cmp(&ChunkId(b)), a.cmp(&b));
            proptest::prop_assert_eq!(ChunkId(b).cmp(&ChunkId(a)), b.cmp(&a));
            let (p, q): ([u8; 16], [u8; 16]) = (a[..16].try_into().unwrap(), b[..16].try_into().unwrap());
            proptest::prop_assert_eq!(PackId(p).partial_cmp(&PackId(q)), Some(p.cmp(&q)));
        }
    }
}

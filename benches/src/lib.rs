//! Seeded data generators shared by sbk's criterion benches and end-to-end tests, so that they
//! measure the same bytes every run: random (incompressible, no duplicates), text-like
//! (compressible), and mixed (disk-like: data, text and runs of zeros).

/// Incompressible pseudo-random bytes (xorshift64), deterministic for a seed.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible, text-like bytes: words drawn from a small vocabulary by a seeded generator.
pub fn text_like(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "block", "device", "snapshot", "the", "of", "and", "backup", "chunk", "a", "storage",
        "data", "restore", "volume", "to", "in", "is",
    ];
    let noise = random(len / 4 + 8, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let r = noise[i % noise.len()] as usize;
        out.extend_from_slice(WORDS[r % WORDS.len()].as_bytes());
        out.push(if r.is_multiple_of(11) { b'\n' } else { b' ' });
        i += 1;
    }
    out.truncate(len);
    out
}

/// Disk-like bytes: in every MiB, 384 KiB random, 384 KiB text and 256 KiB of zeros.
pub fn mixed(len: usize, seed: u64) -> Vec<u8> {
    const STRIPE: usize = 1 << 20;
    let mut out = Vec::with_capacity(len + STRIPE);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(&random(3 << 17, seed + i));
        out.extend_from_slice(&text_like(3 << 17, seed + i));
        out.resize(out.len() + (1 << 18), 0);
        i += 1;
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn generators_are_deterministic_and_sized() {
        assert_eq!(super::mixed(5 << 20, 1), super::mixed(5 << 20, 1));
        assert_eq!(super::text_like(1000, 2).len(), 1000);
        assert_ne!(super::random(64, 1), super::random(64, 2));
    }
}

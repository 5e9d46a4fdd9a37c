//! Random-read latency of an NBD export, for benches/nbd.sh: `nbd-latency URI N [SEED]` reads N
//! random 4 KiB blocks (offsets from xorshift64, aligned) twice through one connection, the
//! second pass hitting whatever the first brought into caches, and prints one line of JSON:
//! p50/p99/max in microseconds per pass.

use std::time::Instant;

use sbk_nbd::client::{Client, NbdUri};

fn percentiles(mut us: Vec<u64>) -> serde_json::Value {
    us.sort_unstable();
    let at = |p: f64| us[((us.len() as f64 * p) as usize).min(us.len() - 1)];
    serde_json::json!({ "p50_us": at(0.50), "p99_us": at(0.99), "max_us": us[us.len() - 1] })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: nbd-latency URI N [SEED]");
        std::process::exit(2);
    }
    let uri = NbdUri::parse(&args[1]).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let n: usize = args[2].parse().expect("N is a number");
    let mut x: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0x5eed) | 1;
    let mut client = Client::connect(&uri, &[]).unwrap_or_else(|e| {
        eprintln!("{uri}: {e}");
        std::process::exit(1)
    });
    let blocks = client.size() / 4096;
    let offsets: Vec<u64> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * 4096
        })
        .collect();
    let mut buf = vec![0u8; 4096];
    let mut pass = || -> Vec<u64> {
        offsets
            .iter()
            .map(|&o| {
                let t = Instant::now();
                client.read(o, &mut buf).expect("a read");
                t.elapsed().as_micros() as u64
            })
            .collect()
    };
    let cold = pass();
    let warm = pass();
    println!(
        "{}",
        serde_json::json!({ "reads": n, "cold": percentiles(cold), "warm": percentiles(warm) })
    );
    client.disconnect().ok();
}

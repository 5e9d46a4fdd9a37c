//! Encryption at rest, to choose the AEAD by measurement (docs/benchmarks.md, "Encryption"):
//! sealing a 256 KiB chunk (the default average) with XChaCha20-Poly1305 (192-bit random
//! nonces, one master key) and with AES-256-GCM under a key derived per object with BLAKE3
//! (96-bit nonces are only safe under keys that seal few messages), beside a memcpy of the same
//! bytes; and the Argon2id key derivation a password unlock costs.
// criterion_group! generates public functions that cannot carry docs.
#![allow(missing_docs)]

use aes_gcm::aead::{Aead, KeyInit, Payload};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sbk_benches::random;

const CHUNK: usize = 256 << 10;

fn aead(c: &mut Criterion) {
    let data = random(CHUNK, 3);
    let aad = [7u8; 33];
    let mut g = c.benchmark_group("aead");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let x = chacha20poly1305::XChaCha20Poly1305::new(&[1u8; 32].into());
    g.bench_function("xchacha20poly1305_seal", |b| {
        b.iter(|| {
            let nonce = chacha20poly1305::XNonce::from([9u8; 24]);
            x.encrypt(
                &nonce,
                Payload {
                    msg: black_box(&data),
                    aad: &aad,
                },
            )
            .expect("seals")
        })
    });
    let sealed = x
        .encrypt(
            &[9u8; 24].into(),
            Payload {
                msg: &data,
                aad: &aad,
            },
        )
        .expect("seals");
    g.bench_function("xchacha20poly1305_open", |b| {
        b.iter(|| {
            x.decrypt(
                &[9u8; 24].into(),
                Payload {
                    msg: black_box(&sealed),
                    aad: &aad,
                },
            )
            .expect("opens")
        })
    });
    let master = [2u8; 32];
    g.bench_function("aes256gcm_derived_key_seal", |b| {
        b.iter(|| {
            // A fresh key per object: BLAKE3 of the master key and a 24-byte salt.
            let key = blake3::keyed_hash(&master, &[5u8; 24]);
            let a = aes_gcm::Aes256Gcm::new(key.as_bytes().into());
            a.encrypt(
                &[0u8; 12].into(),
                Payload {
                    msg: black_box(&data),
                    aad: &aad,
                },
            )
            .expect("seals")
        })
    });
    let key = blake3::keyed_hash(&master, &[5u8; 24]);
    let a = aes_gcm::Aes256Gcm::new(key.as_bytes().into());
    let sealed_gcm = a
        .encrypt(
            &[0u8; 12].into(),
            Payload {
                msg: &data,
                aad: &aad,
            },
        )
        .expect("seals");
    g.bench_function("aes256gcm_derived_key_open", |b| {
        b.iter(|| {
            let key = blake3::keyed_hash(&master, &[5u8; 24]);
            let a = aes_gcm::Aes256Gcm::new(key.as_bytes().into());
            a.decrypt(
                &[0u8; 12].into(),
                Payload {
                    msg: black_box(&sealed_gcm),
                    aad: &aad,
                },
            )
            .expect("opens")
        })
    });
    // ring's AES-256-GCM (assembly, AES-NI/VAES and CLMUL), under a key derived per object.
    g.bench_function("ring_aes256gcm_derived_key_seal", |b| {
        b.iter(|| {
            let key = blake3::keyed_hash(&master, &[5u8; 24]);
            let k = ring::aead::LessSafeKey::new(
                ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key.as_bytes())
                    .expect("a 32-byte key"),
            );
            let mut buf = black_box(&data).clone();
            let tag = k
                .seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
                    ring::aead::Aad::from(&aad),
                    &mut buf,
                )
                .expect("seals");
            (buf, tag)
        })
    });
    let ring_sealed = {
        let k = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key.as_bytes()).expect("key"),
        );
        let mut buf = data.clone();
        k.seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
            ring::aead::Aad::from(&aad),
            &mut buf,
        )
        .expect("seals");
        buf
    };
    g.bench_function("ring_aes256gcm_derived_key_open", |b| {
        b.iter(|| {
            let key = blake3::keyed_hash(&master, &[5u8; 24]);
            let k = ring::aead::LessSafeKey::new(
                ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key.as_bytes())
                    .expect("a 32-byte key"),
            );
            let mut buf = black_box(&ring_sealed).clone();
            k.open_in_place(
                ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
                ring::aead::Aad::from(&aad),
                &mut buf,
            )
            .expect("opens")
            .len()
        })
    });
    let mut dst = vec![0u8; CHUNK];
    g.bench_function("baseline_memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&data)))
    });
    g.finish();
}

fn kdf(c: &mut Criterion) {
    let mut g = c.benchmark_group("kdf");
    g.sample_size(10);
    for (name, m_kib, t) in [
        ("argon2id_64MiB_t2", 65536, 2),
        ("argon2id_64MiB_t3", 65536, 3),
    ] {
        let params = argon2::Params::new(m_kib, t, 1, Some(32)).expect("valid parameters");
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut out = [0u8; 32];
                argon
                    .hash_password_into(b"correct horse battery staple", &[3u8; 16], &mut out)
                    .expect("derives");
                out
            })
        });
    }
    g.finish();
}

criterion_group!(benches, aead, kdf);
criterion_main!(benches);

//! The bundle on the wire: a stored (uncompressed) zip cut into `GetTokenizer` chunks, the
//! SHA-256 of the whole zip on the last chunk, as the gateway's `smg-grpc-client` reassembles
//! it (`tokenizer_bundle::collect_stream_bundle`: concatenate every chunk's `data`, take the
//! last chunk's non-empty `sha256`, compare with the lower-case hex digest of the bytes, then
//! open the zip and extract its entries into a directory).
//!
//! A hand-written stored-only writer rather than the `zip` crate: three small text files need no
//! compression, and the format's stored subset is sixty lines, where the crate (even with its
//! default features off) adds its own dependency tree to a service that only ever writes.

use sha2::{Digest, Sha256};

/// Bytes of zip per chunk: well under gRPC's 4 MiB default message limit on any client.
pub const CHUNK: usize = 1 << 20;

/// A zip archive holding `files` (name, contents) uncompressed, in order.
pub fn stored<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    let mut count: u16 = 0;
    for (name, body) in files {
        let offset = out.len() as u32;
        let crc = crc32(body);
        // Version 2.0, no flags, method 0 (stored), time 00:00, date 1980-01-01 (a fixed date
        // keeps the archive, and so its SHA-256, the same at every start).
        let common = |buf: &mut Vec<u8>| {
            for v in [20u16, 0, 0, 0, 0x21] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            for v in [crc, body.len() as u32, body.len() as u32] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes());
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(body);

        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes());
        common(&mut central);
        // Comment length, disk, internal and external attributes, then the local header.
        central.extend_from_slice(&[0; 10]);
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
        count += 1;
    }
    let (central_at, central_len) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for v in [count, count] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [central_len, central_at] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// `bytes` as `GetTokenizer` chunks of at most `size` bytes: (data, sha256), the lower-case hex
/// SHA-256 of all of `bytes` on the last chunk only.
pub fn chunks(bytes: &[u8], size: usize) -> Vec<(Vec<u8>, String)> {
    let digest = sha256_hex(bytes);
    let mut chunks: Vec<(Vec<u8>, String)> =
        bytes.chunks(size.max(1)).map(|c| (c.to_vec(), String::new())).collect();
    if let Some(last) = chunks.last_mut() {
        last.1 = digest;
    }
    chunks
}

/// Lower-case hex SHA-256, as the gateway formats its own digest.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// CRC-32 (IEEE, reflected), as zip readers check every entry.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_of_the_check_string() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn chunks_concatenate_to_the_bytes_and_the_last_carries_the_digest() {
        let bytes: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let chunks = chunks(&bytes, 300);
        assert_eq!(chunks.len(), 4);
        assert!(chunks[..3].iter().all(|c| c.1.is_empty()));
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.0.clone()).collect();
        assert_eq!(joined, bytes);
        assert_eq!(chunks[3].1, sha256_hex(&bytes));
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}

//! Response content coding for exports: negotiation from `Accept-Encoding` and the compressor.
//! The compressor is fed whole chunks and flushed on demand, so compressed output keeps flowing.

use async_compression::tokio::write::{GzipEncoder, ZstdEncoder};
use bytes::Bytes;
use std::io;
use tokio::io::AsyncWriteExt;

/// The codings an export can be sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentCoding {
    Identity,
    Gzip,
    Zstd,
}

impl ContentCoding {
    /// Picks the best coding the client accepts: zstd, then gzip, else identity.
    /// Codings with `q=0` are refused, as RFC 9110 says; `*` stands for any coding not named.
    pub fn negotiate(accept_encoding: Option<&str>) -> ContentCoding {
        let Some(header) = accept_encoding else {
            return ContentCoding::Identity;
        };
        let (mut wildcard, mut gzip, mut zstd) = (None, None, None);
        for item in header.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts.find_map(quality).unwrap_or(1.0);
            match name.as_str() {
                "gzip" | "x-gzip" => gzip = Some(q),
                "zstd" => zstd = Some(q),
                "*" => wildcard = Some(q),
                _ => {}
            }
        }
        let zstd = zstd.or(wildcard).unwrap_or(0.0);
        let gzip = gzip.or(wildcard).unwrap_or(0.0);
        // The client's preference wins; on a tie, zstd (faster and smaller).
        match (zstd, gzip) {
            (z, g) if z > 0.0 && z >= g => ContentCoding::Zstd,
            (_, g) if g > 0.0 => ContentCoding::Gzip,
            _ => ContentCoding::Identity,
        }
    }

    /// The `Content-Encoding` value, if any.
    pub fn header_value(self) -> Option<&'static str> {
        match self {
            ContentCoding::Identity => None,
            ContentCoding::Gzip => Some("gzip"),
            ContentCoding::Zstd => Some("zstd"),
        }
    }
}

/// The weight of a `q=` parameter; a malformed one counts as refusal, the safe reading.
fn quality(param: &str) -> Option<f32> {
    let param = param.trim();
    let value = param.strip_prefix("q=").or_else(|| param.strip_prefix("Q="))?;
    Some(value.trim().parse::<f32>().unwrap_or(0.0))
}

/// Turns plain body chunks into the chosen coding.
pub struct BodyEncoder {
    inner: Coder,
    /// Bytes went into the compressor since its last flush, so a flush would emit something.
    dirty: bool,
}

enum Coder {
    Identity,
    Gzip(GzipEncoder<Vec<u8>>),
    Zstd(ZstdEncoder<Vec<u8>>),
}

impl BodyEncoder {
    pub fn new(coding: ContentCoding) -> BodyEncoder {
        let inner = match coding {
            ContentCoding::Identity => Coder::Identity,
            ContentCoding::Gzip => Coder::Gzip(GzipEncoder::new(Vec::new())),
            ContentCoding::Zstd => Coder::Zstd(ZstdEncoder::new(Vec::new())),
        };
        BodyEncoder { inner, dirty: false }
    }

    /// True when a flush would send bytes the client has not seen.
    pub fn has_pending(&self) -> bool {
        self.dirty
    }

    /// Encodes `chunk`; returns whatever encoded output is ready (possibly empty).
    pub async fn write(&mut self, chunk: Vec<u8>) -> io::Result<Bytes> {
        match &mut self.inner {
            Coder::Identity => Ok(Bytes::from(chunk)),
            Coder::Gzip(encoder) => {
                encoder.write_all(&chunk).await?;
                self.dirty = true;
                Ok(Bytes::from(std::mem::take(encoder.get_mut())))
            }
            Coder::Zstd(encoder) => {
                encoder.write_all(&chunk).await?;
                self.dirty = true;
                Ok(Bytes::from(std::mem::take(encoder.get_mut())))
            }
        }
    }

    /// Forces out everything written so far, so the client can decode it now.
    pub async fn flush(&mut self) -> io::Result<Bytes> {
        self.dirty = false;
        match &mut self.inner {
            Coder::Identity => Ok(Bytes::new()),
            Coder::Gzip(encoder) => {
                encoder.flush().await?;
                Ok(Bytes::from(std::mem::take(encoder.get_mut())))
            }
            Coder::Zstd(encoder) => {
                encoder.flush().await?;
                Ok(Bytes::from(std::mem::take(encoder.get_mut())))
            }
        }
    }

    /// Ends the coded stream (gzip trailer, zstd epilogue).
    pub async fn finish(&mut self) -> io::Result<Bytes> {
        self.dirty = false;
        match &mut self.inner {
            Coder::Identity => Ok(Bytes::new()),
            Coder::Gzip(encoder) => {
                encoder.shutdown().await?;
                Ok(Bytes::from(std::mem::take(encoder.get_mut())))
            }
            Coder::Zstd(encoder) => {
                encoder.shutdown().await?;
                Ok(Bytes::from(std::mem::take(encoder.get_mut())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        use ContentCoding::*;
        assert_eq!(ContentCoding::negotiate(None), Identity);
        assert_eq!(ContentCoding::negotiate(Some("gzip, deflate, br")), Gzip);
        assert_eq!(ContentCoding::negotiate(Some("gzip, zstd")), Zstd);
        assert_eq!(ContentCoding::negotiate(Some("zstd;q=0, gzip;q=0.5")), Gzip);
        assert_eq!(ContentCoding::negotiate(Some("*")), Zstd);
        assert_eq!(ContentCoding::negotiate(Some("*;q=0, identity")), Identity);
        assert_eq!(ContentCoding::negotiate(Some("br")), Identity);
        assert_eq!(ContentCoding::negotiate(Some("gzip;q=1, zstd;q=0.1")), Gzip);
        assert_eq!(ContentCoding::negotiate(Some("*;q=0.1, gzip")), Gzip);
        assert_eq!(ContentCoding::negotiate(Some("zstd;q=0.001, gzip")), Gzip);
    }

    #[tokio::test]
    async fn gzip_flush_makes_everything_so_far_decodable() {
        use std::io::Read;
        let mut encoder = BodyEncoder::new(ContentCoding::Gzip);
        let mut sent = encoder.write(b"hello ".to_vec()).await.expect("write").to_vec();
        sent.extend_from_slice(&encoder.flush().await.expect("flush"));
        let mut decoder = flate2::read::MultiGzDecoder::new(&sent[..]);
        let mut text = [0u8; 6];
        decoder.read_exact(&mut text).expect("flushed bytes decode");
        assert_eq!(&text, b"hello ");
        sent.extend_from_slice(&encoder.write(b"world".to_vec()).await.expect("write"));
        sent.extend_from_slice(&encoder.finish().await.expect("finish"));
        let mut all = String::new();
        flate2::read::GzDecoder::new(&sent[..]).read_to_string(&mut all).expect("decodes");
        assert_eq!(all, "hello world");
    }
}

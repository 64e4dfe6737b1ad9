//! Encoded bytes → u8 pixels (HWC, 1 or 3 channels), with limits checked from the header.

use super::config::DecodeConfig;
use image::{ColorType, ImageDecoder, ImageError, ImageReader, Limits};
use std::io::Cursor;

/// Why an image was not decoded; maps to the `too_large` / `undecodable` reject reasons.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    #[error("image too large: {0}")]
    TooLarge(String),
    #[error("undecodable image: {0}")]
    Undecodable(String),
}

/// Decode `bytes` into `out` as interleaved u8 with `cfg.channels` channels; returns (w, h).
/// `tmp` is scratch reused between calls (no per-image allocation once warm).
pub fn decode_into(
    bytes: &[u8],
    cfg: &DecodeConfig,
    out: &mut Vec<u8>,
    tmp: &mut Vec<u8>,
) -> Result<(u32, u32), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Undecodable("0-byte image".into()));
    }
    if bytes.len() as u64 > cfg.max_encoded_bytes {
        return Err(DecodeError::TooLarge(format!(
            "{} encoded bytes > max_encoded_bytes = {}",
            bytes.len(),
            cfg.max_encoded_bytes
        )));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    if reader.format().is_none() {
        return Err(DecodeError::Undecodable(
            "unknown image format (not jpeg/png/webp)".into(),
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(cfg.max_side);
    limits.max_image_height = Some(cfg.max_side);
    limits.max_alloc = Some(cfg.max_pixels.saturating_mul(16).max(64 << 20));
    reader.limits(limits);
    let dec = reader.into_decoder().map_err(map_err)?;
    let (w, h) = dec.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > cfg.max_pixels {
        return Err(DecodeError::TooLarge(format!(
            "{w}x{h} = {pixels} pixels > max_pixels = {}",
            cfg.max_pixels
        )));
    }
    if pixels == 0 {
        return Err(DecodeError::Undecodable(format!("{w}x{h} image")));
    }
    let ct = dec.color_type();
    let total = usize::try_from(dec.total_bytes())
        .map_err(|_| DecodeError::TooLarge("decoded size overflows usize".into()))?;
    tmp.clear();
    tmp.resize(total, 0);
    dec.read_image(tmp).map_err(map_err)?;
    convert(tmp, ct, pixels as usize, cfg.channels, out)?;
    Ok((w, h))
}

fn map_err(e: ImageError) -> DecodeError {
    match e {
        ImageError::Limits(l) => DecodeError::TooLarge(l.to_string()),
        other => DecodeError::Undecodable(other.to_string()),
    }
}

/// PIL's ITU-R 601 luma, integer form.
#[inline]
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 299 + u32::from(g) * 587 + u32::from(b) * 114 + 500) / 1000) as u8
}

/// Convert decoded samples of colour type `ct` to `channels` u8 channels.
fn convert(
    src: &[u8],
    ct: ColorType,
    n: usize,
    channels: u8,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let (src_c, bps) = match ct {
        ColorType::L8 => (1, 1),
        ColorType::La8 => (2, 1),
        ColorType::Rgb8 => (3, 1),
        ColorType::Rgba8 => (4, 1),
        ColorType::L16 => (1, 2),
        ColorType::La16 => (2, 2),
        ColorType::Rgb16 => (3, 2),
        ColorType::Rgba16 => (4, 2),
        ColorType::Rgb32F => (3, 4),
        ColorType::Rgba32F => (4, 4),
        other => {
            return Err(DecodeError::Undecodable(format!(
                "unsupported colour type {other:?}"
            )))
        }
    };
    out.clear();
    out.reserve(n * channels as usize);
    // Fast paths: 8-bit without conversion or with the common conversions.
    if bps == 1 {
        match (src_c, channels) {
            (1, 1) | (3, 3) => out.extend_from_slice(&src[..n * src_c]),
            (1, 3) => out.extend(src[..n].iter().flat_map(|&v| [v, v, v])),
            (3, 1) => out.extend(src[..n * 3].chunks_exact(3).map(|p| luma(p[0], p[1], p[2]))),
            (2, 1) => out.extend(src[..n * 2].chunks_exact(2).map(|p| p[0])),
            (2, 3) => out.extend(
                src[..n * 2]
                    .chunks_exact(2)
                    .flat_map(|p| [p[0], p[0], p[0]]),
            ),
            (4, 1) => out.extend(src[..n * 4].chunks_exact(4).map(|p| luma(p[0], p[1], p[2]))),
            (4, 3) => out.extend(
                src[..n * 4]
                    .chunks_exact(4)
                    .flat_map(|p| [p[0], p[1], p[2]]),
            ),
            _ => {
                return Err(DecodeError::Undecodable(format!(
                    "cannot convert to {channels} channels"
                )))
            }
        }
        return Ok(());
    }
    // Rare wide formats: go through a per-sample u8 read.
    let sample = |i: usize| -> u8 {
        match bps {
            2 => (u16::from_ne_bytes([src[2 * i], src[2 * i + 1]]) >> 8) as u8,
            _ => {
                let f = f32::from_ne_bytes([
                    src[4 * i],
                    src[4 * i + 1],
                    src[4 * i + 2],
                    src[4 * i + 3],
                ]);
                (f.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
            }
        }
    };
    for p in 0..n {
        let base = p * src_c;
        let (r, g, b) = if src_c >= 3 {
            (sample(base), sample(base + 1), sample(base + 2))
        } else {
            let v = sample(base);
            (v, v, v)
        };
        if channels == 1 {
            out.push(if src_c >= 3 { luma(r, g, b) } else { r });
        } else {
            out.extend_from_slice(&[r, g, b]);
        }
    }
    Ok(())
}

//! Geometric + colour transforms on decoded u8 pixels, writing normalised f32 CHW.
//!
//! Crop, resize, flip and rotation are composed into one affine map and applied as ONE inverse-mapped
//! bilinear pass; colour ops then work in place on an f32 HWC scratch buffer.

use super::config::{AugmentConfig, EvalConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// 2x3 affine map from continuous output coordinates (pixel centres at +0.5) to source ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine(pub [f32; 6]);

impl Affine {
    fn apply(&self, x: f32, y: f32) -> (f32, f32) {
        let m = &self.0;
        (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5])
    }
    /// `self ∘ other`: first `other`, then `self`.
    fn after(&self, o: &Affine) -> Affine {
        let (a, b) = (&self.0, &o.0);
        Affine([
            a[0] * b[0] + a[1] * b[3],
            a[0] * b[1] + a[1] * b[4],
            a[0] * b[2] + a[1] * b[5] + a[2],
            a[3] * b[0] + a[4] * b[3],
            a[3] * b[1] + a[4] * b[4],
            a[3] * b[2] + a[4] * b[5] + a[5],
        ])
    }
}

/// Stable per-sample seed: FNV-1a over the key, mixed with the global seed and visit count
/// (stable across runs and Rust versions, unlike `DefaultHasher`).
pub fn sample_seed(global: u64, key: &str, visit: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix(splitmix(h ^ global) ^ visit.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

/// torchvision `RandomResizedCrop.get_params`: (top, left, height, width) of the crop.
pub fn rrc_params(
    rng: &mut ChaCha8Rng,
    width: u32,
    height: u32,
    scale: (f32, f32),
    ratio: (f32, f32),
) -> (u32, u32, u32, u32) {
    let (w_in, h_in) = (width as f32, height as f32);
    let area = w_in * h_in;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = (target * aspect).sqrt().round();
        let h = (target / aspect).sqrt().round();
        if w > 0.0 && h > 0.0 && w <= w_in && h <= h_in {
            let (w, h) = (w as u32, h as u32);
            let i = rng.random_range(0..=height - h);
            let j = rng.random_range(0..=width - w);
            return (i, j, h, w);
        }
    }
    // Fallback: centre crop clamped to the ratio range.
    let in_ratio = w_in / h_in;
    let (w, h) = if in_ratio < ratio.0.min(ratio.1) {
        (
            width,
            ((w_in / ratio.0.min(ratio.1)).round() as u32).clamp(1, height),
        )
    } else if in_ratio > ratio.0.max(ratio.1) {
        (
            ((h_in * ratio.0.max(ratio.1)).round() as u32).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// Inverse-map + bilinear sample: `out` (HWC f32 in [0,1], `ow`×`oh`×C) from u8 `src`.
/// Points outside the source (rotation corners) are 0, as torchvision's fill.
fn warp<const C: usize>(
    src: &[u8],
    sw: usize,
    sh: usize,
    m: &Affine,
    ow: usize,
    oh: usize,
    out: &mut [f32],
) {
    if m.0[1] == 0.0 && m.0[3] == 0.0 {
        return warp_axis_aligned::<C>(src, sw, sh, m, ow, oh, out);
    }
    const INV: f32 = 1.0 / 255.0;
    let (maxx, maxy) = ((sw - 1) as f32, (sh - 1) as f32);
    let (hix, hiy) = (sw as f32 - 0.5, sh as f32 - 0.5);
    let row = sw * C;
    for (yo, dst_row) in out.chunks_exact_mut(ow * C).take(oh).enumerate() {
        // Source position of this row's first pixel centre, in index coordinates (-0.5).
        let (mut sx, mut sy) = m.apply(0.5, yo as f32 + 0.5);
        sx -= 0.5;
        sy -= 0.5;
        for o in dst_row.chunks_exact_mut(C) {
            if sx < -0.5 || sx > hix || sy < -0.5 || sy > hiy {
                o.fill(0.0);
            } else {
                let x = sx.max(0.0).min(maxx);
                let y = sy.max(0.0).min(maxy);
                let (x0, y0) = (x as u32 as usize, y as u32 as usize);
                let (fx, fy) = (x - x0 as f32, y - y0 as f32);
                let dx = if x0 + 1 < sw { C } else { 0 };
                let dy = if y0 + 1 < sh { row } else { 0 };
                let i00 = y0 * row + x0 * C;
                let (a, b) = (&src[i00..i00 + dx + C], &src[i00 + dy..i00 + dy + dx + C]);
                for c in 0..C {
                    let p00 = f32::from(a[c]);
                    let p01 = f32::from(a[dx + c]);
                    let p10 = f32::from(b[c]);
                    let p11 = f32::from(b[dx + c]);
                    let top = p00 + (p01 - p00) * fx;
                    let bot = p10 + (p11 - p10) * fx;
                    o[c] = (top + (bot - top) * fy) * INV;
                }
            }
            sx += m.0[0];
            sy += m.0[3];
        }
    }
}

/// No rotation: the map is separable, so x taps and weights are computed once per column and
/// y once per row (the common case, and the whole eval transform).
fn warp_axis_aligned<const C: usize>(
    src: &[u8],
    sw: usize,
    sh: usize,
    m: &Affine,
    ow: usize,
    oh: usize,
    out: &mut [f32],
) {
    const INV: f32 = 1.0 / 255.0;
    let row = sw * C;
    // Same edge rule as the general path: clamp to the border, 0 beyond half a pixel.
    let tap = |pos: f32, n: usize| -> Option<(usize, usize, f32)> {
        if pos < -0.5 || pos > n as f32 - 0.5 {
            return None;
        }
        let p = pos.max(0.0).min((n - 1) as f32);
        let i0 = p as u32 as usize;
        Some((i0, if i0 + 1 < n { i0 + 1 } else { i0 }, p - i0 as f32))
    };
    let xs: Vec<Option<(usize, usize, f32)>> = (0..ow)
        .map(|xo| tap(m.0[0] * (xo as f32 + 0.5) + m.0[2] - 0.5, sw))
        .collect();
    for (yo, dst_row) in out.chunks_exact_mut(ow * C).take(oh).enumerate() {
        let Some((y0, y1, fy)) = tap(m.0[4] * (yo as f32 + 0.5) + m.0[5] - 0.5, sh) else {
            dst_row.fill(0.0);
            continue;
        };
        let (r0, r1) = (
            &src[y0 * row..(y0 + 1) * row],
            &src[y1 * row..(y1 + 1) * row],
        );
        for (o, t) in dst_row.chunks_exact_mut(C).zip(&xs) {
            let Some((x0, x1, fx)) = *t else {
                o.fill(0.0);
                continue;
            };
            for c in 0..C {
                let p00 = f32::from(r0[x0 * C + c]);
                let p01 = f32::from(r0[x1 * C + c]);
                let p10 = f32::from(r1[x0 * C + c]);
                let p11 = f32::from(r1[x1 * C + c]);
                let top = p00 + (p01 - p00) * fx;
                let bot = p10 + (p11 - p10) * fx;
                o[c] = (top + (bot - top) * fy) * INV;
            }
        }
    }
}

/// Apply `m` from u8 HWC `src` (w×h×channels) into `out` (size×size×channels).
pub fn warp_into(
    src: &[u8],
    w: u32,
    h: u32,
    channels: usize,
    m: &Affine,
    size: u32,
    out: &mut Vec<f32>,
) {
    let s = size as usize;
    out.clear();
    out.resize(s * s * channels, 0.0);
    if channels == 1 {
        warp::<1>(src, w as usize, h as usize, m, s, s, out);
    } else {
        warp::<3>(src, w as usize, h as usize, m, s, s, out);
    }
}

/// Affine for crop (top, left, ch, cw) → resize to `size`, optional flip, rotation by `deg`.
pub fn train_affine(crop: (u32, u32, u32, u32), size: u32, flip: bool, deg: f32) -> Affine {
    let (i, j, ch, cw) = crop;
    let s = size as f32;
    let c = s / 2.0;
    let (sin, cos) = deg.to_radians().sin_cos();
    // Inverse rotation about the output centre.
    let rot = Affine([
        cos,
        sin,
        c - cos * c - sin * c,
        -sin,
        cos,
        c + sin * c - cos * c,
    ]);
    let flip_m = if flip {
        Affine([-1.0, 0.0, s, 0.0, 1.0, 0.0])
    } else {
        Affine([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    };
    let scale = Affine([cw as f32 / s, 0.0, j as f32, 0.0, ch as f32 / s, i as f32]);
    scale.after(&flip_m.after(&rot))
}

/// Affine for resize-shorter-side-to `resize` then centre-crop `size`.
pub fn eval_affine(w: u32, h: u32, resize: u32, size: u32) -> Affine {
    let short = w.min(h) as f32;
    let f = resize as f32 / short;
    let (rw, rh) = ((w as f32 * f).round(), (h as f32 * f).round());
    let top = ((rh - size as f32) / 2.0).round();
    let left = ((rw - size as f32) / 2.0).round();
    let (sx, sy) = (w as f32 / rw, h as f32 / rh);
    Affine([sx, 0.0, left * sx, 0.0, sy, top * sy])
}

#[inline]
fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.2989 * r + 0.587 * g + 0.114 * b
}

fn brightness(img: &mut [f32], f: f32) {
    img.iter_mut().for_each(|v| *v = (*v * f).clamp(0.0, 1.0));
}

fn contrast(img: &mut [f32], c: usize, f: f32) {
    let n = (img.len() / c) as f32;
    let mean = if c == 3 {
        img.chunks_exact(3)
            .map(|p| gray(p[0], p[1], p[2]))
            .sum::<f32>()
            / n
    } else {
        img.iter().sum::<f32>() / n
    };
    let add = (1.0 - f) * mean;
    img.iter_mut()
        .for_each(|v| *v = (f * *v + add).clamp(0.0, 1.0));
}

fn saturation(img: &mut [f32], f: f32) {
    for p in img.chunks_exact_mut(3) {
        let g = (1.0 - f) * gray(p[0], p[1], p[2]);
        for v in p.iter_mut() {
            *v = (f * *v + g).clamp(0.0, 1.0);
        }
    }
}

/// torchvision `_rgb2hsv` for one pixel; h in [0,1).
#[inline]
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let cr = maxc - minc;
    let s = if maxc > 0.0 { cr / maxc } else { 0.0 };
    if cr == 0.0 {
        return (0.0, s, maxc);
    }
    let inv = 1.0 / cr;
    let h = if maxc == r {
        (g - b) * inv
    } else if maxc == g {
        2.0 + (b - r) * inv
    } else {
        4.0 + (r - g) * inv
    };
    // h is in (-1, 5]: wrap to [0, 1) without a float modulo (hot loop).
    let h = h * (1.0 / 6.0);
    (if h < 0.0 { h + 1.0 } else { h }, s, maxc)
}

/// torchvision `_hsv2rgb` for one pixel (h in [0,1)).
#[inline]
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    // h ≥ 0, so truncation is floor (f32::floor is a libm call on baseline x86-64).
    let i = h6 as i32 as f32;
    let f = h6 - i;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match i as i32 {
        0 | 6 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

fn hue(img: &mut [f32], shift: f32) {
    // shift in [-0.5, 0.5]: one conditional wrap keeps h in [0, 1).
    for p in img.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
        let mut h = h + shift;
        if h < 0.0 {
            h += 1.0;
        } else if h >= 1.0 {
            h -= 1.0;
        }
        let (r, g, b) = hsv_to_rgb(h, s, v);
        p[0] = r;
        p[1] = g;
        p[2] = b;
    }
}

fn grayscale(img: &mut [f32]) {
    for p in img.chunks_exact_mut(3) {
        let g = gray(p[0], p[1], p[2]);
        p.fill(g);
    }
}

/// Per-channel normalise HWC `img` into CHW `dst`.
pub fn normalise_chw(img: &[f32], c: usize, mean: &[f32], std: &[f32], dst: &mut [f32]) {
    let hw = img.len() / c;
    for ch in 0..c {
        let m = mean.get(ch).or(mean.first()).copied().unwrap_or(0.0);
        let s = std.get(ch).or(std.first()).copied().unwrap_or(1.0);
        let inv = 1.0 / s;
        let plane = &mut dst[ch * hw..(ch + 1) * hw];
        for (d, px) in plane.iter_mut().zip(img.chunks_exact(c)) {
            *d = (px[ch] - m) * inv;
        }
    }
}

/// Train transform of one decoded image (u8 HWC, `c` channels) into `dst` (CHW, size²·c).
/// Every random draw comes from `rng`, so the same seed gives the same tensor.
#[allow(clippy::too_many_arguments)]
pub fn train_transform(
    src: &[u8],
    w: u32,
    h: u32,
    c: usize,
    cfg: &AugmentConfig,
    rng: &mut ChaCha8Rng,
    scratch: &mut Vec<f32>,
    dst: &mut [f32],
) {
    let crop = rrc_params(rng, w, h, cfg.scale, cfg.ratio);
    let flip = rng.random::<f32>() < cfg.hflip_p;
    let deg = if cfg.rotation_degrees > 0.0 {
        uniform(rng, -cfg.rotation_degrees, cfg.rotation_degrees)
    } else {
        0.0
    };
    let m = train_affine(crop, cfg.size, flip, deg);
    warp_into(src, w, h, c, &m, cfg.size, scratch);

    let any_jitter =
        cfg.brightness > 0.0 || cfg.contrast > 0.0 || cfg.saturation > 0.0 || cfg.hue > 0.0;
    if any_jitter && rng.random::<f32>() < cfg.jitter_p {
        let mut order = [0usize, 1, 2, 3];
        if cfg.jitter_random_order {
            for k in (1..4).rev() {
                order.swap(k, rng.random_range(0..=k));
            }
        }
        let factor = |rng: &mut ChaCha8Rng, x: f32| uniform(rng, (1.0 - x).max(0.0), 1.0 + x);
        let b = (cfg.brightness > 0.0).then(|| factor(rng, cfg.brightness));
        let ct = (cfg.contrast > 0.0).then(|| factor(rng, cfg.contrast));
        let s = (cfg.saturation > 0.0).then(|| factor(rng, cfg.saturation));
        let hu = (cfg.hue > 0.0).then(|| uniform(rng, -cfg.hue, cfg.hue));
        for op in order {
            match (op, b, ct, s, hu) {
                (0, Some(f), ..) => brightness(scratch, f),
                (1, _, Some(f), ..) => contrast(scratch, c, f),
                (2, _, _, Some(f), _) if c == 3 => saturation(scratch, f),
                (3, _, _, _, Some(f)) if c == 3 => hue(scratch, f),
                _ => {}
            }
        }
    }
    if c == 3 && cfg.grayscale_p > 0.0 && rng.random::<f32>() < cfg.grayscale_p {
        grayscale(scratch);
    }
    normalise_chw(scratch, c, &cfg.mean, &cfg.std, dst);
}

/// Eval transform (deterministic) of one decoded image into `dst` (CHW).
#[allow(clippy::too_many_arguments)]
pub fn eval_transform(
    src: &[u8],
    w: u32,
    h: u32,
    c: usize,
    cfg: &EvalConfig,
    scratch: &mut Vec<f32>,
    dst: &mut [f32],
) {
    let m = eval_affine(w, h, cfg.resize, cfg.size);
    warp_into(src, w, h, c, &m, cfg.size, scratch);
    normalise_chw(scratch, c, &cfg.mean, &cfg.std, dst);
}

/// A seeded RNG for one sample.
pub fn sample_rng(global: u64, key: &str, visit: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(sample_seed(global, key, visit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32, c: usize) -> Vec<u8> {
        (0..(w * h) as usize * c)
            .map(|i| (i * 7 % 251) as u8)
            .collect()
    }

    #[test]
    fn same_seed_same_tensor_different_seed_different() {
        let mut cfg = AugmentConfig::new(24);
        cfg.rotation_degrees = 10.0;
        cfg.brightness = 0.4;
        cfg.contrast = 0.4;
        cfg.saturation = 0.4;
        cfg.hue = 0.1;
        cfg.grayscale_p = 0.2;
        let src = ramp(40, 30, 3);
        let run = |key: &str, visit| {
            let mut rng = sample_rng(7, key, visit);
            let (mut s, mut d) = (Vec::new(), vec![0.0; 24 * 24 * 3]);
            train_transform(&src, 40, 30, 3, &cfg, &mut rng, &mut s, &mut d);
            d
        };
        assert_eq!(run("a", 0), run("a", 0));
        assert_ne!(run("a", 0), run("a", 1));
        assert_ne!(run("a", 0), run("b", 0));
    }

    #[test]
    fn rrc_params_stay_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (w, h) in [(28, 28), (256, 256), (300, 100), (10, 500), (1, 1)] {
            for _ in 0..500 {
                let (i, j, ch, cw) = rrc_params(&mut rng, w, h, (0.08, 1.0), (0.75, 4.0 / 3.0));
                assert!(
                    ch >= 1 && cw >= 1 && i + ch <= h && j + cw <= w,
                    "{w}x{h}: {i} {j} {ch} {cw}"
                );
                let frac = (ch * cw) as f32 / (w * h) as f32;
                let ratio = cw as f32 / ch as f32;
                // Either an accepted sample (within scale, near the ratio range) or the fallback.
                let fallback = i == (h - ch) / 2 && j == (w - cw) / 2;
                assert!(fallback || (0.05..=1.0).contains(&frac), "{frac}");
                assert!(fallback || (0.6..=1.6).contains(&ratio), "{ratio}");
            }
        }
    }

    #[test]
    fn rrc_fallback_for_extreme_aspect() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // 1000x10 can never fit a ratio ≤ 4/3 crop of sizeable area: fallback clamps to ratio.
        let (i, j, ch, cw) = rrc_params(&mut rng, 1000, 10, (0.9, 1.0), (0.75, 4.0 / 3.0));
        assert_eq!((i, ch), (0, 10));
        assert_eq!(cw, 13);
        assert_eq!(j, (1000 - 13) / 2);
    }

    #[test]
    fn hsv_round_trip() {
        for r in 0..=10 {
            for g in 0..=10 {
                for b in 0..=10 {
                    let (r, g, b) = (r as f32 / 10.0, g as f32 / 10.0, b as f32 / 10.0);
                    let (h, s, v) = rgb_to_hsv(r, g, b);
                    let (r2, g2, b2) = hsv_to_rgb(h, s, v);
                    assert!(
                        (r - r2).abs() < 1e-5 && (g - g2).abs() < 1e-5 && (b - b2).abs() < 1e-5
                    );
                }
            }
        }
        let (h, s, v) = rgb_to_hsv(1.0, 0.0, 0.0);
        assert_eq!((h, s, v), (0.0, 1.0, 1.0));
        // A hue shift of 1/3 turns red into green.
        let mut px = [1.0, 0.0, 0.0];
        hue(&mut px, 1.0 / 3.0);
        assert!(px[0].abs() < 1e-5 && (px[1] - 1.0).abs() < 1e-5 && px[2].abs() < 1e-5);
        // Saturation 0 gives grey, 1 is identity.
        let mut px = [0.8, 0.2, 0.4];
        saturation(&mut px, 1.0);
        assert_eq!(px, [0.8, 0.2, 0.4]);
        saturation(&mut px, 0.0);
        assert!((px[0] - px[1]).abs() < 1e-6 && (px[1] - px[2]).abs() < 1e-6);
    }

    #[test]
    fn eval_transform_centre_crops_and_normalises() {
        // 8x4 grey image whose columns are 0..8 * 30; resize shorter side 4 -> 4 (identity
        // scale), centre-crop 4: columns 2..6.
        let src: Vec<u8> = (0..4).flat_map(|_| (0..8u8).map(|x| x * 30)).collect();
        let cfg = EvalConfig {
            resize: 4,
            size: 4,
            mean: vec![0.0],
            std: vec![1.0],
        };
        let (mut s, mut d) = (Vec::new(), vec![0.0; 16]);
        eval_transform(&src, 8, 4, 1, &cfg, &mut s, &mut d);
        for y in 0..4 {
            for x in 0..4 {
                let want = ((x + 2) * 30) as f32 / 255.0;
                assert!(
                    (d[y * 4 + x] - want).abs() < 1e-5,
                    "{x},{y}: {} vs {want}",
                    d[y * 4 + x]
                );
            }
        }
        // Downscale by 2: 16x8 -> shorter side 4 -> 8x4 -> crop 4x4; normalised with mean/std.
        let src: Vec<u8> = vec![200; 16 * 8];
        let cfg = EvalConfig {
            resize: 4,
            size: 4,
            mean: vec![0.5],
            std: vec![0.25],
        };
        eval_transform(&src, 16, 8, 1, &cfg, &mut s, &mut d);
        let want = (200.0 / 255.0 - 0.5) / 0.25;
        assert!(d.iter().all(|v| (v - want).abs() < 1e-5));
    }

    #[test]
    fn rotated_path_matches_axis_aligned_path() {
        let src = ramp(37, 23, 3);
        let m = train_affine((3, 5, 17, 29), 19, true, 0.0);
        let (mut a, mut b) = (vec![0.0; 19 * 19 * 3], vec![0.0; 19 * 19 * 3]);
        warp_axis_aligned::<3>(&src, 37, 23, &m, 19, 19, &mut a);
        // Same map with a zero-but-present rotation term forces the general path.
        let mut g = m;
        g.0[1] = 1e-30;
        warp::<3>(&src, 37, 23, &g, 19, 19, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }

    #[test]
    fn identity_crop_without_flip_copies_pixels() {
        let src = ramp(6, 6, 3);
        let m = train_affine((0, 0, 6, 6), 6, false, 0.0);
        let mut out = Vec::new();
        warp_into(&src, 6, 6, 3, &m, 6, &mut out);
        for (a, b) in out.iter().zip(&src) {
            assert!((a - f32::from(*b) / 255.0).abs() < 1e-6);
        }
        let m = train_affine((0, 0, 6, 6), 6, true, 0.0);
        warp_into(&src, 6, 6, 3, &m, 6, &mut out);
        // First output pixel = last source pixel of the first row.
        assert!((out[0] - f32::from(src[5 * 3]) / 255.0).abs() < 1e-6);
    }
}

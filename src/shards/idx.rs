//! IDX files (MNIST / Fashion-MNIST format) → PNG WebDataset shards.

use super::write::{put, shard_path, ShardWriter, WriteSummary};
use super::ShardsError;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use object_store::{path::Path, ObjectStore};
use rayon::prelude::*;
use std::io::Read;
use std::sync::Arc;

/// A parsed IDX file of unsigned bytes.
#[derive(Debug, Clone)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Read an IDX file of u8 (type 0x08), gzip-compressed or plain (detected by magic bytes).
pub fn read_idx(path: &std::path::Path) -> Result<Idx, ShardsError> {
    let name = path.display().to_string();
    let raw = std::fs::read(path).map_err(|source| ShardsError::Io {
        path: name.clone(),
        source,
    })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|source| ShardsError::Io {
                path: name.clone(),
                source,
            })?;
        out
    } else {
        raw
    };
    let bad = |message: String| ShardsError::BadIdx {
        path: name.clone(),
        message,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("missing the 00 00 magic".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "element type 0x{:02x}; only unsigned bytes (0x08) are supported",
            bytes[2]
        )));
    }
    let nd = bytes[3] as usize;
    let header = 4 + 4 * nd;
    if nd == 0 || bytes.len() < header {
        return Err(bad(format!("{nd} dimensions but the header is cut short")));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    // Checked: dimensions from a damaged or hostile header can overflow the product.
    let Some(n) = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
        return Err(bad(format!("dims {dims:?} overflow the element count")));
    };
    if bytes.len() - header != n {
        return Err(bad(format!(
            "dims {dims:?} need {n} data bytes, file has {}; is it truncated?",
            bytes.len() - header
        )));
    }
    Ok(Idx {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Encode a grey image as PNG (deterministic: same pixels → same bytes).
pub(crate) fn png_grey(key: &str, pixels: &[u8], w: u32, h: u32) -> Result<Vec<u8>, ShardsError> {
    let mut out = Vec::with_capacity(pixels.len() + 128);
    PngEncoder::new(&mut out)
        .write_image(pixels, w, h, ExtendedColorType::L8)
        .map_err(|e| ShardsError::Encode {
            key: key.to_string(),
            message: e.to_string(),
        })?;
    Ok(out)
}

/// Which samples of an IDX pair to import: `limit` samples from index `skip` on (all when
/// `None`). Keys keep the sample's index in the IDX file, so sets carved from one file (train /
/// validation) never share a key.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdxRange {
    pub skip: usize,
    pub limit: Option<usize>,
}

/// Convert IDX images (N×H×W) + labels (N) into PNG shards `<prefix>-<n:06>.tar` under `out`,
/// keys `<prefix>-<i:06>` (`i` the index in the file), `per_shard` samples each, only the
/// samples of `range`.
pub async fn import_idx(
    images: &std::path::Path,
    labels: &std::path::Path,
    store: Arc<dyn ObjectStore>,
    out: &Path,
    prefix: &str,
    per_shard: usize,
    range: IdxRange,
) -> Result<WriteSummary, ShardsError> {
    let (images_p, labels_p) = (images.to_path_buf(), labels.to_path_buf());
    let (imgs, labs) = tokio::task::spawn_blocking(move || {
        Ok::<_, ShardsError>((read_idx(&images_p)?, read_idx(&labels_p)?))
    })
    .await
    .map_err(|e| ShardsError::Join(e.to_string()))??;
    if imgs.dims.len() != 3 || labs.dims.len() != 1 || imgs.dims[0] != labs.dims[0] {
        return Err(ShardsError::Mismatch {
            message: format!(
                "images {} has dims {:?}, labels {} has dims {:?}: expected N×H×W and N with the same N",
                images.display(),
                imgs.dims,
                labels.display(),
                labs.dims
            ),
        });
    }
    let (n, h, w) = (imgs.dims[0], imgs.dims[1], imgs.dims[2]);
    let first = range.skip.min(n);
    let n = range.limit.map_or(n, |l| first.saturating_add(l).min(n));
    let per_shard = per_shard.max(1);
    let imgs = Arc::new(imgs);
    let labs = Arc::new(labs);
    let mut summary = WriteSummary::default();
    for (s, start) in (first..n).step_by(per_shard).enumerate() {
        let end = (start + per_shard).min(n);
        let (imgs, labs, prefix_s) = (imgs.clone(), labs.clone(), prefix.to_string());
        // PNG encoding is CPU work: keep it off the async runtime.
        let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ShardsError> {
            let pngs: Vec<Result<Vec<u8>, ShardsError>> = (start..end)
                .into_par_iter()
                .map(|i| {
                    let key = format!("{prefix_s}-{i:06}");
                    png_grey(
                        &key,
                        &imgs.data[i * h * w..(i + 1) * h * w],
                        w as u32,
                        h as u32,
                    )
                })
                .collect();
            let mut wr = ShardWriter::new();
            for (i, png) in (start..end).zip(pngs) {
                let key = format!("{prefix_s}-{i:06}");
                wr.append_sample(&key, "png", &png?, Some(i64::from(labs.data[i])))
                    .map_err(|e| ShardsError::Encode {
                        key: key.clone(),
                        message: e.to_string(),
                    })?;
            }
            wr.finish().map_err(|e| ShardsError::Encode {
                key: prefix_s.clone(),
                message: e.to_string(),
            })
        })
        .await
        .map_err(|e| ShardsError::Join(e.to_string()))??;
        let path = shard_path(out, prefix, s);
        put(&store, &path, bytes).await?;
        summary.shards.push(path.to_string());
        summary.records += end - start;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_whose_product_overflows_are_an_error_not_a_panic() {
        // Three dimensions of 2^32 - 1: the element count overflows usize.
        let mut v = vec![0, 0, 8, 3];
        for _ in 0..3 {
            v.extend(u32::MAX.to_be_bytes());
        }
        v.extend([1, 2, 3]);
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("overflow.idx");
        std::fs::write(&p, &v).expect("write");
        let e = read_idx(&p).expect_err("overflowing dims must be rejected");
        assert!(e.to_string().contains("overflow"), "{e}");
    }

    fn idx(dir: &std::path::Path, name: &str, dims: &[u32], data: &[u8]) -> std::path::PathBuf {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        let p = dir.join(name);
        std::fs::write(&p, v).expect("write idx");
        p
    }

    #[test]
    fn a_range_imports_only_its_samples_under_their_file_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = 10u32;
        let images = idx(
            dir.path(),
            "i.idx",
            &[n, 2, 2],
            &(0..40).collect::<Vec<u8>>(),
        );
        let labels = idx(dir.path(), "l.idx", &[n], &(0..10).collect::<Vec<u8>>());
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let import = |skip, limit| {
            let range = IdxRange { skip, limit };
            rt.block_on(import_idx(
                &images,
                &labels,
                store.clone(),
                &Path::from("out"),
                "p",
                3,
                range,
            ))
            .expect("import")
        };
        // Samples 3..7: two shards (3 + 1), keys named by their index in the file.
        let s = import(3, Some(4));
        assert_eq!((s.records, s.shards.len()), (4, 2));
        let first = rt
            .block_on(async {
                store
                    .get(&Path::from(s.shards[0].as_str()))
                    .await?
                    .bytes()
                    .await
            })
            .expect("read shard");
        let has = |key: &str| first.windows(key.len()).any(|w| w == key.as_bytes());
        assert!(
            has("p-000003.") && has("p-000005."),
            "first shard holds samples 3..6"
        );
        assert!(
            !has("p-000002.") && !has("p-000006."),
            "nothing outside the range"
        );
        // A range past the end imports nothing; a limit past the end stops at the end.
        assert_eq!(import(10, None).records, 0);
        assert_eq!(import(8, Some(100)).records, 2);
    }
}

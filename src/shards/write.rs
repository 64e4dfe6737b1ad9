//! Deterministic tar shard writer and the folder packer.

use super::ShardsError;
use object_store::{path::Path, ObjectStore, PutPayload};
use std::sync::Arc;

/// Builds one tar in memory with fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same
/// members in the same order give byte-identical shards.
pub struct ShardWriter {
    builder: tar::Builder<Vec<u8>>,
    records: usize,
}

impl Default for ShardWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardWriter {
    pub fn new() -> Self {
        ShardWriter {
            builder: tar::Builder::new(Vec::new()),
            records: 0,
        }
    }

    /// A regular-file header with the fixed metadata.
    fn header(size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        h
    }

    /// Append one member (long names become GNU long-name entries).
    pub fn append(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let mut h = Self::header(data.len() as u64);
        self.builder.append_data(&mut h, name, data)
    }

    /// Append one member whose name is raw bytes, stored exactly as given. Tar names are
    /// bytes, not text: this writes the shards a reader must survive, such as a name that is
    /// not UTF-8 (rejected as `bad_name`), which [`append`](Self::append) cannot express.
    /// Names over 100 bytes get a GNU long-name entry, as with `append`.
    pub fn append_raw(&mut self, name: &[u8], data: &[u8]) -> std::io::Result<()> {
        let mut h = Self::header(data.len() as u64);
        let Some(gnu) = h.as_gnu_mut() else {
            return Err(std::io::Error::other("tar header without GNU fields"));
        };
        let field = gnu.name.len();
        if name.len() > field {
            // GNU tar's form: a `././@LongLink` member holding the NUL-terminated name, then
            // the member itself with the name cut to the field.
            let mut long = Self::header(name.len() as u64 + 1);
            long.set_entry_type(tar::EntryType::GNULongName);
            let link = b"././@LongLink";
            if let Some(g) = long.as_gnu_mut() {
                g.name[..link.len()].copy_from_slice(link);
            }
            long.set_cksum();
            let body = [name, &[0]].concat();
            self.builder.append(&long, &body[..])?;
        }
        let n = name.len().min(field);
        gnu.name[..n].copy_from_slice(&name[..n]);
        h.set_cksum();
        self.builder.append(&h, data)
    }

    /// Append a sample: `<key>.<ext>` and, with a label, `<key>.cls`.
    pub fn append_sample(
        &mut self,
        key: &str,
        ext: &str,
        image: &[u8],
        label: Option<i64>,
    ) -> std::io::Result<()> {
        self.append(&format!("{key}.{ext}"), image)?;
        if let Some(l) = label {
            self.append(&format!("{key}.cls"), l.to_string().as_bytes())?;
        }
        self.records += 1;
        Ok(())
    }

    /// Samples appended so far.
    pub fn records(&self) -> usize {
        self.records
    }

    /// The finished tar bytes.
    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        self.builder.into_inner()
    }
}

/// What a writer produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Object paths of the shards, in order.
    pub shards: Vec<String>,
    pub records: usize,
}

pub(crate) async fn put(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    bytes: Vec<u8>,
) -> Result<(), ShardsError> {
    store
        .put(path, PutPayload::from(bytes))
        .await
        .map(|_| ())
        .map_err(|source| ShardsError::Put {
            path: path.to_string(),
            source,
        })
}

/// Shard object name `<prefix>-<n:06>.tar` under `out`.
pub(crate) fn shard_path(out: &Path, prefix: &str, n: usize) -> Path {
    let name = format!("{prefix}-{n:06}.tar");
    if out.as_ref().is_empty() {
        Path::from(name)
    } else {
        out.child(name)
    }
}

const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

fn io_err(path: &std::path::Path, source: std::io::Error) -> ShardsError {
    ShardsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Image files directly in `dir`, sorted by name.
fn images_in(dir: &std::path::Path) -> Result<Vec<(std::path::PathBuf, String)>, ShardsError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let e = e.map_err(|e| io_err(dir, e))?;
        let p = e.path();
        let ext = p
            .extension()
            .and_then(|x| x.to_str())
            .map(|x| x.to_ascii_lowercase())
            .unwrap_or_default();
        if p.is_file() && IMAGE_EXTS.contains(&ext.as_str()) {
            out.push((p, ext));
        }
    }
    out.sort();
    Ok(out)
}

/// Pack a folder of images into shards. Class sub-folders (sorted by name) become labels
/// 0, 1, ...; their names are written to `classes.json` and `classes.txt` beside the shards.
/// Images directly in `dir` are packed without labels when there are no sub-folders.
/// Image bytes are copied unchanged; keys are `<prefix>-<n:06>` in sorted order.
pub async fn pack_dir(
    dir: &std::path::Path,
    store: Arc<dyn ObjectStore>,
    out: &Path,
    prefix: &str,
    per_shard: usize,
) -> Result<WriteSummary, ShardsError> {
    let mut classes: Vec<String> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let e = e.map_err(|e| io_err(dir, e))?;
        if e.path().is_dir() {
            classes.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    classes.sort();
    let mut files: Vec<(std::path::PathBuf, String, Option<i64>)> = Vec::new();
    if classes.is_empty() {
        files.extend(images_in(dir)?.into_iter().map(|(p, e)| (p, e, None)));
    } else {
        for (label, class) in classes.iter().enumerate() {
            for (p, e) in images_in(&dir.join(class))? {
                files.push((p, e, Some(label as i64)));
            }
        }
    }
    if files.is_empty() {
        return Err(ShardsError::Mismatch {
            message: format!("no jpg/jpeg/png/webp images found in {}", dir.display()),
        });
    }
    let per_shard = per_shard.max(1);
    let mut summary = WriteSummary::default();
    for (n, chunk) in files.chunks(per_shard).enumerate() {
        let mut w = ShardWriter::new();
        for (i, (path, ext, label)) in chunk.iter().enumerate() {
            let data = tokio::fs::read(path).await.map_err(|e| io_err(path, e))?;
            let key = format!("{prefix}-{:06}", n * per_shard + i);
            w.append_sample(&key, ext, &data, *label)
                .map_err(|e| io_err(path, e))?;
        }
        summary.records += w.records();
        let bytes = w.finish().map_err(|e| io_err(dir, e))?;
        let path = shard_path(out, prefix, n);
        put(&store, &path, bytes).await?;
        summary.shards.push(path.to_string());
    }
    if !classes.is_empty() {
        let json = serde_json::to_vec_pretty(&classes).map_err(|e| ShardsError::Mismatch {
            message: format!("cannot serialise class names: {e}"),
        })?;
        let child = |name: &str| {
            if out.as_ref().is_empty() {
                Path::from(name)
            } else {
                out.child(name)
            }
        };
        put(&store, &child("classes.json"), json).await?;
        put(
            &store,
            &child("classes.txt"),
            (classes.join("\n") + "\n").into_bytes(),
        )
        .await?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name bytes, data) of every member, as the tar crate reads them back.
    fn members(tar: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut ar = tar::Archive::new(tar);
        let mut out = Vec::new();
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let name = e.path_bytes().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).expect("read");
            out.push((name, data));
        }
        out
    }

    #[test]
    fn raw_names_are_stored_as_given_short_and_long() {
        let long: Vec<u8> = std::iter::repeat_n(b'k', 150).chain(*b"\xfe.png").collect();
        let mut w = ShardWriter::new();
        w.append_raw(b"bad\xffname.png", b"B").expect("short raw");
        w.append_raw(&long, b"L").expect("long raw");
        w.append("ok.png", b"O").expect("utf-8");
        let got = members(&w.finish().expect("finish"));
        assert_eq!(
            got,
            [
                (b"bad\xffname.png".to_vec(), b"B".to_vec()),
                (long, b"L".to_vec()),
                (b"ok.png".to_vec(), b"O".to_vec()),
            ]
        );
    }

    #[test]
    fn raw_and_text_names_give_the_same_bytes() {
        // Same fixed metadata either way, so mixing the two keeps shards deterministic.
        let long = "x".repeat(120) + ".png";
        let (mut a, mut b) = (ShardWriter::new(), ShardWriter::new());
        for name in ["k.png", long.as_str()] {
            a.append(name, b"data").expect("append");
            b.append_raw(name.as_bytes(), b"data").expect("append_raw");
        }
        assert!(a.finish().expect("a") == b.finish().expect("b"));
    }
}

//! Byte formats of the checkpoint parts, and a streaming part writer.
//!
//! The memory bank of a large run is gigabytes (M = 2,000,000 × D = 256 f32 = 2 GB), so
//! `memory.safetensors` and `memory-keys.bin` are produced chunk by chunk into an object_store
//! multipart upload, never as one buffer. The safetensors header is written by hand (it only
//! needs the shapes) so the data can follow in chunks; any safetensors reader reads the result.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};

use crate::odc::{StreamConfig, StreamingMemory, StreamingState};

/// Size of one buffered chunk / multipart part (S3 needs at least 5 MiB per part).
pub(crate) const CHUNK_BYTES: usize = 16 << 20;
/// Parts in flight at once per multipart upload (bounds memory to about 4 × CHUNK_BYTES).
const MAX_PARTS_IN_FLIGHT: usize = 4;

/// Magic first line of `memory-keys.bin`.
pub(crate) const KEYS_MAGIC: &[u8; 8] = b"ODCKEYS1";

/// Writes one object: buffered in memory up to [`CHUNK_BYTES`] (then a single `put`), or
/// streamed as a multipart upload beyond that. Computes the size and CRC32 on the way.
/// Nothing is visible under `path` until [`PartWriter::finish`] succeeds.
pub(crate) struct PartWriter {
    store: Arc<dyn ObjectStore>,
    path: Path,
    buf: Vec<u8>,
    upload: Option<WriteMultipart>,
    hasher: crc32fast::Hasher,
    size: u64,
}

impl PartWriter {
    pub(crate) fn new(store: Arc<dyn ObjectStore>, path: Path) -> Self {
        PartWriter {
            store,
            path,
            buf: Vec::new(),
            upload: None,
            hasher: crc32fast::Hasher::new(),
            size: 0,
        }
    }

    pub(crate) async fn write(&mut self, data: &[u8]) -> Result<(), object_store::Error> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        if let Some(up) = self.upload.as_mut() {
            up.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await?;
            up.write(data);
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            let upload = self.store.put_multipart(&self.path).await?;
            let mut up = WriteMultipart::new_with_chunk_size(upload, CHUNK_BYTES);
            up.write(&std::mem::take(&mut self.buf));
            self.upload = Some(up);
        }
        Ok(())
    }

    /// Publishes the object; returns its size and CRC32.
    pub(crate) async fn finish(self) -> Result<(u64, u32), object_store::Error> {
        let crc = self.hasher.finalize();
        match self.upload {
            Some(up) => {
                up.finish().await?;
            }
            None => {
                self.store
                    .put(&self.path, PutPayload::from(Bytes::from(self.buf)))
                    .await?;
            }
        }
        Ok((self.size, crc))
    }

    /// Gives up: aborts a started multipart upload (best effort).
    pub(crate) async fn abort(self) {
        if let Some(up) = self.upload {
            let _ = up.abort().await;
        }
    }
}

/// The scalar part of a [`StreamingState`], stored as JSON in the `__metadata__` of
/// `memory.safetensors` (key [`MEMORY_META_KEY`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct MemoryMeta {
    pub config: StreamConfig,
    pub fill: u64,
    pub offered: u64,
    pub rng_seed: [u8; 32],
    pub rng_stream: u64,
    pub rng_word_pos: [u64; 2],
    pub inserted_total: u64,
    pub evictions_total: u64,
    pub not_stored_total: u64,
}

pub(crate) const MEMORY_META_KEY: &str = "odcd.memory";

/// Elements converted per chunk (4 MiB of bytes).
const ELEMS_PER_CHUNK: usize = 1 << 20;

/// What the memory parts are written from: an exported [`StreamingState`] (tools, tests), or
/// the live [`StreamingMemory`] itself, read in place while training is paused, so that a
/// checkpoint never holds a second copy of the bank or the keys. Both give the same bytes.
#[derive(Clone, Copy)]
pub(crate) enum MemorySrc<'a> {
    State(&'a StreamingState),
    Live(&'a StreamingMemory),
}

impl MemorySrc<'_> {
    pub(crate) fn config(&self) -> &StreamConfig {
        match self {
            MemorySrc::State(st) => &st.config,
            MemorySrc::Live(m) => m.config(),
        }
    }
    pub(crate) fn fill(&self) -> usize {
        match self {
            MemorySrc::State(st) => st.slots.len(),
            MemorySrc::Live(m) => m.fill(),
        }
    }
    fn check(&self) -> Result<(), WriteError> {
        let MemorySrc::State(st) = self else {
            return Ok(());
        };
        let d = st.config.dim;
        let n = st.slots.len();
        if st.bank.len() != n * d || st.labels.len() != n || st.keys.len() != n {
            return Err(WriteError::Encode(format!(
                "inconsistent memory state: {n} slots, {} keys, {} labels, {} bank values (dim {d})",
                st.keys.len(),
                st.labels.len(),
                st.bank.len()
            )));
        }
        Ok(())
    }
    fn meta(&self) -> MemoryMeta {
        let (config, fill) = (self.config().clone(), self.fill() as u64);
        match self {
            MemorySrc::State(st) => MemoryMeta {
                config,
                fill,
                offered: st.offered,
                rng_seed: st.rng_seed,
                rng_stream: st.rng_stream,
                rng_word_pos: st.rng_word_pos,
                inserted_total: st.inserted_total,
                evictions_total: st.evictions_total,
                not_stored_total: st.not_stored_total,
            },
            MemorySrc::Live(m) => {
                let sc = m.scalars();
                MemoryMeta {
                    config,
                    fill,
                    offered: sc.offered,
                    rng_seed: sc.rng_seed,
                    rng_stream: sc.rng_stream,
                    rng_word_pos: sc.rng_word_pos,
                    inserted_total: sc.inserted_total,
                    evictions_total: sc.evictions_total,
                    not_stored_total: sc.not_stored_total,
                }
            }
        }
    }
    fn centroids(&self) -> &[f32] {
        match self {
            MemorySrc::State(st) => &st.centroids,
            MemorySrc::Live(m) => m.memory().centroids(),
        }
    }
    fn weights(&self) -> &[f32] {
        match self {
            MemorySrc::State(st) => &st.weights,
            MemorySrc::Live(m) => m.weights(),
        }
    }
    fn fifo_len(&self) -> usize {
        match self {
            MemorySrc::State(st) => st.fifo.len(),
            MemorySrc::Live(m) => m.fifo_order().len(),
        }
    }
}

/// Writes little-endian 4-byte words, [`ELEMS_PER_CHUNK`] at a time; returns how many.
async fn write_words<I>(w: &mut PartWriter, words: I) -> Result<usize, object_store::Error>
where
    I: Iterator<Item = [u8; 4]>,
{
    let mut buf = Vec::with_capacity(ELEMS_PER_CHUNK * 4);
    let mut count = 0;
    for x in words {
        buf.extend_from_slice(&x);
        count += 1;
        if buf.len() == ELEMS_PER_CHUNK * 4 {
            w.write(&buf).await?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        w.write(&buf).await?;
    }
    Ok(count)
}

fn u32_le(it: impl Iterator<Item = u32>) -> impl Iterator<Item = [u8; 4]> {
    it.map(u32::to_le_bytes)
}

fn f32_le<'a>(it: impl Iterator<Item = &'a f32> + 'a) -> impl Iterator<Item = [u8; 4]> + 'a {
    it.map(|x| x.to_le_bytes())
}

/// Streams `memory.safetensors`: tensors `slots` (u32, n), `labels` (u32, n), `bank`
/// (f32, n × D), `centroids` (f32, K × D), `weights` (f32, K), `fifo` (u32), from `src`
/// chunk by chunk.
pub(crate) async fn write_memory(w: &mut PartWriter, src: MemorySrc<'_>) -> Result<(), WriteError> {
    src.check()?;
    let d = src.config().dim;
    let n = src.fill();
    let centroids = src.centroids();
    let k_rows = centroids.len().checked_div(d).unwrap_or(0);
    if k_rows * d != centroids.len() {
        return Err(WriteError::Encode(format!(
            "{} centroid values is not a multiple of dim {d}",
            centroids.len()
        )));
    }
    let shapes: [(&str, &str, Vec<usize>); 6] = [
        ("slots", "U32", vec![n]),
        ("labels", "U32", vec![n]),
        ("bank", "F32", vec![n, d]),
        ("centroids", "F32", vec![k_rows, d]),
        ("weights", "F32", vec![src.weights().len()]),
        ("fifo", "U32", vec![src.fifo_len()]),
    ];
    let meta_json =
        serde_json::to_string(&src.meta()).map_err(|e| WriteError::Encode(e.to_string()))?;
    let mut header = serde_json::Map::new();
    let mut md = serde_json::Map::new();
    md.insert(MEMORY_META_KEY.into(), meta_json.into());
    header.insert("__metadata__".into(), md.into());
    let mut offset = 0usize;
    for (name, dtype, shape) in &shapes {
        let end = offset + 4 * shape.iter().product::<usize>();
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| WriteError::Encode(e.to_string()))?;
    // Pad to 8 bytes like the reference writer, so the data is aligned.
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    w.write(&(hbytes.len() as u64).to_le_bytes()).await?;
    w.write(&hbytes).await?;
    // Counts written, in header order: a live memory whose entries disagree with its fill
    // would otherwise leave a file whose header lies.
    let written = match src {
        MemorySrc::State(st) => [
            write_words(w, u32_le(st.slots.iter().copied())).await?,
            write_words(w, u32_le(st.labels.iter().copied())).await?,
            write_words(w, f32_le(st.bank.iter())).await? / d.max(1),
        ],
        MemorySrc::Live(m) => [
            write_words(w, u32_le(m.entries().map(|e| e.slot))).await?,
            write_words(w, u32_le(m.entries().map(|e| e.label))).await?,
            write_words(w, f32_le(m.entries().flat_map(|e| e.row.iter()))).await? / d.max(1),
        ],
    };
    if written != [n, n, n] {
        return Err(WriteError::Encode(format!(
            "the memory holds {n} entries but {written:?} slots, labels and bank rows were written"
        )));
    }
    write_words(w, f32_le(centroids.iter())).await?;
    write_words(w, f32_le(src.weights().iter())).await?;
    match src {
        MemorySrc::State(st) => write_words(w, u32_le(st.fifo.iter().copied())).await?,
        MemorySrc::Live(m) => write_words(w, u32_le(m.fifo_order())).await?,
    };
    Ok(())
}

/// Streams `memory-keys.bin`: magic, u64 LE count, then per key u32 LE length + UTF-8 bytes.
pub(crate) async fn write_keys(w: &mut PartWriter, src: MemorySrc<'_>) -> Result<(), WriteError> {
    src.check()?;
    let n = src.fill();
    let mut buf = Vec::with_capacity(CHUNK_BYTES / 4);
    buf.extend_from_slice(KEYS_MAGIC);
    buf.extend_from_slice(&(n as u64).to_le_bytes());
    let mut keys: Box<dyn Iterator<Item = &str> + Send + '_> = match src {
        MemorySrc::State(st) => Box::new(st.keys.iter().map(String::as_str)),
        MemorySrc::Live(m) => Box::new(m.entries().map(|e| e.key)),
    };
    let mut count = 0usize;
    for k in &mut keys {
        let len = u32::try_from(k.len())
            .map_err(|_| WriteError::Encode(format!("key of {} bytes is too long", k.len())))?;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(k.as_bytes());
        count += 1;
        if buf.len() >= CHUNK_BYTES / 4 {
            w.write(&buf).await?;
            buf.clear();
        }
    }
    if count != n {
        return Err(WriteError::Encode(format!(
            "the memory holds {n} entries but {count} keys were written"
        )));
    }
    w.write(&buf).await?;
    Ok(())
}

/// Why writing a part failed.
#[derive(Debug)]
pub(crate) enum WriteError {
    Store(object_store::Error),
    Encode(String),
}

impl From<object_store::Error> for WriteError {
    fn from(e: object_store::Error) -> Self {
        WriteError::Store(e)
    }
}

/// Bytes read from the store per blocking read of a local file (object_store's own file
/// stream reads 8 KiB at a time, one blocking task each).
const FILE_READ_BYTES: usize = 8 << 20;

enum Source {
    Stream(futures::stream::BoxStream<'static, object_store::Result<Bytes>>),
    /// A local file and the bytes left to read of it.
    File(Option<std::fs::File>, u64, std::path::PathBuf),
}

/// Reads one object as a stream, computing its size and CRC32 on the way, so that a part can
/// be decoded as it arrives instead of being held whole first.
pub(crate) struct PartReader {
    source: Source,
    chunk: Bytes,
    hasher: crc32fast::Hasher,
    size: u64,
}

/// Why decoding a streamed part stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The store failed (transport).
    Store(object_store::Error),
    /// The bytes are not a valid part.
    Corrupt(String),
}

impl From<object_store::Error> for ReadError {
    fn from(e: object_store::Error) -> Self {
        ReadError::Store(e)
    }
}

fn truncated(what: &str) -> ReadError {
    ReadError::Corrupt(format!("truncated in {what}"))
}

impl PartReader {
    pub(crate) fn new(get: object_store::GetResult) -> Result<Self, object_store::Error> {
        let source = match get.payload {
            object_store::GetResultPayload::File(mut f, path) => {
                use std::io::Seek;
                f.seek(std::io::SeekFrom::Start(get.range.start))
                    .map_err(|e| object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: format!("{}: {e}", path.display()).into(),
                    })?;
                let left = get.range.end.saturating_sub(get.range.start);
                Source::File(Some(f), left, path)
            }
            object_store::GetResultPayload::Stream(s) => Source::Stream(s),
        };
        Ok(PartReader {
            source,
            chunk: Bytes::new(),
            hasher: crc32fast::Hasher::new(),
            size: 0,
        })
    }

    /// A reader over chunks already in hand (tests: any chunking a network stream may give).
    #[cfg(test)]
    pub(crate) fn from_chunks(chunks: Vec<Bytes>) -> Self {
        let s = futures::stream::iter(chunks.into_iter().map(Ok));
        PartReader {
            source: Source::Stream(Box::pin(s)),
            chunk: Bytes::new(),
            hasher: crc32fast::Hasher::new(),
            size: 0,
        }
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, object_store::Error> {
        match &mut self.source {
            Source::Stream(s) => futures::StreamExt::next(s).await.transpose(),
            Source::File(file, left, path) => {
                let (Some(f), true) = (file.take(), *left > 0) else {
                    return Ok(None);
                };
                let want = (*left).min(FILE_READ_BYTES as u64);
                let p = path.clone();
                let read = move || {
                    use std::io::Read;
                    let mut f = f;
                    let mut buf = Vec::with_capacity(want as usize);
                    let r = (&mut f).take(want).read_to_end(&mut buf);
                    (f, buf, r)
                };
                let (f, buf, r) =
                    match tokio::runtime::Handle::try_current() {
                        Ok(h) => h.spawn_blocking(read).await.map_err(|e| {
                            object_store::Error::Generic {
                                store: "LocalFileSystem",
                                source: Box::new(e),
                            }
                        })?,
                        Err(_) => read(),
                    };
                r.map_err(|e| object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: format!("{}: {e}", p.display()).into(),
                })?;
                *left = if buf.is_empty() {
                    0
                } else {
                    *left - buf.len() as u64
                };
                *file = Some(f);
                Ok((!buf.is_empty()).then(|| Bytes::from(buf)))
            }
        }
    }

    /// Makes `chunk` non-empty; `false` at the end of the object.
    async fn fill(&mut self) -> Result<bool, object_store::Error> {
        while self.chunk.is_empty() {
            match self.next_chunk().await? {
                None => return Ok(false),
                Some(c) => {
                    self.hasher.update(&c);
                    self.size += c.len() as u64;
                    self.chunk = c;
                }
            }
        }
        Ok(true)
    }

    async fn read_exact(&mut self, out: &mut [u8], what: &str) -> Result<(), ReadError> {
        let mut off = 0;
        while off < out.len() {
            if !self.fill().await? {
                return Err(truncated(what));
            }
            let k = self.chunk.len().min(out.len() - off);
            out[off..off + k].copy_from_slice(&self.chunk.split_to(k));
            off += k;
        }
        Ok(())
    }

    async fn read_u64(&mut self, what: &str) -> Result<u64, ReadError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what).await?;
        Ok(u64::from_le_bytes(b))
    }

    /// Appends `count` little-endian 4-byte words to `out`, converted by `conv`.
    async fn read_words<T>(
        &mut self,
        count: usize,
        out: &mut Vec<T>,
        conv: fn([u8; 4]) -> T,
        what: &str,
    ) -> Result<(), ReadError> {
        let mut left = count;
        while left > 0 {
            if !self.fill().await? {
                return Err(truncated(what));
            }
            let whole = (self.chunk.len() / 4).min(left);
            if whole == 0 {
                // a word split across two chunks
                let mut b = [0u8; 4];
                self.read_exact(&mut b, what).await?;
                out.push(conv(b));
                left -= 1;
                continue;
            }
            let bytes = self.chunk.split_to(whole * 4);
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| conv([c[0], c[1], c[2], c[3]])),
            );
            left -= whole;
        }
        Ok(())
    }

    /// Whether bytes are left after what was decoded.
    pub(crate) async fn has_more(&mut self) -> Result<bool, object_store::Error> {
        self.fill().await
    }

    /// Reads the rest of the object, so that its size and CRC32 are complete.
    pub(crate) async fn drain(&mut self) -> Result<(), object_store::Error> {
        loop {
            self.chunk = Bytes::new();
            if !self.fill().await? {
                return Ok(());
            }
        }
    }

    /// Bytes read so far and their CRC32.
    pub(crate) fn size_crc(&self) -> (u64, u32) {
        (self.size, self.hasher.clone().finalize())
    }
}

/// Decodes `memory-keys.bin` from `r` (`size`: the object's size, which bounds every count).
pub(crate) async fn read_keys(r: &mut PartReader, size: u64) -> Result<Vec<String>, ReadError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic, "the magic").await?;
    if &magic != KEYS_MAGIC {
        return Err(ReadError::Corrupt(
            "does not start with the ODCKEYS1 magic".into(),
        ));
    }
    let count = r.read_u64("the key count").await?;
    // Each key takes at least 4 bytes: a count beyond that is corrupt, not an allocation.
    let room = size.saturating_sub(16) / 4;
    if count > room {
        return Err(ReadError::Corrupt(format!(
            "claims {count} keys in {size} bytes"
        )));
    }
    let mut keys = Vec::with_capacity(count as usize);
    let mut buf = Vec::new();
    for i in 0..count {
        let mut len = [0u8; 4];
        r.read_exact(&mut len, "a key length").await?;
        let len = u32::from_le_bytes(len) as u64;
        if len > size {
            return Err(ReadError::Corrupt(format!(
                "key {i} claims {len} bytes in a {size}-byte part"
            )));
        }
        buf.resize(len as usize, 0);
        r.read_exact(&mut buf, "a key").await?;
        let k = std::str::from_utf8(&buf)
            .map_err(|e| ReadError::Corrupt(format!("key {i} is not UTF-8: {e}")))?;
        keys.push(k.to_string());
    }
    Ok(keys)
}

/// Largest safetensors header accepted (the reference reader's limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The tensors of `memory.safetensors` and their dtypes.
const MEMORY_TENSORS: [(&str, &str); 6] = [
    ("slots", "U32"),
    ("labels", "U32"),
    ("bank", "F32"),
    ("centroids", "F32"),
    ("weights", "F32"),
    ("fifo", "U32"),
];

/// One tensor entry of a safetensors header.
#[derive(Deserialize)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Decodes `memory.safetensors` from `r` as it streams in, with `keys` from
/// `memory-keys.bin`, into a [`StreamingState`]. `size` is the object's size: the header must
/// account for exactly that many bytes, which bounds every allocation by what was stored.
pub(crate) async fn read_memory(
    r: &mut PartReader,
    size: u64,
    keys: Vec<String>,
) -> Result<StreamingState, ReadError> {
    let bad = |m: String| ReadError::Corrupt(m);
    let hlen = r.read_u64("the header length").await?;
    if hlen > MAX_HEADER_BYTES || hlen > size.saturating_sub(8) {
        return Err(bad(format!("header of {hlen} bytes in a {size}-byte part")));
    }
    let mut hbytes = vec![0u8; hlen as usize];
    r.read_exact(&mut hbytes, "the header").await?;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&hbytes).map_err(|e| bad(format!("header: {e}")))?;
    drop(hbytes);
    let meta_json = header
        .remove("__metadata__")
        .and_then(|m| {
            m.get(MEMORY_META_KEY)
                .and_then(|v| v.as_str().map(String::from))
        })
        .ok_or_else(|| bad(format!("no `{MEMORY_META_KEY}` metadata")))?;
    let meta: MemoryMeta = serde_json::from_str(&meta_json)
        .map_err(|e| bad(format!("bad `{MEMORY_META_KEY}`: {e}")))?;
    // Every tensor, checked like the reference reader does: offsets contiguous from 0, each
    // the size its shape says, the last one ending at the end of the part.
    let mut infos = Vec::new();
    for (name, v) in header {
        let info: TensorInfo =
            serde_json::from_value(v).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let Some(&(_, dtype)) = MEMORY_TENSORS.iter().find(|(n, _)| *n == name) else {
            return Err(bad(format!("unexpected tensor `{name}`")));
        };
        if info.dtype != dtype {
            return Err(bad(format!(
                "tensor `{name}` is {}, expected {dtype}",
                info.dtype
            )));
        }
        infos.push((name, info));
    }
    infos.sort_by_key(|(_, i)| i.data_offsets[0]);
    let mut at = 0u64;
    for (name, i) in &infos {
        let [s, e] = i.data_offsets;
        let elems = i
            .shape
            .iter()
            .try_fold(1u64, |a, &x| a.checked_mul(x))
            .and_then(|n| n.checked_mul(4));
        if s != at || e < s || elems != Some(e - s) {
            return Err(bad(format!(
                "tensor `{name}`: offsets {s}..{e} do not follow {at} or do not match shape {:?}",
                i.shape
            )));
        }
        at = e;
    }
    if at.checked_add(8 + hlen) != Some(size) {
        return Err(bad(format!(
            "the header describes {at} data bytes; the part holds {}",
            size - 8 - hlen
        )));
    }
    for (name, _) in MEMORY_TENSORS {
        if !infos.iter().any(|(n, _)| n == name) {
            return Err(bad(format!("tensor `{name}`: not in the header")));
        }
    }
    let (mut slots, mut labels, mut fifo) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bank, mut centroids, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for (name, i) in &infos {
        // bounded by the part's size, checked above
        let count = ((i.data_offsets[1] - i.data_offsets[0]) / 4) as usize;
        let what = format!("tensor `{name}`");
        match name.as_str() {
            "slots" | "labels" | "fifo" => {
                let out = match name.as_str() {
                    "slots" => &mut slots,
                    "labels" => &mut labels,
                    _ => &mut fifo,
                };
                out.reserve_exact(count);
                r.read_words(count, out, u32::from_le_bytes, &what).await?;
            }
            _ => {
                let out = match name.as_str() {
                    "bank" => &mut bank,
                    "centroids" => &mut centroids,
                    _ => &mut weights,
                };
                out.reserve_exact(count);
                r.read_words(count, out, f32::from_le_bytes, &what).await?;
            }
        }
    }
    if slots.len() as u64 != meta.fill || keys.len() != slots.len() {
        return Err(bad(format!(
            "fill {} but {} slots and {} keys",
            meta.fill,
            slots.len(),
            keys.len()
        )));
    }
    Ok(StreamingState {
        config: meta.config,
        slots,
        keys,
        labels,
        bank,
        centroids,
        weights,
        fifo,
        offered: meta.offered,
        rng_seed: meta.rng_seed,
        rng_stream: meta.rng_stream,
        rng_word_pos: meta.rng_word_pos,
        inserted_total: meta.inserted_total,
        evictions_total: meta.evictions_total,
        not_stored_total: meta.not_stored_total,
    })
}

/// Serialises optimizer tensors (moved to the CPU) as safetensors bytes.
pub(crate) fn optimizer_bytes(
    tensors: &BTreeMap<String, candle_core::Tensor>,
) -> Result<Vec<u8>, String> {
    let mut cpu = BTreeMap::new();
    for (k, t) in tensors {
        let t = t
            .to_device(&candle_core::Device::Cpu)
            .map_err(|e| format!("tensor `{k}`: {e}"))?;
        cpu.insert(k.clone(), t);
    }
    safetensors::serialize(cpu.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| e.to_string())
}

pub(crate) fn optimizer_from_bytes(
    bytes: &[u8],
) -> Result<BTreeMap<String, candle_core::Tensor>, String> {
    let map = candle_core::safetensors::load_buffer(bytes, &candle_core::Device::Cpu)
        .map_err(|e| e.to_string())?;
    Ok(map.into_iter().collect())
}

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

use crate::odc::{StreamConfig, StreamingState};

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

/// One tensor of a hand-built safetensors file.
enum Data<'a> {
    F32(&'a [f32]),
    U32(&'a [u32]),
}

impl Data<'_> {
    fn dtype(&self) -> &'static str {
        match self {
            Data::F32(_) => "F32",
            Data::U32(_) => "U32",
        }
    }
    fn byte_len(&self) -> usize {
        match self {
            Data::F32(v) => v.len() * 4,
            Data::U32(v) => v.len() * 4,
        }
    }
}

/// Elements converted per chunk (4 MiB of bytes).
const ELEMS_PER_CHUNK: usize = 1 << 20;

async fn write_le(w: &mut PartWriter, data: &Data<'_>) -> Result<(), object_store::Error> {
    let mut buf = Vec::with_capacity(ELEMS_PER_CHUNK * 4);
    match data {
        Data::F32(v) => {
            for chunk in v.chunks(ELEMS_PER_CHUNK) {
                buf.clear();
                for x in chunk {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
                w.write(&buf).await?;
            }
        }
        Data::U32(v) => {
            for chunk in v.chunks(ELEMS_PER_CHUNK) {
                buf.clear();
                for x in chunk {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
                w.write(&buf).await?;
            }
        }
    }
    Ok(())
}

/// Streams `memory.safetensors`: tensors `slots` (u32, n), `labels` (u32, n), `bank`
/// (f32, n × D), `centroids` (f32, K × D), `weights` (f32, K), `fifo` (u32).
pub(crate) async fn write_memory(
    w: &mut PartWriter,
    st: &StreamingState,
) -> Result<(), WriteError> {
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
    let k_rows = st.centroids.len().checked_div(d).unwrap_or(0);
    if k_rows * d != st.centroids.len() {
        return Err(WriteError::Encode(format!(
            "{} centroid values is not a multiple of dim {d}",
            st.centroids.len()
        )));
    }
    let tensors: Vec<(&str, Vec<usize>, Data)> = vec![
        ("slots", vec![n], Data::U32(&st.slots)),
        ("labels", vec![n], Data::U32(&st.labels)),
        ("bank", vec![n, d], Data::F32(&st.bank)),
        ("centroids", vec![k_rows, d], Data::F32(&st.centroids)),
        ("weights", vec![st.weights.len()], Data::F32(&st.weights)),
        ("fifo", vec![st.fifo.len()], Data::U32(&st.fifo)),
    ];
    let meta = MemoryMeta {
        config: st.config.clone(),
        fill: n as u64,
        offered: st.offered,
        rng_seed: st.rng_seed,
        rng_stream: st.rng_stream,
        rng_word_pos: st.rng_word_pos,
        inserted_total: st.inserted_total,
        evictions_total: st.evictions_total,
        not_stored_total: st.not_stored_total,
    };
    let meta_json = serde_json::to_string(&meta).map_err(|e| WriteError::Encode(e.to_string()))?;
    let mut header = serde_json::Map::new();
    let mut md = serde_json::Map::new();
    md.insert(MEMORY_META_KEY.into(), meta_json.into());
    header.insert("__metadata__".into(), md.into());
    let mut offset = 0usize;
    for (name, shape, data) in &tensors {
        let end = offset + data.byte_len();
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": data.dtype(), "shape": shape, "data_offsets": [offset, end]}),
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
    for (_, _, data) in &tensors {
        write_le(w, data).await?;
    }
    Ok(())
}

/// Streams `memory-keys.bin`: magic, u64 LE count, then per key u32 LE length + UTF-8 bytes.
pub(crate) async fn write_keys(w: &mut PartWriter, keys: &[String]) -> Result<(), WriteError> {
    let mut buf = Vec::with_capacity(CHUNK_BYTES / 4);
    buf.extend_from_slice(KEYS_MAGIC);
    buf.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for k in keys {
        let len = u32::try_from(k.len())
            .map_err(|_| WriteError::Encode(format!("key of {} bytes is too long", k.len())))?;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(k.as_bytes());
        if buf.len() >= CHUNK_BYTES / 4 {
            w.write(&buf).await?;
            buf.clear();
        }
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

pub(crate) fn read_keys(bytes: &[u8]) -> Result<Vec<String>, String> {
    let rest = bytes
        .strip_prefix(KEYS_MAGIC.as_slice())
        .ok_or("does not start with the ODCKEYS1 magic")?;
    let (count, mut rest) = split_u64(rest).ok_or("truncated before the key count")?;
    // Each key takes at least 4 bytes: a count beyond that is corrupt, not an allocation.
    if count > (rest.len() / 4) as u64 {
        return Err(format!("claims {count} keys in {} bytes", rest.len()));
    }
    let mut keys = Vec::with_capacity(count as usize);
    for i in 0..count {
        let (len_bytes, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| format!("truncated at key {i}"))?;
        let len = u32::from_le_bytes(*len_bytes) as usize;
        if tail.len() < len {
            return Err(format!("truncated inside key {i}"));
        }
        let (k, tail) = tail.split_at(len);
        let k = std::str::from_utf8(k).map_err(|e| format!("key {i} is not UTF-8: {e}"))?;
        keys.push(k.to_string());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after {count} keys", rest.len()));
    }
    Ok(keys)
}

fn split_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let (h, t) = b.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*h), t))
}

/// Parses `memory.safetensors` + the keys back into a [`StreamingState`].
pub(crate) fn read_memory(bytes: &[u8], keys: Vec<String>) -> Result<StreamingState, String> {
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let meta_json = md
        .metadata()
        .as_ref()
        .and_then(|m| m.get(MEMORY_META_KEY))
        .ok_or_else(|| format!("no `{MEMORY_META_KEY}` metadata"))?;
    let meta: MemoryMeta =
        serde_json::from_str(meta_json).map_err(|e| format!("bad `{MEMORY_META_KEY}`: {e}"))?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let get = |name: &str, dtype: safetensors::Dtype| {
        let t = st
            .tensor(name)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        if t.dtype() != dtype {
            return Err(format!(
                "tensor `{name}` is {:?}, expected {dtype:?}",
                t.dtype()
            ));
        }
        Ok::<_, String>(t)
    };
    let f32s = |name: &str| {
        get(name, safetensors::Dtype::F32).map(|t| {
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<f32>>()
        })
    };
    let u32s = |name: &str| {
        get(name, safetensors::Dtype::U32).map(|t| {
            t.data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<u32>>()
        })
    };
    let slots = u32s("slots")?;
    if slots.len() as u64 != meta.fill || keys.len() != slots.len() {
        return Err(format!(
            "fill {} but {} slots and {} keys",
            meta.fill,
            slots.len(),
            keys.len()
        ));
    }
    Ok(StreamingState {
        config: meta.config,
        slots,
        keys,
        labels: u32s("labels")?,
        bank: f32s("bank")?,
        centroids: f32s("centroids")?,
        weights: f32s("weights")?,
        fifo: u32s("fifo")?,
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

//! Test data: the Debian Fashion-MNIST files, small PNGs, a runtime for plain `#[test]`s, and
//! [`Shard`], which writes clean samples and the damaged members each reject reason is tested
//! with, on the library's own `ShardWriter`.

use std::path::{Path, PathBuf};

use odcd::shards::ShardWriter;

/// Where Debian's `dataset-fashion-mnist` package puts the IDX files.
pub const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The committed shard in `tests/fixtures`: the first 200 Fashion-MNIST test images.
pub const FIXTURE_SHARD: &str = "fmnist-test-000000.tar";

/// A Fashion-MNIST file; fails naming the package when it is not installed.
pub fn fmnist(file: &str) -> PathBuf {
    let p = Path::new(FMNIST).join(file);
    assert!(
        p.exists(),
        "{} is missing: install the data set with `apt-get install -y dataset-fashion-mnist`",
        p.display()
    );
    p
}

/// A multi-threaded runtime for async library calls from tests that run the binary.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn png(value: u8, width: u32, height: u32, color: image::ExtendedColorType) -> Vec<u8> {
    let channels = color.channel_count() as usize;
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &vec![value; width as usize * height as usize * channels],
        width,
        height,
        color,
    )
    .expect("encode png");
    out
}

/// A grey PNG with every pixel `value`.
pub fn png_grey(value: u8, width: u32, height: u32) -> Vec<u8> {
    png(value, width, height, image::ExtendedColorType::L8)
}

/// An RGB PNG with every byte `value`.
pub fn png_rgb(value: u8, width: u32, height: u32) -> Vec<u8> {
    png(value, width, height, image::ExtendedColorType::Rgb8)
}

/// A valid PNG header (with correct CRCs) claiming 100000×100000 pixels: a decompression bomb.
fn png_bomb() -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |ty: &[u8], data: &[u8]| {
        v.extend((data.len() as u32).to_be_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(ty);
        h.update(data);
        v.extend(ty);
        v.extend(data);
        v.extend(h.finalize().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    v
}

/// `len` deterministic bytes that are no image and barely compress (so a big payload really
/// fills socket buffers); `seed` varies them.
pub fn noise(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|j| ((seed * 31 + j * 7919) % 251) as u8)
        .collect()
}

/// Every member of a tar as (name, bytes), in order.
pub fn members(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut ar = tar::Archive::new(tar);
    let mut out = Vec::new();
    for e in ar.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        let name = e
            .path()
            .expect("member path")
            .to_string_lossy()
            .into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).expect("read member");
        out.push((name, data));
    }
    out
}

/// The members of the committed fixture shard ([`FIXTURE_SHARD`]).
pub fn fixture_members() -> Vec<(String, Vec<u8>)> {
    let path = super::fixtures_dir().join(FIXTURE_SHARD);
    members(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// A shard under construction: clean samples and damaged members, in the order added.
/// Finish with [`bytes`](Self::bytes), [`gzip`](Self::gzip), [`truncated`](Self::truncated)
/// or [`write`](Self::write).
#[derive(Default)]
pub struct Shard {
    w: ShardWriter,
}

impl Shard {
    pub fn new() -> Shard {
        Shard::default()
    }

    /// A clean sample: `<key>.<ext>` and, with a label, `<key>.cls`.
    pub fn sample(&mut self, key: &str, ext: &str, image: &[u8], label: Option<i64>) -> &mut Self {
        self.w
            .append_sample(key, ext, image, label)
            .expect("append sample");
        self
    }

    /// Any member, named and filled as given (e.g. copied from another shard).
    pub fn member(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.w.append(name, data).expect("append member");
        self
    }

    /// An image member whose bytes do not decode (noise, a fake header, nothing): `undecodable`.
    pub fn undecodable(&mut self, key: &str, ext: &str, data: &[u8]) -> &mut Self {
        self.member(&format!("{key}.{ext}"), data)
    }

    /// `<key>.png`, a valid PNG header claiming 100000×100000 pixels: `too_large` from the
    /// header alone, before any decompression.
    pub fn bomb(&mut self, key: &str) -> &mut Self {
        self.member(&format!("{key}.png"), &png_bomb())
    }

    /// A label with no image beside it: `missing_image`.
    pub fn label_only(&mut self, key: &str, label: &str) -> &mut Self {
        self.member(&format!("{key}.cls"), label.as_bytes())
    }

    /// A good image whose `.cls` is not an integer: `bad_label`.
    pub fn bad_label(&mut self, key: &str, ext: &str, image: &[u8], label: &str) -> &mut Self {
        self.member(&format!("{key}.{ext}"), image)
            .label_only(key, label)
    }

    /// A member named by raw bytes; a name that is not UTF-8 is a `bad_name`.
    pub fn raw_name(&mut self, name: &[u8], data: &[u8]) -> &mut Self {
        self.w.append_raw(name, data).expect("append raw member");
        self
    }

    /// The finished tar.
    pub fn bytes(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.w).finish().expect("finish tar")
    }

    /// The finished tar, gzip-compressed (a `.tgz` / `.tar.gz` shard).
    pub fn gzip(&mut self) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &self.bytes()).expect("gzip");
        gz.finish().expect("gzip")
    }

    /// The tar cut `into` bytes into the data of member `member` (0-based, every member
    /// counts, labels too): the members before it arrive, then one `truncated_shard`.
    pub fn truncated(&mut self, member: usize, into: u64) -> Vec<u8> {
        let full = self.bytes();
        let start = tar::Archive::new(&full[..])
            .entries()
            .expect("tar entries")
            .nth(member)
            .unwrap_or_else(|| panic!("the shard has no member {member}"))
            .expect("tar entry")
            .raw_file_position();
        full[..(start + into) as usize].to_vec()
    }

    /// Writes the finished tar to `path`.
    pub fn write(&mut self, path: &Path) {
        let bytes = self.bytes();
        std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// Adds the (step → keys) of every row of the Parquet embeddings file `path` to `rows`;
/// panics when the file is not a whole Parquet file or does not read completely (a partial
/// or staging file left visible under a final name).
pub fn add_parquet_rows(
    path: &Path,
    rows: &mut std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>,
) {
    use arrow_array::{Array, StringArray, UInt64Array};
    let f = std::fs::File::open(path).expect("open");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap_or_else(|e| panic!("{} is not a whole Parquet file: {e}", path.display()))
        .build()
        .expect("reader");
    for b in reader {
        let b = b.unwrap_or_else(|e| panic!("{} does not read completely: {e}", path.display()));
        let keys = b.column(0).as_any().downcast_ref::<StringArray>();
        let steps = b.column(1).as_any().downcast_ref::<UInt64Array>();
        let (Some(keys), Some(steps)) = (keys, steps) else {
            panic!("{}: unexpected columns", path.display());
        };
        for i in 0..keys.len() {
            rows.entry(steps.value(i))
                .or_default()
                .insert(keys.value(i).to_string());
        }
    }
}

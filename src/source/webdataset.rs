//! WebDataset tar reader: plain or gzip tars, members grouped by key into records.
//!
//! Synchronous on purpose: it runs on a blocking thread behind `SyncIoBridge`, never on a tokio
//! worker. Damage ends the shard with exactly one `truncated_shard` item after the good records.

// `SourceItem`'s Err (a rejected record) is no larger than its Ok (a record); boxing it would
// only add an allocation per reject.
#![allow(clippy::result_large_err)]

use super::{RejectReason, RejectedRecord, SourceItem};
use crate::record::{format_name, Position, Record};
use bytes::Bytes;
use std::borrow::Cow;
use std::cell::Cell;
use std::io::{self, Read};
use std::ops::ControlFlow;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// Extensions that carry the image, lower case.
pub const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Limits for reading one shard.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Members larger than this are skipped (`too_large`); also bounds GNU/pax extension headers.
    pub max_member_bytes: u64,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            max_member_bytes: 32 << 20,
        }
    }
}

/// A failure of the byte transport under the tar reader (retryable), as opposed to damage in the
/// shard itself (not retryable). The object-store stream records its errors here.
#[derive(Debug, Clone, Default)]
pub struct TransportFault(Arc<Mutex<Option<String>>>);

impl TransportFault {
    /// Remember a transport error (the first one wins).
    pub fn set(&self, msg: String) {
        if let Ok(mut g) = self.0.lock() {
            g.get_or_insert(msg);
        }
    }
    /// The transport error, if one happened.
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

/// How reading a shard ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ShardEnd {
    /// The shard was read to its end (or to its damage, already reported as an item).
    Done { items: u64 },
    /// The consumer asked to stop.
    Stopped { items: u64 },
    /// The transport failed after `items` items; re-reading may succeed.
    Transport { items: u64, message: String },
}

/// Split a member name into (key, extension): key = path up to the first '.' of the basename,
/// extension = the rest, lower case (WebDataset convention).
pub fn split_name(name: &str) -> Option<(&str, String)> {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base_start..].find('.')? + base_start;
    let key = &name[..dot];
    if key.is_empty() || dot == base_start {
        return None;
    }
    Some((key, name[dot + 1..].to_ascii_lowercase()))
}

/// A reader that fails once more than `budget` bytes are pulled without the budget being reset:
/// the tar crate reads GNU long names and pax headers fully into memory, so a corrupt size field
/// would otherwise make it buffer the rest of the shard.
struct BudgetReader<R> {
    inner: R,
    budget: Rc<Cell<u64>>,
}

impl<R: Read> Read for BudgetReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.budget.get();
        if left == 0 {
            return Err(io::Error::other(
                "tar member or extension header larger than max_member_bytes (corrupt size field?)",
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.set(left - n as u64);
        Ok(n)
    }
}

/// Members of the current key, collected until the key changes.
#[derive(Default)]
struct Group {
    key: String,
    image: Option<(Bytes, Cow<'static, str>)>,
    label: Option<Vec<u8>>,
    problem: Option<(RejectReason, String)>,
}

/// Read one shard from `input` (plain or gzip tar, detected by magic bytes) and pass every item to
/// `emit` in order. `emit` returns `Break` to stop early (cancellation, closed channel).
pub fn read_shard<R: Read>(
    input: R,
    shard: &str,
    opts: &ReadOptions,
    fault: &TransportFault,
    mut emit: impl FnMut(SourceItem) -> ControlFlow<()>,
) -> ShardEnd {
    let mut items = 0u64;
    let pos = |index: u64| Position::Shard {
        shard: shard.to_string(),
        index,
    };
    // Wrap emit to count items and stamp positions.
    let mut send = |item: Result<Record, RejectedRecord>, items: &mut u64| -> ControlFlow<()> {
        let r = emit(item);
        *items += 1;
        r
    };

    let mut input = input;
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match input.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return on_error(e, None, shard, 0, fault, &mut send),
        }
    }
    if got == 0 {
        let item = Err(reject(
            shard,
            RejectReason::TruncatedShard,
            format!("shard {shard} is empty (0 bytes); re-upload it"),
            pos(0),
        ));
        return match send(item, &mut items) {
            ControlFlow::Continue(()) => ShardEnd::Done { items },
            ControlFlow::Break(()) => ShardEnd::Stopped { items },
        };
    }
    let rejoined = io::Cursor::new(magic[..got].to_vec()).chain(input);
    let budget = Rc::new(Cell::new(opts.max_member_bytes + (1 << 20)));
    let is_gzip = got == 2 && magic == [0x1f, 0x8b];
    let raw: Box<dyn Read> = if is_gzip {
        Box::new(flate2::read::MultiGzDecoder::new(rejoined))
    } else {
        Box::new(rejoined)
    };
    let reader = BudgetReader {
        inner: raw,
        budget: budget.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return on_error(e, None, shard, items, fault, &mut send),
    };

    let mut group: Option<Group> = None;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let key = group.map(|g| g.key);
                return on_error(e, key, shard, items, fault, &mut send);
            }
        };
        // Every header resets the budget: only a single member is bounded.
        budget.set(opts.max_member_bytes + (1 << 20));
        let et = entry.header().entry_type();
        if !(et.is_file() || et == tar::EntryType::Continuous) {
            continue; // directories, links, pax globals: not samples
        }
        let name_bytes = entry.path_bytes().into_owned();
        let (name, utf8_ok) = match std::str::from_utf8(&name_bytes) {
            Ok(s) => (s.to_string(), true),
            Err(_) => (String::from_utf8_lossy(&name_bytes).into_owned(), false),
        };
        let Some((key, ext)) = split_name(&name) else {
            // No key: cannot be grouped; report it as its own item.
            if let Some(g) = group.take() {
                if finish(g, shard, items, &mut send, &mut items).is_break() {
                    return ShardEnd::Stopped { items };
                }
            }
            let item = Err(reject(
                &name,
                RejectReason::BadName,
                format!("member {name:?} in shard {shard} has no <key>.<ext> name"),
                pos(items),
            ));
            if send(item, &mut items).is_break() {
                return ShardEnd::Stopped { items };
            }
            continue;
        };
        if group.as_ref().is_some_and(|g| g.key != key) {
            if let Some(g) = group.take() {
                if finish(g, shard, items, &mut send, &mut items).is_break() {
                    return ShardEnd::Stopped { items };
                }
            }
        }
        let g = group.get_or_insert_with(|| Group {
            key: key.to_string(),
            ..Group::default()
        });
        if !utf8_ok && g.problem.is_none() {
            g.problem = Some((
                RejectReason::BadName,
                format!("member name {name:?} in shard {shard} is not UTF-8; rename it"),
            ));
        }
        let wanted = (IMAGE_EXTS.contains(&ext.as_str()) && g.image.is_none())
            || (ext == "cls" && g.label.is_none());
        if !wanted {
            continue; // other modalities (json, txt, ...) are not used here
        }
        let size = entry.size();
        if size > opts.max_member_bytes {
            // Allow the tar crate to skip over the member without tripping the budget.
            budget.set(budget.get().saturating_add(size));
            if ext != "cls" && g.problem.is_none() {
                g.problem = Some((
                    RejectReason::TooLarge,
                    format!(
                        "member {name} in shard {shard} is {size} bytes, over max_member_bytes = {}",
                        opts.max_member_bytes
                    ),
                ));
            } else if ext == "cls" && g.problem.is_none() {
                g.problem = Some((
                    RejectReason::BadLabel,
                    format!("label member {name} in shard {shard} is {size} bytes"),
                ));
            }
            continue;
        }
        let mut buf = Vec::with_capacity(size as usize);
        if let Err(e) = entry.read_to_end(&mut buf) {
            return on_error(e, Some(g.key.clone()), shard, items, fault, &mut send);
        }
        if ext == "cls" {
            g.label = Some(buf);
        } else {
            g.image = Some((Bytes::from(buf), format_name(&ext)));
        }
    }
    if let Some(err) = fault.get() {
        // The stream ended because the transport failed, not because the tar ended.
        return ShardEnd::Transport {
            items,
            message: err,
        };
    }
    if let Some(g) = group.take() {
        if finish(g, shard, items, &mut send, &mut items).is_break() {
            return ShardEnd::Stopped { items };
        }
    }
    ShardEnd::Done { items }
}

fn reject(key: &str, reason: RejectReason, message: String, position: Position) -> RejectedRecord {
    RejectedRecord {
        key: key.to_string(),
        reason,
        message,
        position,
        payload: None,
        format: None,
    }
}

/// Turn a finished group into one item.
fn finish(
    g: Group,
    shard: &str,
    index: u64,
    send: &mut impl FnMut(SourceItem, &mut u64) -> ControlFlow<()>,
    items: &mut u64,
) -> ControlFlow<()> {
    let position = Position::Shard {
        shard: shard.to_string(),
        index,
    };
    let item = build_record(g, shard, position);
    send(item, items)
}

fn build_record(g: Group, shard: &str, position: Position) -> SourceItem {
    // Only a rejected record copies the key, position and format name.
    let fail = |reason, message| {
        Err(RejectedRecord {
            key: g.key.clone(),
            reason,
            message,
            position: position.clone(),
            payload: g.image.as_ref().map(|(b, _)| b.clone()),
            format: g.image.as_ref().map(|(_, f)| f.to_string()),
        })
    };
    if let Some((reason, message)) = g.problem.clone() {
        return fail(reason, message);
    }
    let Some((image, format)) = g.image.clone() else {
        return fail(
            RejectReason::MissingImage,
            format!(
                "key {} in shard {shard} has no jpg/jpeg/png/webp member",
                g.key
            ),
        );
    };
    let class_label = match &g.label {
        None => None,
        Some(raw) => match std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
        {
            Some(v) => Some(v),
            None => {
                return fail(
                    RejectReason::BadLabel,
                    format!(
                        "{}.cls in shard {shard} is not an integer: {:?}",
                        g.key,
                        String::from_utf8_lossy(&raw[..raw.len().min(32)])
                    ),
                )
            }
        },
    };
    Ok(Record {
        key: g.key,
        image,
        format,
        class_label,
        position,
    })
}

/// An I/O error from the tar/gzip layer: transport failure (retryable) or damage (one item).
fn on_error(
    e: io::Error,
    key: Option<String>,
    shard: &str,
    mut items: u64,
    fault: &TransportFault,
    send: &mut impl FnMut(SourceItem, &mut u64) -> ControlFlow<()>,
) -> ShardEnd {
    if let Some(message) = fault.get() {
        return ShardEnd::Transport { items, message };
    }
    let key = key.unwrap_or_else(|| shard.to_string());
    let item = Err(reject(
        &key,
        RejectReason::TruncatedShard,
        format!(
            "shard {shard} is truncated or corrupt after {items} records (at key {key}): {e}; \
             the records after this point are lost — re-create the shard"
        ),
        Position::Shard {
            shard: shard.to_string(),
            index: items,
        },
    ));
    match send(item, &mut items) {
        ControlFlow::Continue(()) => ShardEnd::Done { items },
        ControlFlow::Break(()) => ShardEnd::Stopped { items },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(members: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut w = crate::shards::ShardWriter::new();
        for (name, data) in members {
            // Raw bytes: lets tests write non-UTF-8 names.
            w.append_raw(name, data).expect("append");
        }
        w.finish().expect("finish")
    }

    fn read_all(bytes: &[u8], max: u64) -> (Vec<SourceItem>, ShardEnd) {
        let mut items = Vec::new();
        let end = read_shard(
            bytes,
            "s.tar",
            &ReadOptions {
                max_member_bytes: max,
            },
            &TransportFault::default(),
            |i| {
                items.push(i);
                ControlFlow::Continue(())
            },
        );
        (items, end)
    }

    #[test]
    fn split_name_uses_first_dot_of_basename() {
        assert_eq!(
            split_name("a/b.c/k1.seg.png"),
            Some(("a/b.c/k1", "seg.png".into()))
        );
        assert_eq!(split_name("k.JPG"), Some(("k", "jpg".into())));
        assert_eq!(split_name("dir/.hidden"), None);
        assert_eq!(split_name("noext"), None);
    }

    #[test]
    fn groups_consecutive_members_by_key() {
        let t = tar_of(&[
            (b"a.png", b"A"),
            (b"a.cls", b" 3\n"),
            (b"a.json", b"{}"),
            (b"b.jpg", b"B"),
            (b"c.cls", b"1"),
            (b"d.webp", b"D"),
            (b"d.cls", b"x"),
        ]);
        let (items, end) = read_all(&t, 1 << 20);
        assert_eq!(end, ShardEnd::Done { items: 4 });
        let a = items[0].as_ref().expect("a is good");
        assert_eq!(
            (a.key.as_str(), &*a.format, a.class_label),
            ("a", "png", Some(3))
        );
        assert_eq!(&a.image[..], b"A");
        let b = items[1].as_ref().expect("b is good");
        assert_eq!((b.class_label, &b.image[..]), (None, &b"B"[..]));
        assert_eq!(
            items[2].as_ref().err().map(|r| r.reason),
            Some(RejectReason::MissingImage)
        );
        assert_eq!(
            items[3].as_ref().err().map(|r| r.reason),
            Some(RejectReason::BadLabel)
        );
        for (i, it) in items.iter().enumerate() {
            let p = match it {
                Ok(r) => &r.position,
                Err(r) => &r.position,
            };
            assert_eq!(
                p,
                &Position::Shard {
                    shard: "s.tar".into(),
                    index: i as u64
                }
            );
        }
    }

    #[test]
    fn gzip_detected_by_magic_and_truncation_is_one_error() {
        let t = tar_of(&[(b"a.png", b"A"), (b"b.png", &[7u8; 3000]), (b"c.png", b"C")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &t).expect("gz");
        let gz = gz.finish().expect("gz");
        let (items, _) = read_all(&gz, 1 << 20);
        assert_eq!(items.iter().filter(|i| i.is_ok()).count(), 3);

        // Cut inside b's data: a arrives, then exactly one truncated_shard item.
        let (items, end) = read_all(&t[..512 * 4], 1 << 20);
        assert_eq!(end, ShardEnd::Done { items: 2 });
        assert_eq!(items[0].as_ref().map(|r| r.key.as_str()).ok(), Some("a"));
        let e = items[1].as_ref().expect_err("truncated");
        assert_eq!(e.reason, RejectReason::TruncatedShard);
        let (items, _) = read_all(&gz[..gz.len() / 2], 1 << 20);
        assert_eq!(
            items
                .last()
                .and_then(|i| i.as_ref().err())
                .map(|r| r.reason),
            Some(RejectReason::TruncatedShard)
        );
    }

    #[test]
    fn oversized_and_non_utf8_members_are_rejected_not_fatal() {
        let t = tar_of(&[
            (b"a.png", &[1u8; 5000]),
            (b"b\xff.png", b"B"),
            (b"c.png", b"C"),
        ]);
        let (items, end) = read_all(&t, 1000);
        assert_eq!(end, ShardEnd::Done { items: 3 });
        assert_eq!(
            items[0].as_ref().err().map(|r| r.reason),
            Some(RejectReason::TooLarge)
        );
        assert_eq!(
            items[1].as_ref().err().map(|r| r.reason),
            Some(RejectReason::BadName)
        );
        assert_eq!(items[2].as_ref().map(|r| r.key.as_str()).ok(), Some("c"));
    }

    #[test]
    fn empty_input_is_truncated_and_empty_tar_has_no_records() {
        let (items, _) = read_all(&[], 1000);
        assert_eq!(items.len(), 1);
        assert_eq!(
            items[0].as_ref().err().map(|r| r.reason),
            Some(RejectReason::TruncatedShard)
        );
        let (items, end) = read_all(&[0u8; 1024], 1000);
        assert!(items.is_empty());
        assert_eq!(end, ShardEnd::Done { items: 0 });
    }

    #[test]
    fn huge_long_name_header_is_bounded() {
        // A GNU long-name header claiming 1 GiB: must fail fast as truncated, not buffer it.
        let mut h = tar::Header::new_gnu();
        h.set_size(1 << 30);
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_path("././@LongLink").expect("path");
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend(std::iter::repeat_n(b'x', 200_000));
        let (items, _) = read_all(&t, 1000);
        assert_eq!(items.len(), 1);
        assert_eq!(
            items[0].as_ref().err().map(|r| r.reason),
            Some(RejectReason::TruncatedShard)
        );
    }
}

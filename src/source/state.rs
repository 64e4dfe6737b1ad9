//! Resume position of an object-store source, kept by whoever consumes the items.

use crate::record::Position;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use super::kafka::PartitionMark;

/// What has been consumed: whole shards, plus how far into the current one.
///
/// Shards are read one after another, so the consumer can keep this exact by calling
/// [`SourceState::observe`] with the position of every item it has finished with (records and
/// rejects alike, in order). Resuming from it skips exactly what was consumed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceState {
    /// Pass over the prefix (0-based); only `loop` mode has more than one.
    pub pass: u64,
    /// Shards fully consumed in this pass.
    pub completed: BTreeSet<String>,
    /// The shard being consumed and the index of the next item to deliver from it.
    pub current: Option<CurrentShard>,
    /// Kafka source: per topic and partition, the last message consumed. Absent in the
    /// checkpoints of object-store runs (and of odcd versions before the Kafka source).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kafka: BTreeMap<String, BTreeMap<i32, PartitionMark>>,
}

/// The shard in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrentShard {
    pub shard: String,
    pub next_index: u64,
}

impl SourceState {
    /// Record that the item at `pos` has been consumed.
    pub fn observe(&mut self, pos: &Position) {
        let (shard, index) = match pos {
            Position::Shard { shard, index } => (shard, index),
            Position::Kafka {
                topic,
                partition,
                offset,
            } => {
                // Looked up by &str: no allocation per record once the topic is known.
                if !self.kafka.contains_key(&**topic) {
                    self.kafka.insert(topic.to_string(), BTreeMap::new());
                }
                let Some(parts) = self.kafka.get_mut(&**topic) else {
                    return;
                };
                match parts.get_mut(partition) {
                    Some(m) if m.offset == *offset => m.records += 1,
                    _ => {
                        parts.insert(
                            *partition,
                            PartitionMark {
                                offset: *offset,
                                records: 1,
                            },
                        );
                    }
                }
                return;
            }
        };
        let same = self.current.as_ref().is_some_and(|c| &c.shard == shard);
        // Seeing a finished shard again, or going back inside the current one, means a new pass.
        let new_pass = self.completed.contains(shard)
            || (same && self.current.as_ref().is_some_and(|c| *index < c.next_index));
        if new_pass {
            self.pass += 1;
            self.completed.clear();
            self.current = None;
        }
        if let Some(c) = self.current.take() {
            if c.shard != *shard {
                self.completed.insert(c.shard);
            }
        }
        self.current = Some(CurrentShard {
            shard: shard.clone(),
            next_index: index + 1,
        });
    }

    /// How many items of `shard` to skip when (re)reading it in the current pass:
    /// `None` = skip the whole shard.
    pub fn skip_for(&self, shard: &str) -> Option<u64> {
        if self.completed.contains(shard) {
            return None;
        }
        match &self.current {
            Some(c) if c.shard == shard => Some(c.next_index),
            _ => Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str, i: u64) -> Position {
        Position::Shard {
            shard: s.into(),
            index: i,
        }
    }

    #[test]
    fn tracks_shards_and_passes() {
        let mut st = SourceState::default();
        st.observe(&p("a.tar", 0));
        st.observe(&p("a.tar", 1));
        st.observe(&p("b.tar", 0));
        assert_eq!(st.skip_for("a.tar"), None);
        assert_eq!(st.skip_for("b.tar"), Some(1));
        assert_eq!(st.skip_for("c.tar"), Some(0));
        st.observe(&p("a.tar", 0)); // loop mode: second pass
        assert_eq!(st.pass, 1);
        assert_eq!(st.skip_for("a.tar"), Some(1));
        assert_eq!(st.skip_for("b.tar"), Some(0));
        let json = serde_json::to_string(&st).unwrap();
        let back: SourceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
    }

    #[test]
    fn kafka_positions_are_tracked_per_partition_and_old_checkpoints_still_load() {
        let mut st = SourceState::default();
        let k = |p: i32, o: i64| Position::Kafka {
            topic: "t".into(),
            partition: p,
            offset: o,
        };
        st.observe(&k(0, 5));
        st.observe(&k(1, 2));
        st.observe(&k(0, 6));
        st.observe(&k(0, 6)); // a shard message yields several items
        assert_eq!(
            st.kafka["t"][&0],
            PartitionMark {
                offset: 6,
                records: 2
            }
        );
        assert_eq!(st.kafka["t"][&1].offset, 2);
        let json = serde_json::to_string(&st).unwrap();
        let back: SourceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
        // A checkpoint written before the Kafka source: no `kafka` field.
        let old: SourceState = serde_json::from_str(
            r#"{"pass":1,"completed":["a.tar"],"current":{"shard":"b.tar","next_index":3}}"#,
        )
        .unwrap();
        assert!(old.kafka.is_empty());
        assert_eq!(old.skip_for("b.tar"), Some(3));
        // ... and an object-store state serialises as before (no `kafka` key).
        assert!(!serde_json::to_string(&old).unwrap().contains("kafka"));
    }

    #[test]
    fn single_shard_loop_is_a_new_pass() {
        let mut st = SourceState::default();
        st.observe(&p("a.tar", 0));
        st.observe(&p("a.tar", 1));
        st.observe(&p("a.tar", 0));
        assert_eq!(st.pass, 1);
        assert_eq!(st.skip_for("a.tar"), Some(1));
    }
}

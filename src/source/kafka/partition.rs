//! A partition's own librdkafka queue, read in batches.
//!
//! rdkafka's `StreamPartitionQueue` polls through librdkafka's event API, which costs per
//! message a clock read, an event object, an `Arc` allocation and an event destroy.
//! `rd_kafka_consume_batch_queue` takes every message already queued (up to a burst) in one
//! call. This module is the Kafka source's only unsafe code: it owns the queue and message
//! pointers and frees each exactly once, and keeps the consumer alive while it holds them.
//!
//! Errors that librdkafka attaches to a partition (fetch errors, partition EOF) come out as
//! messages with an error code and are returned as such; errors it raises as separate events
//! on a partition queue (an unknown topic or partition) are only logged by librdkafka on this
//! path. Broker connectivity is reported through the main queue either way.

use std::collections::VecDeque;
use std::ffi::{c_void, CStr, CString};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Headers, Message, Timestamp};
use rdkafka::types::RDKafkaRespErr;
use tokio::sync::Notify;

/// Messages taken from librdkafka's queue per hand-off when more are already waiting: one
/// channel reservation and one wake-up of the decode stage per burst instead of per message.
pub(super) const BURST: usize = 256;

/// One partition's queue, split off the consumer's main queue.
pub(super) struct PartitionQueue {
    /// Messages taken from the queue and not handed out yet (dropped before the queue).
    taken: VecDeque<RawMessage>,
    scratch: Vec<*mut rdsys::rd_kafka_message_t>,
    ptr: NonNull<rdsys::rd_kafka_queue_t>,
    /// Signalled by librdkafka (from its own thread) when the queue turns non-empty.
    ready: Arc<Notify>,
    /// Keeps the client alive while the queue and its messages are.
    _consumer: Arc<dyn std::any::Any + Send + Sync>,
}

// SAFETY: librdkafka queues may be used from any thread; the message pointers in `taken` and
// `scratch` are owned by this value alone.
unsafe impl Send for PartitionQueue {}

/// Called by librdkafka when an element is put into the empty queue.
///
/// # Safety
/// `opaque` is the `Notify` that [`PartitionQueue::split`] registered with the callback, and
/// is alive while the callback is enabled.
unsafe extern "C" fn queue_nonempty(_rk: *mut rdsys::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the queue's `ready`, which outlives the callback (disabled in Drop
    // before `ready` is freed; librdkafka calls it under the queue lock, so not after that).
    let ready = unsafe { &*(opaque as *const Notify) };
    // notify_one keeps a permit when nobody waits yet: a wake-up between an empty take and
    // the wait is not lost.
    ready.notify_one();
}

impl PartitionQueue {
    /// Splits `topic`/`partition`'s queue off the consumer's main queue: from now on its
    /// messages arrive only here. None when librdkafka does not know the partition (or the
    /// topic name has a NUL byte).
    pub(super) fn split<C: ConsumerContext + 'static>(
        consumer: &Arc<StreamConsumer<C>>,
        topic: &str,
        partition: i32,
        burst: usize,
    ) -> Option<Self> {
        let topic = CString::new(topic).ok()?;
        let rk = consumer.client().native_ptr();
        // SAFETY: `rk` is the live client of `consumer`; the returned reference is ours.
        let ptr = NonNull::new(unsafe {
            rdsys::rd_kafka_queue_get_partition(rk, topic.as_ptr(), partition)
        })?;
        let ready = Arc::new(Notify::new());
        // SAFETY: `ptr` is a valid queue; `ready` lives as long as the callback is enabled.
        unsafe {
            rdsys::rd_kafka_queue_forward(ptr.as_ptr(), ptr::null_mut());
            rdsys::rd_kafka_queue_cb_event_enable(
                ptr.as_ptr(),
                Some(queue_nonempty),
                Arc::as_ptr(&ready) as *mut c_void,
            );
        }
        let burst = burst.max(1);
        Some(PartitionQueue {
            taken: VecDeque::with_capacity(burst),
            scratch: Vec::with_capacity(burst),
            ptr,
            ready,
            _consumer: consumer.clone(),
        })
    }

    /// The next message already in the queue, without waiting. When none was taken before,
    /// takes up to `room` (at most the burst size): the caller's use for them right now.
    /// Messages taken are out of librdkafka's reach (its filter of messages fetched before a
    /// revoke or seek, its queued-bytes limit, the position behind the lag metric), so
    /// taking more than are handled at once would hold some back across awaits.
    pub(super) fn next_ready(&mut self, room: usize) -> Option<KafkaResult<RawMessage>> {
        if self.taken.is_empty() {
            self.take_batch(room);
        }
        self.taken.pop_front().map(RawMessage::into_result)
    }

    /// Moves up to `max` messages already queued into `taken`: one call into librdkafka for
    /// the lot.
    fn take_batch(&mut self, max: usize) {
        self.scratch.clear();
        let max = max.clamp(1, self.scratch.capacity());
        // SAFETY: `scratch` has room for `max` ≤ `capacity()` pointers; librdkafka writes `n`
        // of them, each a message we now own (wrapped at once, so freed exactly once).
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(
                self.ptr.as_ptr(),
                0,
                self.scratch.as_mut_ptr(),
                max,
            )
        };
        if n <= 0 {
            return;
        }
        // SAFETY: see above; n ≤ capacity.
        unsafe { self.scratch.set_len(n as usize) };
        self.taken.extend(
            self.scratch
                .drain(..)
                .filter_map(NonNull::new)
                .map(RawMessage),
        );
    }

    /// Waits until librdkafka puts something into the queue (returns at once when it did
    /// since the last wait).
    pub(super) fn ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }
}

impl Drop for PartitionQueue {
    fn drop(&mut self) {
        self.taken.clear();
        // SAFETY: the queue is valid until destroyed here; the callback is disabled first so
        // it never sees a freed `ready`.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(self.ptr.as_ptr(), None, ptr::null_mut());
            rdsys::rd_kafka_queue_destroy(self.ptr.as_ptr());
        }
    }
}

/// A message taken from a partition queue; destroyed (its librdkafka buffer released) on drop.
/// It must be dropped before its consumer is destroyed: the Kafka source handles each one
/// within the burst that took it, while its reader holds the queue (and so the consumer).
pub(super) struct RawMessage(NonNull<rdsys::rd_kafka_message_t>);

// SAFETY: a consumed librdkafka message may be read and destroyed on any thread.
unsafe impl Send for RawMessage {}

impl RawMessage {
    fn raw(&self) -> &rdsys::rd_kafka_message_t {
        // SAFETY: valid from consume until drop.
        unsafe { self.0.as_ref() }
    }

    /// The message, or the error librdkafka delivered in its place.
    fn into_result(self) -> KafkaResult<RawMessage> {
        match self.raw().err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(self),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__PARTITION_EOF => {
                Err(KafkaError::PartitionEOF(self.raw().partition))
            }
            e => Err(KafkaError::MessageConsumption(e.into())),
        }
    }
}

impl Drop for RawMessage {
    fn drop(&mut self) {
        // SAFETY: owned, destroyed once.
        unsafe { rdsys::rd_kafka_message_destroy(self.0.as_ptr()) }
    }
}

/// # Safety
/// `p` is null or points to `len` readable bytes that live as long as `'a`.
unsafe fn bytes<'a>(p: *const c_void, len: usize) -> Option<&'a [u8]> {
    if p.is_null() {
        None
    } else {
        // SAFETY: `p` is not null, and the caller guarantees `len` readable bytes there that
        // live for `'a`.
        Some(unsafe { std::slice::from_raw_parts(p as *const u8, len) })
    }
}

impl Message for RawMessage {
    type Headers = RawHeaders;

    fn key(&self) -> Option<&[u8]> {
        // SAFETY: librdkafka's key buffer lives as long as the message.
        unsafe { bytes(self.raw().key, self.raw().key_len) }
    }

    fn payload(&self) -> Option<&[u8]> {
        // SAFETY: as for the key.
        unsafe { bytes(self.raw().payload, self.raw().len) }
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        let (p, len) = (self.raw().payload, self.raw().len);
        if p.is_null() {
            None
        } else {
            // SAFETY: `p` is not null and points to the message's `len` payload bytes, which
            // live as long as the message; `&mut self` makes this the only borrow of them.
            Some(unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) })
        }
    }

    fn topic(&self) -> &str {
        let rkt = self.raw().rkt;
        if rkt.is_null() {
            return "";
        }
        // SAFETY: the topic handle and its name live as long as the message.
        unsafe { CStr::from_ptr(rdsys::rd_kafka_topic_name(rkt)) }
            .to_str()
            .unwrap_or("")
    }

    fn partition(&self) -> i32 {
        self.raw().partition
    }

    fn offset(&self) -> i64 {
        self.raw().offset
    }

    fn timestamp(&self) -> Timestamp {
        use rdsys::rd_kafka_timestamp_type_t as T;
        let mut kind = T::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: valid message.
        let t = unsafe { rdsys::rd_kafka_message_timestamp(self.0.as_ptr(), &mut kind) };
        match kind {
            _ if t == -1 => Timestamp::NotAvailable,
            T::RD_KAFKA_TIMESTAMP_CREATE_TIME => Timestamp::CreateTime(t),
            T::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => Timestamp::LogAppendTime(t),
            T::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE => Timestamp::NotAvailable,
        }
    }

    fn headers(&self) -> Option<&RawHeaders> {
        let mut h = ptr::null_mut();
        // SAFETY: valid message; the headers it returns live as long as the message.
        let err = unsafe { rdsys::rd_kafka_message_headers(self.0.as_ptr(), &mut h) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || h.is_null() {
            return None;
        }
        // SAFETY: `RawHeaders` is a transparent view of librdkafka's opaque headers type.
        Some(unsafe { &*(h as *const RawHeaders) })
    }
}

/// The headers of a [`RawMessage`], read in place.
#[repr(transparent)]
pub(super) struct RawHeaders(rdsys::rd_kafka_headers_t);

impl Headers for RawHeaders {
    fn count(&self) -> usize {
        // SAFETY: valid headers (borrowed from a live message).
        unsafe { rdsys::rd_kafka_header_cnt(&self.0) }
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        let (mut name, mut value, mut size) = (ptr::null(), ptr::null(), 0);
        // SAFETY: valid headers; out-pointers point to locals.
        let err = unsafe {
            rdsys::rd_kafka_header_get_all(&self.0, idx, &mut name, &mut value, &mut size)
        };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        Some(Header {
            // A header name that is not UTF-8 matches no configured header name.
            // SAFETY: NUL-terminated name owned by the headers.
            key: unsafe { CStr::from_ptr(name) }.to_str().unwrap_or(""),
            // SAFETY: `size` bytes owned by the headers.
            value: unsafe { bytes(value, size) },
        })
    }
}

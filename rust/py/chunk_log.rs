//! `ChunkLog`: the Python face of [`crate::chunk_log::ChunkLog`], holding live chunk objects.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::sync::{Mutex, MutexGuard};

use pyo3::types::PyBytes;

use crate::chunk_log::{ChunkLog as Log, LogError};
use crate::py::codec::StreamEncoder;
use crate::py::errors::ConsumerLagged;
use crate::timing::{PaceRecorder, StampClock, DEFAULT_UNIT_US};

/// `record`'s result bits.
pub(crate) const RECORD_OVERFLOWED: u8 = 1;
pub(crate) const RECORD_TAKEN: u8 = 2;
pub(crate) const RECORD_UNENCODED: u8 = 4;
pub(crate) const RECORD_NO_HEADROOM: u8 = 8;

/// Bound on the recorded timing of a log without a byte budget (16 MiB of deltas).
const UNBOUNDED_TIMING_BYTES: usize = 16 << 20;

/// The log and the arrival time of each pushed chunk, under one lock.
struct Inner {
    log: Log<Py<PyAny>>,
    pace: PaceRecorder,
    /// Nanoseconds since the log's creation (a TSC read per push where that is sound).
    clock: StampClock,
}

/// An append-only log of chunks shared by the consumers of one in-flight stream.
///
/// Each consumer reads from its own cursor; the producer may run at most `max_lag` chunks
/// ahead of the slowest consumer still holding it back; past `max_bytes` retained bytes the
/// log stops retaining the whole stream, drops what every holding consumer has read, and
/// refuses new consumers. Every method is non-blocking: Python parks on events and calls back.
///
/// Each push also records when it happened, relative to the log's creation, for `timing()`.
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct ChunkLog {
    // One lock per log, held for one method and never across a call into Python that could
    // re-enter the log. Dropped chunks are decref'd under it: chunk objects are data whose
    // deallocation cannot reach back into this log.
    inner: Mutex<Inner>,
}

impl ChunkLog {
    /// `record` for Rust callers (`record` itself and `SoloPull`).
    pub(crate) fn record_item(
        &self,
        py: Python<'_>,
        item: Bound<'_, PyAny>,
        encoder: Option<&StreamEncoder>,
        nbytes: u64,
        consumer: Option<u64>,
    ) -> u8 {
        let mut bits = 0;
        // The encoder runs before the log is locked: it calls into Python (attribute reads on
        // models), and the log's lock is never held across such a call.
        let nbytes = match encoder.map(|e| e.push_item(py, &item)) {
            Some(Ok((_, added))) => added as u64,
            Some(Err(_)) => {
                bits |= RECORD_UNENCODED;
                nbytes
            }
            None => nbytes,
        };
        let mut inner = self.lock();
        let elapsed = inner.clock.elapsed_ns();
        inner.pace.record(elapsed);
        let (overflowed, taken) = match consumer {
            Some(id) => inner.log.push_taking(item.unbind(), nbytes, id),
            None => (inner.log.push(item.unbind(), nbytes), false),
        };
        if overflowed {
            bits |= RECORD_OVERFLOWED;
        }
        if taken {
            bits |= RECORD_TAKEN;
        }
        if inner.log.headroom() == 0 {
            bits |= RECORD_NO_HEADROOM;
        }
        bits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic cannot leave the log half-updated in a way later calls would misread, so a
        // poisoned lock is recovered rather than turned into an error on every later call.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn log_error(err: LogError) -> PyErr {
    match err {
        LogError::UnknownConsumer(_) => PyValueError::new_err(err.to_string()),
        LogError::Lagged { .. } => ConsumerLagged::new_err(err.to_string()),
    }
}

#[pymethods]
impl ChunkLog {
    #[new]
    #[pyo3(signature = (max_lag = 64, max_bytes = None))]
    fn new(max_lag: u64, max_bytes: Option<u64>) -> PyResult<Self> {
        if max_lag == 0 {
            return Err(PyValueError::new_err("max_lag must be at least 1"));
        }
        let timing_bytes = max_bytes.map_or(UNBOUNDED_TIMING_BYTES, |b| {
            usize::try_from(b).unwrap_or(UNBOUNDED_TIMING_BYTES)
        });
        Ok(ChunkLog {
            inner: Mutex::new(Inner {
                log: Log::new(max_lag, max_bytes),
                pace: PaceRecorder::new(DEFAULT_UNIT_US, timing_bytes),
                clock: StampClock::new(),
            }),
        })
    }

    /// Attaches a consumer at the first chunk and returns its id; `None` once the log no
    /// longer retains the start of the stream.
    fn attach(&self) -> Option<u64> {
        self.lock().log.attach()
    }

    /// Detaches a consumer; returns how many remain.
    fn detach(&self, consumer: u64) -> usize {
        self.lock().log.detach(consumer)
    }

    /// Appends a chunk accounted as `nbytes`; returns True when this push exceeded the byte
    /// budget (the stream is no longer retained whole).
    #[pyo3(signature = (item, nbytes = 0))]
    fn push(&self, item: Py<PyAny>, nbytes: u64) -> bool {
        let mut inner = self.lock();
        let elapsed = inner.clock.elapsed_ns();
        inner.pace.record(elapsed);
        inner.log.push(item, nbytes)
    }

    /// The recorded arrival times of every pushed chunk as a timing section (see
    /// `chengeta_ai._core.decode_timing`), or None if it outgrew its bound.
    fn timing<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        let section = self.lock().pace.encode()?;
        Some(PyBytes::new(py, &section))
    }

    /// `push`, handing the chunk to `consumer` if it had read everything before it (as a
    /// read of one would). Returns a bit set: 1 = the push exceeded the byte budget,
    /// 2 = the consumer took the chunk (it must not read it back).
    fn push_taking(&self, item: Py<PyAny>, nbytes: u64, consumer: u64) -> u8 {
        let mut inner = self.lock();
        let elapsed = inner.clock.elapsed_ns();
        inner.pace.record(elapsed);
        let (overflowed, taken) = inner.log.push_taking(item, nbytes, consumer);
        u8::from(overflowed) | (u8::from(taken) << 1)
    }

    /// A flight's whole per-chunk step in one call: encodes `item` with `encoder` (for the
    /// store; `None`: not encoded), appends it accounted as the bytes the encoding added (or
    /// `nbytes` when not encoded), and hands it to `consumer` as `push_taking` does. Returns a
    /// bit set: 1 = the push exceeded the byte budget, 2 = `consumer` took the chunk, 4 = the
    /// encoder failed on it (it is poisoned: its `error` says why; the chunk is appended all
    /// the same, accounted as `nbytes`), 8 = no headroom is left after the push.
    #[pyo3(signature = (item, encoder, nbytes, consumer = None))]
    fn record(
        &self,
        py: Python<'_>,
        item: Bound<'_, PyAny>,
        encoder: Option<&Bound<'_, StreamEncoder>>,
        nbytes: u64,
        consumer: Option<u64>,
    ) -> u8 {
        self.record_item(py, item, encoder.map(Bound::get), nbytes, consumer)
    }

    /// True when `consumer` may read the next upstream chunk itself: the stream is open, the
    /// consumer has read everything, and the producer is not held back.
    fn ready_to_pull(&self, consumer: u64) -> bool {
        self.lock().log.ready_to_pull(consumer)
    }

    /// How many chunks may be pushed before the slowest holding consumer must read.
    fn headroom(&self) -> u64 {
        self.lock().log.headroom()
    }

    /// Releases the slowest consumers from holding the producer back ("detach" policy);
    /// returns how many were released (0 if nobody is ahead of them).
    fn release_slowest(&self) -> usize {
        self.lock().log.release_slowest()
    }

    /// Returns up to `max_n` chunks from the consumer's cursor and advances it. Raises
    /// `ConsumerLagged` if the consumer's next chunk was already dropped.
    fn read<'py>(
        &self,
        py: Python<'py>,
        consumer: u64,
        max_n: usize,
    ) -> PyResult<Bound<'py, PyList>> {
        let mut out: Vec<Py<PyAny>> = Vec::new();
        self.lock()
            .log
            .read(consumer, max_n, |item| out.push(item.clone_ref(py)))
            .map_err(log_error)?;
        PyList::new(py, out)
    }

    /// Number of chunks ready for this consumer.
    fn available(&self, consumer: u64) -> u64 {
        self.lock().log.available(consumer)
    }

    /// Every chunk of the stream in order, or `None` if the start was dropped.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        let mut out: Vec<Py<PyAny>> = Vec::new();
        if !self
            .lock()
            .log
            .for_each_retained(|item| out.push(item.clone_ref(py)))
        {
            return Ok(None);
        }
        Ok(Some(PyList::new(py, out)?))
    }

    /// Marks the stream finished; consumers drain what is left.
    fn close(&self) {
        self.lock().log.close()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.lock().log.is_closed()
    }

    /// True while the whole stream since its first chunk is retained.
    #[getter]
    fn retaining(&self) -> bool {
        self.lock().log.is_retaining()
    }

    /// Number of chunks pushed so far.
    #[getter]
    fn end(&self) -> u64 {
        self.lock().log.end()
    }

    #[getter]
    fn retained_bytes(&self) -> u64 {
        self.lock().log.retained_bytes()
    }

    #[getter]
    fn consumers(&self) -> usize {
        self.lock().log.consumers()
    }

    /// Counters: pushed, delivered, attached, detached_laggards, lag_errors, dropped,
    /// peak_retained.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock().log.stats();
        let d = PyDict::new(py);
        d.set_item("pushed", s.pushed)?;
        d.set_item("delivered", s.delivered)?;
        d.set_item("attached", s.attached)?;
        d.set_item("detached_laggards", s.detached_laggards)?;
        d.set_item("lag_errors", s.lag_errors)?;
        d.set_item("dropped", s.dropped)?;
        d.set_item("peak_retained", s.peak_retained)?;
        Ok(d)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ChunkLog>()
}

//! `SoloPull`: a lone sync consumer's per-chunk step on a miss, as one iterator's `__next__`.
//!
//! `chengeta_ai.layers.fanout.SyncFlight.consume` hands a caller its chunks with
//! `yield from SoloPull(...)` while the caller is the flight's only consumer: each `next()` is
//! then one generator resume plus this C call (the pull lock, the flight's checks, the upstream
//! read, `ChunkLog.record_item`), not a Python loop body. Anything that is not the plain case
//! ends the iteration and the Python loop carries on exactly as it would have.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pyo3::exceptions::{PyStopIteration, PyTypeError};
use pyo3::prelude::*;
use pyo3::{ffi, intern};

use crate::py::chunk_log::{ChunkLog, RECORD_OVERFLOWED, RECORD_TAKEN, RECORD_UNENCODED};
use crate::py::codec::StreamEncoder;

/// A lone consumer's chunks, read straight from a sync flight's upstream.
///
/// `SoloPull(flight, upstream, log, encoder, consumer, pull_lock, running, nbytes)` yields,
/// per `next()`, what one turn of `SyncFlight.consume`'s pulling branch would: under the
/// flight's pull lock (taken without blocking), while the flight's `state.phase` is `running`
/// and `flight.solo` holds, it reads `next(upstream)`, records it in `log` with `encoder`
/// (`ChunkLog.record`, taken by `consumer`; `nbytes` is the size accounted if the encoder
/// fails), releases the lock, wakes the flight's waiters if there are any, and returns the
/// chunk.
///
/// It stops (without an error) where the Python loop must take over: the pull lock is busy,
/// the flight is not running or not solo any more, the chunk was not taken. The rare outcomes
/// go to the flight's own methods, called with the lock held as the Python step calls them:
/// `flight._after_record(bits)` when the log overflowed or the encoder failed, and
/// `flight._pull_failed(exc)` for whatever the read or the record raised (any
/// `BaseException`, and `StopIteration` at the end of the upstream); an exception they raise
/// (a Ctrl-C re-raised) propagates after the lock is released. After the end, a failure, a
/// failed encoder or a phase or solo check that failed, the iterator is `spent`: it stops at
/// once from then on.
///
/// No Python code runs between the upstream read returning a chunk and its record, so a
/// Ctrl-C cannot land between the two.
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct SoloPull {
    flight: Py<PyAny>,
    state: Py<PyAny>,
    upstream: Py<PyAny>,
    log: Py<ChunkLog>,
    encoder: Py<StreamEncoder>,
    consumer: u64,
    acquire: Py<PyAny>,
    release: Py<PyAny>,
    running: Py<PyAny>,
    nbytes: u64,
    // Atomics, not a lock: the iterator is driven by one thread at a time (a generator cannot
    // be resumed twice at once), and the counters are only read between resumes.
    taken: AtomicU64,
    spent: AtomicBool,
}

impl SoloPull {
    /// One step with the pull lock held: the chunk taken by the consumer, or None to stop.
    fn step<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let flight = self.flight.bind(py);
        let phase = self.state.bind(py).getattr(intern!(py, "phase"))?;
        if !phase.is(self.running.bind(py)) || !flight.getattr(intern!(py, "solo"))?.is_truthy()? {
            // neither comes back: the phase never returns to running, nobody un-joins
            self.spent.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        // SAFETY: `upstream` was checked to be an iterator at construction (`PyIter_Check`);
        // PyIter_Next returns a new reference, or NULL with an exception set on a failure and
        // without one at the end.
        let read = unsafe { ffi::PyIter_Next(self.upstream.as_ptr()) };
        let chunk = if read.is_null() {
            let exc = match PyErr::take(py) {
                Some(err) => err,
                None => PyStopIteration::new_err(()),
            };
            return self.pull_failed(py, exc);
        } else {
            // SAFETY: a non-null new reference, owned from here on.
            unsafe { Bound::from_owned_ptr(py, read) }
        };
        let bits = self.log.get().record_item(
            py,
            chunk.clone(),
            Some(self.encoder.get()),
            self.nbytes,
            Some(self.consumer),
        );
        if bits & (RECORD_OVERFLOWED | RECORD_UNENCODED) != 0 {
            if bits & RECORD_UNENCODED != 0 {
                // the flight drops its core encoder: the Python path takes over after this chunk
                self.spent.store(true, Ordering::Relaxed);
            }
            if let Err(err) = flight.call_method1(intern!(py, "_after_record"), (bits,)) {
                return self.pull_failed(py, err);
            }
        }
        if bits & RECORD_TAKEN == 0 {
            return Ok(None);
        }
        Ok(Some(chunk))
    }

    /// The read or the record raised `err`: the flight's `_pull_failed` ends or fails it.
    fn pull_failed<'py>(&self, py: Python<'py>, err: PyErr) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.spent.store(true, Ordering::Relaxed);
        // into_value carries the traceback onto the exception object, as `except` would
        let exc = err.into_value(py);
        self.flight
            .bind(py)
            .call_method1(intern!(py, "_pull_failed"), (exc,))?;
        Ok(None)
    }
}

#[pymethods]
impl SoloPull {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        flight: Bound<'_, PyAny>,
        upstream: Bound<'_, PyAny>,
        log: Py<ChunkLog>,
        encoder: Py<StreamEncoder>,
        consumer: u64,
        pull_lock: Bound<'_, PyAny>,
        running: Py<PyAny>,
        nbytes: u64,
    ) -> PyResult<Self> {
        // SAFETY: PyIter_Check only reads the object's type slots.
        if unsafe { ffi::PyIter_Check(upstream.as_ptr()) } == 0 {
            return Err(PyTypeError::new_err(format!(
                "upstream must be an iterator, got {}",
                upstream.get_type().name()?
            )));
        }
        let py = flight.py();
        Ok(SoloPull {
            state: flight.getattr(intern!(py, "state"))?.unbind(),
            flight: flight.unbind(),
            upstream: upstream.unbind(),
            log,
            encoder,
            consumer,
            acquire: pull_lock.getattr(intern!(py, "acquire"))?.unbind(),
            release: pull_lock.getattr(intern!(py, "release"))?.unbind(),
            running,
            nbytes,
            taken: AtomicU64::new(0),
            spent: AtomicBool::new(false),
        })
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__<'py>(slf: &Bound<'py, Self>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let py = slf.py();
        let this = slf.get();
        if this.spent.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // the pull lock, without blocking (a busy lock: the Python loop reads or waits)
        if !this.acquire.bind(py).call1((false,))?.is_truthy()? {
            return Ok(None);
        }
        // No Python code runs between the acquire returning and `step` starting, nor between
        // `step` returning and the release: nothing can interrupt this thread's hold there.
        let stepped = this.step(py);
        this.release.bind(py).call0()?;
        let Some(chunk) = stepped? else {
            return Ok(None);
        };
        let flight = this.flight.bind(py);
        if flight.getattr(intern!(py, "_waiters"))?.is_truthy()? {
            flight.call_method0(intern!(py, "wake"))?;
        }
        this.taken.fetch_add(1, Ordering::Relaxed);
        Ok(Some(chunk))
    }

    /// Chunks handed out so far.
    #[getter]
    fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// True once the iterator stops for good (see the class docs).
    #[getter]
    fn spent(&self) -> bool {
        self.spent.load(Ordering::Relaxed)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SoloPull>()
}

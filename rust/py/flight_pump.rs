//! The per-chunk steps of a flight on a miss, in Rust.
//!
//! `SoloPull`: a lone sync consumer's per-chunk step, as one iterator's `__next__`.
//!
//! `chengeta_ai.layers.fanout.SyncFlight.consume` hands a caller its chunks with
//! `yield from SoloPull(...)` while the caller is the flight's only consumer: each `next()` is
//! then one generator resume plus this C call (the pull lock, the flight's checks, the upstream
//! read, `ChunkLog.record_item`), not a Python loop body. Anything that is not the plain case
//! ends the iteration and the Python loop carries on exactly as it would have.
//!
//! `AsyncPump`: an async flight's pump loop (`AsyncFlight._pump`), as one awaitable that
//! drives the upstream's `__anext__()` awaitables the way `await` does and records each chunk.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use pyo3::exceptions::{PyRuntimeError, PyStopAsyncIteration, PyStopIteration, PyTypeError};
use pyo3::panic::PanicException;
use pyo3::prelude::*;
use pyo3::{ffi, intern, PyTraverseError, PyVisit};

use crate::py::attr_reader::AttrReader;
use crate::py::chunk_log::{
    ChunkLog, RECORD_NO_HEADROOM, RECORD_OVERFLOWED, RECORD_TAKEN, RECORD_UNENCODED,
};
use crate::py::codec::StreamEncoder;
use crate::py::pull_lock::{thread_ident, PullLock};

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
///
/// The pull lock is a `PullLock`, taken and given back in Rust; `state.phase`, `flight.solo`
/// and `flight._waiters` are read at every chunk, through the objects' `__dict__` or slot
/// (`AttrReader`): a change made by any thread is seen at the next chunk.
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct SoloPull {
    flight: Py<PyAny>,
    phase: AttrReader,
    solo: AttrReader,
    waiters: AttrReader,
    upstream: Py<PyAny>,
    log: Py<ChunkLog>,
    encoder: Py<StreamEncoder>,
    consumer: u64,
    pull_lock: Py<PullLock>,
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
        if !self.phase.read(py)?.is(self.running.bind(py)) || !self.solo.read(py)?.is_truthy()? {
            // neither comes back: the phase never returns to running, nobody un-joins
            self.spent.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        // SAFETY: `upstream` was checked to be an iterator at construction (`PyIter_Check`);
        // PyIter_Next returns a new reference, or NULL with an exception set on a failure and
        // without one at the end.
        let read = unsafe { ffi::PyIter_Next(self.upstream.as_ptr()) };
        let chunk = if read.is_null() {
            let exc = match take_raised(py) {
                Some(err) => err,
                None => PyStopIteration::new_err(()),
            };
            return self.pull_failed(py, exc);
        } else {
            // SAFETY: a non-null new reference, owned from here on.
            unsafe { Bound::from_owned_ptr(py, read) }
        };
        // A signal (Ctrl-C) that arrived during the read is handled here, as the Python step
        // handles it right after `next()` returns: the read chunk is lost to everyone, so the
        // flight fails. (Left pending, it would be handled by whatever Python code the encoder
        // calls next, e.g. a model discovery hook that swallows it.)
        // SAFETY: called with the GIL held; -1 with an exception set when a handler raised.
        if unsafe { ffi::PyErr_CheckSignals() } != 0 {
            drop(chunk);
            let exc = take_raised(py)
                .unwrap_or_else(|| PyTypeError::new_err("a signal handler failed without error"));
            return self.pull_failed(py, exc);
        }
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
        pull_lock: Py<PullLock>,
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
        let state = flight.getattr(intern!(py, "state"))?;
        Ok(SoloPull {
            phase: AttrReader::new(&state, intern!(py, "phase"))?,
            solo: AttrReader::new(&flight, intern!(py, "solo"))?,
            waiters: AttrReader::new(&flight, intern!(py, "_waiters"))?,
            flight: flight.unbind(),
            upstream: upstream.unbind(),
            log,
            encoder,
            consumer,
            pull_lock,
            running,
            nbytes,
            taken: AtomicU64::new(0),
            spent: AtomicBool::new(false),
        })
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Visible to the garbage collector: the flight may reach back to this iterator.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.flight)?;
        visit.call(&self.upstream)?;
        for reader in [&self.phase, &self.solo, &self.waiters] {
            reader.traverse(&visit)?;
        }
        visit.call(&self.pull_lock)?;
        visit.call(&self.running)?;
        visit.call(&self.log)?;
        visit.call(&self.encoder)
    }

    fn __next__<'py>(slf: &Bound<'py, Self>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let py = slf.py();
        let this = slf.get();
        if this.spent.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // the pull lock, without blocking (a busy lock: the Python loop reads or waits)
        let me = thread_ident();
        let pull_lock = this.pull_lock.get();
        if !pull_lock.try_acquire_as(me) {
            return Ok(None);
        }
        // No Python code runs between the acquire returning and `step` starting, nor between
        // `step` returning and the release: nothing can interrupt this thread's hold there.
        // A panic inside the step (PyO3 resumes a `PanicException` raised by Python code the
        // step calls as one) fails the flight like any other error of the read or the record,
        // and never skips the release.
        let stepped = match panic::catch_unwind(AssertUnwindSafe(|| this.step(py))) {
            Ok(stepped) => stepped,
            Err(payload) => this.pull_failed(py, PanicException::new_err(panic_message(&payload))),
        };
        if !pull_lock.release_as(me) {
            // some Python code the step called gave back this thread's hold (as
            // `RLock.release()` would say)
            return Err(PyRuntimeError::new_err("cannot release un-acquired lock"));
        }
        let Some(chunk) = stepped? else {
            return Ok(None);
        };
        if this.waiters.read(py)?.is_truthy()? {
            this.flight.bind(py).call_method0(intern!(py, "wake"))?;
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

/// The exception raised in this thread, taken as it is. Unlike `PyErr::take`, this does not
/// resume a `PanicException` (raised by an upstream itself driven by this crate's code) as a
/// Rust panic: the flight's failure path gets it like any other exception.
fn take_raised(py: Python<'_>) -> Option<PyErr> {
    let mut typ: *mut ffi::PyObject = std::ptr::null_mut();
    let mut value: *mut ffi::PyObject = std::ptr::null_mut();
    let mut tb: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: with the GIL held, PyErr_Fetch moves the indicator's three new references (or
    // NULLs) out and clears it; PyErr_NormalizeException replaces them with an exception
    // instance of the type (abi3-safe, unlike PyErr_GetRaisedException before 3.12).
    #[allow(deprecated)]
    unsafe {
        ffi::PyErr_Fetch(&mut typ, &mut value, &mut tb);
        if typ.is_null() {
            return None;
        }
        ffi::PyErr_NormalizeException(&mut typ, &mut value, &mut tb);
        if !tb.is_null() && !value.is_null() {
            // as `except` sees it: the traceback on the exception object
            ffi::PyException_SetTraceback(value, tb);
        }
        ffi::Py_XDECREF(tb);
        let err = match Bound::from_owned_ptr_or_opt(py, value) {
            Some(value) => PyErr::from_value(value),
            None => PyErr::from_type(
                Bound::from_borrowed_ptr(py, typ).downcast_into_unchecked(),
                (),
            ),
        };
        ffi::Py_DECREF(typ);
        Some(err)
    }
}

/// The message of a caught panic's payload (as PyO3 builds its `PanicException`).
fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else {
        "panic from Rust code".to_owned()
    }
}

/// What `AsyncPump` returns when the upstream ended (`StopAsyncIteration`).
const PUMP_ENDED: i64 = -1;

/// How one send or throw into an upstream awaitable came out.
enum Step<'py> {
    /// It suspended: the value goes to the event loop.
    Yielded(Bound<'py, PyAny>),
    /// It completed with this chunk.
    Returned(Bound<'py, PyAny>),
    /// It raised.
    Raised(PyErr),
}

/// `PyIter_Send`: resumes `it` with `value`, as `await` does.
fn send_into<'py>(it: &Bound<'py, PyAny>, value: &Bound<'py, PyAny>) -> Step<'py> {
    let py = it.py();
    let mut result: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: both pointers are live objects; PyIter_Send stores a new reference in `result`
    // on PYGEN_NEXT and PYGEN_RETURN, and sets an exception on PYGEN_ERROR.
    match unsafe { ffi::PyIter_Send(it.as_ptr(), value.as_ptr(), &mut result) } {
        ffi::PySendResult::PYGEN_NEXT => {
            Step::Yielded(unsafe { Bound::from_owned_ptr(py, result) })
        }
        ffi::PySendResult::PYGEN_RETURN => {
            Step::Returned(unsafe { Bound::from_owned_ptr(py, result) })
        }
        ffi::PySendResult::PYGEN_ERROR => Step::Raised(
            PyErr::take(py).unwrap_or_else(|| PyTypeError::new_err("send failed without error")),
        ),
    }
}

/// The iterator `await aw` drives (`aw.__await__()`, through the type's `am_await` slot).
fn await_iter<'py>(aw: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = aw.py();
    // SAFETY: PyType_GetSlot reads a slot of a live type object (static types too, 3.10+).
    let slot = unsafe { ffi::PyType_GetSlot(ffi::Py_TYPE(aw.as_ptr()), ffi::Py_am_await) };
    if slot.is_null() {
        // `await`'s other rule (`_PyCoro_GetAwaitableIter`): a generator-based coroutine
        // (`@types.coroutine`, a generator whose code has CO_ITERABLE_COROUTINE) is its own
        // iterator. Off the plain path: only objects without an `am_await` slot get here.
        if is_iterable_coroutine(aw)? {
            return Ok(aw.clone());
        }
        return Err(PyTypeError::new_err(format!(
            "object {} can't be used in 'await' expression",
            aw.get_type().name()?
        )));
    }
    // SAFETY: the am_await slot is a unaryfunc returning a new reference or NULL with an error.
    let am_await: ffi::unaryfunc = unsafe { std::mem::transmute(slot) };
    let it = unsafe { am_await(aw.as_ptr()) };
    // SAFETY: a new reference, or NULL with an exception set
    unsafe { Bound::from_owned_ptr_or_err(py, it) }
}

/// True for a generator whose code is flagged CO_ITERABLE_COROUTINE (`types.coroutine`).
fn is_iterable_coroutine(aw: &Bound<'_, PyAny>) -> PyResult<bool> {
    /// CPython's `CO_ITERABLE_COROUTINE` code flag (stable since 3.5).
    const CO_ITERABLE_COROUTINE: i64 = 0x0100;
    let py = aw.py();
    let generator = py
        .import(intern!(py, "types"))?
        .getattr(intern!(py, "GeneratorType"))?;
    if !aw.get_type().is(&generator) {
        return Ok(false);
    }
    let flags: i64 = aw
        .getattr(intern!(py, "gi_code"))?
        .getattr(intern!(py, "co_flags"))?
        .extract()?;
    Ok(flags & CO_ITERABLE_COROUTINE != 0)
}

/// The exception `throw(typ, val, tb)` raises, as an exception object.
fn thrown_exception<'py>(
    typ: &Bound<'py, PyAny>,
    val: Option<&Bound<'py, PyAny>>,
    tb: Option<&Bound<'py, PyAny>>,
) -> PyResult<PyErr> {
    let exc = match val {
        Some(v) if !v.is_none() && v.is_instance_of::<pyo3::exceptions::PyBaseException>() => {
            v.clone()
        }
        Some(v) if !v.is_none() => typ.call1((v,))?,
        _ if typ.is_instance_of::<pyo3::exceptions::PyBaseException>() => typ.clone(),
        _ => typ.call0()?,
    };
    if let Some(tb) = tb.filter(|tb| !tb.is_none()) {
        exc.call_method1(intern!(typ.py(), "with_traceback"), (tb,))?;
    }
    Ok(PyErr::from_value(exc))
}

/// An async flight's pump loop as one awaitable (`AsyncFlight._pump` awaits it repeatedly).
///
/// `AsyncPump(flight, anext, log, encoder, nbytes, checkpoint_every)`: each `await` reads
/// chunks with `anext()` (the upstream's bound `__anext__`), driving each awaitable it returns
/// exactly as `await` would: every value it yields goes to the event loop unchanged, and every
/// `send`, `throw` and `close` of the awaiting coroutine is forwarded to it, so cancellation,
/// trio's checkpoints and an upstream's own suspensions behave as with `await anext()` in
/// Python. Each chunk is recorded in `log` (`ChunkLog.record` with `encoder`; unencoded after
/// the encoder failed once, accounted as `nbytes`), the flight's data waiters are woken
/// (`flight._wake_data()` when `flight._data` is set) and `since_checkpoint` counts it.
///
/// The await returns to Python with the record's bits after a chunk the Python loop must look
/// at (the log overflowed, the encoder failed, no headroom is left) or after
/// `checkpoint_every` chunks since the last `checkpointed()`; with -1 when the upstream ended
/// (`StopAsyncIteration`). Whatever else the upstream raises propagates unchanged.
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct AsyncPump {
    flight: Py<PyAny>,
    /// `flight._data`, read at every chunk (see `SoloPull`)
    data: AttrReader,
    anext: Py<PyAny>,
    log: Py<ChunkLog>,
    encoder: Py<StreamEncoder>,
    nbytes: u64,
    checkpoint_every: u32,
    // Atomics and a lock taken only to move the awaitable in or out (never held across a call
    // into Python): the pump is driven by one task, one step at a time.
    encoding: AtomicBool,
    since: AtomicU32,
    /// The upstream awaitable being driven while it is suspended.
    current: Mutex<Option<Py<PyAny>>>,
}

impl AsyncPump {
    fn set_current(&self, it: Option<Py<PyAny>>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = it;
    }

    fn take_current(&self) -> Option<Py<PyAny>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The next chunk's awaitable, started.
    fn start_next<'py>(&self, py: Python<'py>) -> (Option<Bound<'py, PyAny>>, Step<'py>) {
        let it = match self.anext.bind(py).call0().and_then(|aw| await_iter(&aw)) {
            Ok(it) => it,
            Err(err) => return (None, Step::Raised(err)),
        };
        let step = send_into(&it, &py.None().into_bound(py));
        (Some(it), step)
    }

    /// Carries on from `step` (the outcome of resuming `it`) until the awaitable suspends,
    /// the upstream ends or raises, or a chunk needs the Python loop.
    fn run<'py>(
        &self,
        py: Python<'py>,
        mut it: Option<Bound<'py, PyAny>>,
        mut step: Step<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        loop {
            let chunk = match step {
                Step::Yielded(value) => {
                    self.set_current(it.map(Bound::unbind));
                    return Ok(value);
                }
                Step::Raised(err) => {
                    if err.is_instance_of::<PyStopAsyncIteration>(py) {
                        return Err(PyStopIteration::new_err((PUMP_ENDED,)));
                    }
                    return Err(err);
                }
                Step::Returned(chunk) => chunk,
            };
            let encoder = if self.encoding.load(Ordering::Relaxed) {
                Some(self.encoder.get())
            } else {
                None
            };
            let bits = self
                .log
                .get()
                .record_item(py, chunk, encoder, self.nbytes, None);
            if bits & RECORD_UNENCODED != 0 {
                // as the flight does (`_after_record`): the rest is appended unencoded
                self.encoding.store(false, Ordering::Relaxed);
            }
            if !self.data.read(py)?.is_none() {
                self.flight
                    .bind(py)
                    .call_method0(intern!(py, "_wake_data"))?;
            }
            let since = self.since.fetch_add(1, Ordering::Relaxed) + 1;
            if bits & (RECORD_OVERFLOWED | RECORD_UNENCODED | RECORD_NO_HEADROOM) != 0
                || since >= self.checkpoint_every
            {
                return Err(PyStopIteration::new_err((i64::from(bits),)));
            }
            (it, step) = self.start_next(py);
        }
    }
}

#[pymethods]
impl AsyncPump {
    #[new]
    fn new(
        flight: Bound<'_, PyAny>,
        anext: Py<PyAny>,
        log: Py<ChunkLog>,
        encoder: Py<StreamEncoder>,
        nbytes: u64,
        checkpoint_every: u32,
    ) -> PyResult<Self> {
        let py = flight.py();
        Ok(AsyncPump {
            data: AttrReader::new(&flight, intern!(py, "_data"))?,
            flight: flight.unbind(),
            anext,
            log,
            encoder,
            nbytes,
            checkpoint_every,
            encoding: AtomicBool::new(true),
            since: AtomicU32::new(0),
            current: Mutex::new(None),
        })
    }

    fn __await__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Visible to the garbage collector: a flight's cancel scope holds the task awaiting this
    /// pump, whose frame holds the pump, which holds the flight.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.flight)?;
        self.data.traverse(&visit)?;
        visit.call(&self.anext)?;
        visit.call(&self.log)?;
        visit.call(&self.encoder)?;
        // never contended: the collector runs with the GIL, between two steps of the pump
        if let Ok(current) = self.current.try_lock() {
            if let Some(it) = current.as_ref() {
                visit.call(it)?;
            }
        }
        Ok(())
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::send(slf, &slf.py().None().into_bound(slf.py()))
    }

    /// Resumes the upstream awaitable being driven with `value` (the event loop's answer to
    /// what it yielded), or starts reading the next chunk.
    fn send<'py>(slf: &Bound<'py, Self>, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        match this.take_current() {
            Some(it) => {
                let it = it.into_bound(py);
                let step = send_into(&it, value);
                this.run(py, Some(it), step)
            }
            None => {
                let (it, step) = this.start_next(py);
                this.run(py, it, step)
            }
        }
    }

    /// Throws into the upstream awaitable being driven (a cancellation, trio's or asyncio's).
    #[pyo3(signature = (typ, val = None, tb = None))]
    fn throw<'py>(
        slf: &Bound<'py, Self>,
        typ: &Bound<'py, PyAny>,
        val: Option<&Bound<'py, PyAny>>,
        tb: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let Some(it) = this.take_current() else {
            // not inside an upstream awaitable (never suspended there): raise it here
            return Err(thrown_exception(typ, val, tb)?);
        };
        let it = it.into_bound(py);
        if !it.hasattr(intern!(py, "throw"))? {
            // as `await` / `yield from` (`gen_throw`): an iterator without `throw` is dropped
            // (closed first for a GeneratorExit) and the exception raised here
            let err = thrown_exception(typ, val, tb)?;
            if err.is_instance_of::<pyo3::exceptions::PyGeneratorExit>(py) {
                if let Ok(close) = it.getattr(intern!(py, "close")) {
                    close.call0()?;
                }
            }
            return Err(err);
        }
        let thrown = match (val, tb) {
            (None, None) => it.call_method1(intern!(py, "throw"), (typ,)),
            (Some(v), None) => it.call_method1(intern!(py, "throw"), (typ, v)),
            (v, Some(t)) => it.call_method1(intern!(py, "throw"), (typ, v, t)),
        };
        let step = match thrown {
            Ok(value) => Step::Yielded(value),
            Err(err) if err.is_instance_of::<PyStopIteration>(py) => {
                let value = err.value(py).getattr(intern!(py, "value"))?;
                Step::Returned(value)
            }
            Err(err) => Step::Raised(err),
        };
        this.run(py, Some(it), step)
    }

    /// Closes the upstream awaitable being driven (the awaiting coroutine is being closed).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(it) = self.take_current() {
            let it = it.into_bound(py);
            if let Ok(close) = it.getattr(intern!(py, "close")) {
                close.call0()?;
            }
        }
        Ok(())
    }

    /// Always None: the pump has no Python frame of its own. With `gi_yieldfrom`, this lets
    /// await-chain walkers (trio's `Task.iter_await_frames`, a `cr_await` walk on asyncio)
    /// go through the pump as through a `@types.coroutine` generator.
    #[getter]
    fn gi_frame(&self, py: Python<'_>) -> Py<PyAny> {
        py.None()
    }

    /// The upstream awaitable's iterator being driven while the pump is suspended, else None
    /// (a generator's `gi_yieldfrom`): the await chain reaches the upstream's frames.
    #[getter]
    fn gi_yieldfrom(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|it| it.clone_ref(py))
    }

    /// Chunks recorded since the last `checkpointed()`.
    #[getter]
    fn since_checkpoint(&self) -> u32 {
        self.since.load(Ordering::Relaxed)
    }

    /// The Python loop gave the event loop a turn: counts from 0 again.
    fn checkpointed(&self) {
        self.since.store(0, Ordering::Relaxed);
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SoloPull>()?;
    m.add_class::<AsyncPump>()
}

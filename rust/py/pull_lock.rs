//! `PullLock`: a sync flight's pull lock, a reentrant lock owned by a thread (as
//! `threading.RLock`) that Rust code takes and gives back without a call into Python.
//!
//! `SoloPull` takes it once per chunk: through `RLock.acquire(False)` that was a Python call
//! with its argument parsing and a clock read, now it is one compare-and-swap.

use std::os::raw::c_ulong;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOverflowError, PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

extern "C" {
    /// CPython's identity of the calling thread (stable ABI; `threading.get_ident()`).
    fn PyThread_get_thread_ident() -> c_ulong;
}

/// The calling thread's identity, as `threading.get_ident()` (never 0: a `pthread_t`).
#[inline]
// c_ulong is u64 on Linux and macOS, u32 on Windows
#[allow(clippy::useless_conversion)]
pub(crate) fn thread_ident() -> u64 {
    // SAFETY: reads the calling thread's id; no argument, no Python state touched.
    u64::from(unsafe { PyThread_get_thread_ident() })
}

/// How long a blocking `acquire` waits before it checks for a signal (Ctrl-C) and waits again.
/// Every thread waits in such slices: only the thread that runs signal handlers (the main
/// thread, which a forked child may have changed) finds one, and the others' checks are free.
const SIGNAL_CHECK_EVERY: Duration = Duration::from_millis(20);

/// A reentrant lock owned by a thread: `threading.RLock`'s semantics, takeable from Rust.
///
/// `acquire(blocking=True, timeout=-1)`, `release()`, `with lock:` and `_is_owned()` behave as
/// `threading.RLock`'s: the thread that holds it may take it again and must give it back as
/// many times; a blocking `acquire` releases the GIL while it waits, honours `timeout`
/// (seconds, -1 for none) and, in the thread that handles signals, is interrupted by a handler that
/// raises (Ctrl-C: within 20 ms). `locked()` says whether any thread holds it. Unlike an
/// RLock, an uncontended `acquire(False)` from Rust reads no clock and parses no arguments.
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct PullLock {
    /// The holder's `thread_ident()`, 0 when free. Taken by compare-and-swap.
    owner: AtomicU64,
    /// How many times the holder took it; read and written by the holder only.
    count: AtomicU64,
    /// Threads parked in a blocking `acquire`: a release wakes them only when there are any.
    waiters: AtomicU32,
    /// Parking for blocking acquires. Locked only to park or to wake, never across a call into
    /// Python, and never while `owner` is being taken.
    park: Mutex<()>,
    freed: Condvar,
}

/// How a round of waiting ended.
enum Waited {
    Acquired,
    TimedOut,
    /// The slice ran out: check for a signal, then wait again.
    CheckSignals,
}

impl PullLock {
    /// Takes the lock for thread `me` without waiting (again, if `me` holds it).
    #[inline]
    pub(crate) fn try_acquire_as(&self, me: u64) -> bool {
        // SeqCst with `waiters` (see `release_as`): a parked thread and a releasing one always
        // see each other's write, so a release never misses a thread about to park.
        let owner = self.owner.load(Ordering::SeqCst);
        if owner == me {
            // only the holder touches the count
            self.count.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if owner == 0
            && self
                .owner
                .compare_exchange(0, me, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
        {
            self.count.store(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Gives back one hold of thread `me`; false if `me` does not hold the lock.
    #[inline]
    pub(crate) fn release_as(&self, me: u64) -> bool {
        if self.owner.load(Ordering::Relaxed) != me {
            return false;
        }
        let count = self.count.load(Ordering::Relaxed) - 1;
        self.count.store(count, Ordering::Relaxed);
        if count == 0 {
            self.owner.store(0, Ordering::SeqCst);
            if self.waiters.load(Ordering::SeqCst) != 0 {
                // Taking `park` orders this wake-up after the waiter's check of `owner`: it
                // either saw the lock free or is already waiting on `freed`. Every waiter is
                // woken: one that gave up at its deadline must not swallow the wake-up.
                let _parked = self.park.lock().unwrap_or_else(|e| e.into_inner());
                self.freed.notify_all();
            }
        }
        true
    }

    /// Waits (without the GIL) until `me` holds the lock, `deadline` passes, or (`slice`) it
    /// is time to check for a signal.
    fn wait_round(&self, me: u64, deadline: Option<Instant>, slice: Option<Duration>) -> Waited {
        let mut parked = self.park.lock().unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let slice_end = slice.map(|s| Instant::now() + s);
        let outcome = loop {
            if self.try_acquire_as(me) {
                break Waited::Acquired;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break Waited::TimedOut;
            }
            if slice_end.is_some_and(|s| now >= s) {
                break Waited::CheckSignals;
            }
            let until = match (deadline, slice_end) {
                (Some(d), Some(s)) => Some(d.min(s)),
                (d, s) => d.or(s),
            };
            parked = match until {
                None => self.freed.wait(parked).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    self.freed
                        .wait_timeout(parked, t.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        outcome
    }

    fn acquire_blocking(&self, py: Python<'_>, deadline: Option<Instant>) -> PyResult<bool> {
        let me = thread_ident();
        if self.try_acquire_as(me) {
            return Ok(true);
        }
        // Waits in slices and checks for a signal between them, as CPython's lock does when a
        // signal interrupts its wait. `PyErr_CheckSignals` does nothing in a thread that does
        // not handle signals; which thread does is not remembered (a child forked from another
        // thread handles them in that thread).
        loop {
            match py.detach(|| self.wait_round(me, deadline, Some(SIGNAL_CHECK_EVERY))) {
                Waited::Acquired => return Ok(true),
                Waited::TimedOut => return Ok(false),
                Waited::CheckSignals => {
                    // SAFETY: with the GIL held; -1 with an exception set when a handler raised.
                    if unsafe { ffi::PyErr_CheckSignals() } != 0 {
                        return Err(PyErr::take(py).unwrap_or_else(|| {
                            PyRuntimeError::new_err("a signal handler failed without error")
                        }));
                    }
                }
            }
        }
    }
}

#[pymethods]
impl PullLock {
    #[new]
    fn new() -> Self {
        PullLock {
            owner: AtomicU64::new(0),
            count: AtomicU64::new(0),
            waiters: AtomicU32::new(0),
            park: Mutex::new(()),
            freed: Condvar::new(),
        }
    }

    /// Takes the lock (again, if this thread holds it); see `threading.RLock.acquire`.
    #[pyo3(signature = (blocking = true, timeout = -1.0), text_signature = "(self, /, blocking=True, timeout=-1.0)")]
    fn acquire(&self, py: Python<'_>, blocking: bool, timeout: f64) -> PyResult<bool> {
        if !blocking {
            if timeout != -1.0 {
                return Err(PyValueError::new_err(
                    "can't specify a timeout for a non-blocking call",
                ));
            }
            return Ok(self.try_acquire_as(thread_ident()));
        }
        let deadline = if timeout == -1.0 {
            None
        } else if timeout < 0.0 || timeout.is_nan() {
            return Err(PyValueError::new_err(
                "timeout value must be a non-negative number",
            ));
        } else {
            let wait = Duration::try_from_secs_f64(timeout)
                .map_err(|_| PyOverflowError::new_err("timeout value is too large"))?;
            Some(
                Instant::now()
                    .checked_add(wait)
                    .ok_or_else(|| PyOverflowError::new_err("timeout value is too large"))?,
            )
        };
        self.acquire_blocking(py, deadline)
    }

    /// Gives back one hold; `RuntimeError` if this thread does not hold the lock.
    fn release(&self) -> PyResult<()> {
        if self.release_as(thread_ident()) {
            Ok(())
        } else {
            Err(PyRuntimeError::new_err("cannot release un-acquired lock"))
        }
    }

    fn __enter__(&self, py: Python<'_>) -> PyResult<bool> {
        self.acquire_blocking(py, None)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.release()
    }

    /// True if this thread holds the lock (`threading.RLock._is_owned`).
    fn _is_owned(&self) -> bool {
        self.owner.load(Ordering::Relaxed) == thread_ident()
    }

    /// True if some thread holds the lock.
    fn locked(&self) -> bool {
        self.owner.load(Ordering::SeqCst) != 0
    }

    fn __repr__(&self) -> String {
        let owner = self.owner.load(Ordering::SeqCst);
        if owner == 0 {
            "<unlocked chengeta_ai._core.PullLock>".to_owned()
        } else {
            format!(
                "<locked chengeta_ai._core.PullLock owner={owner} count={}>",
                self.count.load(Ordering::Relaxed)
            )
        }
    }
}

/// The calling OS thread's identity (CPython's `PyThread_get_thread_ident`: what
/// `threading.get_ident()` returns unless `threading` is monkey-patched, e.g. by gevent, to
/// tell greenlets apart). A `PullLock` is owned by an OS thread.
#[pyfunction(name = "thread_ident")]
fn py_thread_ident() -> u64 {
    thread_ident()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PullLock>()?;
    m.add_function(wrap_pyfunction!(py_thread_ident, m)?)
}

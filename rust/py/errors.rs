//! The exceptions chengeta_ai raises, defined once here and re-exported by
//! `chengeta_ai.errors`. Every one derives from `ChengetaError`, so `except ChengetaError`
//! catches all of them; `DecodeError` and `EncodeError` also keep the builtin they have always
//! derived from (`ValueError`, `TypeError`), so `except ValueError` keeps working.
//!
//! PyO3's `create_exception!` takes a single base, so the types are built here, once per
//! interpreter, by calling `type(name, bases, {"__module__": "chengeta_ai", "__doc__": doc})`
//! in [`new_exception_type`], the one place that makes them. Each Rust handle
//! (`DecodeError`, ...) implements `PyTypeInfo` exactly as `create_exception!` does, so Rust
//! code raises them the usual way: `DecodeError::new_err("...")`.

use pyo3::exceptions::{PyException, PyLookupError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple, PyType};

/// The module name every exception reports (`__module__`): the public package, so that
/// `repr`, tracebacks and pickling all go through `chengeta_ai.<Name>`.
const MODULE: &str = "chengeta_ai";

/// Builds one exception class: `type(name, bases, {"__module__": MODULE, "__doc__": doc})`.
fn new_exception_type<'py>(
    py: Python<'py>,
    name: &str,
    doc: &str,
    bases: &[Bound<'py, PyType>],
) -> PyResult<Bound<'py, PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__module__", MODULE)?;
    namespace.set_item("__doc__", doc)?;
    let bases = PyTuple::new(py, bases)?;
    py.get_type::<PyType>()
        .call1((name, bases, namespace))?
        .cast_into::<PyType>()
        .map_err(PyErr::from)
}

/// Declares a Rust handle for an exception class made by [`new_exception_type`]: the same
/// items `create_exception!` generates (`new_err`, `PyTypeInfo`), with several bases allowed.
/// It uses the two PyO3 macros `create_exception!` itself expands to in user crates
/// (`impl_exception_boilerplate!`, `pyobject_native_type_core!`); a PyO3 upgrade that changes
/// `create_exception!` may need the same change here.
macro_rules! chengeta_exception {
    ($name:ident, [$($base:ty),+ $(,)?], $doc:expr) => {
        #[doc = $doc]
        #[repr(transparent)]
        pub struct $name(pyo3::PyAny);

        pyo3::impl_exception_boilerplate!($name);

        pyo3::pyobject_native_type_core!(
            $name,
            $name::type_object_raw,
            #module = ::std::option::Option::Some(MODULE)
        );

        impl $name {
            fn type_object_raw(py: Python<'_>) -> *mut pyo3::ffi::PyTypeObject {
                // Built once per interpreter and kept alive by this static for the life of the
                // process, so the raw pointer handed to PyO3 never dangles.
                static TYPE_OBJECT: pyo3::sync::PyOnceLock<Py<PyType>> =
                    pyo3::sync::PyOnceLock::new();
                TYPE_OBJECT
                    .get_or_init(py, || {
                        let bases = [$(py.get_type::<$base>()),+];
                        new_exception_type(py, stringify!($name), $doc, &bases)
                            .expect(concat!("cannot create chengeta_ai.", stringify!($name)))
                            .unbind()
                    })
                    .as_ptr()
                    .cast()
            }
        }
    };
}

chengeta_exception!(
    ChengetaError,
    [PyException],
    "Base class of every error chengeta_ai raises on its own account."
);
chengeta_exception!(
    DecodeError,
    [ChengetaError, PyValueError],
    "Bytes that are not a valid chengeta_ai encoding: truncated, corrupt, foreign or of an unknown version."
);
chengeta_exception!(
    EncodeError,
    [ChengetaError, PyTypeError],
    "A value the compact codec cannot encode (unsupported type or unregistered model class)."
);
chengeta_exception!(
    ConsumerLagged,
    [ChengetaError],
    "A stream consumer fell behind the part of an in-flight stream that was already dropped."
);
chengeta_exception!(
    BackendError,
    [ChengetaError],
    "A storage backend failed (server unreachable, file locked, ...).

Raised by backends to the cache layers, which log it, count it and step aside: callers of
`get_or_stream` never see it."
);

chengeta_exception!(
    UpstreamLost,
    [ChengetaError],
    "The process producing a shared in-flight stream was lost (killed, partitioned, paused past
its lease) after this consumer had received part of the stream.

Raised only with `RedisFlights`: a consumer that had received nothing is moved to a new
producer transparently instead."
);

chengeta_exception!(
    CacheMiss,
    [ChengetaError, PyLookupError],
    "A call with `only_if_cached` found neither a stored entry nor an in-flight stream of its
request in this process. Raised before any chunk is handed over: nothing was called upstream."
);

/// Adds every exception class to `chengeta_ai._core` (and so to its `__all__`).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ChengetaError", py.get_type::<ChengetaError>())?;
    m.add("DecodeError", py.get_type::<DecodeError>())?;
    m.add("EncodeError", py.get_type::<EncodeError>())?;
    m.add("ConsumerLagged", py.get_type::<ConsumerLagged>())?;
    m.add("BackendError", py.get_type::<BackendError>())?;
    m.add("UpstreamLost", py.get_type::<UpstreamLost>())?;
    m.add("CacheMiss", py.get_type::<CacheMiss>())?;
    Ok(())
}

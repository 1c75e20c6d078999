//! The exceptions raised by `chengeta_ai._core`, defined once here and re-exported by
//! `chengeta_ai.errors`. Every Rust error converts to one of them in a single place.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    chengeta_ai,
    ChengetaError,
    PyException,
    "Base class of every error chengeta_ai raises on its own account."
);
create_exception!(
    chengeta_ai,
    DecodeError,
    PyValueError,
    "Bytes that are not a valid chengeta_ai encoding: truncated, corrupt, foreign or of an unknown version."
);
create_exception!(
    chengeta_ai,
    EncodeError,
    PyTypeError,
    "A value the compact codec cannot encode (unsupported type or unregistered model class)."
);
create_exception!(
    chengeta_ai,
    ConsumerLagged,
    ChengetaError,
    "A stream consumer fell behind the part of an in-flight stream that was already dropped."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ChengetaError", py.get_type::<ChengetaError>())?;
    m.add("DecodeError", py.get_type::<DecodeError>())?;
    m.add("EncodeError", py.get_type::<EncodeError>())?;
    m.add("ConsumerLagged", py.get_type::<ConsumerLagged>())?;
    Ok(())
}

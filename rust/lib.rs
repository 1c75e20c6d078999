//! chengeta_ai's Rust core.
//!
//! Pure-Rust modules (no PyO3) hold the logic and their tests:
//! - [`chunk_log`]: the append-only chunk log with per-consumer cursors and backpressure;
//! - [`keys`]: the canonical, typed request hash (BLAKE3) building blocks;
//! - [`codec`]: the compact, versioned binary format for chunk streams;
//! - [`timing`]: chunk arrival times, recorded and encoded for paced replay.
//!
//! `py/` adapts them to Python; it is compiled only with the `python` feature.

pub mod chunk_log;
pub mod codec;
pub mod keys;
pub mod timing;

#[cfg(feature = "python")]
mod py;

#[cfg(feature = "python")]
use pyo3::prelude::*;

/// The compiled core of chengeta_ai: chunk log, request hashing, compact codec.
#[cfg(feature = "python")]
#[pymodule(gil_used = true)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    py::errors::register(m)?;
    py::chunk_log::register(m)?;
    py::flight_pump::register(m)?;
    py::pull_lock::register(m)?;
    py::keys::register(m)?;
    py::codec::register(m)?;
    py::timing::register(m)?;
    Ok(())
}

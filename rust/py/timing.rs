//! `decode_timing`: the Python face of [`crate::timing::decode`].

use pyo3::prelude::*;

use crate::py::errors::DecodeError;
use crate::timing;

/// The arrival offsets, in seconds since the request's start, of a timing section (as made by
/// `ChunkLog.timing()`). Raises `DecodeError` on a corrupt section or one whose last offset is
/// above `max_total_seconds`.
#[pyfunction]
#[pyo3(signature = (data, /, *, max_total_seconds))]
fn decode_timing(data: &[u8], max_total_seconds: f64) -> PyResult<Vec<f64>> {
    let cap = if max_total_seconds.is_finite() && max_total_seconds > 0.0 {
        // saturating float-to-int cast: a cap above u64::MAX µs is no cap
        (max_total_seconds * 1e6) as u64
    } else {
        0
    };
    let offsets = timing::decode(data, cap).map_err(|e| DecodeError::new_err(e.to_string()))?;
    Ok(offsets.into_iter().map(|us| us as f64 / 1e6).collect())
}

/// Adds `decode_timing` to `chengeta_ai._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_timing, m)?)?;
    Ok(())
}

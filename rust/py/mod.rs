//! PyO3 adapters of the pure-Rust modules. Each submodule exposes a `register` function
//! that adds its classes and functions to `chengeta_ai._core`.

pub mod attr_reader;
pub mod chunk_log;
pub mod codec;
pub mod errors;
pub mod flight_pump;
pub mod keys;
pub mod pull_lock;
pub mod timing;

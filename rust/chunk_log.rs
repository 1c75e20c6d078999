//! placeholder: chunk_log (being written)

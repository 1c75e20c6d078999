//! placeholder: keys (being written)

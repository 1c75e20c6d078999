//! placeholder: codec (being written)

//! Maglev.

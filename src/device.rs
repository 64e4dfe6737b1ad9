//! device selection

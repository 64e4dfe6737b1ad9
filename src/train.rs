//! trainer step

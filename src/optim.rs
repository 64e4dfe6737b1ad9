//! SGD with momentum

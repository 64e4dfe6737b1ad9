//! The one error a section's `validate()` returns: which config field is wrong and what to
//! write instead. `config.rs` reports it as is, so every component names its fields the same
//! way (`section.field`), whatever the component.

/// A config field with a value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct FieldError {
    /// Dotted path of the field as written in the TOML file, e.g. `source.topics`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

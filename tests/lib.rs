//! Workspace-level tests of eda: `tests/ui` holds the trybuild cases of the macros,
//! `tests/*.rs` the end-to-end and delivery tests.

//! Policies: the format and its checks are `lichen_core::policy` (fuzzed
//! there without the engine); the live table of policies in force, read
//! from the policies directory and reloaded when it changes, is here.

pub use lichen_core::policy::*;

mod table;
pub use table::{PolicyStatus, PolicyTable, SecretCheck, WriteError};

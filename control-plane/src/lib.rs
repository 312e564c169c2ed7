//! `custody-control`: the Custody control plane.
//!
//! - [`assembly`]: hop events to chain trees with confidence and coverage.
//! - [`store`]: the storage trait and its embedded SQLite implementation.

pub mod assembly;
pub mod store;

//! `custody-protocols`: what Custody understands of database traffic.
//!
//! A pure library, driven byte by byte by the database sidecar: incremental
//! decoders for the PostgreSQL and MySQL wire protocols, SQL access analysis,
//! sqlcommenter extraction and data classification. It does no I/O, spawns
//! nothing and never panics on hostile input: a decoder returns what it
//! understood plus an error, and the caller can always fall back to passing
//! bytes through untouched.

pub mod classify;
pub mod mysql;
pub mod pg;
pub mod sql;
pub mod sqlcommenter;

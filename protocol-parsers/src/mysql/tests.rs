//! Tests of the MySQL decoder: synthetic packets, captured sessions, splits
//! and hostile input.

mod captures;
mod support;
mod synthetic;

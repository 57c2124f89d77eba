//! Shared helpers for integration tests. Use from a test file with `mod support;`.
#![allow(dead_code)]

pub mod cluster;
pub mod command;
pub mod db;
pub mod fixtures;
pub mod ha_db;
pub mod id;
pub mod operator;
pub mod proxy;
pub mod trials;
pub mod two_clusters;

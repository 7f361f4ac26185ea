//! End-to-end tests on the test bed: real PostgreSQL clusters, real Apache
//! Kafka brokers and the real `mmsync` binary as a child process. One test binary
//! (like etl's), one module per concern.

mod adopt;
mod apply;
mod capture;
mod chaos;
mod common;
mod constraints;
mod hardening;
mod join;
mod kafka;
mod mariadb;
mod observability;
mod races;
mod tombstones;

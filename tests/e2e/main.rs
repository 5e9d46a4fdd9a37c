//! End-to-end scenarios: the real `sbk` binary against real files, loop devices and
//! filesystems. One binary, a module per topic (see ../README.md in docs for what each covers).

mod bad_input;
mod changed_blocks;
mod common;
mod console;
mod copy;
mod dedup;
mod devices;
mod encryption;
mod faults;
mod files;
mod immutable;
mod interrupt;
mod jobs;
mod maintenance;
mod monitoring;
mod mount;
mod movers;
mod nbd_source;
mod operator;
mod repository;
mod retention_prune;
mod roundtrip;
mod s3;
mod s3_backend;
mod serve;
mod serve_protocol;
mod streams;
mod weed;

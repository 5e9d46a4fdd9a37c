//! The NBD protocol (NetworkBlockDevice `doc/proto.md`) for sbk: the wire format in [`proto`], a
//! [`server`] that serves any [`server::Catalog`] of exports, and a [`client`] that reads one.
//!
//! No crate implemented the server side with `NBD_OPT_GO` and structured replies when this was
//! written (nbd 0.3 has neither; tokio-nbd panics on them), so this one does, with the
//! protocol's constants in one place and every decoder of peer bytes fuzzed.

pub mod client;
pub mod proto;
pub mod server;

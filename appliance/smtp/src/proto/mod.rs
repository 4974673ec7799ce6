//! Sans-I/O protocol logic: the server session state machine and the client's building blocks.
//! Everything here is driven by bytes in and values out, so it is unit-tested and fuzzed
//! without sockets.

pub mod client;
pub mod server;

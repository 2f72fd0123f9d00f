//! Integration tests against the real embedded SpiceDB. They need the
//! library: `export SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)`.
//! One test binary (one link), one harness, a fresh server per test.

mod authz;
mod faults;
mod grpc;
mod helpers;

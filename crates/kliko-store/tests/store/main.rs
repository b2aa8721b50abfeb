//! The store's tests (ingest and materialize, fsck, the journal, maintenance, the stat
//! cache), in one test binary: one module per area (each used to be a binary of its own, and
//! each linked RocksDB).

mod common;
mod fsck;
mod ingest_materialize;
mod journal;
mod maintenance;
mod stat_cache;

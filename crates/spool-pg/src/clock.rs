//! The broker's clock. The database's `now()` is never used: every node
//! passes its own instant (nanoseconds since the Unix epoch:
//! `Clock::wall()`, or `Clock::manual` in tests) as a parameter, so tests
//! can stop time and every rule reads the same `now` through one operation.
//! The type is the one every broker uses.

pub use spool_broker::Clock;

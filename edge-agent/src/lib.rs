//! The edge agent: joins once, keeps a reverse tunnel to the gateway, and serves the
//! services the gateway opens streams for (SSH, and the test-only echo).

pub mod ssh;

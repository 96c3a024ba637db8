//! Harness for tsh sessions (owned by the SSH work).

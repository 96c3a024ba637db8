//! Harness for gateway and agent processes (owned by the tunnel work).

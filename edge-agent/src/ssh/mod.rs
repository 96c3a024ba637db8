//! The agent's in-process SSH server (russh), serving streams the gateway opens.

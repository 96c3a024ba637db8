//! Edgeport's client side: `tctl` (administrators, talks to the authority) and `tsh`
//! (users, talks to the gateway). The binaries in `src/bin/` are thin edges over these modules.

pub mod out;
pub mod schema;
pub mod shared;
pub mod text;

pub mod client;
pub mod tctl;

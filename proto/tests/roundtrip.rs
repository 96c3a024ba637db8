//! Every message of the wire protocol survives encode -> decode: the tunnel and join enums,
//! the dial enums, the control-stream messages and the RPC enums, from hand-written
//! strategies (`support/strategies.rs`) that cover every variant (checked below).
//!
//! "Equal" is compared through the encoding: most message types have no `PartialEq` (and
//! `CaBundle`'s leaves its signature out on purpose), and postcard's encoding of these types
//! is injective, so a decoded message that encodes to the same bytes is the same message.

// Test code: failing loudly is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/strategies.rs"]
mod strategies;

use std::collections::BTreeSet;

use edgeport_proto::frame::{decode, encode, split_frame};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde::{de::DeserializeOwned, Serialize};

fn roundtrip<T: Serialize + DeserializeOwned>(msg: &T) -> Result<(), TestCaseError> {
    let wire = encode(msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (body, used) = split_frame(&wire).unwrap().unwrap();
    prop_assert_eq!(used, wire.len());
    let back: T = decode(body).map_err(|e| TestCaseError::fail(format!("decode: {e}")))?;
    prop_assert_eq!(encode(&back).unwrap(), wire);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn rpc_requests(m in strategies::request()) { roundtrip(&m)?; }

    #[test]
    fn rpc_responses(m in strategies::response()) { roundtrip(&m)?; }

    #[test]
    fn agent_control(m in strategies::agent_control()) { roundtrip(&m)?; }

    #[test]
    fn gateway_control(m in strategies::gateway_control()) { roundtrip(&m)?; }

    #[test]
    fn join_messages(m in strategies::join_message(), r in strategies::join_reply()) {
        roundtrip(&m)?;
        roundtrip(&r)?;
    }

    #[test]
    fn stream_headers(m in strategies::stream_header()) { roundtrip(&m)?; }

    #[test]
    fn client_requests(m in strategies::client_request()) { roundtrip(&m)?; }

    #[test]
    fn client_replies(m in strategies::client_reply()) { roundtrip(&m)?; }

    #[test]
    fn audit_batches(b in strategies::audit_batch(), a in strategies::audit_ack()) {
        roundtrip(&b)?;
        roundtrip(&a)?;
    }
}

/// The variant tags (postcard's first byte, all below 128) a strategy produces.
fn tags<S: Strategy>(strategy: S) -> BTreeSet<u8>
where
    S::Value: Serialize,
{
    let mut runner = TestRunner::deterministic();
    (0..3000)
        .map(|_| {
            let v = strategy.new_tree(&mut runner).unwrap().current();
            postcard::to_stdvec(&v).unwrap()[0]
        })
        .collect()
}

/// Whether `n` is past the last variant of `T`: a tag with zeroed fields after it does not
/// decode (zeros decode as empty strings, lists, `None`, `false` and 0 for any variant that
/// exists), so a variant appended to an enum without a strategy fails the count below.
fn past_last_variant<T: serde::de::DeserializeOwned>(n: u8) -> bool {
    let mut bytes = vec![n];
    bytes.extend([0u8; 256]);
    postcard::from_bytes::<T>(&bytes).is_err()
}

/// The strategies reach every variant: a variant added to an enum must be added there too
/// (then update the count here).
#[test]
fn strategies_cover_every_variant() {
    let all = |n: u8| (0..n).collect::<BTreeSet<u8>>();
    assert!(past_last_variant::<edgeport_proto::rpc::Request>(77));
    assert!(past_last_variant::<edgeport_proto::rpc::Response>(43));
    assert!(past_last_variant::<edgeport_proto::tunnel::AgentControl>(8));
    assert!(past_last_variant::<edgeport_proto::tunnel::GatewayControl>(
        9
    ));
    assert!(past_last_variant::<edgeport_proto::tunnel::JoinReply>(2));
    assert!(past_last_variant::<edgeport_proto::tunnel::ClientRequest>(
        14
    ));
    assert!(past_last_variant::<edgeport_proto::tunnel::ClientReply>(14));
    assert_eq!(tags(strategies::request()), all(77), "rpc::Request");
    assert_eq!(tags(strategies::response()), all(43), "rpc::Response");
    assert_eq!(
        tags(strategies::agent_control()),
        all(8),
        "tunnel::AgentControl"
    );
    assert_eq!(
        tags(strategies::gateway_control()),
        all(9),
        "tunnel::GatewayControl"
    );
    assert_eq!(tags(strategies::join_reply()), all(2), "tunnel::JoinReply");
    assert_eq!(
        tags(strategies::client_request()),
        all(14),
        "tunnel::ClientRequest"
    );
    assert_eq!(
        tags(strategies::client_reply()),
        all(14),
        "tunnel::ClientReply"
    );
}

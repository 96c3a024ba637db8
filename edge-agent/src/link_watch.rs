//! Watching the device's route to the gateway while the agent waits to reconnect: a modem
//! that lost its bearer often loses its address and default route too, and gets them back
//! when coverage returns. Seeing the route come back (or leave from another address) ends
//! the wait at once instead of at the end of the backoff.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// How often the route is looked at (a socket and a connect(2): nothing is sent).
const EVERY: Duration = Duration::from_secs(1);

/// Resolves, with a line for the log, once the route to `gateway` appears or changes its
/// source address; never when the gateway's address is unknown (a name that does not
/// resolve now).
pub async fn route_changes(gateway: &str) -> String {
    let Some(peer) = peer(gateway).await else {
        return std::future::pending().await;
    };
    let first = crate::transport::route_source(peer);
    loop {
        tokio::time::sleep(EVERY).await;
        let now = crate::transport::route_source(peer);
        if let Some(why) = changed(first, now) {
            // A little jitter: devices that regain a shared uplink together do not all
            // knock at the same millisecond.
            tokio::time::sleep(EVERY.mul_f64(crate::backoff::unit_random())).await;
            return why;
        }
    }
}

/// The gateway's address: the literal, or one DNS answer within 2 s.
pub(crate) async fn peer(gateway: &str) -> Option<SocketAddr> {
    if let Ok(a) = gateway.parse() {
        return Some(a);
    }
    let lookup = tokio::net::lookup_host(gateway.to_string());
    match tokio::time::timeout(Duration::from_secs(2), lookup).await {
        Ok(Ok(mut addrs)) => addrs.next(),
        _ => None,
    }
}

/// What a change of the route's source address means, if it is one worth reconnecting for.
pub fn changed(before: Option<IpAddr>, now: Option<IpAddr>) -> Option<String> {
    match (before, now) {
        (None, Some(to)) => Some(format!("the route to the gateway is back (from {to})")),
        (Some(from), Some(to)) if from != to => Some(format!(
            "the route to the gateway now leaves from {to} (was {from})"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_route_that_appears_or_moves_counts() {
        let a: IpAddr = [10, 0, 0, 2].into();
        let b: IpAddr = [10, 1, 0, 2].into();
        assert_eq!(changed(Some(a), Some(a)), None);
        assert_eq!(changed(Some(a), None), None);
        assert_eq!(changed(None, None), None);
        assert!(changed(None, Some(a)).is_some_and(|w| w.contains("is back (from 10.0.0.2)")));
        assert!(changed(Some(a), Some(b)).is_some_and(|w| w.contains("was 10.0.0.2")));
    }

    #[tokio::test]
    async fn loopback_route_is_found_and_unknown_names_wait() {
        assert_eq!(
            crate::transport::route_source("127.0.0.1:9".parse().unwrap()),
            Some([127, 0, 0, 1].into())
        );
        let unknown = route_changes("no-such-host.invalid:1");
        assert!(tokio::time::timeout(Duration::from_secs(3), unknown)
            .await
            .is_err());
    }
}

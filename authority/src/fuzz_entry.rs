//! Entry points for fuzzing what the authority parses of single sign-on input itself (the
//! RPC frames are fuzzed in `edgeport_proto::fuzz_entry`). The cargo-fuzz targets in `fuzz/`
//! and the proptest harness in `authority/tests/fuzz_entries.rs` call these.

/// The parameters of a single sign-on login that come from outside: tsh's `redirect_uri`
/// (must be a loopback listener), the client address the gateway reports (bounds logins per
/// client) and the ID token whose payload names the user's groups (read after the token's
/// signature verified, but the provider is outside). Input: those fields, one per line:
/// `redirect_uri`, `client_addr`, `id_token`, `groups_claim`. (The callback's `code` and
/// `state` are only looked up or passed on; tsh's listener parses the callback itself.)
pub fn sso_callback(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut f = text.split('\n');
    let mut next = || f.next().unwrap_or_default();
    let (redirect, client, jwt, claim) = (next(), next(), next(), next());
    if let Ok(url) = crate::sso::loopback_redirect(redirect) {
        // Only loopback listeners pass, and the code never goes to a userinfo host.
        assert!(url.as_str().starts_with("http://"));
        assert!(!redirect.split('/').nth(2).unwrap_or_default().contains('@'));
    }
    if let Ok(ip) = crate::sso::client_ip(client) {
        let key = crate::sso::client_key(ip);
        // One /64 (or one IPv4 address) counts as one client, whatever the host bits.
        assert_eq!(crate::sso::client_key(key), key);
    }
    let groups = crate::sso::oidc::groups_of(jwt, claim);
    assert!(groups.len() <= jwt.len());
}

/// The fuzz targets of this crate, by name (as in `fuzz/fuzz_targets/`).
pub const TARGETS: &[edgeport_proto::fuzz_entry::Target] = &[("sso_callback", sso_callback)];

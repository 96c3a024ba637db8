//! Percent-decoding of request paths and query values, one decoder for every reader: the
//! gateway's web console queries, the Kubernetes paths and parameters its audit log names (as
//! the API server reads them), and tsh's single sign-on callback. A `%` not followed by two hex
//! digits stays as it is.

/// Decodes `%XX`; with `form`, also `+` as a space (query strings of HTML forms).
pub fn decode(s: &str, form: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            // Two hex digits exactly (`from_str_radix` alone would take `+A`).
            b'%' => match b
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            b'+' if form => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of `name` in a `k=v&k=v` query string, decoded as a form value (`+` is a
/// space). The key is compared as sent.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| decode(v, true))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_as_servers_do() {
        assert_eq!(decode("fleet%3Dvans", true), "fleet=vans");
        assert_eq!(decode("a+b", true), "a b");
        assert_eq!(decode("a+b", false), "a+b");
        assert_eq!(decode("kube%2Dsystem", false), "kube-system");
        assert_eq!(decode("%65xec", false), "exec");
        assert_eq!(decode("a%2", false), "a%2");
        assert_eq!(decode("%", false), "%");
        assert_eq!(decode("%zz%41", false), "%zzA");
        assert_eq!(decode("%ff", false), "\u{fffd}");
        assert_eq!(decode("a%20b+c", true), "a b c");
        assert_eq!(decode("http%3A%2F%2Fx", true), "http://x");
        assert_eq!(decode("50%", true), "50%");
        assert_eq!(decode("%+A", false), "%+A");
        assert_eq!(decode("%+A", true), "% A");
        assert_eq!(decode("%-1x", false), "%-1x");
    }

    #[test]
    fn finds_the_first_value_of_a_parameter() {
        assert_eq!(
            query_param("x=1&label=fleet%3Dvans", "label").as_deref(),
            Some("fleet=vans")
        );
        assert_eq!(
            query_param("state=a&state=b", "state").as_deref(),
            Some("a")
        );
        assert_eq!(query_param("statex=a&flag", "state"), None);
        assert_eq!(query_param("", "state"), None);
    }
}

//! Percent-decoding of request paths and query values, as the servers behind the gateway
//! read them (the web console's queries, and the Kubernetes API server's paths and
//! parameters that the audit log names). A `%` not followed by two hex digits stays as it is.

/// Decodes `%XX`; with `form`, also `+` as a space (query strings of HTML forms).
pub fn decode(s: &str, form: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match b
                .get(i + 1..i + 3)
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
    }
}
